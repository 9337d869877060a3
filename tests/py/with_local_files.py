#!/usr/bin/python3
"""Runs another tests/py script with libnbd URIs allowed to name local files.

usage: with_local_files.py SCRIPT [ARGS...]

libnbd refuses `?tls-certificates=DIR` in a URI unless the program calls
nbd_set_uri_allow_local_file(true); the shared scripts connect with plain connect_uri. Running as
root, libnbd's default certificate directory is /etc/pki/libnbd, which a test must not write to, so
the URI has to name the directory: this wrapper allows it for every handle, then runs SCRIPT as
its main program.
"""

import os
import runpy
import sys

import nbd

_connect_uri = nbd.NBD.connect_uri


def connect_uri(self, uri):
    self.set_uri_allow_local_file(True)
    return _connect_uri(self, uri)


nbd.NBD.connect_uri = connect_uri

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")

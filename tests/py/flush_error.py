#!/usr/bin/python3
"""A backing flush fails (the test's nbdkit fails FLUSH while a trigger file exists): no FLUSH or
FUA write may succeed afterwards, on this connection or another, until the operator clears it.

usage: flush_error.py URI PHASE [--trigger PATH]

Phases:
  fail     two connections write; the trigger appears; A's FLUSH fails; the trigger goes away;
           B's FLUSH, A's FLUSH again and a FUA write must still fail (CAN_MULTI_CONN).
  refused  (after a restart) FLUSH and a FUA write still fail.
  cleared  (after clear-flush-error) FLUSH and a FUA write succeed; the first write is intact.
"""

import argparse
import os

import nbd
from nbdtest import MIB, check, connect, expect_errno, main
import errno

FIRST = bytes(range(256)) * 16  # 4 KiB, flushed before the failure: must survive everything


def must_fail(what, fn):
    expect_errno(what, fn, errno.EIO)


def phase_fail(uri, trigger):
    a, b = connect(uri), connect(uri)
    check(a.can_multi_conn(), "the export must advertise CAN_MULTI_CONN")
    a.pwrite(FIRST, 0)
    a.flush()
    b.pwrite(b"\xbb" * 65536, 4 * MIB)
    open(trigger, "w").close()
    try:
        # Its write-intent commit is a FUA write, which on this backing syncs, and fails too.
        a.pwrite(b"\xaa" * 65536, 2 * MIB)
    except nbd.Error:
        pass
    must_fail("connection A's FLUSH while the backing fails it", a.flush)
    os.remove(trigger)
    must_fail("connection B's FLUSH after A's failed (its write may be lost)", b.flush)
    must_fail("A's second FLUSH", a.flush)
    must_fail("a FUA write", lambda: b.pwrite(b"\xcc" * 4096, 8 * MIB, nbd.CMD_FLAG_FUA))
    check(a.pread(len(FIRST), 0) == FIRST, "the write flushed before the failure reads back")


def phase_refused(uri):
    h = connect(uri)
    must_fail("FLUSH after a restart, before the operator cleared the error", h.flush)
    must_fail("a FUA write after a restart", lambda: h.pwrite(b"\xdd" * 4096, 8 * MIB, nbd.CMD_FLAG_FUA))


def phase_cleared(uri):
    h = connect(uri)
    h.pwrite(b"\xee" * 4096, 8 * MIB, nbd.CMD_FLAG_FUA)
    h.flush()
    check(h.pread(len(FIRST), 0) == FIRST, "the write flushed before the failure is intact")
    check(h.pread(4096, 8 * MIB) == b"\xee" * 4096, "the FUA write after the clear reads back")


def run():
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("phase", choices=["fail", "refused", "cleared"])
    p.add_argument("--trigger")
    a = p.parse_args()
    if a.phase == "fail":
        phase_fail(a.uri, a.trigger)
    elif a.phase == "refused":
        phase_refused(a.uri)
    else:
        phase_cleared(a.uri)


main(run)

#!/usr/bin/python3
"""usage: pwrite.py URI OFFSET LENGTH BYTE: writes LENGTH copies of BYTE (e.g. 0x5a) at OFFSET,
flushes, and reads the range back."""

import sys

from nbdtest import check, connect, main


def run():
    uri, off, n, byte = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4], 0)
    h = connect(uri, meta=False)
    data = bytes([byte]) * n
    h.pwrite(data, off)
    h.flush()
    check(h.pread(n, off) == data, f"read back of {n} bytes at {off} differs")
    h.shutdown()


if __name__ == "__main__":
    main(run)

#!/usr/bin/python3
"""Requests a correct server must refuse, and the error each must get; the connection must keep
working after every one of them.

usage: errors.py URI SIZE [--read-only] [--no-structured]

libnbd normally refuses such requests itself; strict mode 0 makes it send them to the server.
"""

import argparse
import errno

import nbd
from nbdtest import MIB, check, connect, expect_errno, main

MAX_PAYLOAD = 32 * MIB


def run():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("size", type=int)
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--no-structured", action="store_true")
    args = ap.parse_args()
    size = args.size
    structured = not args.no_structured
    h = connect(args.uri, structured=structured)
    h.set_strict_mode(0)
    check(h.get_size() == size, f"export size {h.get_size()}, expected {size}")
    check(h.is_read_only() == args.read_only, f"is_read_only() = {h.is_read_only()}")

    marker = bytes(range(256)) * 16

    def alive(what):
        # A server that mishandled the previous request (left a payload unread, replied twice, or
        # dropped the connection) fails this read or returns wrong bytes.
        got = h.pread(len(marker), 8192)
        if not args.read_only:
            check(got == marker, f"after {what}: the connection returned wrong data")

    if not args.read_only:
        h.pwrite(marker, 8192)
    alive("setup")

    # Out of bounds: reads and trims get EINVAL, writes and zeroes ENOSPC. A whole 1 MiB payload
    # follows the refused write, and the server must read it off the socket.
    expect_errno("read past the end", lambda: h.pread(2, size - 1), errno.EINVAL)
    alive("read past the end")
    expect_errno("read starting at the end", lambda: h.pread(1, size), errno.EINVAL)
    alive("read at the end")
    # offset + length overflows 64 bits: a bounds check that adds naively would accept it.
    expect_errno("read with offset + length past 2^64", lambda: h.pread(8192, (1 << 64) - 4096), errno.EINVAL)
    alive("read with a wrapping offset")
    if args.read_only:
        # Writes of any kind are refused with EPERM on a read-only export, in bounds or not.
        expect_errno("write on a read-only export", lambda: h.pwrite(b"x" * 4096, 0), errno.EPERM)
        alive("write on a read-only export")
        expect_errno("1 MiB write on a read-only export", lambda: h.pwrite(b"y" * MIB, 4096), errno.EPERM)
        alive("1 MiB write on a read-only export")
        expect_errno("zero on a read-only export", lambda: h.zero(4096, 0), errno.EPERM)
        alive("zero on a read-only export")
        expect_errno("trim on a read-only export", lambda: h.trim(4096, 0), errno.EPERM)
        alive("trim on a read-only export")
        check(h.pread(4096, 0) == bytes(4096), "a read-only fresh export does not read as zeroes")
    else:
        expect_errno("write past the end", lambda: h.pwrite(b"z" * MIB, size - MIB + 1), errno.ENOSPC)
        alive("write past the end")
        expect_errno("write starting past the end", lambda: h.pwrite(b"z" * 4096, size + 4096), errno.ENOSPC)
        alive("write beyond the end")
        expect_errno("zero past the end", lambda: h.zero(8192, size - 4096), errno.ENOSPC)
        alive("zero past the end")
        expect_errno("trim past the end", lambda: h.trim(8192, size - 4096), errno.EINVAL)
        alive("trim past the end")
        # A refused write changes nothing inside the export either.
        check(h.pread(MIB - 1, size - MIB + 1) == bytes(MIB - 1), "a refused write past the end modified the export")

    # Reads over the maximum payload: EOVERFLOW with structured replies, EINVAL without.
    big = MAX_PAYLOAD + 4096
    if size > big:
        expect_errno(
            "read over 32 MiB", lambda: h.pread(big, 0), errno.EOVERFLOW if structured else errno.EINVAL
        )
        alive("read over 32 MiB")
        # Exactly the maximum payload is fine.
        check(len(h.pread(MAX_PAYLOAD, 0)) == MAX_PAYLOAD, "read of exactly 32 MiB")
        alive("read of 32 MiB")

    if structured:
        expect_errno("block status past the end", lambda: h.block_status(4096, size, lambda *a: 0), errno.EINVAL)
        alive("block status past the end")

    # An unknown command flag (bit 6 has no meaning) is refused with EINVAL.
    expect_errno("read with an unknown flag", lambda: h.pread(512, 0, 1 << 6), errno.EINVAL)
    alive("read with an unknown flag")

    # Zero-length requests: the spec leaves the result open, but the server must answer and stay
    # in sync.
    for what, fn in [
        ("zero-length read", lambda: h.pread(0, 0)),
        ("zero-length write", lambda: h.pwrite(b"", 0)),
        ("zero-length trim", lambda: h.trim(0, 0)),
        ("zero-length zero", lambda: h.zero(0, 0)),
        ("zero-length cache", lambda: h.cache(0, 0)),
    ]:
        try:
            fn()
        except nbd.Error:
            pass  # any error reply is acceptable here; losing the connection is not
        alive(what)

    h.flush()
    h.shutdown()


if __name__ == "__main__":
    main(run)

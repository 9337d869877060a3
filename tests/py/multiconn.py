#!/usr/bin/python3
"""Two connections to one export: what one writes and flushes, the other reads.

usage: multiconn.py URI SIZE [--seed N]

The server advertises CAN_MULTI_CONN, which promises that a FLUSH on one connection makes every
write completed on any connection visible to all of them; so each round writes on one connection,
flushes it, and reads on the other, in both directions, with writes, FUA writes and zeroes.
"""

import argparse
import random

import nbd
from nbdtest import check, connect, main


def run():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("size", type=int)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    size = args.size
    a = connect(args.uri)
    b = connect(args.uri)
    for h in (a, b):
        check(h.can_multi_conn(), "can_multi_conn() is false")
        check(h.get_size() == size, f"export size {h.get_size()}, expected {size}")

    for i in range(200):
        w, r = (a, b) if i % 2 == 0 else (b, a)
        n = rng.choice([1, 3, 511, 4096, 4097, 65536, rng.randint(1, 1 << 20)])
        off = rng.randrange(0, size - n)
        # Read first, through the connection that will observe the change, so any cache it keeps
        # holds the old bytes.
        r.pread(n, off)
        kind = rng.choice(["write", "fua", "zero"])
        if kind == "zero":
            w.pwrite(b"\x5a" * n, off)
            w.flush()
            check(r.pread(n, off) == b"\x5a" * n, f"round {i}: write+flush of {n} at {off} not seen")
            w.zero(n, off)
            expect = bytes(n)
        else:
            expect = rng.randbytes(n)
            w.pwrite(expect, off, nbd.CMD_FLAG_FUA if kind == "fua" else 0)
        w.flush()
        got = r.pread(n, off)
        check(got == expect, f"round {i}: {kind} of {n} bytes at {off} on one connection, flushed, "
              f"not seen by the other (first bytes {got[:8].hex()} vs {expect[:8].hex()})")

    a.shutdown()
    b.shutdown()


if __name__ == "__main__":
    main(run)

#!/usr/bin/python3
"""Seeded reads and writes against the mirror, checked against a file that holds the bytes the
export must hold; with events (create a file, kill a process) fired at fixed operation counts, so a
fault lands at the same point of the workload on every run.

usage: mirror_rw.py URI --expect FILE [--seed N] [--ops N] [--no-initial-check]
                    [--event OPS:touch:PATH] [--event OPS:kill:PID] [--event OPS:rm:PATH]

FILE holds the expected content of the whole export; it is created as zeroes (a fresh export) when
it does not exist, and rewritten (atomically) at the end. The script first reads the whole export
and compares it with FILE (the restart / rebuild / degraded check), then runs --ops operations:
reads of random ranges (compared), writes of random data, WRITE_ZEROES, FLUSH, and every 50
operations a sweep that reads 16 MiB in order, so that reads reach every region and not only the
ones the random ranges happen to hit. At the end it flushes and reads everything once more.

Any error reply fails the run: the mirror must absorb every cache fault. Exit status 0, or 1 with
the operation, offset, seed and operation number on stderr.
"""

import argparse
import os
import random
import signal
import sys

import nbd

MIB = 1 << 20
CHUNK = 4 * MIB


class Mismatch(Exception):
    pass


def first_diff(a, b):
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


def compare(what, expect, off, got):
    want = memoryview(expect)[off : off + len(got)]
    if want != memoryview(got):
        i = first_diff(want, got)
        raise Mismatch(
            f"{what}: mismatch at offset {off + i} (read of {len(got)} bytes at {off}): "
            f"expected {bytes(want[i:i + 16]).hex()} got {bytes(got[i:i + 16]).hex()}"
        )


def check_all(h, expect, what):
    for pos in range(0, len(expect), CHUNK):
        n = min(CHUNK, len(expect) - pos)
        compare(f"{what}: read at {pos}", expect, pos, h.pread(n, pos))


def pick(rng, size):
    r = rng.random()
    if r < 0.5:  # aligned 4 KiB multiples: the common case
        n = 4096 * rng.randint(1, 32)
        off = 4096 * rng.randrange(0, (size - n) // 4096 + 1)
    elif r < 0.8:  # unaligned, small
        n = rng.randint(1, 20000)
        off = rng.randrange(0, size - n + 1)
    else:  # large, crossing several regions
        n = rng.randint(1, 3 * MIB)
        off = rng.randrange(0, size - n + 1)
    return off, n


def fire(event):
    _, action, arg = event
    if action == "touch":
        open(arg, "w").close()
    elif action == "kill":
        os.kill(int(arg), signal.SIGKILL)
    elif action == "rm":
        os.unlink(arg)
    else:
        raise Mismatch(f"unknown event action {action!r}")
    print(f"event: {action} {arg}", flush=True)


def run():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("--expect", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=600)
    ap.add_argument("--no-initial-check", action="store_true")
    ap.add_argument("--event", action="append", default=[])
    args = ap.parse_args()
    events = []
    for e in args.event:
        k, action, arg = e.split(":", 2)
        events.append((int(k), action, arg))
    events.sort()

    h = nbd.NBD()
    h.connect_uri(args.uri)
    size = h.get_size()
    if os.path.exists(args.expect):
        with open(args.expect, "rb") as f:
            expect = bytearray(f.read())
        if len(expect) != size:
            raise Mismatch(f"{args.expect} holds {len(expect)} bytes but the export has {size}")
    else:
        expect = bytearray(size)

    op = "initial check"
    i = 0
    rng = random.Random(args.seed)
    try:
        if not args.no_initial_check:
            check_all(h, expect, "initial check")
        sweep = 0
        for i in range(args.ops):
            while events and events[0][0] <= i:
                fire(events.pop(0))
            r = rng.random()
            if i % 50 == 49:
                n = min(16 * MIB, size)
                off = (sweep * 16 * MIB) % (size - n + 1) if size > n else 0
                sweep += 1
                op = f"sweep read({off}, {n})"
                compare(op, expect, off, h.pread(n, off))
            elif r < 0.45:
                off, n = pick(rng, size)
                op = f"read({off}, {n})"
                compare(op, expect, off, h.pread(n, off))
            elif r < 0.88:
                off, n = pick(rng, size)
                data = rng.randbytes(n)
                fua = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
                op = f"write({off}, {n}, fua={bool(fua)})"
                h.pwrite(data, off, fua)
                expect[off : off + n] = data
            elif r < 0.94:
                off, n = pick(rng, size)
                op = f"zero({off}, {n})"
                h.zero(n, off)
                expect[off : off + n] = bytes(n)
            else:
                op = "flush"
                h.flush()
        while events:
            fire(events.pop(0))
        op = "final flush"
        h.flush()
        check_all(h, expect, "final check")
        h.shutdown()
    except nbd.Error as e:
        raise Mismatch(f"operation {i} {op}: the client got an error: {e} (errno {e.errnum})")
    except Mismatch as e:
        raise Mismatch(f"operation {i}: {e}")
    tmp = args.expect + ".tmp"
    with open(tmp, "wb") as f:
        f.write(expect)
    os.rename(tmp, args.expect)
    print(f"OK: {args.ops} operations, size {size}")


if __name__ == "__main__":
    try:
        run()
    except Mismatch as e:
        print(f"FAIL: {e}\nreplay: {' '.join(sys.argv)}", file=sys.stderr)
        sys.exit(1)

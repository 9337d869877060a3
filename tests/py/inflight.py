#!/usr/bin/python3
"""Many requests in flight on one connection: 128 writes, then 128 reads, then 128 mixed reads and
writes, each issued before any reply is collected; every reply is checked.

usage: inflight.py URI SIZE [--seed N] [--no-structured]

The ranges of one batch never overlap, because the spec does not order concurrent requests. A final
batch of 32 MiB-class writes pushes past any in-flight byte budget the server has, which must delay
requests rather than fail them.
"""

import argparse
import random

import nbd
from nbdtest import MIB, Model, check, connect, fail, main

DEPTH = 128


def disjoint_ranges(rng, size, count, max_len):
    """`count` non-overlapping (offset, length) ranges, shuffled, with unaligned edges."""
    slot = size // count
    check(slot > max_len, "export too small for the requested batch")
    ranges = []
    for i in range(count):
        n = rng.randint(1, max_len)
        off = i * slot + rng.randint(0, slot - n)
        ranges.append((off, n))
    rng.shuffle(ranges)
    return ranges


def wait_all(h, cookies, what):
    """Polls until every cookie has completed; aio_command_completed raises if a command failed."""
    pending = set(cookies)
    while pending:
        if h.aio_in_flight() > 0:
            h.poll(-1)
        for c in list(pending):
            try:
                if h.aio_command_completed(c):
                    pending.discard(c)
            except nbd.Error as e:
                fail(f"{what}: command {cookies[c]} failed: {e}")
        check(pending == set() or h.aio_in_flight() > 0, f"{what}: {len(pending)} commands lost")


def run():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("size", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-structured", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    size = args.size
    h = connect(args.uri, structured=not args.no_structured, meta=False)
    model = Model(size)

    # 1. DEPTH writes in flight.
    ranges = disjoint_ranges(rng, size, DEPTH, 96 * 1024)
    cookies = {}
    keep = []  # buffers must stay alive until their command completes
    for off, n in ranges:
        data = rng.randbytes(n)
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        keep.append(buf)
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
        cookies[h.aio_pwrite(buf, off, flags=flags)] = f"write({off}, {n})"
        model.write(off, data)
    wait_all(h, cookies, "write batch")

    # 2. DEPTH reads in flight over the same ranges, in a different order.
    rng.shuffle(ranges)
    reads = {}
    for off, n in ranges:
        buf = nbd.Buffer(n)
        reads[h.aio_pread(buf, off)] = (off, n, buf)
    # Read requests are bare headers, so libnbd sends all of them without collecting a reply: this
    # guards the premise that the server really had DEPTH requests outstanding at once.
    check(h.aio_in_flight() == DEPTH, f"only {h.aio_in_flight()} of {DEPTH} reads in flight")
    wait_all(h, {c: f"read({o}, {n})" for c, (o, n, _) in reads.items()}, "read batch")
    for off, n, buf in reads.values():
        model.verify(f"read batch ({off}, {n})", off, buf.to_bytearray())

    # 3. Mixed: reads of old ranges interleaved with writes, zeroes and trims of new ones; a range is
    # touched by only one request of the batch.
    old = ranges[: DEPTH // 2]
    new = disjoint_ranges(rng, size, DEPTH, 64 * 1024)
    new = [r for r in new if all(r[0] + r[1] <= o or o + m <= r[0] for o, m in old)][: DEPTH // 2]
    cookies, reads, keep = {}, {}, []
    for i in range(max(len(old), len(new))):
        if i < len(old):
            off, n = old[i]
            buf = nbd.Buffer(n)
            c = h.aio_pread(buf, off)
            reads[c] = (off, n, buf)
            cookies[c] = f"read({off}, {n})"
        if i < len(new):
            off, n = new[i]
            if i % 8 == 7:
                cookies[h.aio_zero(n, off)] = f"zero({off}, {n})"
                model.zero(off, n)
            elif i % 8 == 3:
                cookies[h.aio_trim(n, off)] = f"trim({off}, {n})"
                model.forget(off, n)
            else:
                data = rng.randbytes(n)
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                keep.append(buf)
                cookies[h.aio_pwrite(buf, off)] = f"write({off}, {n})"
    # Reads saw the state before this batch's writes (disjoint ranges), so check them first.
    wait_all(h, cookies, "mixed batch")
    for off, n, buf in reads.values():
        model.verify(f"mixed batch read ({off}, {n})", off, buf.to_bytearray())
    for i, (off, n) in enumerate(new):
        if i % 8 not in (3, 7):
            model.write(off, bytes(keep.pop(0).to_bytearray()))

    # 4. Large writes: 12 x (up to) 4 MiB in flight, 48 MiB at once, beyond any sane byte budget.
    big = disjoint_ranges(rng, size, 12, 4 * MIB) if size >= 60 * MIB else []
    cookies, keep = {}, []
    for off, n in big:
        data = rng.randbytes(n)
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        keep.append(buf)
        cookies[h.aio_pwrite(buf, off)] = f"write({off}, {n})"
        model.write(off, data)
    cookies[h.aio_flush()] = "flush"
    wait_all(h, cookies, "large batch")

    for pos in range(0, size, 8 * MIB):
        n = min(8 * MIB, size - pos)
        model.verify(f"final read at {pos}", pos, h.pread(n, pos))
    h.shutdown()


if __name__ == "__main__":
    main(run)

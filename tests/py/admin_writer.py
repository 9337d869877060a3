"""Writes seeded 4 KiB blocks at random offsets for a while, flushing now and then, then reads every
written block back and compares. Any client-visible error fails it: cache swaps, failures and
rebuilds under it must be invisible to clients.
Usage: admin_writer.py URI SPAN_BYTES SECONDS SEED
"""
import random
import sys
import time

import nbd

BLOCK = 4096


def block(seed, offset, version):
    r = random.Random(f"{seed}:{offset}:{version}")
    return r.randbytes(BLOCK)


def main():
    uri, span, seconds, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(seed)
    latest = {}
    deadline = time.monotonic() + seconds
    writes = 0
    while time.monotonic() < deadline:
        off = rng.randrange(span // BLOCK) * BLOCK
        version = latest.get(off, 0) + 1
        h.pwrite(block(seed, off, version), off)
        latest[off] = version
        writes += 1
        if writes % 64 == 0:
            h.flush()
    h.flush()
    bad = [off for off, v in latest.items() if h.pread(BLOCK, off) != block(seed, off, v)]
    h.shutdown()
    if bad:
        sys.exit(f"{len(bad)} of {len(latest)} blocks read back wrong, first at offset {bad[0]}")
    print(f"ok writes={writes} blocks={len(latest)}")


if __name__ == "__main__":
    main()

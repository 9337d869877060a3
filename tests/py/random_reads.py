#!/usr/bin/python3
"""Random 4 KiB reads with several in flight; each block must hold the byte its MiB was written
with (MiB i filled with byte i + 1 by the test).

usage: random_reads.py URI COUNT SEED
Prints `OK reads=N` on success; exits non-zero on the first wrong byte or error.
"""

import random
import sys

import nbd

BLOCK = 4096
IN_FLIGHT = 8


def main():
    uri, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // BLOCK
    pending = []
    done = 0

    def check(buf, offset):
        want = bytes([(offset >> 20) + 1]) * BLOCK
        if bytes(buf) != want:
            raise SystemExit(f"wrong data at {offset}: {bytes(buf)[:8].hex()}…")

    issued = 0
    while done < count:
        while issued < count and len(pending) < IN_FLIGHT:
            offset = rng.randrange(blocks) * BLOCK
            buf = nbd.Buffer(BLOCK)
            cookie = h.aio_pread(buf, offset)
            pending.append((cookie, buf, offset))
            issued += 1
        h.poll(-1)
        still = []
        for cookie, buf, offset in pending:
            if h.aio_command_completed(cookie):
                check(buf.to_bytearray(), offset)
                done += 1
            else:
                still.append((cookie, buf, offset))
        pending = still
    h.shutdown()
    print(f"OK reads={done}")


if __name__ == "__main__":
    main()

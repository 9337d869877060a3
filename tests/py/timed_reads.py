#!/usr/bin/python3
"""Random 4 KiB reads, 4 in flight, for a number of seconds; every block is compared with the
file the export was written from, and the latency of each read is kept.

usage: timed_reads.py URI EXPECTED_FILE SECONDS SEED
Prints one JSON line: reads, p50_us, p99_us. Exits non-zero on the first wrong byte or error.
"""

import json
import random
import sys
import time

import nbd

BLOCK = 4096
IN_FLIGHT = 4


def percentile(sorted_us, p):
    if not sorted_us:
        return None
    return sorted_us[min(len(sorted_us) - 1, int(len(sorted_us) * p))]


def main():
    uri, expected_path, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    with open(expected_path, "rb") as f:
        expected = f.read()
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = min(h.get_size(), len(expected)) // BLOCK
    pending = []
    took_us = []
    end = time.monotonic() + seconds
    while pending or time.monotonic() < end:
        while len(pending) < IN_FLIGHT and time.monotonic() < end:
            offset = rng.randrange(blocks) * BLOCK
            buf = nbd.Buffer(BLOCK)
            pending.append((h.aio_pread(buf, offset), buf, offset, time.monotonic()))
        h.poll(-1)
        still = []
        for cookie, buf, offset, started in pending:
            if h.aio_command_completed(cookie):
                took_us.append((time.monotonic() - started) * 1e6)
                if bytes(buf.to_bytearray()) != expected[offset : offset + BLOCK]:
                    raise SystemExit(f"wrong data at {offset}")
            else:
                still.append((cookie, buf, offset, started))
        pending = still
    h.shutdown()
    took_us.sort()
    print(json.dumps({"reads": len(took_us), "p50_us": percentile(took_us, 0.5), "p99_us": percentile(took_us, 0.99)}))


if __name__ == "__main__":
    main()

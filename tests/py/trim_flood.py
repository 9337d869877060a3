#!/usr/bin/python3
"""Thousands of 4 GiB TRIMs in flight on one connection, each over a different part of a
many-TiB export: the server must answer all of them without its memory growing with the number
of regions they span (one registration per request, not one per region).

usage: trim_flood.py URI COUNT
"""

import sys

from nbdtest import check, connect, main

TRIM_BYTES = (4 << 30) - 4096


def run():
    uri, count = sys.argv[1], int(sys.argv[2])
    h = connect(uri, meta=False)
    size = h.get_size()
    check(size >= count * (4 << 30), f"export of {size} bytes too small for {count} trims")
    for i in range(count):
        h.aio_trim(TRIM_BYTES, i * (4 << 30))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    # aio_trim without a completion callback: errors surface from aio_command_completed.
    print(f"{count} trims answered")


main(run)

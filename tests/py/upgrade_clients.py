#!/usr/bin/python3
"""Clients that keep DEPTH requests in flight on each connection until STOPFILE appears, checking
that every request completes exactly once and every read returns what was last written there.
Meant to run while the daemon is upgraded in place (or killed and restarted, with --reconnect off):
libnbd itself fails on a reply to a cookie it does not know, so an answer sent twice or to the
wrong request is an error here, and so is a request that never completes.

usage: upgrade_clients.py STOPFILE SIZE URI [URI ...] [--depth 64] [--seed N]

Each URI gets one connection and its own slice of the disk, cut into DEPTH slots of SLOT bytes;
each slot alternates "write a pattern" and "read it back". Prints, per connection, the requests
completed and the longest gap between two completions (the pause it saw), then OK.
"""

import argparse
import os
import random
import threading
import time

import nbd
from nbdtest import check, connect, fail, main

SLOT = 64 * 1024


class Conn:
    def __init__(self, uri, base, depth, seed, structured):
        self.h = connect(uri, structured=structured, meta=False)
        self.base = base
        self.depth = depth
        self.rng = random.Random(seed)
        self.gen = [0] * depth  # generation of the pattern last written per slot (0: none yet)
        self.done = 0
        self.issued = 0
        self.max_gap = 0.0
        self.last = time.monotonic()
        self.error = None
        self.seen = set()
        # Completion callbacks must not call into libnbd: they queue the slot's next request here.
        self.todo = []

    def pattern(self, slot, gen):
        head = f"slot {slot} gen {gen} ".encode()
        return (head * (SLOT // len(head) + 1))[:SLOT]

    def completed(self, tag):
        check(tag not in self.seen, f"request {tag} completed twice")
        self.seen.add(tag)
        now = time.monotonic()
        self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        self.done += 1

    def issue(self, slot, write):
        off = self.base + slot * SLOT
        tag = self.issued
        self.issued += 1
        if write:
            gen = self.gen[slot] + 1
            buf = nbd.Buffer.from_bytearray(bytearray(self.pattern(slot, gen)))

            def on_write(err, slot=slot, gen=gen, tag=tag, buf=buf):
                if err.value != 0:
                    self.error = f"write slot {slot} gen {gen}: errno {err.value}"
                    return 1
                self.completed(tag)
                self.gen[slot] = gen
                self.todo.append((slot, False))
                return 1

            self.h.aio_pwrite(buf, off, completion=on_write)
        else:
            buf = nbd.Buffer(SLOT)

            def on_read(err, slot=slot, tag=tag, buf=buf):
                if err.value != 0:
                    self.error = f"read slot {slot}: errno {err.value}"
                    return 1
                self.completed(tag)
                got = bytes(buf.to_bytearray())
                want = self.pattern(slot, self.gen[slot])
                if got != want:
                    self.error = f"slot {slot}: read {got[:24]!r}…, expected gen {self.gen[slot]}"
                    return 1
                self.todo.append((slot, self.rng.random() < 0.5))
                return 1

            self.h.aio_pread(buf, off, completion=on_read)

    def run(self, stopfile):
        try:
            for slot in range(self.depth):
                self.issue(slot, True)
            while not os.path.exists(stopfile) and self.error is None:
                self.h.poll(100)
                todo, self.todo = self.todo, []
                for slot, write in todo:
                    self.issue(slot, write)
            # Let what is in flight finish; nothing new is issued once the stop file exists.
            deadline = time.monotonic() + 60
            while self.h.aio_in_flight() > 0 and self.error is None:
                check(time.monotonic() < deadline, f"{self.h.aio_in_flight()} requests never completed")
                self.h.poll(100)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.error = f"{type(e).__name__}: {e}"


def run():
    ap = argparse.ArgumentParser()
    ap.add_argument("stopfile")
    ap.add_argument("size", type=int)
    ap.add_argument("uris", nargs="+")
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    share = args.size // len(args.uris)
    check(share >= args.depth * SLOT, "export too small for this many slots")
    # The last connection negotiates no structured replies: both reply forms cross the upgrade.
    conns = [
        Conn(u, i * share, args.depth, args.seed + i, structured=(i + 1 < len(args.uris) or len(args.uris) == 1))
        for i, u in enumerate(args.uris)
    ]
    threads = [threading.Thread(target=c.run, args=(args.stopfile,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, c in enumerate(conns):
        if c.error:
            fail(f"connection {i} ({args.uris[i]}): {c.error}")
        check(c.done == c.issued, f"connection {i}: {c.issued} issued, {c.done} completed")
        print(f"connection {i}: {c.done} requests, longest pause {c.max_gap * 1000:.0f} ms")
        c.h.shutdown()


main(run)

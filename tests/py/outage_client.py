#!/usr/bin/python3
"""The client side of tests/outage.rs: what a client sees before, during and after a backing stall.

usage: outage_client.py URI fill   --expect FILE --size N --seed S
       outage_client.py URI touch  --expect FILE --seed S --write OFF:LEN [--write OFF:LEN ...]
       outage_client.py URI during --expect FILE --failed FILE --deadline-ms D --seed S
                                   --write OFF:LEN [--write OFF:LEN ...] [--plain]
       outage_client.py URI after  --expect FILE --failed FILE --seed S

fill    writes seeded random data over the whole export, flushes, reads it back and saves it in FILE
        (the bytes the export must hold).
touch   writes seeded data into the ranges (it must succeed) and updates FILE.
during  runs while the backing does not answer. Each --write is issued asynchronously and must fail
        with EIO, never succeed, within the deadline plus slack. With the mirror, while the first
        write is still pending, reads of ranges the writes do not touch must return the expected
        bytes, each within the deadline (the cache serves them; nothing waits for the backing).
        With --plain (no cache) reads must fail with EIO too, within the deadline. A FLUSH must
        fail. The failed writes (offset and data) are saved in --failed.
after   runs once the backing answers again: each failed write's range must read as, byte by byte,
        its old or its new content, and the same on a second read (one story, whichever copy
        serves it); FILE is updated to what was read. Then seeded writes and a flush must succeed,
        and the whole export must read as FILE.

Exit status 0, or 1 with the operation and offset on stderr. Timing is measured only against the
deadline, a generous bound: a read served by the cache takes milliseconds.
"""

import argparse
import errno
import json
import os
import random
import sys
import time

import nbd

MIB = 1 << 20
CHUNK = 4 * MIB
# Time the daemon may take beyond its deadline to answer (scheduling on a loaded CI machine).
SLACK_S = 5.0


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


def save(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def parse_range(s):
    off, length = s.split(":")
    return int(off), int(length)


def fill(h, args):
    rng = random.Random(args.seed)
    expect = bytearray(args.size)
    for pos in range(0, args.size, CHUNK):
        n = min(CHUNK, args.size - pos)
        data = rng.randbytes(n)
        h.pwrite(data, pos)
        expect[pos : pos + n] = data
    h.flush()
    check_all(h, expect, "after fill")
    save(args.expect, bytes(expect))


class Pending:
    """An async command that must fail with EIO within the deadline plus slack."""

    def __init__(self, cookie, what):
        self.cookie = cookie
        self.what = what
        self.started = time.monotonic()
        self.failed_after = None

    def resolved(self, h, deadline_s):
        """Checks once (libnbd retires a cookie once it reports it): True once it has failed."""
        if self.failed_after is not None:
            return True
        try:
            done = h.aio_command_completed(self.cookie)
        except nbd.Error as e:
            if e.errnum != errno.EIO:
                raise Mismatch(
                    f"{self.what}: failed with errno {e.errnum} ({errno.errorcode.get(e.errnum)}), expected EIO"
                )
            self.failed_after = time.monotonic() - self.started
            if self.failed_after > deadline_s + SLACK_S:
                raise Mismatch(f"{self.what}: failed only after {self.failed_after:.1f} s (deadline {deadline_s} s)")
            return True
        if done:
            raise Mismatch(
                f"{self.what}: SUCCEEDED while the backing did not answer: an acknowledgement without the backing"
            )
        if time.monotonic() - self.started > deadline_s + SLACK_S:
            raise Mismatch(f"{self.what}: no reply within {deadline_s + SLACK_S:.0f} s (deadline {deadline_s} s)")
        return False

    def wait(self, h, deadline_s):
        while not self.resolved(h, deadline_s):
            h.poll(100)


def during(h, args):
    expect = open(args.expect, "rb").read()
    size = len(expect)
    deadline_s = args.deadline_ms / 1000.0
    rng = random.Random(args.seed)
    writes = [parse_range(w) for w in args.write]
    region = 256 << 10
    touched = set()
    for off, length in writes:
        touched.update(range(off // region, (off + length - 1) // region + 1))
    failed = []
    pending = []
    for off, length in writes:
        data = rng.randbytes(length)
        failed.append({"offset": off, "hex": data.hex()})
        pending.append(Pending(h.aio_pwrite(data, off), f"write of {length} bytes at {off}"))

    if args.plain:
        # Without a cache every request needs the backing: reads, writes and a flush all in flight
        # at once, each must fail with EIO within the deadline.
        for i in range(2):
            off = rng.randrange(0, size - 4096)
            pending.append(Pending(h.aio_pread(nbd.Buffer(4096), off), f"read of 4096 bytes at {off}"))
        pending.append(Pending(h.aio_flush(), "flush"))
        for p in pending:
            p.wait(h, deadline_s)
        save(args.failed, json.dumps(failed).encode())
        print(f"requests failed during the stall: {[(p.what, round(p.failed_after, 1)) for p in pending]}")
        return

    reads = 0
    served_while_pending = 0
    for _ in range(args.reads):
        # Ranges in regions no write touches: in the mirror they are valid in the cache.
        while True:
            length = rng.choice([512, 4096, 65536, 200000])
            off = rng.randrange(0, size - length)
            regions = set(range(off // region, (off + length - 1) // region + 1))
            if not regions & touched:
                break
        write_pending = not pending[0].resolved(h, deadline_s)
        started = time.monotonic()
        try:
            got = h.pread(length, off)
        except nbd.Error as e:
            raise Mismatch(f"read of {length} bytes at {off} failed during the stall: {e}")
        elapsed = time.monotonic() - started
        compare(f"read during the stall at {off}", expect, off, got)
        if elapsed > deadline_s:
            raise Mismatch(f"read of {length} bytes at {off} took {elapsed:.1f} s: it waited for the backing")
        reads += 1
        if write_pending and not pending[0].resolved(h, deadline_s):
            served_while_pending += 1

    if served_while_pending == 0:
        raise Mismatch("no read completed while the stalled write was pending: reads queue behind it")
    for p in pending:
        p.wait(h, deadline_s)
    Pending(h.aio_flush(), "flush").wait(h, deadline_s)
    # Still serving after the failures.
    compare("read after the failed writes", expect, 0, h.pread(65536, 0))
    save(args.failed, json.dumps(failed).encode())
    print(
        f"reads served during the stall: {reads} ({served_while_pending} while a write was pending); "
        f"writes failed: {len(pending)} after {[round(p.failed_after, 1) for p in pending]} s"
    )


def touch(h, args):
    """Writes seeded data into the --write ranges (which must succeed) and updates FILE."""
    expect = bytearray(open(args.expect, "rb").read())
    rng = random.Random(args.seed)
    for w in args.write:
        off, length = parse_range(w)
        data = rng.randbytes(length)
        h.pwrite(data, off)
        expect[off : off + length] = data
    save(args.expect, bytes(expect))


def after(h, args):
    expect = bytearray(open(args.expect, "rb").read())
    failed = json.loads(open(args.failed, "rb").read())
    for f in failed:
        off = f["offset"]
        new = bytes.fromhex(f["hex"])
        old = bytes(expect[off : off + len(new)])
        first = h.pread(len(new), off)
        for i in range(len(new)):
            if first[i] != old[i] and first[i] != new[i]:
                raise Mismatch(
                    f"failed write at {off}: byte {off + i} reads {first[i]:#x}, neither the old {old[i]:#x} "
                    f"nor the new {new[i]:#x}"
                )
        landed = sum(1 for i in range(len(new)) if first[i] == new[i] != old[i])
        second = h.pread(len(new), off)
        compare(f"second read of the failed write's range at {off}", first, 0, second)
        expect[off : off + len(new)] = first
        print(f"failed write at {off}: {landed} of {len(new)} bytes hold the new data")
    rng = random.Random(args.seed)
    for _ in range(20):
        length = rng.choice([4096, 65536, 300000])
        off = rng.randrange(0, len(expect) - length)
        data = rng.randbytes(length)
        h.pwrite(data, off)
        expect[off : off + length] = data
    # Overwrite the failed writes' ranges too: they take new writes normally again.
    for f in failed:
        off = f["offset"]
        data = rng.randbytes(len(f["hex"]) // 2)
        h.pwrite(data, off)
        expect[off : off + len(data)] = data
    h.flush()
    check_all(h, expect, "after the stall")
    save(args.expect, bytes(expect))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("mode", choices=["fill", "touch", "during", "after"])
    p.add_argument("--expect", required=True)
    p.add_argument("--failed")
    p.add_argument("--size", type=int)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deadline-ms", type=int, default=3000)
    p.add_argument("--write", action="append", default=[])
    p.add_argument("--reads", type=int, default=200)
    p.add_argument("--plain", action="store_true")
    args = p.parse_args()
    h = connect(args.uri)
    try:
        {"fill": fill, "touch": touch, "during": during, "after": after}[args.mode](h, args)
    except Mismatch as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
    except nbd.Error as e:
        print(f"FAIL: unexpected libnbd error: {e} (errno {e.errnum})", file=sys.stderr)
        sys.exit(1)
    h.shutdown()
    print("OK")


if __name__ == "__main__":
    main()

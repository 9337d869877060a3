#!/usr/bin/python3
"""One cycle of the mirror crash test: check what survived the last crash, then write until killed.

usage: mirror_crash.py URI SIZE --state DIR --seed N --cycle K [--verify-only] [--max-seconds S]
                      [--hot-pairs N --region-bytes R]

Every 4 KiB block the workload writes describes itself: a header (magic, value, block number) and
filler derived from both, so one read of the export tells, block by block, which write it holds
and whether that write arrived whole. The value 0 is a zeroed block (WRITE_ZEROES, or never
written: a fresh export reads as zeroes).

The workload records in DIR/journal.K, *before* submitting, every write it is about to issue
(`I seq kind block nblocks fua`); after each reply `A seq`; after each completed flush `F`, then
fsyncs the journal. Batches never overlap inside themselves and a batch starts only after the
previous one completed, so the writes to one block are ordered by seq. After a crash the allowed
contents of a block are therefore: the last write to it that was made durable (acknowledged with
FUA, or acknowledged before a flush that completed), or any write to it issued after that one. The
server was killed, not the machine, so the journal in the page cache is enough; the fsync is for
an observer reading it from elsewhere.

At the start of a cycle the script flushes (so that whatever the restarted server shows is now
durable), reads the whole export, checks every block against the allowed set, and takes what it
read as the new baseline (DIR/model.bin, one little-endian u64 value per block, replaced
atomically). Only then does it create DIR/writing.K and start writing.

Exit status: 0 when the workload ran until the connection was lost (the expected end: the test
SIGKILLs the server) or until --max-seconds; 1 on a mismatch or an NBD error reply (a client must
never see one); 3 when the connection was lost during the check (the server was killed early; the
next cycle repeats the check against the same journal).
"""

import argparse
import errno
import hashlib
import os
import random
import struct
import sys
import time

import nbd

BLOCK = 4096
MAGIC = b"SDCRASH1"
ZERO_BLOCK = bytes(BLOCK)
SEQ_PER_CYCLE = 10_000_000
CHUNK = 4 << 20
LOST = 3


class Mismatch(Exception):
    pass


class ConnectionLost(Exception):
    pass


def block_bytes(value, block):
    """The 4 KiB a write of `value` puts at block number `block`."""
    head = MAGIC + struct.pack("<QQ", value, block)
    head += bytes(32 - len(head))
    digest = hashlib.blake2b(struct.pack("<QQ", value, block), digest_size=64).digest()
    return head + digest * 63 + digest[:32]


def decode(buf, block):
    """The value a block holds; raises Mismatch for a block no single write could have produced
    (torn, misplaced or corrupt)."""
    if buf == ZERO_BLOCK:
        return 0
    if buf[:8] != MAGIC:
        raise Mismatch(f"block {block} (offset {block * BLOCK}): neither zero nor written by this test: {buf[:32].hex()}")
    value, where = struct.unpack_from("<QQ", buf, 8)
    if where != block:
        raise Mismatch(f"block {block} (offset {block * BLOCK}) holds the data of block {where} (value {value}): misplaced write")
    want = block_bytes(value, block)
    if buf != want:
        i = next(i for i in range(BLOCK) if buf[i] != want[i])
        raise Mismatch(
            f"block {block} (offset {block * BLOCK}): header says value {value} but byte {i} differs "
            f"(expected {want[i:i + 16].hex()} got {buf[i:i + 16].hex()}): torn or corrupt"
        )
    return value


def is_disconnect(h, e):
    """True when a libnbd error means the server went away (it was killed), not an error reply."""
    dead = False
    try:
        dead = h.aio_is_dead() or h.aio_is_closed()
    except nbd.Error:
        dead = True
    return dead or e.errnum in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN)


def load_model(path, nblocks):
    if not os.path.exists(path):
        return [0] * nblocks
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != 8 * nblocks:
        raise Mismatch(f"{path}: {len(data)} bytes, expected {8 * nblocks}")
    return list(struct.unpack(f"<{nblocks}Q", data))


def save_model(path, model):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack(f"<{len(model)}Q", *model))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def allowed_sets(model, journal_path):
    """Block -> set of values the block may hold after a crash during `journal_path`'s workload.
    Blocks the journal never touched must hold exactly their model value."""
    hist = {}  # block -> [value, ...] in issue order, hist[b][0] being the baseline
    durable = {}  # block -> index into hist[b] of the newest write known durable
    ops = {}  # seq -> [(block, index into hist[block])] for the blocks it covers, and its FUA flag
    acked = []  # seqs acknowledged (without FUA) since the last completed flush
    with open(journal_path) as f:
        lines = f.read().split("\n")
    # Drop a torn last line (cannot happen when only the server is killed, but be exact).
    lines = lines[:-1]
    for ln, line in enumerate(lines, 1):
        p = line.split()
        if p[0] == "I":
            seq, kind, first, n, fua = int(p[1]), p[2], int(p[3]), int(p[4]), p[5] == "1"
            value = 0 if kind == "Z" else seq
            where = []
            for b in range(first, first + n):
                if b not in hist:
                    hist[b] = [model[b]]
                    durable[b] = 0
                hist[b].append(value)
                where.append((b, len(hist[b]) - 1))
            ops[seq] = (where, fua)
        elif p[0] == "A":
            seq = int(p[1])
            if ops[seq][1]:
                make_durable(durable, ops[seq][0])
            else:
                acked.append(seq)
        elif p[0] == "F":
            for seq in acked:
                make_durable(durable, ops[seq][0])
            acked = []
        else:
            raise Mismatch(f"{journal_path}:{ln}: bad journal line {line!r}")
    return {b: set(hist[b][durable[b]:]) for b in hist}, {b: hist[b][durable[b]] for b in hist}


def make_durable(durable, where):
    for b, idx in where:
        durable[b] = max(durable[b], idx)


def check_export(h, size, model, journal_path, what):
    nblocks = size // BLOCK
    if journal_path:
        allowed, durable = allowed_sets(model, journal_path)
    else:
        allowed, durable = {}, {}
    got = [0] * nblocks
    bad = []
    for pos in range(0, size, CHUNK):
        n = min(CHUNK, size - pos)
        buf = h.pread(n, pos)
        for i in range(0, n, BLOCK):
            b = (pos + i) // BLOCK
            v = decode(buf[i : i + BLOCK], b)
            got[b] = v
            ok = v in allowed[b] if b in allowed else v == model[b]
            if not ok:
                bad.append(b)
    if bad:
        msgs = []
        for b in bad[:8]:
            if b in allowed:
                msgs.append(
                    f"block {b} (offset {b * BLOCK}) holds value {got[b]}; durable value {durable[b]}, "
                    f"allowed {sorted(allowed[b])}"
                )
            else:
                msgs.append(f"block {b} (offset {b * BLOCK}) holds value {got[b]}, expected {model[b]} (not written since)")
        raise Mismatch(f"{what}: {len(bad)} blocks hold data that was never allowed there:\n  " + "\n  ".join(msgs))
    return got


def pending_journal(state, cycle):
    """The journal of the newest earlier cycle that wrote one and has not been checked yet."""
    applied = -1
    mark = os.path.join(state, "applied")
    if os.path.exists(mark):
        with open(mark) as f:
            applied = int(f.read().strip())
    found = []
    for name in os.listdir(state):
        if name.startswith("journal."):
            k = int(name.split(".")[1])
            if applied < k < cycle:
                found.append(k)
    if len(found) > 1:
        raise Mismatch(f"journals {sorted(found)} all unchecked: a cycle wrote without checking first")
    return (found[0], os.path.join(state, f"journal.{found[0]}")) if found else (None, None)


def write_file(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


class Progress:
    acked = 0
    flushes = 0


def workload(h, size, state, seed, cycle, max_seconds, hot_pairs, region_bytes):
    """Writes in batches until the connection drops or time is up (counts in Progress).

    With hot_pairs > 0 the writes of this cycle stay inside that many randomly chosen pairs of
    adjacent regions (a write may cross the boundary inside a pair): the other regions carry no
    write-intent bit at the crash, so the offline verify that follows has valid regions to compare
    (a workload spread over the whole disk leaves every region intent-marked, and verify nothing)."""
    rng = random.Random(seed * 1000 + cycle)
    nblocks = size // BLOCK
    spans = [(0, nblocks)]
    if hot_pairs:
        rb = region_bytes // BLOCK
        pairs = rng.sample(range(0, nblocks // rb - 1, 2), hot_pairs)
        spans = [(p * rb, 2 * rb) for p in sorted(pairs)]
    seq = cycle * SEQ_PER_CYCLE
    jfd = os.open(os.path.join(state, f"journal.{cycle}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    open(os.path.join(state, f"writing.{cycle}"), "w").close()
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        depth = rng.choice([1, 2, 4, 8, 16, 32])
        taken = []
        batch = []
        for _ in range(depth):
            start, span = rng.choice(spans)
            n = min(span, rng.choice([1, 1, 1, 2, 4, 8, 16, 64]))
            first = start + rng.randrange(0, span - n + 1)
            if any(first < f + m and f < first + n for f, m in taken):
                continue
            taken.append((first, n))
            seq += 1
            kind = "Z" if rng.random() < 0.1 else "W"
            fua = rng.random() < 0.15
            batch.append((seq, kind, first, n, fua))
        # Intent records reach the journal before any of the batch is submitted.
        os.write(jfd, "".join(f"I {s} {k} {f} {n} {int(u)}\n" for s, k, f, n, u in batch).encode())
        cookies = {}
        keep = []
        for s, k, f, n, u in batch:
            flags = nbd.CMD_FLAG_FUA if u else 0
            if k == "Z":
                c = h.aio_zero(n * BLOCK, f * BLOCK, flags=flags)
            else:
                buf = nbd.Buffer.from_bytearray(bytearray(b"".join(block_bytes(s, b) for b in range(f, f + n))))
                keep.append(buf)
                c = h.aio_pwrite(buf, f * BLOCK, flags=flags)
            cookies[c] = s
        while cookies:
            h.poll(-1)
            for c in list(cookies):
                if h.aio_command_completed(c):
                    os.write(jfd, f"A {cookies.pop(c)}\n".encode())
                    Progress.acked += 1
        if rng.random() < 0.5:
            h.flush()
            os.write(jfd, b"F\n")
            os.fsync(jfd)
            Progress.flushes += 1
    os.close(jfd)


def run():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("size", type=int)
    ap.add_argument("--state", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--cycle", type=int, required=True)
    ap.add_argument("--verify-only", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=20.0)
    ap.add_argument("--hot-pairs", type=int, default=0, help="write only inside this many region pairs")
    ap.add_argument("--region-bytes", type=int, default=1 << 20)
    args = ap.parse_args()
    if args.size % BLOCK:
        raise Mismatch("SIZE must be a multiple of 4096")
    nblocks = args.size // BLOCK
    model_path = os.path.join(args.state, "model.bin")
    model = load_model(model_path, nblocks)
    jcycle, jpath = pending_journal(args.state, args.cycle)

    h = nbd.NBD()
    phase = "check"
    try:
        h.connect_uri(args.uri)
        if h.get_size() != args.size:
            raise Mismatch(f"export size {h.get_size()}, expected {args.size}")
        # Whatever the restarted server shows for a write that was in flight at the crash becomes
        # the baseline, so it must be durable from now on.
        h.flush()
        got = check_export(h, args.size, model, jpath, f"cycle {args.cycle}, checking journal {jcycle}")
        save_model(model_path, got)
        if jcycle is not None:
            write_file(os.path.join(args.state, "applied"), str(jcycle))
        written = sum(1 for v in got if v)
        print(f"cycle {args.cycle}: checked {nblocks} blocks ({written} hold data) against journal {jcycle}")
        if args.verify_only:
            h.shutdown()
            return 0
        phase = "workload"
        workload(h, args.size, args.state, args.seed, args.cycle, args.max_seconds, args.hot_pairs, args.region_bytes)
        print(f"cycle {args.cycle}: workload ran its full time: {Progress.acked} writes, {Progress.flushes} flushes")
        h.shutdown()
        return 0
    except nbd.Error as e:
        if is_disconnect(h, e):
            print(f"cycle {args.cycle}: connection lost during {phase} after {Progress.acked} writes and {Progress.flushes} flushes: {e}")
            return LOST if phase == "check" else 0
        print(f"FAIL: cycle {args.cycle}: NBD error during {phase}: {e} (errno {e.errnum})", file=sys.stderr)
        return 1
    except Mismatch as e:
        print(f"FAIL: seed {args.seed} {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())

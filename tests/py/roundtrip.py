#!/usr/bin/python3
"""Seeded random operations against an NBD export, checked against a local model of its bytes.

usage: roundtrip.py URI SIZE [--seed N] [--ops N] [--no-structured]

Operations: writes (with and without FUA) at byte-granular, unaligned, aligned and large offsets and
lengths; reads (with DF when structured replies are on); WRITE_ZEROES with no flag, NO_HOLE, FUA and
FAST_ZERO; TRIM; FLUSH; CACHE; BLOCK_STATUS over base:allocation (whose ZERO bit must agree with the
model). At the end the whole export is read back on this connection and on a new one.
"""

import argparse
import errno
import random
import sys

import nbd
from nbdtest import MIB, STATE_ZERO, Model, block_status, check, connect, fail, main


def pick_range(rng, size):
    """An (offset, length) pair; the mix favours the cases servers get wrong."""
    kind = rng.random()
    if kind < 0.25:  # byte-granular: a few bytes anywhere, often straddling a 4 KiB boundary
        n = rng.randint(1, 16)
        if rng.random() < 0.5:
            off = rng.randrange(4096, size - 4096, 4096) - rng.randint(0, n)
        else:
            off = rng.randrange(0, size - n)
    elif kind < 0.5:  # unaligned offset and length below a block or two
        n = rng.randint(1, 12288)
        off = rng.randrange(0, size - n)
    elif kind < 0.75:  # aligned 4 KiB multiples
        n = 4096 * rng.randint(1, 64)
        off = 4096 * rng.randrange(0, (size - n) // 4096)
    elif kind < 0.92:  # medium, unaligned
        n = rng.randint(1, 512 * 1024)
        off = rng.randrange(0, size - n)
    elif kind < 0.97:  # large, up to 4 MiB
        n = rng.randint(1, 4 * MIB)
        off = rng.randrange(0, size - n)
    else:  # touching the last byte of the export
        n = rng.randint(1, 65536)
        off = size - n
    return off, n


def run():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("size", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=1500)
    ap.add_argument("--no-structured", action="store_true")
    args = ap.parse_args()
    structured = not args.no_structured
    rng = random.Random(args.seed)
    size = args.size

    h = connect(args.uri, structured=structured)
    check(h.get_size() == size, f"export size {h.get_size()}, expected {size}")
    check(not h.is_read_only(), "export is read-only")
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_multi_conn"):
        check(getattr(h, cap)(), f"{cap}() is false")
    # DF and meta contexts only exist with structured replies.
    check(h.can_df() == structured, f"can_df() = {h.can_df()} with structured replies {structured}")
    check(
        h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION) == structured,
        f"can_meta_context(base:allocation) = {h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)}",
    )

    model = Model(size)
    history = []

    def note(s):
        history.append(s)
        del history[:-25]

    ops = ["write"] * 30 + ["fua"] * 8 + ["read"] * 25 + ["zero"] * 10 + ["trim"] * 5
    ops += ["flush"] * 4 + ["cache"] * 3
    if structured:
        ops += ["status"] * 10 + ["df"] * 7

    try:
        for i in range(args.ops):
            op = rng.choice(ops)
            off, n = pick_range(rng, size)
            what = f"op {i} (seed {args.seed}): {op} off={off} len={n}"
            note(what)
            if op in ("write", "fua"):
                buf = rng.randbytes(n)
                h.pwrite(buf, off, nbd.CMD_FLAG_FUA if op == "fua" else 0)
                model.write(off, buf)
            elif op == "read":
                model.verify(what, off, h.pread(n, off))
            elif op == "zero":
                flags = rng.choice(
                    [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_FAST_ZERO,
                     nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE]
                )
                note(f"{what} flags={flags:#x}")
                try:
                    h.zero(n, off, flags)
                    model.zero(off, n)
                except nbd.Error as e:
                    # A fast zero may refuse with ENOTSUP, and must then leave the data alone.
                    if not (flags & nbd.CMD_FLAG_FAST_ZERO and e.errnum == errno.ENOTSUP):
                        fail(f"{what}: zero flags={flags:#x} failed: {e}")
                # Zeroed bytes must read back as zero right away.
                model.verify(what + " (read after zero)", off, h.pread(n, off))
            elif op == "trim":
                h.trim(n, off)
                model.forget(off, n)
            elif op == "flush":
                h.flush()
            elif op == "cache":
                h.cache(n, off)
            elif op == "status":
                flags = nbd.CMD_FLAG_REQ_ONE if rng.random() < 0.3 else 0
                for eoff, elen, eflags in block_status(h, size, off, n, flags):
                    if eflags & STATE_ZERO:
                        check(
                            model.all_zero(eoff, elen),
                            f"{what}: extent ({eoff}, {elen}) reported ZERO (flags {eflags}) "
                            f"but holds written data",
                        )
            elif op == "df":
                n = min(n, 65536) if rng.random() < 0.8 else n
                chunks = []

                def chunk(subbuf, coff, status, err):
                    chunks.append((coff, len(subbuf), status))
                    return 0

                try:
                    got = h.pread_structured(n, off, chunk, nbd.CMD_FLAG_DF)
                except nbd.Error as e:
                    # The spec allows EOVERFLOW for an unfragmented read over 64 KiB only.
                    check(n > 65536 and e.errnum == errno.EOVERFLOW, f"{what}: DF read failed: {e}")
                    continue
                check(len(chunks) == 1, f"{what}: DF read came back in {len(chunks)} chunks: {chunks}")
                model.verify(what, off, got)
            else:
                raise AssertionError(op)

        # Everything must read back, on this connection and on a fresh one.
        h.flush()
        for pos in range(0, size, 8 * MIB):
            n = min(8 * MIB, size - pos)
            model.verify(f"final read at {pos}", pos, h.pread(n, pos))
        h.shutdown()
        h2 = connect(args.uri, structured=structured)
        for pos in range(0, size, 8 * MIB):
            n = min(8 * MIB, size - pos)
            model.verify(f"final read on a new connection at {pos}", pos, h2.pread(n, pos))
        h2.shutdown()
    except Exception:
        print("last operations:\n  " + "\n  ".join(history), file=sys.stderr)
        raise


if __name__ == "__main__":
    main(run)

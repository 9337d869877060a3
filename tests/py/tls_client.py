#!/usr/bin/python3
"""python3-libnbd over TLS (GnuTLS inside libnbd): a client that insists on TLS, or refuses it.

usage: tls_client.py (--tcp HOST:PORT | --unix PATH) [--certs DIR] [--tls require|disable]
                     [--expect-fail TEXT] [--seed N]

With --expect-fail, connecting must fail and libnbd's error message must contain TEXT (the
refusal a plain client gets from a TLS-only server, or a handshake a client certificate decides).
Otherwise the session must have negotiated TLS exactly when --tls require, and then it runs a data
round trip with up to 64 requests in flight: random writes (unaligned and aligned, up to 1 MiB),
flush, reads checked against a local copy, one 32 MiB write and read (the largest request), and
a second connection that reads everything back after the flush.
"""

import argparse
import random
import sys

import nbd
from nbdtest import MIB, check, fail, main


def open_handle(args):
    h = nbd.NBD()
    if args.tls == "require":
        h.set_tls(nbd.TLS_REQUIRE)
        if args.certs:
            h.set_tls_certificates(args.certs)
    else:
        h.set_tls(nbd.TLS_DISABLE)
    h.set_request_structured_replies(True)
    if args.tcp:
        host, port = args.tcp.rsplit(":", 1)
        h.connect_tcp(host, port)
    else:
        h.connect_unix(args.unix)
    return h


def run():
    ap = argparse.ArgumentParser()
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--tcp")
    target.add_argument("--unix")
    ap.add_argument("--certs")
    ap.add_argument("--tls", choices=["require", "disable"], default="require")
    ap.add_argument("--expect-fail")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    if args.expect_fail is not None:
        try:
            h = open_handle(args)
        except nbd.Error as e:
            check(args.expect_fail in str(e), f"connection failed, but with {str(e)!r}, not {args.expect_fail!r}")
            print(f"refused as expected: {e}")
            return
        # Some refusals (a TLS alert sent after the handshake) surface at the first request.
        try:
            h.pread(512, 0)
        except nbd.Error as e:
            check(args.expect_fail in str(e), f"first read failed, but with {str(e)!r}, not {args.expect_fail!r}")
            print(f"refused as expected at the first request: {e}")
            return
        fail(f"connected and read data; expected a failure mentioning {args.expect_fail!r}")

    h = open_handle(args)
    want_tls = args.tls == "require"
    check(h.get_tls_negotiated() == want_tls, f"get_tls_negotiated() = {h.get_tls_negotiated()}, want {want_tls}")
    check(h.get_structured_replies_negotiated(), "structured replies were not negotiated")
    size = h.get_size()
    check(size >= 64 * MIB, f"export of {size} bytes is too small for this test")
    rng = random.Random(args.seed)
    model = bytearray(size)

    # Phase 1: many writes in flight at once (non-overlapping, so completion order is free).
    ranges = []
    cursor = 0
    while cursor < 32 * MIB:
        n = rng.choice([rng.randint(1, 4096), 4096 * rng.randint(1, 16), rng.randint(1, MIB)])
        off = cursor + rng.randint(0, 4096)
        if off + n > 32 * MIB:
            break
        ranges.append((off, n))
        cursor = off + n
    rng.shuffle(ranges)
    inflight = []
    for off, n in ranges:
        data = rng.randbytes(n)
        model[off : off + n] = data
        inflight.append(h.aio_pwrite(data, off))
        while h.aio_in_flight() >= 64:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in inflight:
        check(h.aio_command_completed(cookie), f"write {cookie} did not complete")
    h.flush()

    # Phase 2: reads in flight, each checked.
    bufs = []
    for off, n in ranges:
        buf = nbd.Buffer(n)
        bufs.append((off, n, buf, h.aio_pread(buf, off)))
        while h.aio_in_flight() >= 64:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for off, n, buf, cookie in bufs:
        check(h.aio_command_completed(cookie), f"read {cookie} did not complete")
        got = buf.to_bytearray()
        if got != model[off : off + n]:
            fail(f"read at {off} length {n} differs from what was written (seed {args.seed})")

    # Phase 3: the largest request each way.
    big = rng.randbytes(32 * MIB)
    at = size - 32 * MIB
    h.pwrite(big, at)
    model[at:] = big
    check(h.pread(32 * MIB, at) == big, f"32 MiB read at {at} differs (seed {args.seed})")
    h.flush()
    h.shutdown()

    # Phase 4: a fresh connection sees everything.
    h2 = open_handle(args)
    for off, n in ranges[:200] + [(at, 32 * MIB)]:
        if h2.pread(n, off) != bytes(model[off : off + n]):
            fail(f"second connection: read at {off} length {n} differs (seed {args.seed})")
    h2.shutdown()


if __name__ == "__main__":
    main(run)

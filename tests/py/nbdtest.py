"""Shared helpers for the python3-libnbd client tests (run with /usr/bin/python3, which has `nbd`).

A test script exits non-zero with a message naming the operation, offset and seed on the first
mismatch, so a Rust test that runs it can print the reason and the run can be replayed.
"""

import errno
import sys

import nbd

STATE_HOLE = nbd.STATE_HOLE
STATE_ZERO = nbd.STATE_ZERO
MIB = 1 << 20


class Mismatch(Exception):
    pass


def fail(msg):
    raise Mismatch(msg)


def check(cond, msg):
    if not cond:
        fail(msg)


def main(fn):
    """Runs fn(); turns a Mismatch (or any libnbd error) into a clear message and exit status 1."""
    try:
        fn()
    except Mismatch as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
    except nbd.Error as e:
        print(f"FAIL: unexpected libnbd error: {e} (errno {e.errnum})", file=sys.stderr)
        sys.exit(1)
    print("OK")


def connect(uri, structured=True, meta=True):
    h = nbd.NBD()
    # nbds:// URIs name the certificate directory in the query (tls-certificates=DIR).
    h.set_uri_allow_local_file(True)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    check(
        h.get_structured_replies_negotiated() == structured,
        f"structured replies negotiated = {h.get_structured_replies_negotiated()}, requested {structured}",
    )
    return h


def expect_errno(what, fn, *allowed):
    """Runs fn, which must fail with one of the `allowed` errno values (the server's reply)."""
    try:
        fn()
    except nbd.Error as e:
        names = [errno.errorcode.get(a, str(a)) for a in allowed]
        check(
            e.errnum in allowed,
            f"{what}: failed with errno {e.errnum} ({errno.errorcode.get(e.errnum)}), expected one of {names}: {e}",
        )
        return e.errnum
    fail(f"{what}: succeeded, expected an error ({[errno.errorcode.get(a) for a in allowed]})")


def first_diff(a, b):
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


class Model:
    """The bytes the export must hold. `known[i]` is 0xff where the content is defined; TRIM makes a
    range undefined (the spec lets a server return anything there until it is written again). The
    model keeps undefined bytes at zero so that "known bytes are zero" is a plain slice comparison."""

    def __init__(self, size):
        self.size = size
        # A freshly created image reads as zeroes everywhere.
        self.data = bytearray(size)
        self.known = bytearray(b"\xff") * size
        self.zeros = bytes(min(size, 64 * MIB))

    def write(self, off, buf):
        self.data[off : off + len(buf)] = buf
        self.known[off : off + len(buf)] = b"\xff" * len(buf)

    def zero(self, off, n):
        self.data[off : off + n] = bytes(n)
        self.known[off : off + n] = b"\xff" * n

    def forget(self, off, n):
        self.data[off : off + n] = bytes(n)
        self.known[off : off + n] = bytes(n)

    def all_zero(self, off, n):
        """True when every byte of [off, off+n) that is defined is zero."""
        mv = memoryview(self.data)
        pos = off
        while pos < off + n:
            step = min(len(self.zeros), off + n - pos)
            if mv[pos : pos + step] != self.zeros[:step]:
                return False
            pos += step
        return True

    def verify(self, what, off, got):
        """Compares bytes read at `off` with the model, ignoring undefined (trimmed) bytes."""
        n = len(got)
        check(n <= self.size - off, f"{what}: read returned {n} bytes at {off}, beyond the export")
        exp = memoryview(self.data)[off : off + n]
        if self.known.find(0, off, off + n) == -1:
            if exp != memoryview(got):
                i = first_diff(exp, got)
                fail(
                    f"{what}: data mismatch at offset {off + i} (read of {n} bytes at {off}): "
                    f"expected {bytes(exp[i:i + 16]).hex()} got {bytes(got[i:i + 16]).hex()}"
                )
            return
        # Compare each defined run separately.
        pos = off
        end = off + n
        while pos < end:
            start = self.known.find(0xFF, pos, end)
            if start == -1:
                break
            stop = self.known.find(0, start, end)
            if stop == -1:
                stop = end
            a = memoryview(self.data)[start:stop]
            b = memoryview(got)[start - off : stop - off]
            if a != b:
                i = first_diff(a, b)
                fail(
                    f"{what}: data mismatch at offset {start + i} (read of {n} bytes at {off}): "
                    f"expected {bytes(a[i:i + 16]).hex()} got {bytes(b[i:i + 16]).hex()}"
                )
            pos = stop


def block_status(h, size, off, length, flags=0):
    """Runs BLOCK_STATUS over base:allocation and checks the reply's shape against the spec.
    Returns [(offset, length, flags)]."""
    seen = []

    def cb(metacontext, offset, entries, err):
        seen.append((metacontext, offset, list(entries)))
        return 0

    h.block_status(length, off, cb, flags)
    check(len(seen) == 1, f"block_status({off}, {length}): {len(seen)} context callbacks, expected 1: {seen}")
    ctx, cb_off, entries = seen[0]
    check(ctx == nbd.CONTEXT_BASE_ALLOCATION, f"block_status: context {ctx!r}")
    check(cb_off == off, f"block_status: extents start at {cb_off}, asked for {off}")
    check(entries and len(entries) % 2 == 0, f"block_status({off}, {length}): bad entries {entries}")
    extents = []
    pos = off
    for i in range(0, len(entries), 2):
        elen, eflags = entries[i], entries[i + 1]
        check(elen > 0, f"block_status({off}, {length}): zero-length extent in {entries}")
        check(eflags & ~(STATE_HOLE | STATE_ZERO) == 0, f"block_status: unknown flags {eflags:#x}")
        if i + 2 < len(entries):
            # Only the final extent may run past the requested length.
            check(pos + elen < off + length, f"block_status({off}, {length}): extent {i // 2} overruns: {entries}")
        extents.append((pos, elen, eflags))
        pos += elen
    check(pos <= size, f"block_status({off}, {length}): extents end at {pos}, past the export size {size}")
    if flags & nbd.CMD_FLAG_REQ_ONE:
        check(len(extents) == 1, f"block_status REQ_ONE({off}, {length}): {len(extents)} extents")
        check(extents[0][1] <= length, f"block_status REQ_ONE({off}, {length}): extent longer than request")
    return extents

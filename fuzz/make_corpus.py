#!/usr/bin/python3
"""Regenerates the seeds of the `server` and `meta` fuzz targets from real programs.

    /usr/bin/python3 fuzz/make_corpus.py [--bin target/debug/superdisk]

server: real NBD clients (nbdinfo, qemu-io, qemu-img, fio, libnbd through nbdsh-style calls) talk
to a running `superdisk serve` through a recording proxy; each client's bytes to the server become
one seed, prefixed with the target's setup byte.
meta: the metadata tails of a backing and a cache made by `superdisk create`, then served and
stopped cleanly, killed, and stopped degraded after `superdisk cache fail`.

It writes fuzz/corpus/{server,meta}/ (replacing files of the same name); run `cargo fuzz cmin`
afterwards (scripts/fuzz.sh --cmin does both). Needs python3-libnbd (Debian's /usr/bin/python3),
libnbd-bin, qemu-utils and fio.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import nbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The export sizes of the fuzz targets' volumes (fuzz_targets/server.rs, meta.rs).
SERVER_EXPORT_BYTES = 256 << 10
EXPORT_BYTES = 1 << 20
PAGE = 4096
# Bitmap slots (4 pages for a one-page bitmap) and the two superblock slots: what the meta target's
# mode 2 replaces at the end of each device (fuzz_targets/meta.rs).
TAIL_BYTES = 6 * PAGE


def wait_for(path, proc, what):
    deadline = time.time() + 30
    while not os.path.exists(path):
        if proc.poll() is not None:
            sys.exit(f"superdisk exited before {what} appeared")
        if time.time() > deadline:
            sys.exit(f"{what} did not appear")
        time.sleep(0.05)


DAEMONS = []


class Daemon:
    def __init__(self, binary, d, backing, caches=(), admin=False):
        self.sock = os.path.join(d, "nbd.sock")
        self.admin = os.path.join(d, "admin.sock") if admin else None
        for p in (self.sock, self.admin):
            if p and os.path.exists(p):
                os.unlink(p)
        args = [binary, "serve", "--backing", backing, "--listen", "", "--unix", self.sock, "--log-level", "warn"]
        for c in caches:
            args += ["--cache", c]
        if self.admin:
            args += ["--admin-socket", self.admin]
        self.log = open(os.path.join(d, "daemon.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log)
        DAEMONS.append(self)
        wait_for(self.sock, self.proc, "the NBD socket")
        if self.admin:
            wait_for(self.admin, self.proc, "the admin socket")

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        self.log.close()
        if sig == signal.SIGTERM and rc != 0:
            sys.exit(f"superdisk exited {rc} on SIGTERM")


class Recorder:
    """A Unix-socket proxy in front of the daemon that keeps what each client sent."""

    def __init__(self, d, upstream):
        self.path = os.path.join(d, "rec.sock")
        self.upstream = upstream
        self.sessions = []
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            u.connect(self.upstream)
            buf = bytearray()
            with self.lock:
                self.sessions.append(buf)
            threading.Thread(target=self.pump, args=(c, u, buf), daemon=True).start()
            threading.Thread(target=self.pump, args=(u, c, None), daemon=True).start()

    @staticmethod
    def pump(src, dst, record):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                if record is not None:
                    record += b
                dst.sendall(b)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def take(self):
        """Waits for the client's bytes to settle and returns the newest session."""
        time.sleep(0.3)
        with self.lock:
            if not self.sessions:
                sys.exit("a client made no connection")
            return bytes(self.sessions[-1])

    def uri(self, export="superdisk"):
        return f"nbd+unix:///{export}?socket={self.path}"


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        sys.exit(f"{cmd} failed: {r.stderr}")


def handle(rec, structured=True, fixed=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if not fixed:
        h.set_handshake_flags(0)  # plain newstyle: the client must use NBD_OPT_EXPORT_NAME
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name("superdisk")
    return h


def libnbd_sessions(rec):
    """Sessions that exercise what the tools do not: every command and flag, bad requests, options."""
    out = {}

    h = handle(rec)
    h.connect_unix(rec.path)
    h.pwrite(b"\x5a" * 4096, 0, nbd.CMD_FLAG_FUA)
    h.pread(4096, 0)
    h.pread_structured(8192, 0, lambda *a: 0, nbd.CMD_FLAG_DF)
    h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, 12288, nbd.CMD_FLAG_FAST_ZERO) if h.can_fast_zero() else h.zero(4096, 12288)
    h.trim(4096, 16384)
    h.cache(65536, 0)
    h.block_status(SERVER_EXPORT_BYTES, 0, lambda *a: 0)
    h.block_status(65536, 4096, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
    h.flush()
    h.shutdown()
    out["libnbd_all_commands"] = rec.take()

    h = handle(rec, structured=False)
    h.connect_unix(rec.path)
    h.pwrite(bytes(range(256)) * 8, 512)
    h.pread(2048, 512)
    h.flush()
    h.shutdown()
    out["libnbd_simple_replies"] = rec.take()

    h = handle(rec, structured=False, fixed=False)
    h.connect_unix(rec.path)
    h.pwrite(b"old" * 100, 1000)
    h.pread(300, 1000)
    h.shutdown()
    out["libnbd_export_name"] = rec.take()

    # Many requests in flight at once, replies in any order.
    h = handle(rec)
    h.connect_unix(rec.path)
    bufs = [nbd.Buffer(512) for _ in range(8)]
    for i in range(8):
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 512), i * 8192)
    for i, b in enumerate(bufs):
        h.aio_pread(b, i * 8192)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.shutdown()
    out["libnbd_in_flight"] = rec.take()

    # Requests a careful client never sends: out of range, misaligned, unknown flags, zero length.
    h = handle(rec)
    h.set_strict_mode(0)
    h.connect_unix(rec.path)
    for f in (
        lambda: h.pread(4096, SERVER_EXPORT_BYTES - 1024),
        lambda: h.pwrite(b"x" * 512, SERVER_EXPORT_BYTES),
        lambda: h.pread(0, 0),
        lambda: h.pread(512, 0, 1 << 7),
        lambda: h.trim(0, 0),
        lambda: h.block_status(0, 0, lambda *a: 0),
        lambda: h.zero(1 << 30, 0),
    ):
        try:
            f()
        except nbd.Error:
            pass
    h.shutdown()
    out["libnbd_refused"] = rec.take()

    # Option haggling without transmission: list, info, meta contexts, then abort.
    h = handle(rec)
    h.set_opt_mode(True)
    h.connect_unix(rec.path)
    h.opt_list(lambda *a: 0)
    h.opt_info()
    h.opt_list_meta_context(lambda *a: 0)
    h.set_export_name("nope")
    try:
        h.opt_info()
    except nbd.Error:
        pass
    h.opt_abort()
    out["libnbd_options_abort"] = rec.take()

    h = handle(rec)
    h.set_opt_mode(True)
    h.set_request_block_size(True)
    h.connect_unix(rec.path)
    h.opt_go()
    h.pread(4096, 4096)
    h.shutdown()
    out["libnbd_block_size_go"] = rec.take()
    return out


def tool_sessions(rec):
    uri = rec.uri()
    out = {}
    run(["nbdinfo", uri])
    out["nbdinfo"] = rec.take()
    run(["nbdinfo", "--map", uri])
    out["nbdinfo_map"] = rec.take()
    run(["nbdinfo", "--list", f"nbd+unix:///?socket={rec.path}"])
    out["nbdinfo_list"] = rec.take()
    run(["qemu-img", "map", "--output=json", "-f", "raw", uri])
    out["qemu_img_map"] = rec.take()
    qio = ["qemu-io", "-f", "raw", uri]
    for c in ("write -P 0x5a 0 4k", "read -P 0x5a 0 4k", "write -z 8k 4k", "discard 16k 4k", "flush",
              "aio_write -P 1 65536 2048", "aio_flush", "writev -P 3 32768 512 1024"):
        qio += ["-c", c]
    run(qio)
    out["qemu_io"] = rec.take()
    run(["fio", "--name=seed", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=512",
         "--size=64k", "--number_ios=24", "--iodepth=4", "--verify=crc32c", "--randseed=1", "--verify_state_save=0",
         "--output=/dev/null"])
    out["fio_randrw_verify"] = rec.take()
    return out


# fuzz_targets/server.rs `Setup` bits: 1 mirror, 2 read-only, 4 1 MiB in-flight budget, 8/16 pipe
# size (0: 64 KiB, 1: 7 bytes, 2: 4 KiB, 3: 1 MiB), 32 slow reader, 64 512-byte minimum block.
SETUPS = {
    "libnbd_all_commands": [0x00, 0x01],
    "libnbd_in_flight": [0x00, 0x0D, 0x24],
    "libnbd_refused": [0x00, 0x42],
    "qemu_io": [0x00, 0x01, 0x08],
    "fio_randrw_verify": [0x01, 0x14],
}


def server_corpus(binary, work, out_dir):
    d = os.path.join(work, "server")
    os.makedirs(d)
    backing = os.path.join(d, "backing.img")
    run([binary, "create", "--backing", backing, "--size", str(SERVER_EXPORT_BYTES)])
    daemon = Daemon(binary, d, backing)
    try:
        rec = Recorder(d, daemon.sock)
        sessions = {**tool_sessions(rec), **libnbd_sessions(rec)}
    finally:
        daemon.stop()
    os.makedirs(out_dir, exist_ok=True)
    for name, data in sessions.items():
        for setup in SETUPS.get(name, [0x00]):
            with open(os.path.join(out_dir, f"{name}-{setup:02x}"), "wb") as f:
                f.write(bytes([setup]) + data)


def tail(path, n=TAIL_BYTES):
    with open(path, "rb") as f:
        f.seek(-n, os.SEEK_END)
        return f.read(n)


def admin(binary, sock, command, *args):
    run([binary, command, "--socket", sock, *args])


def meta_corpus(binary, work, out_dir):
    d = os.path.join(work, "meta")
    os.makedirs(d)
    backing = os.path.join(d, "backing.img")
    cache = os.path.join(d, "cache.img")
    # The fuzz target's devices are exactly these sizes: the export plus its 1 MiB metadata area.
    with open(cache, "wb") as f:
        f.truncate(2 * EXPORT_BYTES)
    run([binary, "create", "--backing", backing, "--size", str(EXPORT_BYTES), "--cache", cache])
    states = {"created": (tail(backing), tail(cache))}

    def write_some(sock, byte):
        h = nbd.NBD()
        h.connect_unix(sock)
        h.pwrite(bytes([byte]) * 65536, 0)
        h.flush()
        h.shutdown()

    daemon = Daemon(binary, d, backing, [cache], admin=True)
    admin(binary, daemon.admin, "verify", "--wait")
    write_some(daemon.sock, 1)
    daemon.stop()
    states["clean"] = (tail(backing), tail(cache))

    daemon = Daemon(binary, d, backing, [cache], admin=True)
    admin(binary, daemon.admin, "verify", "--wait")
    write_some(daemon.sock, 2)
    daemon.stop(signal.SIGKILL)
    states["killed"] = (tail(backing), tail(cache))

    daemon = Daemon(binary, d, backing, [cache], admin=True)
    admin(binary, daemon.admin, "cache", "fail")
    write_some(daemon.sock, 3)
    daemon.stop()
    states["degraded"] = (tail(backing), tail(cache))

    os.makedirs(out_dir, exist_ok=True)
    seeds = {}
    for state, (b, c) in states.items():
        # Mode 2: both tails, checksums fixed up; one variant without the cache.
        seeds[f"open-{state}"] = bytes([2, 1]) + b + c
        # Mode 0: each superblock slot that holds one.
        for dev, t in (("backing", b), ("cache", c)):
            for slot in range(2):
                sb = t[len(t) - (2 - slot) * PAGE:][:PAGE]
                if sb[:7] == b"SPRDISK":
                    seeds[f"sb-{state}-{dev}-{slot}"] = bytes([0, 0]) + sb
    # Mode 1: real one-page bitmap areas (headers rewritten to the target's owner): the backing's
    # write-intent bits after a kill, its changed-regions bits when degraded, a cache's valid bits.
    for state, dev in (("killed", 0), ("degraded", 0), ("clean", 1)):
        seeds[f"bitmap-{state}-{('backing', 'cache')[dev]}"] = bytes([1, 7, 0, 0, 0]) + states[state][dev]
    seeds["open-created-nocache"] = bytes([2, 5]) + states["created"][0] + states["created"][1]
    # Mode 1 with several pages and generations in both slots, payloads patterned.
    for pages in (2,):
        area = bytearray(4 * pages * PAGE + 2 * PAGE)
        for i in range(4 * pages):
            rec = memoryview(area)[i * PAGE:(i + 1) * PAGE]
            slot = (i // pages) % 2
            rec[16:24] = (2 * (i % pages + 1) + slot).to_bytes(8, "little")
            rec[64:64 + 64] = bytes([(i * 37 + k) & 0xFF for k in range(64)])
        seeds[f"bitmap-synthetic-{pages}"] = bytes([1, 7, pages - 1, 0x10, 0x27]) + bytes(area)
    for name, data in seeds.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "superdisk"))
    ap.add_argument("--only", choices=["server", "meta"])
    a = ap.parse_args()
    for tool in ("nbdinfo", "qemu-io", "qemu-img", "fio"):
        if shutil.which(tool) is None:
            sys.exit(f"make_corpus: `{tool}` is not installed")
    work = tempfile.mkdtemp(prefix="superdisk-corpus-")
    try:
        if a.only in (None, "server"):
            server_corpus(a.bin, work, os.path.join(ROOT, "fuzz", "corpus", "server"))
        if a.only in (None, "meta"):
            meta_corpus(a.bin, work, os.path.join(ROOT, "fuzz", "corpus", "meta"))
    finally:
        # A step that failed half-way (sys.exit) leaves its daemon running.
        for d in DAEMONS:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    print("seeds written to fuzz/corpus/{server,meta}; minimize with scripts/fuzz.sh --cmin")


if __name__ == "__main__":
    main()

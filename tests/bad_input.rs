//! Hostile and malformed input over a raw socket. Real clients (libnbd, qemu) never send most of
//! this, so the only way to exercise the server's defences is to speak the wire protocol by hand:
//! the client below is deliberately minimal and strict, and every reply it reads is checked for
//! correct framing, so a server that desynchronises shows up as a framing failure, not a hang.
//!
//! Every case ends by checking that the daemon is alive, logged no panic, and still serves a fresh
//! client a correct write + read round trip.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::Daemon;
use superdisk::nbd::consts::*;
use superdisk::nbd::request::{encode_header, RequestHeader};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The export most cases use: big enough for the health-check region, small enough to be cheap.
const SMALL_EXPORT: u64 = 64 * MIB;
/// Sparse export for the cases that need lengths of gigabytes to be in bounds.
const BIG_EXPORT: u64 = 4 * GIB;

/// Health checks write here, away from the offsets the cases themselves look at.
const HEALTH_REGION: u64 = 32 * MIB;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

/// Only a failure detector: a server that stops answering fails the test instead of hanging CI.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection the server must drop may stay open (it should close at once).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Deterministic, position-dependent bytes, so a misplaced or stale block never compares equal.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to daemon");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap_or_else(|e| panic!("reading {n} bytes from the daemon: {e}"));
    b
}

/// Connects and checks the fixed-newstyle greeting, leaving the client flags to the caller.
fn greeted(port: u16) -> TcpStream {
    let mut s = connect(port);
    // The greeting is due at once; a server busy with another (idle) client must fail here, well
    // before its own 30 s handshake timeout would free it.
    s.set_read_timeout(Some(CLOSE_TIMEOUT)).unwrap();
    let g = read_n(&mut s, 18);
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(be_u64(&g[0..]), NBDMAGIC, "greeting magic");
    assert_eq!(be_u64(&g[8..]), IHAVEOPT, "greeting must be newstyle");
    let hflags = be_u16(&g[16..]);
    assert_ne!(hflags & FLAG_FIXED_NEWSTYLE, 0, "server must offer FIXED_NEWSTYLE");
    assert_ne!(hflags & FLAG_NO_ZEROES, 0, "server must offer NO_ZEROES");
    s
}

fn send_client_flags(s: &mut TcpStream, flags: u32) {
    s.write_all(&flags.to_be_bytes()).unwrap();
}

/// Greeted and past the client flags (fixed newstyle + no zeroes): ready for options.
fn negotiating(port: u16) -> TcpStream {
    let mut s = greeted(port);
    send_client_flags(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    s
}

fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    s.write_all(&option_bytes(option, data)).unwrap();
}

/// Reads one option reply, checking its magic and that it answers `option`.
fn option_reply(s: &mut TcpStream, option: u32) -> (u32, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(be_u64(&h[0..]), OPTION_REPLY_MAGIC, "option reply magic");
    assert_eq!(be_u32(&h[8..]), option, "option reply must echo the option it answers");
    let len = be_u32(&h[16..]) as usize;
    assert!(len <= 64 * 1024, "option reply of {len} bytes is not plausible");
    (be_u32(&h[12..]), read_n(s, len))
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    d
}

/// Reads and closes until EOF and returns whatever arrived first. A connection reset also counts
/// as closed: a server that closes with unread input in its buffer makes the kernel send RST.
/// Panics if the server keeps the connection open.
fn expect_closed(s: &mut TcpStream, what: &str) -> Vec<u8> {
    // Shorter than the daemon's 30 s handshake timeout: a server that ignores the violation and
    // merely times the client out later must fail here, not pass by accident.
    s.set_read_timeout(Some(CLOSE_TIMEOUT)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                assert!(got.len() < 16 * 1024 * 1024, "{what}: server keeps sending instead of closing");
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the server did not close the connection (got {} bytes)", got.len())
            }
            Err(e) => panic!("{what}: unexpected error while waiting for close: {e}"),
        }
    }
}

/// Writes that may fail because the server already closed on us; only closing is asserted later.
fn write_ignoring_close(s: &mut TcpStream, b: &[u8]) {
    if let Err(e) = s.write_all(b) {
        assert!(matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset), "unexpected write error: {e}");
    }
}

/// A request header; the cookie is filled in when it is sent.
fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader { flags, command, cookie: 0, offset, length }
}

/// One whole transmission-phase reply.
#[derive(Debug)]
struct Reply {
    cookie: u64,
    /// 0 on success, else the NBD error value.
    error: u32,
    /// Read data (assembled from all chunks for structured replies); empty for other commands.
    data: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Pending {
    command: u16,
    offset: u64,
    length: u32,
}

/// Chunks received so far for one structured reply.
#[derive(Default)]
struct Partial {
    data: Vec<u8>,
    covered: Vec<(u64, u64)>,
    error: u32,
}

/// A transmission-phase connection. It remembers every request in flight so that each reply can
/// be checked against the request it claims to answer (unknown cookies, simple replies to a
/// structured READ, chunks outside the requested range all fail the test).
struct Conn {
    s: TcpStream,
    structured: bool,
    size: u64,
    tflags: u16,
    pending: HashMap<u64, Pending>,
    partial: HashMap<u64, Partial>,
    next_cookie: u64,
}

impl Conn {
    /// Full handshake: fixed newstyle, NO_ZEROES, optionally STRUCTURED_REPLY, then GO "".
    fn open(port: u16, structured: bool) -> Conn {
        let s = negotiating(port);
        Conn::go(s, "", structured)
    }

    fn go(mut s: TcpStream, name: &str, structured: bool) -> Conn {
        if structured {
            send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
            let (kind, _) = option_reply(&mut s, OPT_STRUCTURED_REPLY);
            assert_eq!(kind, REP_ACK, "STRUCTURED_REPLY must be acknowledged");
        }
        send_option(&mut s, OPT_GO, &go_data(name));
        let mut export = None;
        loop {
            let (kind, data) = option_reply(&mut s, OPT_GO);
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    assert!(data.len() >= 2, "NBD_REP_INFO without a type");
                    if be_u16(&data) == INFO_EXPORT {
                        assert_eq!(data.len(), 12, "NBD_INFO_EXPORT is 12 bytes");
                        export = Some((be_u64(&data[2..]), be_u16(&data[10..])));
                    }
                }
                other => panic!("GO answered with reply type {other:#x}: {}", String::from_utf8_lossy(&data)),
            }
        }
        let (size, tflags) = export.expect("GO must send NBD_INFO_EXPORT before its ACK");
        Conn::transmission(s, size, tflags, structured)
    }

    fn transmission(s: TcpStream, size: u64, tflags: u16, structured: bool) -> Conn {
        assert_ne!(tflags & FLAG_HAS_FLAGS, 0, "HAS_FLAGS must be set");
        Conn { s, structured, size, tflags, pending: HashMap::new(), partial: HashMap::new(), next_cookie: 1 }
    }

    fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Appends request `r` under `cookie` (and its payload) to `buf` and records it as in flight.
    fn queue(&mut self, buf: &mut Vec<u8>, cookie: u64, r: RequestHeader, payload: &[u8]) {
        buf.extend_from_slice(&encode_header(&RequestHeader { cookie, ..r }));
        buf.extend_from_slice(payload);
        if r.command != CMD_DISC {
            let p = Pending { command: r.command, offset: r.offset, length: r.length };
            let old = self.pending.insert(cookie, p);
            assert!(old.is_none(), "test bug: cookie {cookie:#x} reused while in flight");
        }
    }

    fn send(&mut self, cookie: u64, r: RequestHeader, payload: &[u8]) {
        let mut buf = Vec::new();
        self.queue(&mut buf, cookie, r, payload);
        self.s.write_all(&buf).unwrap();
    }

    /// Reads until some request's reply is complete and returns it.
    fn reply(&mut self) -> Reply {
        loop {
            let magic = be_u32(&read_n(&mut self.s, 4));
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let h = read_n(&mut self.s, 12);
                    let (error, cookie) = (be_u32(&h), be_u64(&h[4..]));
                    let p = self.take_pending(cookie);
                    assert!(
                        !(self.structured && p.command == CMD_READ),
                        "simple reply to READ (cookie {cookie:#x}) after structured replies were negotiated"
                    );
                    let data = if p.command == CMD_READ && error == 0 {
                        read_n(&mut self.s, p.length as usize)
                    } else {
                        Vec::new()
                    };
                    return Reply { cookie, error, data };
                }
                STRUCTURED_REPLY_MAGIC => {
                    assert!(self.structured, "structured reply chunk without STRUCTURED_REPLY negotiated");
                    if let Some(r) = self.chunk() {
                        return r;
                    }
                }
                other => panic!("bad reply magic {other:#010x}: the server's stream is desynchronised"),
            }
        }
    }

    fn take_pending(&mut self, cookie: u64) -> Pending {
        self.pending.remove(&cookie).unwrap_or_else(|| panic!("reply for cookie {cookie:#x}, which is not in flight"))
    }

    /// Reads one structured chunk (after its magic); returns the reply if the chunk was the last.
    fn chunk(&mut self) -> Option<Reply> {
        let h = read_n(&mut self.s, 16);
        let (flags, kind, cookie, len) = (be_u16(&h), be_u16(&h[2..]), be_u64(&h[4..]), be_u32(&h[12..]));
        assert!(len <= (32 << 20) + 8 + 4096, "chunk of {len} bytes exceeds anything the server may send");
        let payload = read_n(&mut self.s, len as usize);
        let p = *self.pending.get(&cookie).unwrap_or_else(|| panic!("chunk for cookie {cookie:#x}, not in flight"));
        let part = self.partial.entry(cookie).or_default();
        let mut content = |start: u64, n: u64| -> usize {
            assert_eq!(p.command, CMD_READ, "content chunk for a non-READ request");
            let end = start.checked_add(n).expect("chunk range overflows");
            assert!(
                start >= p.offset && end <= p.offset + u64::from(p.length),
                "chunk {start}+{n} lies outside the request {}+{}",
                p.offset,
                p.length
            );
            assert!(
                part.covered.iter().all(|&(s, e)| end <= s || start >= e),
                "chunk {start}+{n} overlaps an earlier chunk"
            );
            part.covered.push((start, end));
            // Sized on the first content chunk only: refused reads of gigabytes allocate nothing here.
            part.data.resize(p.length as usize, 0);
            (start - p.offset) as usize
        };
        match kind {
            REPLY_TYPE_NONE => {
                assert_eq!(len, 0, "NONE chunk with a payload");
                assert_ne!(flags & REPLY_FLAG_DONE, 0, "NONE chunk must be the last");
            }
            REPLY_TYPE_OFFSET_DATA => {
                assert!(len >= 9, "OFFSET_DATA chunk of length {len} (must be at least 9)");
                let at = content(be_u64(&payload), u64::from(len - 8));
                part.data[at..at + len as usize - 8].copy_from_slice(&payload[8..]);
            }
            REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(len, 12, "OFFSET_HOLE chunk must be 12 bytes");
                let hole = be_u32(&payload[8..]);
                assert_ne!(hole, 0, "empty hole chunk");
                let at = content(be_u64(&payload), u64::from(hole));
                part.data[at..at + hole as usize].fill(0);
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let fixed = if kind == REPLY_TYPE_ERROR { 6 } else { 14 };
                assert!(len >= fixed, "error chunk too short");
                let msg_len = u32::from(be_u16(&payload[4..]));
                assert!(msg_len <= len - fixed, "error message length exceeds the chunk");
                let error = be_u32(&payload);
                assert_ne!(error, 0, "error chunk with error 0");
                part.error = error;
            }
            other => panic!("unknown structured reply type {other:#x}"),
        }
        if flags & REPLY_FLAG_DONE == 0 {
            return None;
        }
        let part = self.partial.remove(&cookie).unwrap();
        self.take_pending(cookie);
        if part.error == 0 && p.command == CMD_READ {
            let total: u64 = part.covered.iter().map(|&(s, e)| e - s).sum();
            assert_eq!(total, u64::from(p.length), "successful READ reply does not cover the request");
        }
        let data = if part.error == 0 { part.data } else { Vec::new() };
        Some(Reply { cookie, error: part.error, data })
    }

    /// Sends one request and waits for its reply (nothing else may be in flight).
    fn request(&mut self, r: RequestHeader, payload: &[u8]) -> Reply {
        assert!(self.pending.is_empty(), "test bug: request() with others in flight");
        let cookie = self.cookie();
        self.send(cookie, r, payload);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        r
    }

    fn expect_error(&mut self, r: RequestHeader, payload: &[u8], want: u32, what: &str) {
        let r = self.request(r, payload);
        assert_eq!(r.error, want, "{what}: expected NBD error {want}, got {}", r.error);
    }

    fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let r = self.request(req(CMD_READ, 0, offset, length), &[]);
        assert_eq!(r.error, 0, "READ {offset}+{length} failed");
        r.data
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let r = self.request(req(CMD_WRITE, 0, offset, u32::try_from(data.len()).unwrap()), data);
        assert_eq!(r.error, 0, "WRITE {offset}+{} failed", data.len());
    }

    fn ok(&mut self, r: RequestHeader, what: &str) {
        let r = self.request(r, &[]);
        assert_eq!(r.error, 0, "{what} failed with {}", r.error);
    }

    /// A valid read after a rejected request: the connection must still be in sync.
    fn assert_usable(&mut self, what: &str) {
        let r = self.request(req(CMD_READ, 0, 0, 4096), &[]);
        assert_eq!(r.error, 0, "{what}: a valid READ afterwards failed");
        assert_eq!(r.data.len(), 4096);
    }

    /// NBD_CMD_DISC; the server must then close (after answering anything still in flight).
    fn disconnect(mut self) {
        self.send(0, req(CMD_DISC, 0, 0, 0), &[]);
        while !self.pending.is_empty() {
            self.reply();
        }
        let rest = expect_closed(&mut self.s, "after NBD_CMD_DISC");
        assert!(rest.is_empty(), "{} unexpected bytes after NBD_CMD_DISC", rest.len());
    }
}

static HEALTH_SEED: AtomicU64 = AtomicU64::new(1);

/// The daemon survived (no exit, no panic in its log) and a brand-new client gets correct data.
fn assert_healthy(d: &mut Daemon) {
    d.assert_alive();
    let seed = HEALTH_SEED.fetch_add(1, Ordering::Relaxed);
    let offset = HEALTH_REGION + (seed * 7919) % MIB;
    let data = pattern(seed, 4096 + (seed as usize * 131) % 8192);
    let mut c = Conn::open(d.port, seed % 2 == 0);
    c.write(offset, &data);
    assert_eq!(c.read(offset, data.len() as u32), data, "fresh client read back different data");
    c.disconnect();
    d.assert_alive();
}

/// Current resident size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Peak resident and peak virtual size of a process, in KiB.
fn memory_peaks_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmHWM:"), field("VmPeak:"))
}

/// A train of valid-looking READ headers with cookies nobody sent: used as a WRITE payload, it turns
/// a server that fails to consume a rejected payload into one that answers unknown cookies.
fn trap_payload(len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len + REQUEST_HEADER_BYTES);
    let mut i = 0;
    while p.len() < len {
        let h = RequestHeader { flags: 0, command: CMD_READ, cookie: 0xBAD0_0000 + i, offset: 0, length: 512 };
        p.extend_from_slice(&encode_header(&h));
        i += 1;
    }
    p.truncate(len);
    p
}

#[test]
fn garbage_instead_of_client_flags_closes_the_connection() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    // "GET " read as client flags has unknown bits set; the rest is left unread by the server.
    let cases: [(&str, &[u8]); 3] = [
        ("an HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("all-ones flags", &[0xff; 4]),
        ("binary noise", &[0x00, 0x00, 0x00, 0x83, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]),
    ];
    for (what, bytes) in cases {
        let mut s = greeted(d.port);
        write_ignoring_close(&mut s, bytes);
        let got = expect_closed(&mut s, what);
        assert!(got.is_empty(), "{what}: server sent {} bytes instead of closing", got.len());
        assert_healthy(&mut d);
    }
    // Two bytes of the four, then EOF: the server must not wait forever or crash on the short read.
    let mut s = greeted(d.port);
    s.write_all(&[0, 0]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(expect_closed(&mut s, "half the client flags").is_empty());
    assert_healthy(&mut d);
    // Valid flags, then something that is not an option header: the stream cannot be resynchronised.
    let mut s = negotiating(d.port);
    write_ignoring_close(&mut s, &[0x5a; 16]);
    let got = expect_closed(&mut s, "bad option magic");
    assert!(got.is_empty(), "bad option magic: server sent {} bytes", got.len());
    assert_healthy(&mut d);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    for flags in [FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES | 1 << 2, 1 << 31, FLAG_C_FIXED_NEWSTYLE | 1 << 9] {
        let mut s = greeted(d.port);
        send_client_flags(&mut s, flags);
        // A well-behaved client would wait here; the option it sends after must not be answered.
        write_ignoring_close(&mut s, &option_bytes(OPT_GO, &go_data("")));
        let got = expect_closed(&mut s, &format!("client flags {flags:#x}"));
        assert!(got.is_empty(), "client flags {flags:#x}: server answered {} bytes instead of closing", got.len());
        assert_healthy(&mut d);
    }
}

#[test]
fn unknown_options_get_unsup_and_negotiation_continues() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    let mut s = negotiating(d.port);
    // 0 is unassigned, 4 is the withdrawn PEEK_EXPORT, 11 is EXTENDED_HEADERS (not offered here),
    // the others are simply unknown; with and without data.
    let unknown: [(u32, Vec<u8>); 6] = [
        (0, vec![]),
        (4, vec![1, 2, 3]),
        (11, vec![]),
        (0x1234, pattern(3, 100)),
        (0x7fff_ffff, vec![]),
        (0xffff_ffff, pattern(4, 4096)),
    ];
    for (option, data) in &unknown {
        send_option(&mut s, *option, data);
        let (kind, msg) = option_reply(&mut s, *option);
        assert_eq!(kind, REP_ERR_UNSUP, "option {option:#x} must get NBD_REP_ERR_UNSUP");
        assert!(std::str::from_utf8(&msg).is_ok(), "error message must be UTF-8");
    }
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut s, OPT_STARTTLS).0, REP_ERR_POLICY, "STARTTLS without TLS configured");
    // GO for an export that does not exist is an error reply, not a disconnect.
    send_option(&mut s, OPT_GO, &go_data("no-such-export"));
    assert_eq!(option_reply(&mut s, OPT_GO).0, REP_ERR_UNKNOWN);
    // Malformed GO data (name length larger than the data) is ERR_INVALID, and negotiation goes on.
    send_option(&mut s, OPT_GO, &[0, 0, 0, 200, b'x']);
    assert_eq!(option_reply(&mut s, OPT_GO).0, REP_ERR_INVALID);
    // All of that pipelined with GO on the same connection must still end in a working session.
    let mut c = Conn::go(s, "", true);
    assert_eq!(c.size, SMALL_EXPORT);
    let data = pattern(11, 8192);
    c.write(4096, &data);
    assert_eq!(c.read(4096, 8192), data);
    c.disconnect();
    assert_healthy(&mut d);
}

#[test]
fn option_claiming_gigabytes_of_data_is_refused() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    for (option, claimed) in
        [(OPT_GO, u32::MAX), (0x4242, u32::MAX), (OPT_SET_META_CONTEXT, 1 << 31), (OPT_GO, (64 << 10) + 1)]
    {
        let mut s = negotiating(d.port);
        let mut header = IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&option.to_be_bytes());
        header.extend_from_slice(&claimed.to_be_bytes());
        s.write_all(&header).unwrap();
        // Some of the claimed data, then silence: a server trying to read (or skip) it all would wait.
        write_ignoring_close(&mut s, &pattern(5, 64 * 1024));
        let what = format!("option {option:#x} claiming {claimed} bytes");
        let got = expect_closed(&mut s, &what);
        // Closing outright is what we implement; an error reply before the close is also spec-conformant.
        let mut rest = &got[..];
        while !rest.is_empty() {
            assert!(rest.len() >= 20, "{what}: partial option reply before close");
            assert_eq!(be_u64(rest), OPTION_REPLY_MAGIC, "{what}: garbage before close");
            assert_ne!(be_u32(&rest[12..]) & (1 << 31), 0, "{what}: a non-error reply");
            rest = &rest[(20 + be_u32(&rest[16..]) as usize).min(rest.len())..];
        }
        assert_healthy(&mut d);
    }
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    for structured in [false, true] {
        let mut c = Conn::open(d.port, structured);
        c.assert_usable("before the bad magic");
        let mut bad = encode_header(&RequestHeader { flags: 0, command: CMD_READ, cookie: 9, offset: 0, length: 512 });
        bad[3] ^= 0x01;
        c.s.write_all(&bad).unwrap();
        let got = expect_closed(&mut c.s, "bad request magic");
        assert!(got.is_empty(), "bad request magic got {} bytes of reply instead of a close", got.len());
        assert_healthy(&mut d);
    }
}

#[test]
fn out_of_bounds_requests_get_the_spec_errors_and_the_connection_goes_on() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    let size = SMALL_EXPORT;
    for structured in [false, true] {
        let mut c = Conn::open(d.port, structured);
        assert_eq!(c.size, size);
        let cases: [(u16, u64, u32, u32, &str); 9] = [
            (CMD_READ, size - 1, 2, EINVAL, "READ straddling the end"),
            (CMD_READ, size, 1, EINVAL, "READ just past the end"),
            (CMD_READ, size + 10 * GIB, 4096, EINVAL, "READ far past the end"),
            (CMD_WRITE, size - 100, 4096, ENOSPC, "WRITE straddling the end"),
            (CMD_WRITE, size, 512, ENOSPC, "WRITE just past the end"),
            (CMD_TRIM, size - 4096, 8192, EINVAL, "TRIM straddling the end"),
            (CMD_WRITE_ZEROES, size - 4096, 8192, ENOSPC, "WRITE_ZEROES straddling the end"),
            (CMD_CACHE, size, 4096, EINVAL, "CACHE past the end"),
            (CMD_FLUSH, 4096, 0, EINVAL, "FLUSH with a nonzero offset"),
        ];
        for (command, offset, length, want, what) in cases {
            let payload = if command == CMD_WRITE { pattern(offset, length as usize) } else { vec![] };
            c.expect_error(req(command, 0, offset, length), &payload, want, what);
            c.assert_usable(what);
        }
        // The last bytes are still reachable: the check is `offset + length <= size`, not `<`.
        let tail = pattern(size + u64::from(structured), 512);
        c.write(size - 512, &tail);
        assert_eq!(c.read(size - 512, 512), tail);
        c.disconnect();
        assert_healthy(&mut d);
    }
    // A write that cannot be honoured on a read-only export is EPERM (and the payload consumed).
    let mut ro = Daemon::start(SMALL_EXPORT, &["--read-only"]);
    let mut c = Conn::open(ro.port, false);
    assert_ne!(c.tflags & FLAG_READ_ONLY, 0, "read-only export must advertise READ_ONLY");
    c.expect_error(req(CMD_WRITE, 0, 0, 4096), &trap_payload(4096), EPERM, "WRITE on a read-only export");
    c.expect_error(req(CMD_TRIM, 0, 0, 4096), &[], EPERM, "TRIM on a read-only export");
    c.expect_error(req(CMD_WRITE_ZEROES, 0, 0, 4096), &[], EPERM, "WRITE_ZEROES on a read-only export");
    c.assert_usable("read-only refusals");
    c.disconnect();
    ro.assert_alive();
}

#[test]
fn rejected_write_payload_is_still_consumed() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    let size = SMALL_EXPORT;
    for structured in [false, true] {
        let mut c = Conn::open(d.port, structured);
        let before = c.read(0, 4096);
        let cases: [(u16, u64, u32, u32, &str); 5] = [
            (0, size - 1000, 4088, ENOSPC, "WRITE past the end"),
            (0, u64::MAX - 100, 4088, ENOSPC, "WRITE whose end overflows u64"),
            (1 << 9, 0, 4088, EINVAL, "WRITE with an unknown flag"),
            (CMD_FLAG_NO_HOLE, 0, 4088, EINVAL, "WRITE with a flag that only applies to WRITE_ZEROES"),
            // Larger than the advertised 32 MiB maximum, yet not a denial of service (spec: up to
            // 2^25 SHOULD be tolerated), so it is refused and its payload skipped.
            (0, 0, (32 << 20) + 4096, EINVAL, "WRITE over the maximum payload"),
        ];
        for (flags, offset, length, want, what) in cases {
            // The rejected write, its payload, and a valid READ, all in one burst: if the payload
            // were not consumed, the server would parse it as the trap's READ headers.
            let (bad, good) = (c.cookie(), c.cookie());
            let mut buf = Vec::new();
            c.queue(&mut buf, bad, req(CMD_WRITE, flags, offset, length), &trap_payload(length as usize));
            c.queue(&mut buf, good, req(CMD_READ, 0, 0, 4096), &[]);
            // Large payloads are written from a thread so that the replies can be read meanwhile.
            let mut w = c.s.try_clone().unwrap();
            let writer = std::thread::spawn(move || w.write_all(&buf).map_err(|e| e.to_string()));
            let mut got: HashMap<u64, Reply> = HashMap::new();
            for _ in 0..2 {
                let r = c.reply();
                got.insert(r.cookie, r);
            }
            writer.join().unwrap().unwrap();
            assert_eq!(got[&bad].error, want, "{what}");
            assert_eq!(got[&good].error, 0, "{what}: the READ after it failed");
            assert_eq!(got[&good].data, before, "{what}: the READ after it returned wrong data");
            // Nothing else may be queued behind: a stray reply would surface here as an unknown cookie.
            assert_eq!(c.read(0, 4096), before, "{what}: the rejected WRITE changed the data");
        }
        c.disconnect();
        assert_healthy(&mut d);
    }
}

#[test]
fn one_gib_read_is_refused_without_allocating_it() {
    let mut d = Daemon::start(BIG_EXPORT, &[]);
    assert_healthy(&mut d);
    let (hwm_before, _) = memory_peaks_kib(d.pid());
    for (structured, want) in [(false, EINVAL), (true, EOVERFLOW)] {
        let mut c = Conn::open(d.port, structured);
        assert_eq!(c.size, BIG_EXPORT);
        c.expect_error(req(CMD_READ, 0, 0, GIB as u32), &[], want, "1 GiB READ");
        c.expect_error(req(CMD_READ, 0, 0, u32::MAX), &[], want, "4 GiB - 1 READ");
        c.assert_usable("oversized READ");
        // Just at the limit is fine and returns the whole range.
        let r = c.request(req(CMD_READ, 0, GIB, 32 << 20), &[]);
        assert_eq!((r.error, r.data.len()), (0, 32 << 20), "a 32 MiB READ must succeed");
        c.disconnect();
        assert_healthy(&mut d);
    }
    let (hwm_after, _) = memory_peaks_kib(d.pid());
    // A 1 GiB buffer would have to be filled to be sent; the 32 MiB reads above are the legitimate
    // peak. The margin covers buffer pools filling up; a gigabyte cannot hide in it.
    assert!(
        hwm_after - hwm_before < 512 * 1024,
        "daemon peak RSS grew by {} MiB serving refused reads",
        (hwm_after - hwm_before) / 1024
    );
}

#[test]
fn offset_plus_length_overflowing_u64_is_rejected() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    for structured in [false, true] {
        let mut c = Conn::open(d.port, structured);
        for (offset, length) in [(u64::MAX - 511, 1024), (u64::MAX, 1), (u64::MAX - 4095, 4096), (1 << 63, u32::MAX)] {
            for (command, want) in [
                (CMD_READ, EINVAL),
                (CMD_WRITE, ENOSPC),
                (CMD_TRIM, EINVAL),
                (CMD_WRITE_ZEROES, ENOSPC),
                (CMD_CACHE, EINVAL),
                (CMD_BLOCK_STATUS, EINVAL),
            ] {
                // Keep the payload small: huge lengths are only sent for commands without one.
                if command == CMD_WRITE && length > 4096 {
                    continue;
                }
                let payload = if command == CMD_WRITE { trap_payload(length as usize) } else { vec![] };
                let what = format!("command {command} at {offset:#x}+{length:#x}");
                c.expect_error(req(command, 0, offset, length), &payload, want, &what);
            }
        }
        c.assert_usable("overflowing requests");
        c.disconnect();
        assert_healthy(&mut d);
    }
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    for structured in [false, true] {
        let mut c = Conn::open(d.port, structured);
        // Unknown commands carry no payload as far as the server can know; 8 is the next to be
        // assigned, 0xffff the last.
        for command in [8u16, 9, 0x100, 0x7fff, 0xffff] {
            c.expect_error(req(command, 0, 0, 4096), &[], EINVAL, &format!("unknown command {command:#x}"));
        }
        let mut flag_cases: Vec<(u16, u16, &str)> = vec![
            (CMD_READ, 1 << 5, "READ with an unknown flag"),
            (CMD_READ, 1 << 15, "READ with the top flag bit"),
            (CMD_READ, CMD_FLAG_NO_HOLE, "READ with NO_HOLE"),
            (CMD_FLUSH, CMD_FLAG_REQ_ONE, "FLUSH with REQ_ONE"),
            (CMD_TRIM, CMD_FLAG_DF, "TRIM with DF"),
            (CMD_CACHE, CMD_FLAG_FAST_ZERO, "CACHE with FAST_ZERO"),
            (CMD_WRITE_ZEROES, CMD_FLAG_REQ_ONE, "WRITE_ZEROES with REQ_ONE"),
        ];
        if !structured {
            // DF only exists once structured replies were negotiated.
            flag_cases.push((CMD_READ, CMD_FLAG_DF, "READ with DF but simple replies"));
        }
        for (command, flags, what) in flag_cases {
            let length = if command == CMD_FLUSH { 0 } else { 4096 };
            c.expect_error(req(command, flags, 0, length), &[], EINVAL, what);
            c.assert_usable(what);
        }
        // The same flag with a payload attached: the payload must be skipped as well.
        c.expect_error(req(CMD_WRITE, 1 << 12, 0, 4096), &trap_payload(4096), EINVAL, "WRITE with an unknown flag");
        c.assert_usable("WRITE with an unknown flag");
        c.disconnect();
        assert_healthy(&mut d);
    }
}

#[test]
fn zero_length_requests_succeed() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    for structured in [false, true] {
        let mut c = Conn::open(d.port, structured);
        let data = pattern(21, 8192);
        c.write(0, &data);
        for offset in [0, 4096, 12345, SMALL_EXPORT] {
            for (command, flags) in [
                (CMD_READ, 0),
                (CMD_WRITE, 0),
                (CMD_WRITE, CMD_FLAG_FUA),
                (CMD_TRIM, 0),
                (CMD_WRITE_ZEROES, 0),
                (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE),
                (CMD_CACHE, 0),
            ] {
                let r = c.request(req(command, flags, offset, 0), &[]);
                assert_eq!(r.error, 0, "zero-length command {command} (flags {flags:#x}) at {offset}");
                assert!(r.data.is_empty());
            }
        }
        // ... and changed nothing.
        assert_eq!(c.read(0, 8192), data, "a zero-length request modified data");
        c.disconnect();
        assert_healthy(&mut d);
    }
}

#[test]
fn write_cut_short_by_disconnect_leaves_earlier_data_intact() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    let original = pattern(31, 64 * 1024);
    let mut c = Conn::open(d.port, false);
    c.write(0, &original);
    c.ok(req(CMD_FLUSH, 0, 0, 0), "FLUSH");
    c.disconnect();

    // Header promises 64 KiB, 1000 bytes arrive, then the client vanishes.
    let mut c = Conn::open(d.port, false);
    let header =
        encode_header(&RequestHeader { flags: 0, command: CMD_WRITE, cookie: 1, offset: 0, length: 64 * 1024 });
    c.s.write_all(&header).unwrap();
    c.s.write_all(&pattern(32, 1000)).unwrap();
    drop(c);
    assert_healthy(&mut d);

    // Same with a header cut in the middle, and with a half-closed socket (FIN, still reading).
    let mut c = Conn::open(d.port, true);
    c.s.write_all(&header[..11]).unwrap();
    drop(c);
    let mut c = Conn::open(d.port, true);
    c.s.write_all(&header).unwrap();
    c.s.write_all(&pattern(33, 30_000)).unwrap();
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    let got = expect_closed(&mut c.s, "EOF in the middle of a WRITE payload");
    assert!(got.is_empty(), "an incomplete WRITE was answered");
    assert_healthy(&mut d);

    // The server only applies a WRITE whose whole payload arrived, so none of the torn bytes landed.
    let mut c = Conn::open(d.port, false);
    assert_eq!(c.read(0, 64 * 1024), original, "a WRITE cut short by a disconnect changed the data");
    c.disconnect();
}

#[test]
fn export_name_option() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    // Unknown name: EXPORT_NAME cannot carry an error, so the server must just close.
    for name in ["nope", "superdisk2", "\u{fffd}"] {
        let mut s = negotiating(d.port);
        send_option(&mut s, OPT_EXPORT_NAME, name.as_bytes());
        let got = expect_closed(&mut s, &format!("EXPORT_NAME {name:?}"));
        assert!(got.is_empty(), "EXPORT_NAME {name:?}: got {} bytes instead of a close", got.len());
        assert_healthy(&mut d);
    }
    // Not UTF-8 at all.
    let mut s = negotiating(d.port);
    send_option(&mut s, OPT_EXPORT_NAME, &[0xff, 0xfe, 0x00]);
    assert!(expect_closed(&mut s, "EXPORT_NAME with invalid UTF-8").is_empty());
    assert_healthy(&mut d);

    // The known names work: without NO_ZEROES the reply carries 124 bytes of padding.
    for (name, no_zeroes) in [("superdisk", false), ("", true)] {
        let mut s = greeted(d.port);
        send_client_flags(&mut s, FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 });
        send_option(&mut s, OPT_EXPORT_NAME, name.as_bytes());
        let r = read_n(&mut s, 10);
        if !no_zeroes {
            assert_eq!(read_n(&mut s, 124), vec![0u8; 124], "EXPORT_NAME padding must be zeroes");
        }
        let mut c = Conn::transmission(s, be_u64(&r), be_u16(&r[8..]), false);
        assert_eq!(c.size, SMALL_EXPORT);
        let data = pattern(41, 4096);
        c.write(8192, &data);
        assert_eq!(c.read(8192, 4096), data);
        c.disconnect();
    }
    assert_healthy(&mut d);
}

#[test]
fn disc_with_requests_in_flight_answers_them_before_closing() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    for structured in [false, true] {
        let mut c = Conn::open(d.port, structured);
        let chunk = 256 * 1024;
        let base = u64::from(structured) * 8 * MIB;
        let mut buf = Vec::new();
        let mut written = Vec::new();
        for i in 0..8u64 {
            let data = pattern(50 + i + base, chunk);
            let cookie = c.cookie();
            c.queue(&mut buf, cookie, req(CMD_WRITE, 0, base + i * chunk as u64, chunk as u32), &data);
            written.push(data);
            let cookie = c.cookie();
            c.queue(&mut buf, cookie, req(CMD_READ, 0, 4 * MIB + i * chunk as u64, chunk as u32), &[]);
        }
        let cookie = c.cookie();
        c.queue(&mut buf, cookie, req(CMD_FLUSH, 0, 0, 0), &[]);
        c.queue(&mut buf, 0, req(CMD_DISC, 0, 0, 0), &[]);
        let in_flight = c.pending.len();
        let mut w = c.s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&buf).map_err(|e| e.to_string()));
        for _ in 0..in_flight {
            let r = c.reply();
            assert_eq!(r.error, 0, "request {:#x} failed", r.cookie);
        }
        writer.join().unwrap().unwrap();
        assert!(c.pending.is_empty());
        let rest = expect_closed(&mut c.s, "after NBD_CMD_DISC");
        assert!(rest.is_empty(), "{} bytes after all replies to a DISC'ed connection", rest.len());
        // The writes answered before the close are really there.
        let mut c = Conn::open(d.port, false);
        for (i, data) in written.iter().enumerate() {
            assert_eq!(&c.read(base + i as u64 * chunk as u64, chunk as u32), data, "write {i} before DISC");
        }
        c.disconnect();
        assert_healthy(&mut d);
    }
}

#[test]
fn idle_and_stalled_clients_do_not_block_others() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    // Connected, greeting unread, nothing sent.
    let silent = connect(d.port);
    // Greeted, client flags never sent.
    let greeted_only = greeted(d.port);
    // Half an option header.
    let mut half_option = negotiating(d.port);
    half_option.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    // In transmission, half a request header.
    let mut half_request = Conn::open(d.port, false);
    half_request
        .s
        .write_all(
            &encode_header(&RequestHeader { flags: 0, command: CMD_READ, cookie: 1, offset: 0, length: 512 })[..10],
        )
        .unwrap();
    // In transmission, a WRITE whose payload stops halfway, holding whatever the server reserved.
    let mut half_write = Conn::open(d.port, true);
    half_write
        .s
        .write_all(&encode_header(&RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 1 << 20,
        }))
        .unwrap();
    half_write.s.write_all(&pattern(60, 4096)).unwrap();

    // With all of them hanging, other clients are served, repeatedly, on both kinds of session.
    for _ in 0..3 {
        assert_healthy(&mut d);
    }
    // A client that stays idle in transmission does not stop another from working either.
    let mut idle = Conn::open(d.port, true);
    assert_healthy(&mut d);
    idle.assert_usable("an idle session after others came and went");
    idle.disconnect();
    drop((silent, greeted_only, half_option, half_request, half_write));
    assert_healthy(&mut d);
}

#[test]
fn huge_trim_and_write_zeroes_are_cheap_and_correct() {
    let mut d = Daemon::start(BIG_EXPORT, &[]);
    assert_healthy(&mut d);
    let mut c = Conn::open(d.port, true);
    let (start, len) = (512 * MIB, 3 * GIB);
    // Markers inside the range (must become zero), and just outside it on both sides (must stay).
    let inside = [start, start + GIB + 12345, start + len - 4096];
    let outside = [start - 4096, start + len];
    let mark = |c: &mut Conn, round: u64| {
        for (i, &at) in inside.iter().chain(&outside).enumerate() {
            c.write(at, &pattern(round * 10 + i as u64, 4096));
        }
    };
    let check = |c: &mut Conn, round: u64, inside_zero: bool, what: &str| {
        for (i, &at) in inside.iter().chain(&outside).enumerate() {
            let got = c.read(at, 4096);
            if i >= inside.len() {
                assert_eq!(got, pattern(round * 10 + i as u64, 4096), "{what}: data outside the range at {at} changed");
            } else if inside_zero {
                assert!(got.iter().all(|&b| b == 0), "{what}: {at} does not read back zero");
            }
        }
    };
    let (hwm0, peak0) = memory_peaks_kib(d.pid());

    mark(&mut c, 1);
    c.ok(req(CMD_WRITE_ZEROES, 0, start, len as u32), "3 GiB WRITE_ZEROES");
    check(&mut c, 1, true, "WRITE_ZEROES");
    // Reading a whole 32 MiB stretch in the middle checks more than the markers.
    let mid = c.read(start + 2 * GIB, 32 << 20);
    assert!(mid.iter().all(|&b| b == 0), "WRITE_ZEROES left non-zero bytes mid-range");

    mark(&mut c, 2);
    c.ok(req(CMD_WRITE_ZEROES, CMD_FLAG_FUA, start, len as u32), "3 GiB WRITE_ZEROES with FUA");
    check(&mut c, 2, true, "WRITE_ZEROES+FUA");

    mark(&mut c, 3);
    c.ok(req(CMD_TRIM, 0, start, len as u32), "3 GiB TRIM");
    // After a TRIM the spec lets the range read back as anything until rewritten, so only success
    // and the untouched neighbours are asserted here (zeroes are WRITE_ZEROES' promise, not TRIM's).
    check(&mut c, 3, false, "TRIM");
    // Maximum u32 length reaching exactly the end of the export.
    c.ok(req(CMD_TRIM, 0, BIG_EXPORT - u64::from(u32::MAX), u32::MAX), "TRIM of 4 GiB - 1 to the end");
    c.disconnect();

    let (hwm1, peak1) = memory_peaks_kib(d.pid());
    // Zeroing gigabytes must not go through a buffer of that size. Resident growth would show a
    // buffer that was filled; virtual growth one that was merely allocated. Both margins are far
    // below the 3 GiB such a buffer needs and far above what thread stacks and allocator arenas add.
    assert!(hwm1 - hwm0 < 512 * 1024, "peak RSS grew by {} MiB during TRIM/WRITE_ZEROES", (hwm1 - hwm0) / 1024);
    assert!(peak1 - peak0 < 2 * 1024 * 1024, "peak virtual size grew by {} MiB", (peak1 - peak0) / 1024);
    assert_healthy(&mut d);
}

#[test]
fn client_that_never_reads_replies_cannot_grow_server_memory() {
    let mut d = Daemon::start(SMALL_EXPORT, &[]);
    assert_healthy(&mut d);
    let rss_before = rss_kib(d.pid());
    let mut c = Conn::open(d.port, true);
    // Requests that are refused without any I/O are the cheapest to send and, unless their replies
    // count against the in-flight budget, queue without limit when the client stops reading. 24 MiB
    // of them is ~900k requests: with no backpressure that is hundreds of MiB of queued replies;
    // with it, the server stops reading after a few MiB and the writes below stall.
    let mut burst = Vec::with_capacity(1 << 20);
    for i in 0..(1 << 20) / (2 * REQUEST_HEADER_BYTES) as u64 {
        let unknown = RequestHeader { flags: 0, command: 0x77, cookie: i, offset: 0, length: 0 };
        let past_end = RequestHeader { flags: 0, command: CMD_READ, cookie: i, offset: SMALL_EXPORT, length: 4096 };
        burst.extend_from_slice(&encode_header(&unknown));
        burst.extend_from_slice(&encode_header(&past_end));
    }
    c.s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sent = 0usize;
    while sent < 24 << 20 {
        match c.s.write_all(&burst) {
            Ok(()) => sent += burst.len(),
            // The server stopped reading: backpressure works, which is the point.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("writing requests: {e}"),
        }
    }
    let grown_kib = rss_kib(d.pid()).saturating_sub(rss_before);
    assert!(
        grown_kib < 64 * 1024,
        "daemon RSS grew by {} MiB while a client sent {} MiB of refused requests and read no replies",
        grown_kib / 1024,
        sent >> 20
    );
    drop(c);
    assert_healthy(&mut d);
}

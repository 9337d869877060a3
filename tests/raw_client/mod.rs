//! A minimal NBD client over any `Read + Write` stream (a TCP socket, or a TLS stream on one), for
//! the tests whose point is the wire itself: who gets a greeting, what an option is answered with
//! before and after STARTTLS, when the server hangs up. Simple replies only (no structured-reply
//! negotiation) unless a test negotiates them by hand. Used by tests/tls.rs and tests/access.rs.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use superdisk::nbd::consts::*;
use superdisk::nbd::request::{encode_header, RequestHeader};

/// Only a failure detector: a server that stops answering fails the test instead of hanging CI.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to daemon");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

pub fn read_n<S: Read>(s: &mut S, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap_or_else(|e| panic!("reading {n} bytes from the daemon: {e}"));
    b
}

/// Reads the fixed-newstyle greeting and sends the client flags (fixed newstyle, no zeroes).
pub fn greet<S: Read + Write>(s: &mut S) {
    let g = read_n(s, 18);
    assert_eq!(be_u64(&g[0..]), NBDMAGIC, "greeting magic");
    assert_eq!(be_u64(&g[8..]), IHAVEOPT, "greeting must be newstyle");
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
}

pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    b.extend_from_slice(data);
    b
}

pub fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) {
    s.write_all(&option_bytes(option, data)).unwrap();
    s.flush().unwrap();
}

/// Reads one option reply answering `option`: (reply type, data).
pub fn option_reply<S: Read>(s: &mut S, option: u32) -> (u32, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(be_u64(&h[0..]), OPTION_REPLY_MAGIC, "option reply magic");
    assert_eq!(be_u32(&h[8..]), option, "option reply must echo the option it answers");
    let len = be_u32(&h[16..]) as usize;
    assert!(len <= 64 * 1024, "option reply of {len} bytes is not plausible");
    (be_u32(&h[12..]), read_n(s, len))
}

pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Sends GO for the default export and reads its replies: Ok(export size) on ACK, Err(reply type)
/// on an error reply.
pub fn go<S: Read + Write>(s: &mut S) -> Result<u64, u32> {
    send_option(s, OPT_GO, &go_data(""));
    let mut size = None;
    loop {
        let (kind, data) = option_reply(s, OPT_GO);
        match kind {
            REP_INFO if be_u16(&data) == INFO_EXPORT => size = Some(be_u64(&data[2..])),
            REP_INFO => {}
            REP_ACK => return Ok(size.expect("GO acknowledged without INFO_EXPORT")),
            err => return Err(err),
        }
    }
}

/// An NBD session in the transmission phase with simple replies.
pub struct Session<S: Read + Write> {
    pub s: S,
    pub size: u64,
    cookie: u64,
}

impl<S: Read + Write> Session<S> {
    /// Greets, sends GO and enters transmission; panics if the server refuses.
    pub fn open(mut s: S) -> Self {
        greet(&mut s);
        let size = go(&mut s).unwrap_or_else(|e| panic!("GO refused with reply type {e:#x}"));
        Session { s, size, cookie: 0 }
    }

    /// After a handshake done elsewhere.
    pub fn in_transmission(s: S, size: u64) -> Self {
        Session { s, size, cookie: 0 }
    }

    pub fn send(&mut self, command: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        self.cookie += 1;
        let h = RequestHeader { flags, command, cookie: self.cookie, offset, length };
        let mut b = encode_header(&h).to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
        self.s.flush().unwrap();
        self.cookie
    }

    /// Reads one simple reply: (cookie, error).
    pub fn reply(&mut self) -> (u64, u32) {
        let r = read_n(&mut self.s, 16);
        assert_eq!(be_u32(&r), SIMPLE_REPLY_MAGIC, "expected a simple reply");
        (be_u64(&r[8..]), be_u32(&r[4..]))
    }

    /// Writes and waits for the reply; returns the NBD error (0 = success).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let c = self.send(CMD_WRITE, 0, offset, data.len() as u32, data);
        let (cookie, err) = self.reply();
        assert_eq!(cookie, c, "reply cookie");
        err
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let c = self.send(CMD_READ, 0, offset, length, &[]);
        let (cookie, err) = self.reply();
        assert_eq!((cookie, err), (c, 0), "read at {offset} failed");
        read_n(&mut self.s, length as usize)
    }

    pub fn flush(&mut self) -> u32 {
        let c = self.send(CMD_FLUSH, 0, 0, 0, &[]);
        let (cookie, err) = self.reply();
        assert_eq!(cookie, c, "reply cookie");
        err
    }

    /// Write, flush, read back: the session works.
    pub fn round_trip(&mut self, offset: u64, seed: u8) {
        let data: Vec<u8> = (0..8192u32).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        assert_eq!(self.write(offset, &data), 0, "write at {offset}");
        assert_eq!(self.flush(), 0, "flush");
        assert_eq!(self.read(offset, data.len() as u32), data, "read back at {offset}");
    }

    pub fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, &[]);
    }
}

/// Waits for the server to close the connection and returns what arrived before. A reset counts
/// as closed. Panics if it is still open after `limit`.
pub fn expect_closed(s: &mut TcpStream, limit: Duration, what: &str) -> Vec<u8> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                assert!(got.len() < 16 << 20, "{what}: server keeps sending instead of closing");
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the server did not close the connection within {limit:?} (got {} bytes)", got.len())
            }
            Err(e) => panic!("{what}: unexpected error while waiting for close: {e}"),
        }
    }
}

//! One connection to the server, negotiated up to the transmission phase: the socket the kernel
//! then takes over. Blocking I/O with a deadline: the supervisor does nothing else meanwhile.

use crate::nbd::client::{
    answer_greeting, opt_abort, opt_go, reply_header, ExportInfo, GoReplies, GREETING_BYTES, OPTION_REPLY_HEADER_BYTES,
};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Why a dial failed: worth retrying (the server is not there yet, or restarting), or not (it
/// answered and said no, or is not an NBD server).
#[derive(Debug)]
pub enum DialError {
    Unreachable(io::Error),
    Refused(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Unreachable(e) => write!(f, "{e}"),
            DialError::Refused(m) => write!(f, "{m}"),
        }
    }
}

/// Connects and negotiates `export`; the socket in transmission phase and what the server said.
pub fn dial(at: &Endpoint, export: &str, timeout: Duration) -> Result<(OwnedFd, ExportInfo), DialError> {
    let unreachable = |e: io::Error| DialError::Unreachable(io::Error::new(e.kind(), format!("{at}: {e}")));
    match at {
        Endpoint::Unix(p) => {
            let s = std::os::unix::net::UnixStream::connect(p).map_err(unreachable)?;
            s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
            s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
            let info = negotiate(&mut &s, export).map_err(|e| classify(at, e))?;
            // The kernel's requests must never time out in user space: clear the deadlines.
            s.set_read_timeout(None).map_err(unreachable)?;
            s.set_write_timeout(None).map_err(unreachable)?;
            Ok((s.into(), info))
        }
        Endpoint::Tcp(addr) => {
            let s = connect_tcp(addr, timeout).map_err(unreachable)?;
            let info = negotiate(&mut &s, export).map_err(|e| classify(at, e))?;
            s.set_read_timeout(None).map_err(unreachable)?;
            s.set_write_timeout(None).map_err(unreachable)?;
            Ok((s.into(), info))
        }
    }
}

fn connect_tcp(addr: &str, timeout: Duration) -> io::Result<std::net::TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for a in addr.to_socket_addrs()? {
        match std::net::TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

enum Negotiation {
    Io(io::Error),
    Protocol(crate::nbd::client::ClientError),
}

impl From<io::Error> for Negotiation {
    fn from(e: io::Error) -> Self {
        Negotiation::Io(e)
    }
}

fn classify(at: &Endpoint, e: Negotiation) -> DialError {
    match e {
        // A server that closes or resets in the handshake is one that is going away or starting:
        // try again. A timeout too.
        Negotiation::Io(e) => DialError::Unreachable(io::Error::new(e.kind(), format!("{at}: handshake: {e}"))),
        Negotiation::Protocol(p) => DialError::Refused(format!("{at}: {p}")),
    }
}

fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo, Negotiation> {
    let mut greeting = [0u8; GREETING_BYTES];
    s.read_exact(&mut greeting)?;
    let flags = answer_greeting(&greeting).map_err(Negotiation::Protocol)?;
    s.write_all(&flags.to_be_bytes())?;
    s.write_all(&opt_go(export))?;
    let mut replies = GoReplies::new(export);
    loop {
        let mut h = [0u8; OPTION_REPLY_HEADER_BYTES];
        s.read_exact(&mut h)?;
        let (kind, len) = reply_header(&h).map_err(Negotiation::Protocol)?;
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match replies.take(kind, &data) {
            Ok(Some(info)) => return Ok(info),
            Ok(None) => {}
            Err(e) => {
                let _ = s.write_all(&opt_abort());
                return Err(Negotiation::Protocol(e));
            }
        }
    }
}

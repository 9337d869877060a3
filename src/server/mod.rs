//! The NBD front end on tokio: listeners, the handshake driver and the transmission loop. It turns
//! wire requests into [`Volume`] calls; it knows nothing about devices, regions or mirrors.
//!
//! One connection = one reader (this task) + one writer task. The reader decodes a request, checks
//! it against the session (sans-IO `nbd::request::validate`), reserves in-flight bytes, and spawns
//! the I/O; each finished request sends one whole reply to the writer, which batches replies into as
//! few socket writes as it can. Only the writer touches the socket's write half, so replies never
//! interleave (spec: "every reply goes out whole").

mod connection;
mod listen;
pub mod stats;
mod stream;
pub mod tls;
mod zerocopy;

pub use listen::{run, ServerConfig};
pub use stream::{fd_streams, serve_stream, stdio_streams, StreamConfig};

use crate::config::{Cidr, ConfigError, ServeConfig, TlsMode};
use std::io;

/// Who may connect and what they may hold: TLS, client networks, Unix socket ownership and the
/// server-wide in-flight budget. Built once at start-up ([`Policy::from_config`] reads the
/// certificate files); `Policy::default()` is the open, plain-text policy tests start from.
#[derive(Clone)]
pub struct Policy {
    pub tls_mode: TlsMode,
    /// Present whenever `tls_mode` is not `Off`.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Whether the TLS configuration demands client certificates (for the log).
    pub client_certificates: bool,
    /// TCP client networks allowed in; empty allows every address.
    pub allow: Vec<Cidr>,
    pub unix_owner: Option<u32>,
    pub unix_group: Option<u32>,
    /// Request bytes in flight across all connections together.
    pub max_inflight_bytes_total: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            tls_mode: TlsMode::Off,
            tls: None,
            client_certificates: false,
            allow: Vec::new(),
            unix_owner: None,
            unix_group: None,
            max_inflight_bytes_total: 1 << 30,
        }
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("tls_mode", &self.tls_mode)
            .field("client_certificates", &self.client_certificates)
            .field("allow", &self.allow)
            .field("unix_owner", &self.unix_owner)
            .field("unix_group", &self.unix_group)
            .field("max_inflight_bytes_total", &self.max_inflight_bytes_total)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Reads the TLS files named by the config; errors name the key at fault.
    pub fn from_config(cfg: &ServeConfig) -> Result<Policy, ConfigError> {
        Ok(Policy {
            tls_mode: cfg.tls,
            tls: tls::acceptor(cfg)?,
            client_certificates: cfg.tls != TlsMode::Off && cfg.tls_ca.is_some(),
            allow: cfg.allow.clone(),
            unix_owner: cfg.unix_owner,
            unix_group: cfg.unix_group,
            max_inflight_bytes_total: cfg.max_inflight_bytes_total,
        })
    }

    /// Whether a TCP client at `ip` may connect.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(ip))
    }
}

/// Applies TCP keepalive so half-open connections (a client VM that vanished) are reaped by the
/// kernel in about a minute and a half, without an idle timeout that would cut off a quiet but live
/// kernel client (a mounted filesystem can go hours without I/O).
pub(crate) fn tune_tcp(stream: &tokio::net::TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    stream.set_nodelay(true)?;
    let fd = stream.as_raw_fd();
    let set = |level: i32, name: i32, value: i32| -> io::Result<()> {
        // SAFETY: setsockopt with a pointer to a live i32 and its size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6)?;
    Ok(())
}

/// A bare client for the in-crate tests of whole connections.
#[cfg(test)]
pub(crate) mod testing {
    use crate::nbd::consts::*;
    use crate::nbd::request::{encode_header, RequestHeader};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Old-style negotiation (EXPORT_NAME of the default export), so every reply is simple.
    /// Returns the export size.
    pub async fn negotiate_export_name<S: AsyncRead + AsyncWrite + Unpin>(c: &mut S) -> u64 {
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        assert_eq!(u64::from_be_bytes(greeting[..8].try_into().unwrap()), NBDMAGIC);
        let mut msg = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        msg.extend_from_slice(&0u32.to_be_bytes());
        c.write_all(&msg).await.unwrap();
        let mut info = [0u8; 10];
        c.read_exact(&mut info).await.unwrap();
        u64::from_be_bytes(info[..8].try_into().unwrap())
    }

    pub fn request(command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        encode_header(&RequestHeader { flags: 0, command, cookie, offset, length }).to_vec()
    }
}

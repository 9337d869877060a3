//! The NBD front end on tokio: listeners, the handshake driver and the transmission loop. It turns
//! wire requests into [`Volume`](crate::volume::Volume) calls; it knows nothing about devices, regions or mirrors.
//!
//! One connection = one reader (this task) + one writer task. The reader decodes a request, checks
//! it against the session (sans-IO `nbd::request::validate`), reserves in-flight bytes, and spawns
//! the I/O; each finished request sends one whole reply to the writer, which batches replies into as
//! few socket writes as it can. Only the writer touches the socket's write half, so replies never
//! interleave (spec: "every reply goes out whole").
//!
//! # Limits, and why each exists
//! * The handshake must finish within `handshake_timeout_secs` (30): one deadline for the whole
//!   negotiation, TLS included, so a client sending a byte at a time is cut off too.
//! * `allow` (CIDR list) is checked at accept, before the greeting; the Unix socket gets
//!   `unix_mode`, `unix_owner`, `unix_group` right after bind. TLS material is read while the
//!   config is validated, so a bad certificate stops the daemon before any device is opened.
//! * In-flight bytes: `max_inflight_bytes_per_connection` (64 MiB, always at least one maximum
//!   request) and `max_inflight_bytes_total` (1 GiB, with a 1 MiB reserve per connection outside
//!   it so clients holding the total cannot starve others' small requests). Budget is released
//!   only once a reply is written, so a client that does not read its replies stalls itself and
//!   nobody else; one that accepts no reply bytes for 60 s is cut off.
//! * TCP keepalive (30 s idle, 6 probes 10 s apart) reaps half-open connections. The idle timeout
//!   is off by default (`idle_timeout_secs = 0`): a mounted filesystem can be quiet for hours and
//!   cutting it off would fail the kernel device.
//! * `max_connections` (256) bounds the rest.

mod connection;
pub mod handover;
mod listen;
mod policy;
pub mod stats;
mod stream;
pub mod tls;
mod zerocopy;

pub use listen::{run, Listeners, ServerConfig};
pub use policy::{Cidr, Policy};
pub use stream::{fd_streams, serve_stream, stdio_streams, StreamConfig};

use std::io;

/// How large reads are sent from a device file's page cache (`zero_copy_reads`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroCopyReads {
    /// Read into a buffer, then write the buffer: two copies.
    Off,
    /// `send` from a read-only mapping of the file: one copy (page cache → socket buffer).
    Mapped,
    /// `sendfile`: no copy on the server; the socket carries the page-cache pages themselves.
    Sendfile,
}

/// `idle_poll_us` by default: longer than the gap between a reply and the next request of a
/// client at queue depth 1 on the same machine (20-40 µs measured), far shorter than a second
/// poll of a client that has nothing to send (docs/PERFORMANCE.md, "Idle polling").
pub const DEFAULT_IDLE_POLL_US: u64 = 50;
/// Beyond this a poll costs more CPU than any sleep it could save.
pub const MAX_IDLE_POLL_US: u64 = 1000;

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

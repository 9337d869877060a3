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
mod stream;

pub use listen::{run, ServerConfig};
pub use stream::{fd_streams, serve_stream, stdio_streams, StreamConfig};

use std::io;

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

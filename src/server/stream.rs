//! One NBD connection over any byte stream, outside the listeners: a client on stdin/stdout (`serve
//! --stdio`, as `nbdkit -s`: a parent such as libnbd's `nbd_connect_command` hands us one end of a
//! socketpair), a captured session replayed from a file, or an in-memory pipe in the fuzzer.

use super::connection::{serve_connection, ConnLimits, Transport, BUDGET_UNIT_BYTES};
use super::zerocopy::CopyOnly;
use super::ServerConfig;
use crate::nbd::ExportParams;
use crate::server::stats::ServerStats;
use crate::volume::Volume;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// What one connection is served with: the per-connection half of [`ServerConfig`].
#[derive(Clone)]
pub struct StreamConfig {
    pub export: ExportParams,
    pub max_inflight_bytes: usize,
    pub handshake_timeout: Duration,
    /// Zero disables it.
    pub idle_timeout: Duration,
    pub stats: Arc<ServerStats>,
}

impl StreamConfig {
    /// The daemon's defaults (docs/CONFIG.md) for `export`.
    pub fn new(export: ExportParams) -> Self {
        StreamConfig {
            export,
            max_inflight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::ZERO,
            stats: Arc::default(),
        }
    }
}

impl From<&ServerConfig> for StreamConfig {
    fn from(c: &ServerConfig) -> Self {
        StreamConfig {
            export: c.export.clone(),
            max_inflight_bytes: c.max_inflight_bytes_per_connection,
            handshake_timeout: c.handshake_timeout,
            idle_timeout: c.idle_timeout,
            stats: c.stats.clone(),
        }
    }
}

/// Serves one connection, handshake to disconnect, exactly as a listener's connection is served.
/// Returns once the client is gone (EOF, DISC, a protocol error) and every reply is written, or
/// once `shutdown` turns true and the requests in flight are answered. It does not shut the volume
/// down: the caller owns it.
pub async fn serve_stream<R, W, V>(
    reader: R,
    writer: W,
    volume: Arc<V>,
    cfg: StreamConfig,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    V: Volume,
{
    let stats = cfg.stats.clone();
    stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
    stats.connections_active.fetch_add(1, Ordering::Relaxed);
    // One connection: the server-wide budget is this connection's own (no TLS on a stream).
    let max_request_units = (cfg.export.max_payload_bytes as usize).div_ceil(BUDGET_UNIT_BYTES) + 1;
    let total_units = cfg.max_inflight_bytes.div_ceil(BUDGET_UNIT_BYTES).max(max_request_units);
    let limits = Arc::new(ConnLimits {
        export: cfg.export,
        // Never a plain socket we could send a file into (see `CopyOnly`).
        zero_copy_reads: super::ZeroCopyReads::Off,
        max_inflight_bytes: cfg.max_inflight_bytes,
        handshake_timeout: cfg.handshake_timeout,
        idle_timeout: cfg.idle_timeout,
        // Stdio streams cannot be polled without reading them.
        idle_poll: Duration::ZERO,
        stats: cfg.stats,
        tls_mode: crate::nbd::handshake::TlsMode::Off,
        tls: None,
        total_budget: Arc::new(tokio::sync::Semaphore::new(total_units)),
        // A stream given to us (stdio, a pipe) cannot be handed to another process.
        handover: Arc::default(),
    });
    serve_connection(Pair(reader, writer), volume, limits, shutdown).await;
    stats.connections_active.fetch_sub(1, Ordering::Relaxed);
}

/// A reader and a writer that are one connection.
struct Pair<R, W>(R, W);

impl<R, W> Transport for Pair<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    type R = R;
    type W = CopyOnly<W>;
    fn into_halves(self) -> (R, CopyOnly<W>) {
        (self.0, CopyOnly(self.1))
    }
}

pub type BoxedReader = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxedWriter = Pin<Box<dyn AsyncWrite + Send>>;

/// Async halves for a pair of inherited descriptors (for `--stdio`: dups of 0 and 1). A socket or
/// a pipe is driven by epoll like any connection. Anything else is read and written in place: right
/// for what never waits for a peer (a regular file holding a captured session, `/dev/null`), but a
/// terminal would stall the runtime, so it is refused.
pub fn fd_streams(read_fd: OwnedFd, write_fd: OwnedFd) -> io::Result<(BoxedReader, BoxedWriter)> {
    Ok((reader_of(read_fd)?, writer_of(write_fd)?))
}

/// [`fd_streams`] over duplicates of stdin and stdout; the process's own 0 and 1 stay open, so a
/// stray print cannot land on a reused descriptor.
pub fn stdio_streams() -> io::Result<(BoxedReader, BoxedWriter)> {
    let stdin = io::stdin().lock().as_raw_fd();
    let stdout = io::stdout().lock().as_raw_fd();
    fd_streams(dup(stdin)?, dup(stdout)?)
}

fn dup(fd: i32) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor that nothing else owns.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh, valid descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[derive(PartialEq)]
enum FdKind {
    Socket,
    Pipe,
    Other,
}

fn kind_of(fd: &OwnedFd) -> io::Result<FdKind> {
    // SAFETY: fstat writes into a zeroed stat of the right size for a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the struct is ours and of the size fstat writes; the descriptor is live.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd.as_raw_fd()) } == 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NBD over stdio needs a socket, a pipe or a file, not a terminal",
        ));
    }
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => FdKind::Socket,
        libc::S_IFIFO => FdKind::Pipe,
        _ => FdKind::Other,
    })
}

/// A stream socket of any family: tokio's Unix stream only issues read/write/shutdown, which every
/// stream socket (TCP from inetd included) understands.
fn socket_of(fd: OwnedFd) -> io::Result<tokio::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

fn reader_of(fd: OwnedFd) -> io::Result<BoxedReader> {
    Ok(match kind_of(&fd)? {
        FdKind::Socket => Box::pin(socket_of(fd)?),
        FdKind::Pipe => Box::pin(tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?),
        FdKind::Other => Box::pin(InPlace(std::fs::File::from(fd))),
    })
}

fn writer_of(fd: OwnedFd) -> io::Result<BoxedWriter> {
    Ok(match kind_of(&fd)? {
        FdKind::Socket => Box::pin(socket_of(fd)?),
        FdKind::Pipe => Box::pin(tokio::net::unix::pipe::Sender::from_owned_fd(fd)?),
        FdKind::Other => Box::pin(InPlace(std::fs::File::from(fd))),
    })
}

/// A descriptor whose reads and writes complete at once (a regular file, `/dev/null`), used
/// synchronously from the poll functions.
struct InPlace(std::fs::File);

impl AsyncRead for InPlace {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::io::Read;
        let n = (&self.0).read(buf.initialize_unfilled())?;
        buf.advance(n);
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for InPlace {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::io::Write;
        std::task::Poll::Ready((&self.0).write(buf))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::mem::MemDevice;
    use crate::device::BlockDevice;
    use crate::meta::store;
    use crate::nbd::consts::*;
    use crate::server::testing::{negotiate_export_name, request};
    use crate::volume::PlainVolume;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DATA_BYTES: u64 = 1 << 20;

    async fn volume() -> Arc<PlainVolume<MemDevice>> {
        let dev = MemDevice::new(DATA_BYTES + crate::meta::meta_bytes(DATA_BYTES, crate::meta::DEFAULT_REGION_BYTES));
        let sb = store::new_backing_superblock(dev.size_bytes(), crate::meta::DEFAULT_REGION_BYTES).unwrap();
        store::write_superblock(&dev, &sb).await.unwrap();
        Arc::new(PlainVolume::open(dev, false).await.unwrap())
    }

    fn export(size_bytes: u64) -> ExportParams {
        ExportParams {
            name: "superdisk".into(),
            description: String::new(),
            size_bytes,
            read_only: false,
            fast_zero: false,
            rotational: false,
            min_block_bytes: 1,
            preferred_block_bytes: 4096,
            max_payload_bytes: 32 << 20,
        }
    }

    /// A whole old-fashioned client session (EXPORT_NAME, simple replies) through a socketpair
    /// wrapped by `fd_streams`, as `--stdio` would get it: write, read back, disconnect.
    #[tokio::test]
    async fn serves_one_session_over_inherited_descriptors() {
        let vol = volume().await;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (r, w) = fd_streams(theirs.try_clone().unwrap().into(), theirs.into()).unwrap();
        let (_stop_tx, stop_rx) = watch::channel(false);
        let server =
            tokio::spawn(serve_stream(r, w, vol.clone(), StreamConfig::new(export(vol.size_bytes())), stop_rx));

        ours.set_nonblocking(true).unwrap();
        let mut c = tokio::net::UnixStream::from_std(ours).unwrap();
        assert_eq!(negotiate_export_name(&mut c).await, DATA_BYTES);

        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut msg = request(CMD_WRITE, 1, 4096, data.len() as u32);
        msg.extend_from_slice(&data);
        msg.extend_from_slice(&request(CMD_READ, 2, 4096, data.len() as u32));
        msg.extend_from_slice(&request(CMD_DISC, 3, 0, 0));
        c.write_all(&msg).await.unwrap();
        let mut replies = Vec::new();
        c.read_to_end(&mut replies).await.unwrap();
        server.await.unwrap();

        // Two simple replies: the write's (16 bytes) and the read's (16 + data), in either order.
        assert_eq!(replies.len(), 16 + 16 + data.len());
        let cookie_at = |o: usize| u64::from_be_bytes(replies[o + 8..o + 16].try_into().unwrap());
        let read_at = if cookie_at(0) == 2 { 0 } else { 16 };
        assert_eq!(cookie_at(read_at), 2);
        assert_eq!(u32::from_be_bytes(replies[read_at + 4..read_at + 8].try_into().unwrap()), 0, "read error");
        assert_eq!(&replies[read_at + 16..read_at + 16 + data.len()], &data[..]);
    }

    /// A client that stops mid-request still ends the connection: the server must not wait.
    #[tokio::test]
    async fn truncated_input_ends_the_connection() {
        let vol = volume().await;
        let (client, server_side) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(server_side);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let server =
            tokio::spawn(serve_stream(r, w, vol.clone(), StreamConfig::new(export(vol.size_bytes())), stop_rx));
        let (mut cr, mut cw) = tokio::io::split(client);
        let mut input = Vec::new();
        input.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        input.extend_from_slice(&0u32.to_be_bytes());
        input.extend_from_slice(&request(CMD_WRITE, 1, 0, 1 << 20)[..]);
        input.extend_from_slice(&[0xaa; 100]);
        cw.write_all(&input).await.unwrap();
        cw.shutdown().await.unwrap();
        drop(cw);
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), cr.read_to_end(&mut out)).await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(30), server).await.unwrap().unwrap();
        assert_eq!(out.len(), 18 + 10, "greeting and export info, then no reply to the cut-off write");
    }
}

//! One NBD connection: the handshake ([`negotiate`]), then the transmission phase, where one
//! reader ([`reader`]: decode, validate, budget) hands each request to [`dispatch`] (run it
//! against the volume, answer it exactly once) and one writer ([`writer`]) sends the replies whole
//! and in order.

mod dispatch;
mod negotiate;
mod reader;
mod reply;
mod writer;

use super::handover::{Handover, ParkedConnection, Prefixed, SocketKind};
use super::tls::{Joined, TlsMode};
use super::zerocopy::ReplySink;
use super::ZeroCopyReads;
use crate::nbd::consts::REQUEST_HEADER_BYTES;
use crate::nbd::{ExportParams, Session};
use crate::server::stats::ServerStats;
use crate::volume::Volume;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

pub(crate) struct ConnLimits {
    pub export: ExportParams,
    /// `zero_copy_reads`: only plain sockets can honour it (see `zerocopy`).
    pub zero_copy_reads: ZeroCopyReads,
    pub max_inflight_bytes: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// `idle_poll_us`: how long a writer that has sent every reply polls for the client's next
    /// request before its thread may sleep (zero: never).
    pub idle_poll: Duration,
    pub stats: Arc<ServerStats>,
    pub tls_mode: TlsMode,
    /// Present whenever `tls_mode` is not `Off`.
    pub tls: Option<TlsAcceptor>,
    /// Shared by every connection, in [`BUDGET_UNIT_BYTES`] units: bounds the memory all clients
    /// together can make the server hold, where `max_inflight_bytes` bounds one client's share.
    pub total_budget: Arc<Semaphore>,
    /// Whether a stop parks connections for the next process, and where they go.
    pub handover: Arc<Handover>,
}

/// In-flight accounting unit: budgets are counted in 4 KiB pages so a u32 permit count covers
/// budgets far above any sane setting.
pub(crate) const BUDGET_UNIT_BYTES: usize = 4096;
/// Requests up to this many budget units (64 KiB) are polled in place; larger ones become tasks.
pub(super) const INLINE_MAX_UNITS: usize = 16;
/// Once a request's first byte has arrived, the rest of it (header and payload) must follow within
/// this. Generous: 32 MiB at 1 MB/s still fits.
pub(super) const PARTIAL_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that accepts none of our reply bytes for this long is cut off. Its replies hold
/// in-flight budget, part of the server-wide total: without a limit, a few clients that stop
/// reading would stall every other client for as long as they stay connected.
pub(super) const REPLY_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Each connection may hold this much in flight outside the server-wide total, so that while a
/// few clients hold the whole total (large reads they do not read back), every other client's
/// small requests still go through. The memory bound is `max_inflight_bytes_total` plus this
/// times `max_connections`.
pub(super) const CONN_RESERVE_BYTES: usize = 1 << 20;
const SHUTDOWN_HANDSHAKE_GRACE: Duration = Duration::from_secs(2);
/// Buffer for the handshake's small messages (replies proper are written with writev).
pub(super) const WRITE_BUFFER_BYTES: usize = 16 * 1024;
pub(super) const READ_BUFFER_BYTES: usize = 64 * 1024;

/// A connected socket that splits into halves the reader and writer tasks own separately.
pub(crate) trait Transport: Send + 'static {
    type R: AsyncRead + Unpin + Send + 'static;
    type W: ReplySink;
    fn into_halves(self) -> (Self::R, Self::W);
    /// The socket whole again, with the bytes the read half still held, for another process to
    /// carry on with (see `handover`). None where a stream cannot be handed over.
    fn park(_r: Self::R, _w: Self::W) -> Option<(OwnedFd, SocketKind, Vec<u8>)> {
        None
    }
}

/// A listener's socket, with bytes an earlier process had already read from it (empty when the
/// connection was accepted here).
pub(crate) struct Sock<S>(pub S, pub Vec<u8>);

macro_rules! socket_transport {
    ($stream:ty, $read:ty, $write:ty, $kind:expr) => {
        impl Transport for Sock<$stream> {
            type R = Prefixed<$read>;
            type W = $write;
            fn into_halves(self) -> (Self::R, Self::W) {
                let (r, w) = self.0.into_split();
                (Prefixed::new(self.1, r), w)
            }
            fn park(r: Self::R, w: Self::W) -> Option<(OwnedFd, SocketKind, Vec<u8>)> {
                let (r, unread) = r.into_parts();
                let stream = r.reunite(w).ok()?.into_std().ok()?;
                Some((OwnedFd::from(stream), $kind, unread))
            }
        }
    };
}
socket_transport!(
    tokio::net::TcpStream,
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
    SocketKind::Tcp
);
socket_transport!(
    tokio::net::UnixStream,
    tokio::net::unix::OwnedReadHalf,
    tokio::net::unix::OwnedWriteHalf,
    SocketKind::Unix
);

type TlsIo<R, W> = tokio_rustls::server::TlsStream<Joined<R, W>>;

/// Where the handshake left the connection: plain text on the socket's own halves (which keep
/// the lock-free split and writev), or inside TLS, whose one session state both directions share
/// through `tokio::io::split`.
pub(super) enum Negotiated<R, W> {
    Plain(Session, BufReader<R>, BufWriter<W>),
    Tls(Session, BufReader<ReadHalf<TlsIo<R, W>>>, BufWriter<WriteHalf<TlsIo<R, W>>>),
}

/// Serves one connection to its end. The caller instruments it with a span naming the connection,
/// so every log line (and every request task, which inherits it) says which client it is about.
pub(crate) async fn serve_connection<S, V>(
    stream: S,
    volume: Arc<V>,
    limits: Arc<ConnLimits>,
    shutdown: watch::Receiver<bool>,
) where
    S: Transport,
    V: Volume,
{
    let (reader, writer) = buffered_halves(stream);
    let mut stop = shutdown.clone();
    // One deadline for the whole handshake, TLS included: a client that trickles bytes cannot
    // stretch it, since no read on its own restarts the clock.
    let negotiated = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, negotiate::handshake(reader, writer, &limits, shutdown.clone())) => r,
        // On shutdown a client still negotiating gets a short grace, during which its options are
        // answered with ERR_SHUTDOWN (spec), then the connection is closed.
        _ = async {
            let _ = stop.wait_for(|s| *s).await;
            // A handover pauses every client: no grace, the client retries against the next process.
            if !limits.handover.requested() {
                tokio::time::sleep(SHUTDOWN_HANDSHAKE_GRACE).await;
            }
        } => {
            tracing::info!("shutting down during the handshake; closing");
            return;
        }
    };
    let negotiated = match negotiated {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => {
            tracing::debug!("client ended negotiation");
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "handshake failed; closing");
            return;
        }
        Err(_) => {
            tracing::info!(timeout_s = limits.handshake_timeout.as_secs(), "handshake timed out; closing");
            return;
        }
    };
    let result = match negotiated {
        Negotiated::Plain(session, reader, writer) => {
            connected(&session, false);
            let kept = session.clone();
            match reader::transmission(reader, writer, session, volume, limits.clone(), shutdown, true).await {
                Ok(reader::Ended::Parked(reader, w)) => {
                    park::<S>(reader, w, kept, &limits.handover);
                    return;
                }
                r => r.map(|_| ()),
            }
        }
        Negotiated::Tls(session, reader, writer) => {
            connected(&session, true);
            let _open = limits.handover.tls_opened();
            reader::transmission(reader, writer, session, volume, limits.clone(), shutdown, false).await.map(|_| ())
        }
    };
    match result {
        Ok(()) => tracing::info!("client disconnected"),
        Err(e) => tracing::info!(error = %e, "connection closed"),
    }
}

/// Serves a connection another process parked: straight into the transmission phase, as the
/// handshake it already did left it.
pub(crate) async fn serve_adopted<S, V>(
    stream: S,
    session: Session,
    volume: Arc<V>,
    limits: Arc<ConnLimits>,
    shutdown: watch::Receiver<bool>,
) where
    S: Transport,
    V: Volume,
{
    let (reader, writer) = buffered_halves(stream);
    tracing::info!(structured = session.structured_replies, "connection carried over from the previous process");
    let kept = session.clone();
    match reader::transmission(reader, writer, session, volume, limits.clone(), shutdown, true).await {
        Ok(reader::Ended::Parked(reader, w)) => park::<S>(reader, w, kept, &limits.handover),
        Ok(reader::Ended::Closed) => tracing::info!("client disconnected"),
        Err(e) => tracing::info!(error = %e, "connection closed"),
    }
}

fn buffered_halves<S: Transport>(stream: S) -> (BufReader<S::R>, BufWriter<S::W>) {
    let (reader, writer) = stream.into_halves();
    (BufReader::with_capacity(READ_BUFFER_BYTES, reader), BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer))
}

/// Hands a stopped connection to the handover collector, with the bytes its reader held.
fn park<S: Transport>(reader: BufReader<S::R>, w: S::W, session: Session, handover: &Handover) {
    let mut unread = reader.buffer().to_vec();
    match S::park(reader.into_inner(), w) {
        Some((fd, kind, rest)) => {
            unread.extend_from_slice(&rest);
            tracing::debug!(unread_bytes = unread.len(), "connection parked for the handover");
            handover.deposit(ParkedConnection { fd, kind, session, unread });
        }
        None => tracing::warn!("this connection cannot be handed over; closed"),
    }
}

fn connected(session: &Session, tls: bool) {
    tracing::info!(
        structured = session.structured_replies,
        base_allocation = session.base_allocation,
        tls,
        "client connected"
    );
}

pub(super) fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Fills `out` from what the reader has already buffered, if it holds all of it; false (and
/// nothing consumed) otherwise. The waiting paths arm a timeout, which reads the clock (twice per
/// request with the header's and the payload's): at queue depth 32 that was a few per cent of the
/// server's CPU per 4 KiB read, for bytes that were already in memory.
pub(super) fn take_buffered<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, out: &mut [u8]) -> bool {
    let buffered = reader.buffer();
    if buffered.len() < out.len() {
        return false;
    }
    out.copy_from_slice(&buffered[..out.len()]);
    std::pin::Pin::new(reader).consume(out.len());
    true
}

/// Reads one request header; Ok(false) on a clean EOF before its first byte.
pub(super) async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    hdr: &mut [u8; REQUEST_HEADER_BYTES],
    idle: Duration,
) -> io::Result<bool> {
    let first = if idle.is_zero() {
        reader.read(&mut hdr[..1]).await?
    } else {
        match tokio::time::timeout(idle, reader.read(&mut hdr[..1])).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
        }
    };
    if first == 0 {
        return Ok(false);
    }
    within(PARTIAL_REQUEST_TIMEOUT, reader.read_exact(&mut hdr[1..])).await?;
    Ok(true)
}

/// Bounds an I/O that a client has started but may never finish (half a header, half a payload):
/// such a connection holds a slot and budget, so it is closed rather than waited on forever.
pub(super) async fn within<T>(limit: Duration, io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(limit, io)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "client stalled in the middle of a request")))
}

pub(super) async fn drain<R: AsyncRead + Unpin>(reader: &mut R, mut bytes: u64) -> io::Result<()> {
    let mut scratch = [0u8; 16 * 1024];
    while bytes > 0 {
        let n = (bytes as usize).min(scratch.len());
        reader.read_exact(&mut scratch[..n]).await?;
        bytes -= n as u64;
    }
    Ok(())
}

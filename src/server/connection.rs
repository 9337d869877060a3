//! One NBD connection: the handshake, then the transmission loop.

use super::tls::Joined;
use super::zerocopy::{zero_copy_min_bytes, ReplySink};
use super::ZeroCopyReads;
use crate::device::{AlignedBuf, FileSlice};
use crate::nbd::consts::*;
use crate::nbd::handshake::{self, Handshake, Next, TlsMode, MAX_OPTION_DATA_BYTES};
use crate::nbd::request::{self, Op, RequestHeader};
use crate::nbd::{reply, ExportParams, NbdError, Session};
use crate::server::stats::{ReqOp, ServerStats};
use crate::volume::Volume;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

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
}

/// In-flight accounting unit: budgets are counted in 4 KiB pages so a u32 permit count covers
/// budgets far above any sane setting.
pub(crate) const BUDGET_UNIT_BYTES: usize = 4096;
/// Requests up to this many budget units (64 KiB) are polled in place; larger ones become tasks.
const INLINE_MAX_UNITS: usize = 16;
/// Once a request's first byte has arrived, the rest of it (header and payload) must follow within
/// this. Generous: 32 MiB at 1 MB/s still fits.
const PARTIAL_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that accepts none of our reply bytes for this long is cut off. Its replies hold
/// in-flight budget, part of the server-wide total: without a limit, a few clients that stop
/// reading would stall every other client for as long as they stay connected.
const REPLY_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Each connection may hold this much in flight outside the server-wide total, so that while a
/// few clients hold the whole total (large reads they do not read back), every other client's
/// small requests still go through. The memory bound is `max_inflight_bytes_total` plus this
/// times `max_connections`.
const CONN_RESERVE_BYTES: usize = 1 << 20;
const SHUTDOWN_HANDSHAKE_GRACE: Duration = Duration::from_secs(2);
/// Buffer for the handshake's small messages (replies proper are written with writev).
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// A block-status reply is capped at this many extents (spec SHOULD NOT exceed 2^20).
const MAX_STATUS_EXTENTS: usize = 1024;

/// The in-flight budget a request holds: its connection's share and the server-wide total.
struct Budget {
    _conn: OwnedSemaphorePermit,
    _total: Option<OwnedSemaphorePermit>,
}

/// One whole reply: a header (and small payloads) plus, for reads, the data buffer. It also carries
/// the in-flight budget it holds, released only once the bytes are handed to the socket.
struct Reply {
    head: Vec<u8>,
    data: Option<Payload>,
    _budget: Option<Budget>,
    /// The request failed (counted as an error by the front end's statistics).
    failed: bool,
}

/// A read reply's data: in memory, or bytes of a file the writer sends from the page cache.
enum Payload {
    Buf(AlignedBuf),
    /// `volume_offset` is where the bytes are on the export, for reading whatever part of them
    /// the socket did not take from the file.
    File {
        slice: FileSlice,
        volume_offset: u64,
    },
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Buf(b) => b.len(),
            Payload::File { slice, .. } => slice.len,
        }
    }
}

/// A connected socket that splits into halves the reader and writer tasks own separately.
pub(crate) trait Transport: Send + 'static {
    type R: AsyncRead + Unpin + Send + 'static;
    type W: ReplySink;
    fn into_halves(self) -> (Self::R, Self::W);
}

impl Transport for tokio::net::TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

impl Transport for tokio::net::UnixStream {
    type R = tokio::net::unix::OwnedReadHalf;
    type W = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

type TlsIo<R, W> = tokio_rustls::server::TlsStream<Joined<R, W>>;

/// Where the handshake left the connection: plain text on the socket's own halves (which keep
/// the lock-free split and writev), or inside TLS, whose one session state both directions share
/// through `tokio::io::split`.
enum Negotiated<R, W> {
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
    let (reader, writer) = stream.into_halves();
    let reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
    let mut stop = shutdown.clone();
    // One deadline for the whole handshake, TLS included: a client that trickles bytes cannot
    // stretch it, since no read on its own restarts the clock.
    let negotiated = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, handshake(reader, writer, &limits, shutdown.clone())) => r,
        // On shutdown a client still negotiating gets a short grace, during which its options are
        // answered with ERR_SHUTDOWN (spec), then the connection is closed.
        _ = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_HANDSHAKE_GRACE).await;
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
            transmission(reader, writer, session, volume, limits, shutdown).await
        }
        Negotiated::Tls(session, reader, writer) => {
            connected(&session, true);
            transmission(reader, writer, session, volume, limits, shutdown).await
        }
    };
    match result {
        Ok(()) => tracing::info!("client disconnected"),
        Err(e) => tracing::info!(error = %e, "connection closed"),
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

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Greeting, option haggling and, when the client asks for it, the TLS upgrade in the middle.
/// Ok(None): the client aborted.
async fn handshake<R, W>(
    mut reader: BufReader<R>,
    mut writer: BufWriter<W>,
    limits: &ConnLimits,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Option<Negotiated<R, W>>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&handshake::greeting()).await?;
    writer.flush().await?;
    let flags = reader.read_u32().await?;
    let no_zeroes = handshake::client_flags(flags).map_err(|e| protocol_error(e.to_string()))?;
    let mut hs = Handshake::new(&limits.export, no_zeroes).with_tls(limits.tls_mode);
    match options(&mut reader, &mut writer, &mut hs, &shutdown).await? {
        Haggled::Session(s) => return Ok(Some(Negotiated::Plain(s, reader, writer))),
        Haggled::Closed => {
            let _ = writer.shutdown().await;
            return Ok(None);
        }
        Haggled::StartTls => {}
    }
    let acceptor = limits.tls.clone().ok_or_else(|| io::Error::other("STARTTLS acknowledged without a TLS setup"))?;
    // `options` flushed the ACK; whatever the read buffer holds already is the client's first TLS
    // bytes.
    let early = reader.buffer().to_vec();
    let joined = Joined::new(early, reader.into_inner(), writer.into_inner());
    let tls =
        acceptor.accept(joined).await.map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
    {
        let (_, conn) = tls.get_ref();
        tracing::debug!(
            version = ?conn.protocol_version(),
            cipher = ?conn.negotiated_cipher_suite().map(|c| c.suite()),
            client_certificate = conn.peer_certificates().is_some_and(|c| !c.is_empty()),
            "TLS established"
        );
    }
    let (r, w) = tokio::io::split(tls);
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, r);
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, w);
    match options(&mut reader, &mut writer, &mut hs, &shutdown).await? {
        Haggled::Session(s) => Ok(Some(Negotiated::Tls(s, reader, writer))),
        Haggled::Closed => {
            // close_notify, so the client sees a clean TLS end rather than a truncation.
            let _ = writer.shutdown().await;
            Ok(None)
        }
        Haggled::StartTls => Err(protocol_error("a second TLS upgrade was acknowledged")),
    }
}

enum Haggled {
    Session(Session),
    Closed,
    StartTls,
}

/// Runs option haggling until transmission, an abort, or an acknowledged STARTTLS.
async fn options<R, W>(
    reader: &mut R,
    writer: &mut W,
    hs: &mut Handshake<'_>,
    shutdown: &watch::Receiver<bool>,
) -> io::Result<Haggled>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    loop {
        let mut hdr = [0u8; OPTION_HEADER_BYTES];
        reader.read_exact(&mut hdr).await?;
        let (option, len) =
            handshake::decode_option_header(&hdr).map_err(|m| protocol_error(format!("bad option magic {m:#x}")))?;
        if len > MAX_OPTION_DATA_BYTES {
            return Err(protocol_error(format!(
                "option {option} claims {len} bytes of data; limit is {MAX_OPTION_DATA_BYTES}"
            )));
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data).await?;
        if *shutdown.borrow() {
            hs.shutting_down();
        }
        out.clear();
        let next = hs.option(option, &data, &mut out);
        writer.write_all(&out).await?;
        writer.flush().await?;
        match next {
            Next::Continue if hs.take_tls_upgrade() => return Ok(Haggled::StartTls),
            Next::Continue => {}
            Next::Transmission(s) => return Ok(Haggled::Session(s)),
            Next::Close => return Ok(Haggled::Closed),
            Next::HardDisconnect(why) => return Err(protocol_error(why)),
        }
    }
}

async fn transmission<R, W, V>(
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    session: Session,
    volume: Arc<V>,
    limits: Arc<ConnLimits>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: ReplySink,
    V: Volume,
{
    let send_mode = if writer.get_ref().can_sendfile() { limits.zero_copy_reads } else { ZeroCopyReads::Off };
    let zero_copy_min = zero_copy_min_bytes(send_mode);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    // Set while the reader waits for a request with nothing buffered: only then can polling the
    // socket find the client's next request sooner than the runtime would.
    let reader_idle = Arc::new(AtomicBool::new(false));
    let idle_poll = IdlePoll::new(limits.idle_poll, reader_idle.clone(), limits.stats.clone());
    let writer_task =
        tokio::spawn(write_replies(writer, rx, volume.clone(), limits.stats.clone(), send_mode, idle_poll));
    let budget_units = (limits.max_inflight_bytes / BUDGET_UNIT_BYTES).max(1);
    // The budget must admit the largest single request, or such a request would wait forever.
    let budget_units = budget_units.max((limits.export.max_payload_bytes as usize).div_ceil(BUDGET_UNIT_BYTES) + 1);
    let budget = Arc::new(Semaphore::new(budget_units));
    let reserve = Arc::new(Semaphore::new(CONN_RESERVE_BYTES / BUDGET_UNIT_BYTES));
    let session = Arc::new(session);
    let structured = session.structured_replies;
    let read_result: io::Result<()> = async {
        loop {
            let mut hdr = [0u8; REQUEST_HEADER_BYTES];
            reader_idle.store(reader.buffer().is_empty(), Ordering::Relaxed);
            // Cancelling a half-read header is fine: we only cancel to close the connection.
            let got = if take_buffered(&mut reader, &mut hdr) {
                // Already here (a pipelining client's requests arrive in batches): nothing to wait
                // for, so no timeout to arm and no clock to read.
                Ok(true)
            } else {
                tokio::select! {
                    biased;
                    r = read_header(&mut reader, &mut hdr, limits.idle_timeout) => r,
                    _ = shutdown.wait_for(|s| *s) => {
                        tracing::debug!("shutdown: no more requests on this connection");
                        return Ok(());
                    }
                    // The writer gave up (the client stopped reading, or the socket broke): its
                    // error is the connection's; stop taking requests whose replies could not be
                    // sent.
                    _ = tx.closed() => return Ok(()),
                }
            };
            reader_idle.store(false, Ordering::Relaxed);
            if !got? {
                return Ok(()); // EOF between requests: the client hung up
            }
            let h = request::decode_header(&hdr).map_err(|e| protocol_error(e.to_string()))?;
            let validated = request::validate(&h, &limits.export, &session);
            let op = match validated {
                Ok(Op::Disconnect) => return Ok(()),
                Ok(op) => op,
                Err(err) => {
                    // The payload of a refused write is still on the wire: skip it without buffering.
                    within(PARTIAL_REQUEST_TIMEOUT, drain(&mut reader, u64::from(h.payload_bytes()))).await?;
                    // Refusals hold budget too: a client that streams bad requests and never reads
                    // its replies must stall itself, not grow our reply queue without bound.
                    // (Per connection only: a refusal holds a few dozen bytes, not a data buffer.)
                    let permit = budget.clone().acquire_owned().await.expect("budget semaphore is never closed");
                    let mut head = Vec::with_capacity(64);
                    reply::error(&mut head, h.cookie, structured, err, &refusal_message(&h, err));
                    let held = Budget { _conn: permit, _total: None };
                    let _ = tx.send(Reply { head, data: None, _budget: Some(held), failed: true });
                    continue;
                }
            };
            let units = match op {
                Op::Read { length, .. } | Op::Write { length, .. } => {
                    (length as usize).div_ceil(BUDGET_UNIT_BYTES).max(1)
                }
                _ => 1,
            };
            let units32 = u32::try_from(units).unwrap_or(u32::MAX);
            let conn_permit =
                budget.clone().acquire_many_owned(units32).await.expect("budget semaphore is never closed");
            // Connection share first, then the connection's reserve or else the total: a client
            // waits on the total only with its own share in hand, so one client never holds total
            // budget it cannot use yet.
            // Every request, data or not, is charged at least one unit against both: a client
            // streaming TRIMs or FLUSHes holds a task and a registration for each, and the total
            // must bound those too.
            let total_permit = Some(match reserve.clone().try_acquire_many_owned(units32) {
                Ok(p) => p,
                Err(_) => limits
                    .total_budget
                    .clone()
                    .acquire_many_owned(units32)
                    .await
                    .expect("budget semaphore is never closed"),
            });
            let permit = Budget { _conn: conn_permit, _total: total_permit };
            let payload = match op {
                Op::Write { length, .. } => {
                    let mut buf = AlignedBuf::uninit_for_fill(length as usize);
                    if !take_buffered(&mut reader, &mut buf) {
                        within(PARTIAL_REQUEST_TIMEOUT, reader.read_exact(&mut buf)).await?;
                    }
                    Some(buf)
                }
                _ => None,
            };
            let (volume, tx, session, stats) = (volume.clone(), tx.clone(), session.clone(), limits.stats.clone());
            let mut request = Box::pin(async move {
                let mut r = execute(&*volume, &session, &stats, h.cookie, op, payload, zero_copy_min).await;
                r._budget = Some(permit);
                let _ = tx.send(r);
            });
            // Poll once here: a page-cache hit completes synchronously, and then the request costs
            // no task spawn and no cross-thread wake-up. Only requests that really wait for a
            // device become tasks (their next poll registers the real waker).
            // Large transfers are the exception: their copy takes long enough that doing it here
            // would stop this reader from taking the next request, so they run as tasks, in
            // parallel with the reader.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if units > INLINE_MAX_UNITS || request.as_mut().poll(&mut cx).is_pending() {
                tokio::spawn(request.in_current_span());
            }
        }
    }
    .await;
    // Every spawned request holds a sender; the writer ends once the last reply is written, which
    // is how DISC and shutdown "finish outstanding requests, then close".
    drop(tx);
    let write_result = writer_task.await.map_err(|e| io::Error::other(format!("writer task failed: {e}")))?;
    read_result.and(write_result)
}

/// Fills `out` from what the reader has already buffered, if it holds all of it; false (and
/// nothing consumed) otherwise. The waiting paths arm a timeout, which reads the clock (twice per
/// request with the header's and the payload's): at queue depth 32 that was a few per cent of the
/// server's CPU per 4 KiB read, for bytes that were already in memory.
fn take_buffered<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, out: &mut [u8]) -> bool {
    let buffered = reader.buffer();
    if buffered.len() < out.len() {
        return false;
    }
    out.copy_from_slice(&buffered[..out.len()]);
    std::pin::Pin::new(reader).consume(out.len());
    true
}

/// Reads one request header; Ok(false) on a clean EOF before its first byte.
async fn read_header<R: AsyncRead + Unpin>(
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
async fn within<T>(limit: Duration, io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(limit, io)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "client stalled in the middle of a request")))
}

async fn drain<R: AsyncRead + Unpin>(reader: &mut R, mut bytes: u64) -> io::Result<()> {
    let mut scratch = [0u8; 16 * 1024];
    while bytes > 0 {
        let n = (bytes as usize).min(scratch.len());
        reader.read_exact(&mut scratch[..n]).await?;
        bytes -= n as u64;
    }
    Ok(())
}

fn refusal_message(h: &RequestHeader, err: NbdError) -> String {
    format!(
        "request refused: command {} flags {:#x} offset {} length {}: {}",
        h.command,
        h.flags,
        h.offset,
        h.length,
        err.message()
    )
}

fn io_failure(what: &str, e: &io::Error) -> (NbdError, String) {
    let err = NbdError::from_io(e);
    tracing::warn!(op = what, error = %e, "I/O failed");
    (err, format!("{what} failed: {e}"))
}

/// Runs one validated request against the volume and builds its whole reply.
async fn execute<V: Volume>(
    volume: &V,
    session: &Session,
    stats: &ServerStats,
    cookie: u64,
    op: Op,
    payload: Option<AlignedBuf>,
    zero_copy_min: Option<u32>,
) -> Reply {
    let started = std::time::Instant::now();
    let (kind, bytes) = match op {
        Op::Read { length, .. } => (ReqOp::Read, u64::from(length)),
        Op::Write { length, .. } => (ReqOp::Write, u64::from(length)),
        Op::Flush => (ReqOp::Flush, 0),
        Op::Trim { length, .. } => (ReqOp::Trim, u64::from(length)),
        Op::WriteZeroes { length, .. } => (ReqOp::WriteZeroes, u64::from(length)),
        _ => (ReqOp::Other, 0),
    };
    let reply = execute_op(volume, session, cookie, op, payload, zero_copy_min).await;
    stats.request(kind).record(bytes, !reply.failed, started);
    reply
}

async fn execute_op<V: Volume>(
    volume: &V,
    session: &Session,
    cookie: u64,
    op: Op,
    payload: Option<AlignedBuf>,
    zero_copy_min: Option<u32>,
) -> Reply {
    let structured = session.structured_replies;
    let mut head = Vec::with_capacity(64);
    let outcome: Result<Option<Payload>, (NbdError, String)> = match op {
        Op::Read { offset, length } => {
            let from_file = if zero_copy_min.is_some_and(|min| length >= min) {
                volume.read_zero_copy(offset, u64::from(length))
            } else {
                None
            };
            match from_file {
                Some(slice) => Ok(Some(Payload::File { slice, volume_offset: offset })),
                None => {
                    let (buf, r) = volume.read(offset, AlignedBuf::uninit_for_fill(length as usize)).await;
                    r.map(|()| Some(Payload::Buf(buf))).map_err(|e| io_failure("read", &e))
                }
            }
        }
        Op::Write { offset, fua, .. } => {
            let buf = payload.expect("write carries its payload");
            let (_, r) = volume.write(offset, buf, fua).await;
            r.map(|()| None).map_err(|e| io_failure("write", &e))
        }
        Op::Flush => volume.flush().await.map(|()| None).map_err(|e| io_failure("flush", &e)),
        Op::Trim { offset, length, fua } => {
            volume.trim(offset, u64::from(length), fua).await.map(|()| None).map_err(|e| io_failure("trim", &e))
        }
        Op::WriteZeroes { offset, length, fua, may_trim, fast_only: _ } => volume
            .write_zeroes(offset, u64::from(length), may_trim, fua)
            .await
            .map(|()| None)
            .map_err(|e| io_failure("write zeroes", &e)),
        Op::Cache { offset, length } => {
            volume.cache(offset, u64::from(length)).await.map(|()| None).map_err(|e| io_failure("cache", &e))
        }
        Op::BlockStatus { offset, length, req_one } => {
            if length == 0 {
                Err((NbdError::Inval, "block status of zero bytes".into()))
            } else {
                match volume.allocation(offset, u64::from(length)).await {
                    Ok(extents) => {
                        let list = status_extents(&extents, length, req_one);
                        reply::block_status(&mut head, cookie, META_BASE_ALLOCATION_ID, &list, true);
                        return Reply { head, data: None, _budget: None, failed: false };
                    }
                    Err(e) => Err(io_failure("block status", &e)),
                }
            }
        }
        Op::Disconnect => unreachable!("DISC is handled by the reader"),
    };
    match outcome {
        Ok(Some(data)) => {
            if structured {
                if data.len() == 0 {
                    // OFFSET_DATA must carry at least one byte; an empty read is just "done".
                    reply::none_done(&mut head, cookie);
                    return Reply { head, data: None, _budget: None, failed: false };
                }
                let offset = match op {
                    Op::Read { offset, .. } => offset,
                    _ => unreachable!(),
                };
                reply::offset_data_header(&mut head, cookie, offset, data.len() as u32, true);
            } else {
                reply::simple(&mut head, cookie, None);
            }
            Reply { head, data: Some(data), _budget: None, failed: false }
        }
        Ok(None) => {
            reply::ok(&mut head, cookie, structured);
            Reply { head, data: None, _budget: None, failed: false }
        }
        Err((err, msg)) => {
            reply::error(&mut head, cookie, structured, err, &msg);
            Reply { head, data: None, _budget: None, failed: true }
        }
    }
}

/// Converts device extents to wire descriptors: clipped to the request, adjacent equal states
/// merged, at most one with REQ_ONE, never more than MAX_STATUS_EXTENTS.
fn status_extents(extents: &[crate::device::Extent], length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = u64::from(length);
    for e in extents {
        if left == 0 || out.len() >= MAX_STATUS_EXTENTS {
            break;
        }
        let len = e.length_bytes.min(left);
        if len == 0 {
            continue;
        }
        let state = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        let len32 = len as u32; // len ≤ left ≤ u32 length
        match out.last_mut() {
            Some(last) if last.1 == state => last.0 += len32,
            _ => out.push((len32, state)),
        }
        left -= len;
    }
    if out.is_empty() {
        // A device that could not say anything: "allocated, contents unknown" is always true.
        out.push((length, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Most replies gathered into one `writev`: enough to empty a deep queue of small replies in one
/// syscall, well under IOV_MAX (two iovecs per reply).
const MAX_BATCH_REPLIES: usize = 128;

async fn write_replies<W: ReplySink, V: Volume>(
    mut writer: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    volume: Arc<V>,
    stats: Arc<ServerStats>,
    send_mode: ZeroCopyReads,
    mut idle_poll: IdlePoll,
) -> io::Result<()> {
    // The handshake's buffered bytes are all flushed; replies are written with writev from their
    // own buffers (header and data in one syscall, no copy into a staging buffer).
    writer.flush().await?;
    let mut sock = writer.into_inner();
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH_REPLIES);
    while let Some(r) = rx.recv().await {
        batch.push(r);
        while batch.len() < MAX_BATCH_REPLIES {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        write_batch(&mut sock, &batch, &*volume, &stats, send_mode).await?;
        // A no-op on a plain socket; TLS may hold the last record until flushed.
        within_reply_stall(sock.flush()).await?;
        // Dropping the replies releases their in-flight budget only now that the bytes are out.
        batch.clear();
        if rx.is_empty() {
            idle_poll.wait(&sock, &rx);
        }
    }
    sock.flush().await?;
    sock.shutdown().await
}

/// Polling for the client's next request after the last reply is out, before the writer's
/// thread goes back to the runtime and may sleep.
///
/// Why: a client at queue depth 1 sends its next request a few tens of microseconds after it gets
/// a reply. If the thread that will read it is asleep by then, it is woken through the kernel and,
/// on a VM whose idle vCPUs halt, through the hypervisor too, which costs more than the request
/// itself (docs/PERFORMANCE.md, "Idle polling"). Polling a bounded time keeps the thread awake
/// across that gap, as Seastar's reactor (ScyllaDB's) does with `--idle-poll-time-us`. The poll is
/// a non-blocking one-byte `MSG_PEEK`: once bytes are there the writer returns, the runtime finds
/// the socket readable without sleeping and the reader takes the request as usual. A poll that
/// reaches its limit sets polling aside for a few idle moments, more after each miss in a row (up
/// to 15), so a client that pauses between bursts costs a poll now and then, not one per reply.
///
/// Only while the open connections are at most half the CPUs: a polling thread holds a CPU, and
/// with more clients than that the CPUs are wanted for their requests (four connections at queue
/// depth 1 on 2 CPUs ran at 0.60× with polling), while the runtime's threads rarely sleep anyway.
/// On one CPU it never polls: the client needs that CPU to send what we would wait for.
struct IdlePoll {
    limit: Duration,
    reader_idle: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    skip: u32,
    /// Polls in a row that reached the limit; a hit resets it.
    misses_in_row: u32,
    max_connections: u64,
}

/// After this many misses in a row, polling is set aside for `2^IDLE_POLL_MAX_BACKOFF_SHIFT - 1`
/// idle moments between polls, so a client that is simply slow costs one poll in 16.
const IDLE_POLL_MAX_BACKOFF_SHIFT: u32 = 4;

impl IdlePoll {
    fn new(limit: Duration, reader_idle: Arc<AtomicBool>, stats: Arc<ServerStats>) -> Self {
        // Asked once per process: on Linux the answer reads cgroup files, not worth per connection.
        static CPUS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) as u64);
        IdlePoll { limit, reader_idle, stats, skip: 0, misses_in_row: 0, max_connections: cpus / 2 }
    }

    /// Returns once the client has sent something, the limit is reached, or polling would not
    /// help: the reader has requests buffered (it is not waiting), or a reply is queued.
    fn wait<W: ReplySink>(&mut self, sock: &W, rx: &mpsc::UnboundedReceiver<Reply>) {
        if self.limit.is_zero()
            || !self.reader_idle.load(Ordering::Relaxed)
            || self.stats.connections_active.load(Ordering::Relaxed) > self.max_connections
        {
            return;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return;
        }
        let deadline = Instant::now() + self.limit;
        loop {
            match sock.peer_has_sent() {
                None => return,
                Some(true) => {
                    self.stats.idle_poll_hits.fetch_add(1, Ordering::Relaxed);
                    self.misses_in_row = 0;
                    return;
                }
                Some(false) => {}
            }
            if !rx.is_empty() || !self.reader_idle.load(Ordering::Relaxed) {
                return;
            }
            if Instant::now() >= deadline {
                self.stats.idle_poll_misses.fetch_add(1, Ordering::Relaxed);
                // Backs off exponentially: 0, 1, 3, 7, then 15 idle moments without polling. A
                // steady client that is late once (a timer tick, a preemption) is polled again at
                // once; a fixed 16-moment pause after every miss left 16 requests each to pay the
                // cross-CPU wake-up, and those made the p99 of queue-depth-1 reads.
                self.skip = (1 << self.misses_in_row.min(IDLE_POLL_MAX_BACKOFF_SHIFT)) - 1;
                self.misses_in_row = self.misses_in_row.saturating_add(1);
                return;
            }
            // Not a bare spin: the client may be waiting for this very CPU to send its request,
            // and yielding lets it run now; with nothing else runnable it returns at once.
            std::thread::yield_now();
        }
    }
}

async fn within_reply_stall<T>(io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(REPLY_STALL_TIMEOUT, io).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client read no reply bytes for {} s", REPLY_STALL_TIMEOUT.as_secs()),
        ))
    })
}

/// Writes every reply of the batch whole and in order: runs of in-memory parts with `writev`,
/// resuming after partial writes; file parts in between, sent from the page cache as `send_mode`
/// says.
async fn write_batch<W: ReplySink, V: Volume>(
    sock: &mut W,
    batch: &[Reply],
    volume: &V,
    stats: &ServerStats,
    send_mode: ZeroCopyReads,
) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
    for r in batch {
        parts.push(&r.head);
        match &r.data {
            Some(Payload::Buf(d)) => parts.push(d),
            Some(Payload::File { slice, volume_offset }) => {
                write_parts(sock, &parts).await?;
                parts.clear();
                send_file(sock, slice, *volume_offset, volume, stats, send_mode).await?;
            }
            None => {}
        }
    }
    write_parts(sock, &parts).await
}

/// Sends a reply's data from the page cache. Whatever the socket did not take from the file (the
/// file failed to read, or ended early) is read through the volume and written from memory: the
/// header already promised these bytes, and the volume's own read path (the backing, when the
/// cache fails) still has them. Only when that read fails too must the connection close, since
/// a reply cannot be taken back half-sent.
async fn send_file<W: ReplySink, V: Volume>(
    sock: &mut W,
    slice: &FileSlice,
    volume_offset: u64,
    volume: &V,
    stats: &ServerStats,
    send_mode: ZeroCopyReads,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering::Relaxed;
    stats.zero_copy_reads.fetch_add(1, Relaxed);
    stats.zero_copy_read_bytes.fetch_add(slice.len as u64, Relaxed);
    let mut offset = slice.offset;
    let end = slice.offset + slice.len as u64;
    while offset < end {
        let left = (end - offset) as usize;
        let sent = match send_mode {
            ZeroCopyReads::Mapped => match slice.file.window(offset) {
                Ok(window) => {
                    let sent =
                        within_reply_stall(std::future::poll_fn(|cx| sock.poll_send_mapped(cx, &window, offset, left)))
                            .await;
                    if let Ok(n) = sent {
                        offset += n as u64;
                    }
                    sent
                }
                Err(e) => Err(io::Error::new(e.kind(), format!("mapping the file: {e}"))),
            },
            _ => {
                let fd = slice.file.fd().as_raw_fd();
                within_reply_stall(std::future::poll_fn(|cx| sock.poll_sendfile(cx, fd, &mut offset, left))).await
            }
        };
        let why = match sent {
            Ok(0) => "the file ended early".to_owned(),
            Ok(_) => continue,
            Err(e) if is_socket_error(&e) => return Err(e),
            Err(e) => e.to_string(),
        };
        let done = offset - slice.offset;
        stats.zero_copy_fallbacks.fetch_add(1, Relaxed);
        tracing::warn!(error = %why, sent_bytes = done, left_bytes = left, "sending a read from the page cache failed; reading the rest");
        let (rest, r) = volume.read(volume_offset + done, AlignedBuf::uninit_for_fill(left)).await;
        r.map_err(|e| {
            io::Error::new(e.kind(), format!("a read reply was half sent, then reading the rest failed: {e}"))
        })?;
        return write_parts(sock, &[&rest]).await;
    }
    Ok(())
}

/// Errors that belong to the socket (the client went away, or stopped reading), as opposed to the
/// file being sent from.
fn is_socket_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::TimedOut
    )
}

/// Writes `parts` whole and in order with as few `writev` calls as the socket allows.
async fn write_parts<W: AsyncWrite + Unpin>(sock: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let (mut part, mut skip) = (0usize, 0usize);
    while part < parts.len() {
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&parts[part][skip..])
            .chain(parts[part + 1..].iter().copied())
            .map(std::io::IoSlice::new)
            .collect();
        let mut n = within_reply_stall(sock.write_vectored(&slices)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Advance (part, skip) past the n bytes written.
        while n > 0 && part < parts.len() {
            let left = parts[part].len() - skip;
            if n >= left {
                n -= left;
                part += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
        while part < parts.len() && parts[part].len() == skip {
            part += 1;
            skip = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Extent;

    #[test]
    fn status_extents_clip_merge_and_req_one() {
        let ex = [
            Extent { length_bytes: 4096, hole: false },
            Extent { length_bytes: 4096, hole: false },
            Extent { length_bytes: 1 << 40, hole: true },
        ];
        assert_eq!(status_extents(&ex, 10000, false), vec![(8192, 0), (1808, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(status_extents(&ex, 10000, true), vec![(8192, 0)]);
        assert_eq!(status_extents(&[], 512, false), vec![(512, 0)]);
    }

    /// A socket whose client has sent something or not, as the test says.
    struct PeekSink(AtomicBool);

    impl AsyncWrite for PeekSink {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl ReplySink for PeekSink {
        fn peer_has_sent(&self) -> Option<bool> {
            Some(self.0.load(Ordering::Relaxed))
        }
    }

    /// The moments (of `n` idle moments) at which the writer polled a client that never sends.
    fn polled_moments(poll: &mut IdlePoll, sink: &PeekSink, rx: &mpsc::UnboundedReceiver<Reply>, n: u32) -> Vec<u32> {
        let mut moments = Vec::new();
        for i in 0..n {
            let before = poll.stats.idle_poll_misses.load(Ordering::Relaxed);
            poll.wait(sink, rx);
            if poll.stats.idle_poll_misses.load(Ordering::Relaxed) > before {
                moments.push(i);
            }
        }
        moments
    }

    #[test]
    fn idle_polling_backs_off_exponentially_and_a_hit_resets_it() {
        let stats = Arc::new(ServerStats::default());
        let reader_idle = Arc::new(AtomicBool::new(true));
        let mut poll = IdlePoll::new(Duration::from_micros(20), reader_idle.clone(), stats.clone());
        // The limit is per CPU count; the test is about the schedule, whatever this machine has.
        poll.max_connections = 1;
        let (_tx, rx) = mpsc::unbounded_channel::<Reply>();
        let sink = PeekSink(AtomicBool::new(false));

        // A late client is polled again at once, then after 1, 3, 7 and at most 15 idle moments.
        assert_eq!(polled_moments(&mut poll, &sink, &rx, 64), [0, 1, 3, 7, 15, 31, 47, 63]);

        // Skipped moments cost nothing; once the client is back, a hit resets the backoff.
        let mut waited = 0;
        sink.0.store(true, Ordering::Relaxed);
        while stats.idle_poll_hits.load(Ordering::Relaxed) == 0 {
            poll.wait(&sink, &rx);
            waited += 1;
        }
        assert_eq!(waited, 16, "after the last miss, 15 moments were skipped and the 16th polled");
        sink.0.store(false, Ordering::Relaxed);
        assert_eq!(polled_moments(&mut poll, &sink, &rx, 4), [0, 1, 3]);

        // A reader that has requests buffered, or more connections than allowed: no poll at all.
        reader_idle.store(false, Ordering::Relaxed);
        let misses = stats.idle_poll_misses.load(Ordering::Relaxed);
        for _ in 0..32 {
            poll.wait(&sink, &rx);
        }
        reader_idle.store(true, Ordering::Relaxed);
        stats.connections_active.store(2, Ordering::Relaxed);
        for _ in 0..32 {
            poll.wait(&sink, &rx);
        }
        assert_eq!(stats.idle_poll_misses.load(Ordering::Relaxed), misses);
    }
}

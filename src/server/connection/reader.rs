//! The transmission phase's reader: takes each request off the socket, validates it against the
//! session, charges its in-flight budget, reads a write's payload, and hands it to
//! [`super::dispatch`] as a [`Pending`] that will answer it. It ends on DISC, EOF, a protocol
//! violation, shutdown, or when the writer gave up; then the writer drains what is outstanding.

use super::dispatch::{execute, refusal_message};
use super::reply::{Budget, Pending, Reply, ReplyBody, ReplyTx};
use super::writer::{write_replies, IdlePoll};
use super::{
    drain, protocol_error, read_header, take_buffered, within, ConnLimits, BUDGET_UNIT_BYTES, CONN_RESERVE_BYTES,
    INLINE_MAX_UNITS, PARTIAL_REQUEST_TIMEOUT,
};
use crate::device::AlignedBuf;
use crate::nbd::consts::*;
use crate::nbd::request::{self, Op, RequestHeader};
use crate::nbd::{reply, Session};
use crate::server::zerocopy::{zero_copy_min_bytes, ReplySink};
use crate::server::ZeroCopyReads;
use crate::volume::Volume;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

/// What the reader shares with every request it starts.
struct Dispatch<V> {
    volume: Arc<V>,
    limits: Arc<ConnLimits>,
    session: Arc<Session>,
    tx: ReplyTx,
    /// This connection's share of in-flight bytes, and its reserve outside the server's total.
    budget: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    zero_copy_min: Option<u32>,
}

/// How the transmission phase ended: the connection closed, or it stopped between requests with
/// nothing in flight for a handover, its reader (with what it buffered) and writer half intact.
pub(super) enum Ended<R, W> {
    Closed,
    Parked(BufReader<R>, W),
}

/// Why the reader stopped taking requests.
enum Stopped {
    /// DISC, EOF, or the writer gave up: the connection ends.
    Client,
    /// The server is stopping (shutdown or handover).
    Server,
}

pub(super) async fn transmission<R, W, V>(
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    session: Session,
    volume: Arc<V>,
    limits: Arc<ConnLimits>,
    shutdown: watch::Receiver<bool>,
    parkable: bool,
) -> io::Result<Ended<R, W>>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: ReplySink,
    V: Volume,
{
    let send_mode = if writer.get_ref().can_sendfile() { limits.zero_copy_reads } else { ZeroCopyReads::Off };
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    // Set while the reader waits for a request with nothing buffered: only then can polling the
    // socket find the client's next request sooner than the runtime would.
    let reader_idle = Arc::new(AtomicBool::new(false));
    let idle_poll = IdlePoll::new(limits.idle_poll, reader_idle.clone(), limits.stats.clone());
    // Set before the last reply is written when this connection parks instead of closing.
    let park = Arc::new(AtomicBool::new(false));
    let writer_task = tokio::spawn(write_replies(
        writer,
        rx,
        volume.clone(),
        limits.stats.clone(),
        send_mode,
        idle_poll,
        park.clone(),
    ));
    let budget_units = (limits.max_inflight_bytes / BUDGET_UNIT_BYTES).max(1);
    // The budget must admit the largest single request, or such a request would wait forever.
    let budget_units = budget_units.max((limits.export.max_payload_bytes as usize).div_ceil(BUDGET_UNIT_BYTES) + 1);
    let d = Dispatch {
        zero_copy_min: zero_copy_min_bytes(send_mode),
        volume,
        limits,
        session: Arc::new(session),
        tx,
        budget: Arc::new(Semaphore::new(budget_units)),
        reserve: Arc::new(Semaphore::new(CONN_RESERVE_BYTES / BUDGET_UNIT_BYTES)),
    };
    let read_result = read_requests(&mut reader, &d, &reader_idle, shutdown).await;
    if parkable && matches!(read_result, Ok(Stopped::Server)) && d.limits.handover.requested() {
        park.store(true, Ordering::SeqCst);
    }
    // Every started request holds a sender; the writer ends once the last reply is written, which
    // is how DISC and shutdown "finish outstanding requests, then close".
    drop(d);
    let write_result = writer_task.await.map_err(|e| io::Error::other(format!("writer task failed: {e}")))?;
    read_result?;
    Ok(match write_result? {
        Some(w) => Ended::Parked(reader, w),
        None => Ended::Closed,
    })
}

async fn read_requests<R: AsyncRead + Unpin, V: Volume>(
    reader: &mut BufReader<R>,
    d: &Dispatch<V>,
    reader_idle: &AtomicBool,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<Stopped> {
    loop {
        let mut hdr = [0u8; REQUEST_HEADER_BYTES];
        reader_idle.store(reader.buffer().is_empty(), Ordering::Relaxed);
        let got = if take_buffered(reader, &mut hdr) {
            // Already here (a pipelining client's requests arrive in batches): nothing to wait
            // for, so no timeout to arm and no clock to read.
            Ok(true)
        } else {
            // Only the wait for the first byte races the stop, and it consumes nothing: a
            // connection that parks for a handover must not lose half a header.
            let readable = tokio::select! {
                biased;
                r = wait_readable(reader, d.limits.idle_timeout) => r,
                _ = shutdown.wait_for(|s| *s) => {
                    tracing::debug!("stopping: no more requests on this connection");
                    return Ok(Stopped::Server);
                }
                // The writer gave up (the client stopped reading, or the socket broke): its error
                // is the connection's; stop taking requests whose replies could not be sent.
                _ = d.tx.closed() => return Ok(Stopped::Client),
            };
            match readable {
                Ok(true) => read_header(reader, &mut hdr, d.limits.idle_timeout).await,
                other => other,
            }
        };
        reader_idle.store(false, Ordering::Relaxed);
        if !got? {
            return Ok(Stopped::Client); // EOF between requests: the client hung up
        }
        let h = request::decode_header(&hdr).map_err(|e| protocol_error(e.to_string()))?;
        match request::validate(&h, &d.limits.export, &d.session) {
            Ok(Op::Disconnect) => return Ok(Stopped::Client),
            Ok(op) => start(reader, d, h.cookie, op).await?,
            Err(err) => refuse(reader, d, &h, err).await?,
        }
    }
}

/// Waits until the socket has a byte for us (true) or the client closed it (false), without
/// consuming anything; `idle` (zero: none) bounds the wait.
async fn wait_readable<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, idle: std::time::Duration) -> io::Result<bool> {
    use tokio::io::AsyncBufReadExt;
    let filled = if idle.is_zero() {
        reader.fill_buf().await
    } else {
        match tokio::time::timeout(idle, reader.fill_buf()).await {
            Ok(r) => r,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
        }
    };
    Ok(!filled?.is_empty())
}

/// Answers a request the spec says to refuse. The payload of a refused write is still on the wire:
/// it is skipped without being buffered. A refusal holds budget too (its connection's share only:
/// a few dozen bytes, not a data buffer), so a client that streams bad requests and never reads
/// its replies stalls itself instead of growing the reply queue without bound.
async fn refuse<R: AsyncRead + Unpin, V: Volume>(
    reader: &mut BufReader<R>,
    d: &Dispatch<V>,
    h: &RequestHeader,
    err: crate::nbd::NbdError,
) -> io::Result<()> {
    within(PARTIAL_REQUEST_TIMEOUT, drain(reader, u64::from(h.payload_bytes()))).await?;
    let permit = d.budget.clone().acquire_owned().await.expect("budget semaphore is never closed");
    let structured = d.session.structured_replies;
    let pending = Pending::new(h.cookie, structured, Budget { _conn: permit, _total: None }, d.tx.clone());
    let mut head = Vec::with_capacity(64);
    reply::error(&mut head, h.cookie, structured, err, &refusal_message(h, err));
    pending.answer(ReplyBody { head, data: None, failed: true });
    Ok(())
}

/// Budget units a request holds: its data, or one unit for any other (a client streaming TRIMs
/// or FLUSHes holds a task and a registration for each, and the total must bound those too).
fn units_of(op: &Op) -> usize {
    match op {
        Op::Read { length, .. } | Op::Write { length, .. } => (*length as usize).div_ceil(BUDGET_UNIT_BYTES).max(1),
        _ => 1,
    }
}

/// Charges a request's budget: its connection's share first, then the connection's reserve or
/// else the server-wide total. A client waits on the total only with its own share in hand, so
/// one client never holds total budget it cannot use yet.
async fn admit<V: Volume>(d: &Dispatch<V>, units: u32) -> Budget {
    let conn = d.budget.clone().acquire_many_owned(units).await.expect("budget semaphore is never closed");
    let total = match d.reserve.clone().try_acquire_many_owned(units) {
        Ok(p) => p,
        Err(_) => {
            d.limits.total_budget.clone().acquire_many_owned(units).await.expect("budget semaphore is never closed")
        }
    };
    Budget { _conn: conn, _total: Some(total) }
}

/// Admits a validated request, reads its payload, and runs it.
async fn start<R: AsyncRead + Unpin, V: Volume>(
    reader: &mut BufReader<R>,
    d: &Dispatch<V>,
    cookie: u64,
    op: Op,
) -> io::Result<()> {
    let units = units_of(&op);
    let budget = admit(d, u32::try_from(units).unwrap_or(u32::MAX)).await;
    let payload = match op {
        Op::Write { length, .. } => {
            let mut buf = AlignedBuf::uninit_for_fill(length as usize);
            if !take_buffered(reader, &mut buf) {
                within(PARTIAL_REQUEST_TIMEOUT, reader.read_exact(&mut buf)).await?;
            }
            Some(buf)
        }
        _ => None,
    };
    let pending = Pending::new(cookie, d.session.structured_replies, budget, d.tx.clone());
    let (volume, session, stats) = (d.volume.clone(), d.session.clone(), d.limits.stats.clone());
    let zero_copy_min = d.zero_copy_min;
    let mut request =
        Box::pin(async move { execute(&*volume, &session, &stats, pending, op, payload, zero_copy_min).await });
    // Poll once here: a page-cache hit completes synchronously, and then the request costs no
    // task spawn and no cross-thread wake-up. Only requests that really wait for a device become
    // tasks (their next poll registers the real waker). Large transfers are the exception: their
    // copy takes long enough that doing it here would stop this reader from taking the next
    // request, so they run as tasks, in parallel with the reader.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if units > INLINE_MAX_UNITS || request.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(request.in_current_span());
    }
    Ok(())
}

//! Timeouts, retries and write fencing for a device that can stall: the backing, a network disk
//! that may stop answering for seconds or minutes and then answer again.
//!
//! ```text
//!   caller ──► Guarded<D> ── write: fence [off, off+len) ─► attempt ───────────► answer ─► unfence
//!                 │                                           │ past attempt_timeout: stalled
//!                 │                                           │ (counted; warn once per outage)
//!                 │                                           │ past the deadline: the caller gets
//!                 │                                           ▼ EIO, the attempt moves to a task
//!                 │                                        still fenced … late answer ─► unfence
//!                 └── read:  wait for given-up writes that overlap ─► attempt; re-issued when it
//!                            stalls or fails (read_retries, backoff); the first answer wins
//! ```
//!
//! # Why a write stays fenced after its caller gave up, and is never issued twice
//! An operation that timed out is not cancelled: it may sit in the kernel (an io_uring request, a
//! blocked pwrite thread, a FUSE or NBD request) and reach the device later. If a later write to
//! the same bytes were issued and acknowledged meanwhile, the late one could land after it and
//! silently replace acknowledged data. So every write holds its byte range in a fence from issue
//! until the device really answers — even after its caller got EIO — and the next write to
//! overlapping bytes waits behind it (within its own deadline, so it too fails cleanly while the
//! device is stalled). For the same reason a write is never re-issued while the first attempt may
//! be in flight; and one that failed outright is not re-issued either (the kernel below already
//! retried; the client must see the error).
//!
//! Reads are idempotent: a stalled read is re-issued while the first attempt is still pending
//! (hedged: the first answer wins), a failed one is retried after a backoff. A read that overlaps a
//! write whose caller gave up waits for that write to land, so once a client saw a write fail,
//! every later read of those bytes (and the mirror's rebuild copy of them) tells one story.
//!
//! A flush is never re-issued: after fdatasync fails the kernel may have dropped the dirty pages,
//! and a second fdatasync would report success for data that is gone. A flush past the deadline
//! fails; its late completion is reported to nobody.
//!
//! # Deadlines
//! Each operation has `deadline` from its start. A caller that does several things for one client
//! request (the mirror: range lock, write-intent commit, device write) wraps the whole request in
//! [`with_deadline`]; every operation inside it then ends by the request's deadline, and
//! [`bounded`] bounds its other waits (locks) by the same instant.
//!
//! Operations that stalled stay counted until the device answers them. Past
//! [`MAX_STALLED_OPS`] of them no new operation is issued (each would only tie up another kernel
//! worker or blocking thread): requests wait, within their deadline, for the count to drop.

use crate::device::rangelock::OwnedRangeGuard;
use crate::device::{AlignedBuf, BlockDevice, Extent, RangeLocks};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Operations past their attempt timeout (or given up by their caller) that may stay outstanding
/// at once; beyond this, new operations wait instead of piling up in the kernel. Each can hold a
/// thread (tokio's blocking pool, 512 by default and shared with the cache devices under psync,
/// or an io_uring worker), so this stays well below the pool. It is per device: a backing whose
/// requests hang only in one place still lets others through until this many have piled up.
pub const MAX_STALLED_OPS: u64 = 256;
/// How often a request blocked on [`MAX_STALLED_OPS`] looks again.
const CAPACITY_POLL: Duration = Duration::from_millis(50);

/// How long to wait for a device, how often to try again, and when to give up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoPolicy {
    /// One attempt may take this long before it counts as stalled: counted and logged, and a read
    /// is re-issued. A write or flush keeps waiting for the same attempt (see the module docs).
    pub attempt_timeout: Duration,
    /// Extra attempts for a read that stalled or failed.
    pub read_retries: u32,
    /// Pause before re-issuing a read that failed; doubles with each retry (up to the attempt
    /// timeout). A stalled read is re-issued at once.
    pub retry_backoff: Duration,
    /// The longest a request waits for the device, fences and retries included; then it fails
    /// with EIO (an attempt still in flight carries on in the background, fenced).
    pub deadline: Duration,
}

impl Default for IoPolicy {
    fn default() -> Self {
        IoPolicy {
            // A persistent disk can stall for seconds under normal operation; 30 s is the Linux
            // block layer's own default request timeout.
            attempt_timeout: Duration::from_secs(30),
            read_retries: 3,
            retry_backoff: Duration::from_millis(500),
            // A write error usually makes the client's filesystem shut down, so waiting out a
            // long stall is better than failing early.
            deadline: Duration::from_secs(120),
        }
    }
}

/// Counters of one guarded device (for the status command and metrics).
#[derive(Debug, Default)]
pub struct BackingIoStats {
    /// Attempts that ran past the attempt timeout.
    pub timeouts: AtomicU64,
    /// Read attempts re-issued (after a stall or an error).
    pub retries: AtomicU64,
    /// Operations that failed because their deadline passed: client requests (which got EIO) and
    /// background ones (cleaner, rebuild).
    pub deadline_errors: AtomicU64,
    /// Outages begun: an attempt stalled while none was stalled.
    pub outages: AtomicU64,
    /// Gauge: attempts stalled or given up and not yet answered by the device.
    pub stalled_ops: AtomicU64,
    /// Gauge: 1 while an outage lasts (some attempt is stalled), else 0.
    pub in_outage: AtomicU64,
    pub durability: Durability,
}

/// Whether the device can still be trusted with the durability of what it acknowledged.
///
/// Linux reports a failed write-back once per open file (errseq): the `fdatasync` (or `RWF_DSYNC`
/// write) that sees it gets EIO, the dirty pages are marked clean and may be evicted, and the next
/// `fdatasync` returns 0 although the data never reached the media. A device returning an error
/// for a flush or a FUA write is the same story for any device: something acknowledged earlier may
/// be gone. So the first such failure is recorded here and never forgotten by this process: from
/// then on no client FLUSH or FUA write may succeed, and the mirror clears no write-intent bit.
/// Volumes persist the loss on the backing's superblock, so a restart keeps it too; only the
/// operator clears it (`superdisk clear-flush-error`), once the clients have dealt with it.
#[derive(Debug, Default)]
pub struct Durability {
    lost: AtomicBool,
    failures: AtomicU64,
    loss: Mutex<Option<DurabilityLoss>>,
    /// Wakes whoever persists a new loss (the mirror's metadata task).
    changed: tokio::sync::Notify,
}

/// What made the device's durability unknown, and when.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DurabilityLoss {
    pub since_unix_s: u64,
    pub cause: String,
}

impl Durability {
    /// Flush or FUA-write failures seen since start (each one is a possible loss of data).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    pub fn loss(&self) -> Option<DurabilityLoss> {
        if !self.is_lost() {
            return None;
        }
        lock(&self.loss).clone()
    }

    /// Records a failed flush or FUA write (`counted`), or a loss recorded by an earlier run.
    /// True if durability was not already lost.
    pub fn record(&self, cause: String, counted: bool) -> bool {
        if counted {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut l = lock(&self.loss);
        if l.is_some() {
            return false;
        }
        let since_unix_s =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        *l = Some(DurabilityLoss { since_unix_s, cause });
        self.lost.store(true, Ordering::Release);
        drop(l);
        self.changed.notify_waiters();
        true
    }

    /// The operator's acknowledgement (after the volume made its copies consistent again).
    pub fn clear(&self) {
        let mut l = lock(&self.loss);
        *l = None;
        self.lost.store(false, Ordering::Release);
    }

    /// Err (EIO to a client) while durability is lost.
    pub fn check(&self) -> io::Result<()> {
        match self.loss() {
            None => Ok(()),
            Some(l) => Err(io::Error::other(format!(
                "the backing lost durability ({}): an earlier flush or FUA write failed, so writes \
                 acknowledged before it may be gone; every FLUSH and FUA write fails until the \
                 operator runs `superdisk clear-flush-error`",
                l.cause
            ))),
        }
    }

    /// Resolves at the next loss recorded after it was enabled (or first polled).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

tokio::task_local! {
    static REQUEST_DEADLINE: Instant;
}

/// Runs `f` with a request deadline: every guarded operation inside ends by `deadline` (or by an
/// enclosing scope's earlier one), and so does every wait wrapped in [`bounded`].
pub async fn with_deadline<F: Future>(deadline: Instant, f: F) -> F::Output {
    let d = current_deadline().map_or(deadline, |outer| outer.min(deadline));
    REQUEST_DEADLINE.scope(d, f).await
}

/// The deadline of the enclosing [`with_deadline`] scope, if any.
pub fn current_deadline() -> Option<Instant> {
    REQUEST_DEADLINE.try_with(|d| *d).ok()
}

/// Awaits `f`, but no longer than the enclosing request deadline (unbounded outside a scope).
/// For waits that are cancel-safe (lock acquisition): on expiry `f` is dropped.
pub async fn bounded<F: Future>(f: F) -> io::Result<F::Output> {
    match current_deadline() {
        None => Ok(f.await),
        Some(d) => within(d, f).await.ok_or_else(|| deadline_error(None)),
    }
}

/// The error a request gets when its deadline passes: ETIMEDOUT-kinded (the NBD layer sends EIO).
#[derive(Debug)]
struct DeadlineExceeded {
    op: Option<&'static str>,
}

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.op {
            Some(op) => write!(f, "the backing did not complete the {op} within the I/O deadline"),
            None => write!(f, "the request's backing I/O deadline passed while it waited"),
        }
    }
}

impl std::error::Error for DeadlineExceeded {}

fn deadline_error(op: Option<&'static str>) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, DeadlineExceeded { op })
}

/// Whether `e` is a request failing at its deadline (rather than an error the device returned).
pub fn is_deadline_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<DeadlineExceeded>())
}

/// Errors worth a second read: a path or a server that may come back. Not: bad arguments, a
/// device that is gone, reads past the end.
fn transient(e: &io::Error) -> bool {
    match e.raw_os_error() {
        Some(c) => [
            libc::EIO,
            libc::ETIMEDOUT,
            libc::EAGAIN,
            libc::EINTR,
            libc::ECONNRESET,
            libc::ECONNABORTED,
            libc::ECONNREFUSED,
            libc::ENOTCONN,
            libc::ESHUTDOWN,
            libc::ENOLINK,
            libc::ENETDOWN,
            libc::ENETUNREACH,
            libc::EHOSTUNREACH,
            libc::EPIPE,
            libc::ECOMM,
            libc::EREMOTEIO,
        ]
        .contains(&c),
        None => matches!(
            e.kind(),
            io::ErrorKind::Other | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
        ),
    }
}

/// Polls `f` once, and only if it is not ready arms a timer: the common case (done at once) costs
/// no timer, and runtimes without a time driver work as long as nothing has to wait.
async fn within<F: Future>(deadline: Instant, f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let first = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(v) => Some(v),
        Poll::Pending => tokio::time::timeout_at(deadline.into(), f).await.ok(),
    }
}

/// What an operation returns, as far as retrying is concerned.
trait Outcome: Send + 'static {
    fn error(&self) -> Option<&io::Error>;
}

impl Outcome for (AlignedBuf, io::Result<()>) {
    fn error(&self) -> Option<&io::Error> {
        self.1.as_ref().err()
    }
}

impl<T: Send + 'static> Outcome for io::Result<T> {
    fn error(&self) -> Option<&io::Error> {
        self.as_ref().err()
    }
}

type OpFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

struct Outage {
    since: Instant,
    timeouts_at_start: u64,
    deadline_errors_at_start: u64,
}

struct Health {
    stalled: u64,
    outage: Option<Outage>,
}

struct Shared {
    name: &'static str,
    policy: IoPolicy,
    stats: Arc<BackingIoStats>,
    /// Every write (and write_zeroes) holds its range here from issue until the device answers.
    fence: Arc<RangeLocks>,
    /// Ranges of writes whose caller gave up and that the device has not answered: (id, start, end).
    abandoned: Mutex<Vec<(u64, u64, u64)>>,
    abandoned_count: AtomicUsize,
    next_id: AtomicU64,
    health: Mutex<Health>,
    /// Wakes readers waiting for an abandoned write, and [`Guarded::wait_answering`].
    changed: tokio::sync::Notify,
    /// Flushes hold it exclusively and FUA writes shared, from issue until the device answers:
    /// with errseq only one of two overlapping syncs sees a write-back error, so a flush that
    /// overlapped the failing one could report success for data that is gone. In turn, the
    /// failure is recorded before the next sync can start.
    gate: Arc<tokio::sync::RwLock<()>>,
    /// One flush at a time comes through here; flush calls that arrived while one was issued
    /// are all covered by the next one (group commit).
    flush_turn: tokio::sync::Mutex<()>,
    /// Flush calls so far, and how many of them a successful flush has covered.
    flush_calls: AtomicU64,
    flush_covered: AtomicU64,
}

/// A sync's hold on [`Shared::gate`] (held only to be dropped).
#[allow(dead_code)]
enum GateGuard {
    Shared(tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(tokio::sync::OwnedRwLockWriteGuard<()>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One operation for the log: what, where.
#[derive(Clone, Copy)]
struct Op {
    what: &'static str,
    offset: u64,
    len: u64,
    /// A flush or a FUA write: its failure means durability is lost ([`Durability`]).
    durable: bool,
}

impl Shared {
    fn stall(&self, op: Op, timed_out: bool) {
        if timed_out {
            self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        let mut h = lock(&self.health);
        h.stalled += 1;
        self.stats.stalled_ops.store(h.stalled, Ordering::Relaxed);
        if h.outage.is_none() {
            h.outage = Some(Outage {
                since: Instant::now(),
                timeouts_at_start: self.stats.timeouts.load(Ordering::Relaxed) - u64::from(timed_out),
                deadline_errors_at_start: self.stats.deadline_errors.load(Ordering::Relaxed),
            });
            self.stats.outages.fetch_add(1, Ordering::Relaxed);
            self.stats.in_outage.store(1, Ordering::Relaxed);
            tracing::warn!(
                device = self.name,
                op = op.what,
                offset = op.offset,
                len = op.len,
                attempt_timeout_ms = self.policy.attempt_timeout.as_millis() as u64,
                deadline_ms = self.policy.deadline.as_millis() as u64,
                outages = self.stats.outages.load(Ordering::Relaxed),
                "{} I/O stalled: an operation got no answer within the attempt timeout; requests that need \
                 the device wait up to the deadline and then fail with EIO, reads of valid cached regions \
                 continue",
                self.name
            );
        }
    }

    fn unstall(&self) {
        let mut h = lock(&self.health);
        h.stalled -= 1;
        self.stats.stalled_ops.store(h.stalled, Ordering::Relaxed);
        if h.stalled == 0 {
            if let Some(o) = h.outage.take() {
                self.stats.in_outage.store(0, Ordering::Relaxed);
                let timeouts = self.stats.timeouts.load(Ordering::Relaxed) - o.timeouts_at_start;
                let failed = self.stats.deadline_errors.load(Ordering::Relaxed) - o.deadline_errors_at_start;
                tracing::info!(
                    device = self.name,
                    outage_ms = o.since.elapsed().as_millis() as u64,
                    timeouts,
                    failed_at_deadline = failed,
                    "{} answering again: every stalled operation has completed",
                    self.name
                );
            }
        }
        drop(h);
        self.changed.notify_waiters();
    }

    /// Read on every issue: the gauge (kept equal to `health.stalled` under its lock), so the
    /// common path takes no lock.
    fn stalled(&self) -> u64 {
        self.stats.stalled_ops.load(Ordering::Relaxed)
    }

    fn abandon(&self, start: u64, end: u64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.abandoned).push((id, start, end));
        self.abandoned_count.fetch_add(1, Ordering::SeqCst);
        id
    }

    fn landed(&self, id: u64) {
        let mut a = lock(&self.abandoned);
        if let Some(i) = a.iter().position(|e| e.0 == id) {
            a.swap_remove(i);
            self.abandoned_count.fetch_sub(1, Ordering::SeqCst);
        }
        drop(a);
        self.changed.notify_waiters();
    }

    fn overlaps_abandoned(&self, start: u64, end: u64) -> bool {
        self.abandoned_count.load(Ordering::SeqCst) > 0
            && lock(&self.abandoned).iter().any(|&(_, s, e)| s < end && start < e)
    }

    /// Waits until no write that overlaps `[start, end)` is outstanding without its caller.
    async fn wait_abandoned(&self, start: u64, end: u64, deadline: Instant) -> Result<(), ()> {
        if !self.overlaps_abandoned(start, end) {
            // The common case, without a Notify registration or a timer.
            return Ok(());
        }
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.overlaps_abandoned(start, end) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                return Err(());
            }
        }
    }

    /// A flush holds the gate alone; FUA writes share it.
    fn try_gate(&self, kind: Kind) -> Option<GateGuard> {
        if kind == Kind::Flush {
            self.gate.clone().try_write_owned().ok().map(GateGuard::Exclusive)
        } else {
            self.gate.clone().try_read_owned().ok().map(GateGuard::Shared)
        }
    }

    async fn lock_gate(&self, kind: Kind) -> GateGuard {
        if kind == Kind::Flush {
            GateGuard::Exclusive(self.gate.clone().write_owned().await)
        } else {
            GateGuard::Shared(self.gate.clone().read_owned().await)
        }
    }

    /// A flush or FUA write the device failed (possibly long after its caller gave up).
    fn durability_failed(&self, op: Op, e: &io::Error) {
        let cause = format!("{} {} at {}+{} failed: {e}", self.name, op.what, op.offset, op.len);
        if self.stats.durability.record(cause, true) {
            tracing::error!(
                device = self.name,
                op = op.what,
                error = %e,
                "{} {} failed: data acknowledged before it may not be durable; every FLUSH and FUA write fails \
                 from now on and no write-intent bit is cleared, until the operator runs `superdisk clear-flush-error`",
                self.name,
                op.what
            );
        }
    }

    fn deadline_failed(&self, op: Op) -> io::Error {
        self.stats.deadline_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(device = self.name, op = op.what, offset = op.offset, len = op.len, "deadline passed");
        deadline_error(Some(op.what))
    }
}

/// One issued operation. Dropped before the device answered, it moves to a background task that
/// drives it to the end, keeping its write fence (and registering its range as abandoned, so reads
/// wait for it) until then.
struct Attempt<T: Outcome> {
    fut: Option<OpFuture<T>>,
    shared: Arc<Shared>,
    op: Op,
    /// Set once the attempt has to be waited for (the fast path reads no clock).
    started: Option<Instant>,
    stalled: bool,
    fence: Option<OwnedRangeGuard>,
    gate: Option<GateGuard>,
    abandoned: Option<u64>,
    /// Already the background remainder: dropping it again (runtime shutdown) must not respawn.
    detached: bool,
}

/// What an attempt holds while it is in flight: its write fence and its hold on the sync gate.
struct Holds {
    fence: Option<OwnedRangeGuard>,
    gate: Option<GateGuard>,
}

impl Holds {
    fn take(&mut self) -> Holds {
        Holds { fence: self.fence.take(), gate: self.gate.take() }
    }
}

impl<T: Outcome> Attempt<T> {
    fn new(shared: &Arc<Shared>, fut: OpFuture<T>, op: Op, holds: Holds) -> Self {
        Attempt {
            fut: Some(fut),
            shared: shared.clone(),
            op,
            started: None,
            stalled: false,
            fence: holds.fence,
            gate: holds.gate,
            abandoned: None,
            detached: false,
        }
    }

    fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        let Some(fut) = self.fut.as_mut() else { return Poll::Pending };
        let v = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        if self.op.durable {
            // Before the gate opens: the next sync must already see the loss.
            if let Some(e) = v.error() {
                self.shared.durability_failed(self.op, e);
            }
        }
        self.settle();
        Poll::Ready(v)
    }

    /// The device answered (or the operation is gone): release what it held.
    fn settle(&mut self) {
        drop(self.gate.take());
        drop(self.fence.take());
        if let Some(id) = self.abandoned.take() {
            self.shared.landed(id);
        }
        if std::mem::take(&mut self.stalled) {
            self.shared.unstall();
        }
    }

    fn mark_stalled(&mut self, timed_out: bool) {
        if !self.stalled {
            self.stalled = true;
            self.shared.stall(self.op, timed_out);
        }
    }
}

impl<T: Outcome> Drop for Attempt<T> {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else { return };
        if self.detached {
            // The runtime is shutting down with the device still silent: nothing can wait for it.
            self.settle();
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.settle();
            return;
        };
        // Dropped by its caller before the device answered (a hedged read that lost the race, a
        // task being stopped): not a stall in itself, or every lost hedge would open a backing
        // "outage" with a warning. It becomes one if the device has not answered by the attempt
        // timeout; a request's deadline marks its attempts stalled before dropping them.
        let stall_at = self.started.unwrap_or_else(Instant::now) + self.shared.policy.attempt_timeout;
        if self.fence.is_some() {
            // Before the caller's error reaches the client: a read issued after it must wait.
            self.abandoned = Some(self.shared.abandon(self.op.offset, self.op.offset + self.op.len));
        }
        let mut rest = Attempt {
            fut: Some(fut),
            shared: self.shared.clone(),
            op: self.op,
            started: self.started,
            stalled: std::mem::take(&mut self.stalled),
            fence: self.fence.take(),
            gate: self.gate.take(),
            abandoned: self.abandoned.take(),
            detached: true,
        };
        rt.spawn(async move {
            if !rest.stalled {
                let timer = tokio::time::sleep_until(stall_at.into());
                tokio::pin!(timer);
                let answered = std::future::poll_fn(|cx| {
                    if rest.poll_done(cx).is_ready() {
                        Poll::Ready(true)
                    } else if timer.as_mut().poll(cx).is_ready() {
                        Poll::Ready(false)
                    } else {
                        Poll::Pending
                    }
                })
                .await;
                if answered {
                    return;
                }
                rest.mark_stalled(true);
            }
            std::future::poll_fn(|cx| rest.poll_done(cx)).await;
        });
    }
}

fn poll_any<T: Outcome>(attempts: &mut [Attempt<T>], cx: &mut Context<'_>) -> Poll<(usize, T)> {
    for (i, a) in attempts.iter_mut().enumerate() {
        if let Poll::Ready(v) = a.poll_done(cx) {
            return Poll::Ready((i, v));
        }
    }
    Poll::Pending
}

/// How an operation may be repeated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Idempotent: re-issued on a stall or a transient error; waits for abandoned writes first.
    Read,
    /// Fenced, issued once.
    Write,
    /// Issued once, not fenced.
    Flush,
}

/// A device with timeouts, read retries and write fencing (see the module docs). Cheap to share by
/// reference; the device itself is behind an `Arc` so that an operation can outlive its caller.
pub struct Guarded<D> {
    inner: Arc<D>,
    shared: Arc<Shared>,
}

impl<D: BlockDevice> Guarded<D> {
    /// Wraps `inner`; `name` labels its log lines ("backing").
    pub fn new(inner: D, policy: IoPolicy, stats: Arc<BackingIoStats>, name: &'static str) -> Self {
        let shared = Shared {
            name,
            policy,
            stats,
            fence: Arc::new(RangeLocks::default()),
            abandoned: Mutex::new(Vec::new()),
            abandoned_count: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            health: Mutex::new(Health { stalled: 0, outage: None }),
            changed: tokio::sync::Notify::new(),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            flush_turn: tokio::sync::Mutex::new(()),
            flush_calls: AtomicU64::new(0),
            flush_covered: AtomicU64::new(0),
        };
        Guarded { inner: Arc::new(inner), shared: Arc::new(shared) }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    pub fn policy(&self) -> &IoPolicy {
        &self.shared.policy
    }

    pub fn stats(&self) -> &Arc<BackingIoStats> {
        &self.shared.stats
    }

    /// Whether the device can still be trusted with what it acknowledged (see [`Durability`]).
    pub fn durability(&self) -> &Durability {
        &self.shared.stats.durability
    }

    /// Whether a write whose caller gave up, and that the device has not answered yet, overlaps
    /// `[start, end)`: its bytes may still land there, unflushed.
    pub fn write_outstanding(&self, start: u64, end: u64) -> bool {
        self.shared.overlaps_abandoned(start, end)
    }

    /// Whether some operation is stalled (past its attempt timeout, not yet answered).
    pub fn in_outage(&self) -> bool {
        self.shared.stalled() > 0
    }

    /// Resolves once no operation is stalled, or after `max`.
    pub async fn wait_answering(&self, max: Duration) {
        let deadline = Instant::now() + max;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.in_outage() {
                return;
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                return;
            }
        }
    }

    /// Takes at once, if it can, what an operation must hold or wait for before it is issued:
    /// a write's fence, a read's clearance from abandoned writes, a sync's hold on the gate.
    fn try_enter(&self, kind: Kind, op: Op, holds: &mut Holds) -> bool {
        let sh = &self.shared;
        let ready = match kind {
            Kind::Write if op.len > 0 => {
                holds.fence = sh.fence.try_lock_owned(op.offset, op.offset.saturating_add(op.len));
                holds.fence.is_some()
            }
            Kind::Read => !sh.overlaps_abandoned(op.offset, op.offset.saturating_add(op.len)),
            _ => true,
        };
        ready
            && (!op.durable || {
                holds.gate = sh.try_gate(kind);
                holds.gate.is_some()
            })
    }

    /// [`Self::try_enter`], waiting (within `deadline`) for whatever was not free.
    async fn enter(&self, kind: Kind, op: Op, deadline: Instant, holds: &mut Holds) -> io::Result<()> {
        let sh = &self.shared;
        let end = op.offset.saturating_add(op.len);
        match kind {
            Kind::Write if op.len > 0 && holds.fence.is_none() => {
                match within(deadline, sh.fence.lock_owned(op.offset, end)).await {
                    Some(g) => holds.fence = Some(g),
                    None => return Err(sh.deadline_failed(op)),
                }
            }
            Kind::Read if sh.wait_abandoned(op.offset, end, deadline).await.is_err() => {
                return Err(sh.deadline_failed(op));
            }
            _ => {}
        }
        if op.durable && holds.gate.is_none() {
            match within(deadline, sh.lock_gate(kind)).await {
                Some(g) => holds.gate = Some(g),
                None => return Err(sh.deadline_failed(op)),
            }
        }
        Ok(())
    }

    /// Runs one request: fence or wait as its kind needs, issue, watch the attempt timeout,
    /// re-issue reads, give up at the deadline. `start` issues one attempt. Err only when the
    /// deadline passed with no answer to return.
    async fn drive<T: Outcome>(&self, kind: Kind, op: Op, mut start: impl FnMut() -> OpFuture<T>) -> io::Result<T> {
        let sh = &self.shared;
        let pol = &sh.policy;
        let max_attempts = if kind == Kind::Read { pol.read_retries.saturating_add(1) } else { 1 };
        let mut attempts: Vec<Attempt<T>> = Vec::new();
        let mut issued = 0u32;
        let mut last_failure: Option<T> = None;
        let mut holds = Holds { fence: None, gate: None };

        // Fast path, for a device that answers: nothing to wait for before issuing, and an answer
        // on the first poll. No clock read, no timer, no allocation but the operation's box.
        if sh.stalled() < MAX_STALLED_OPS && self.try_enter(kind, op, &mut holds) {
            let mut a = Attempt::new(sh, start(), op, holds.take());
            issued = 1;
            match std::future::poll_fn(|cx| Poll::Ready(a.poll_done(cx))).await {
                Poll::Ready(out) => match out.error() {
                    Some(e) if kind == Kind::Read && max_attempts > 1 && transient(e) => last_failure = Some(out),
                    _ => return Ok(out),
                },
                Poll::Pending => attempts.push(a),
            }
        }

        let begun = Instant::now();
        let deadline = current_deadline().map_or(begun + pol.deadline, |d| d.min(begun + pol.deadline));
        for a in &mut attempts {
            a.started.get_or_insert(begun);
        }
        let mut issue_at = match (issued, &last_failure) {
            (0, _) => Some(begun),
            (_, Some(_)) => Some(begun + pol.retry_backoff.min(pol.attempt_timeout)),
            _ => None,
        };
        if issued == 0 {
            // The slow way in: wait (within the deadline) for what kept the fast path from issuing.
            self.enter(kind, op, deadline, &mut holds).await?;
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                if attempts.is_empty() {
                    if let Some(out) = last_failure {
                        return Ok(out);
                    }
                }
                // Detaches what is in flight (fenced, registered as abandoned) before the error
                // can reach anyone. An attempt the deadline gave up on counts as stalled from now,
                // so that the stall cap holds back more requests to a device that does not answer.
                for a in attempts.iter_mut() {
                    a.mark_stalled(false);
                }
                drop(attempts);
                return Err(sh.deadline_failed(op));
            }
            let due = issue_at.is_some_and(|t| t <= now) && issued < max_attempts;
            let mut blocked = false;
            if due {
                if sh.stalled() >= MAX_STALLED_OPS {
                    blocked = true;
                } else {
                    if issued > 0 {
                        sh.stats.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    issued += 1;
                    issue_at = None;
                    let mut a = Attempt::new(sh, start(), op, holds.take());
                    a.started = Some(now);
                    attempts.push(a);
                }
            }
            if attempts.is_empty() && !blocked && (issue_at.is_none() || issued >= max_attempts) {
                return Ok(last_failure.expect("an attempt ended"));
            }
            // Most operations answer on their first poll: look before arming any timer.
            let ready = std::future::poll_fn(|cx| Poll::Ready(poll_any(&mut attempts, cx))).await;
            let done = match ready {
                Poll::Ready(d) => Some(d),
                Poll::Pending => {
                    let mut wake = deadline;
                    for a in attempts.iter().filter(|a| !a.stalled) {
                        wake = wake.min(a.started.unwrap_or(begun) + pol.attempt_timeout);
                    }
                    if let Some(t) = issue_at.filter(|_| issued < max_attempts) {
                        wake = wake.min(t);
                    }
                    if blocked {
                        wake = wake.min(now + CAPACITY_POLL);
                    }
                    tokio::select! {
                        biased;
                        d = std::future::poll_fn(|cx| poll_any(&mut attempts, cx)) => Some(d),
                        _ = tokio::time::sleep_until(wake.into()) => None,
                    }
                }
            };
            let now = Instant::now();
            match done {
                Some((i, out)) => {
                    drop(attempts.swap_remove(i));
                    let Some(e) = out.error() else {
                        // The others (hedged reads) finish in the background.
                        return Ok(out);
                    };
                    if kind == Kind::Read && issued < max_attempts && transient(e) {
                        let shift = issued.saturating_sub(1).min(16);
                        let backoff = pol.retry_backoff.saturating_mul(1 << shift).min(pol.attempt_timeout);
                        let at = now + backoff;
                        issue_at = Some(issue_at.map_or(at, |t| t.min(at)));
                    }
                    last_failure = Some(out);
                }
                None => {
                    for a in attempts.iter_mut() {
                        if !a.stalled && now >= a.started.unwrap_or(begun) + pol.attempt_timeout {
                            a.mark_stalled(true);
                            if kind == Kind::Read && issued < max_attempts {
                                // Hedge: a fresh request may take another path, or find the device back.
                                issue_at = Some(now);
                            }
                        }
                    }
                }
            }
        }
    }
}

impl<D: BlockDevice> BlockDevice for Guarded<D> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn logical_block_bytes(&self) -> u32 {
        self.inner.logical_block_bytes()
    }

    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }

    /// Bytes already in the page cache are the device's as the kernel holds them: no attempt
    /// that could stall, so nothing to time out. But a write whose caller gave up may still land
    /// on them, and a read must not see the bytes from before it and then the bytes after: such
    /// a range is read through [`Guarded::read`], which waits for the write.
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<crate::device::FileSlice> {
        if self.shared.overlaps_abandoned(offset, offset.saturating_add(len as u64)) {
            return None;
        }
        self.inner.zero_copy_source(offset, len)
    }

    fn identity(&self) -> Option<crate::device::DeviceId> {
        self.inner.identity()
    }

    fn drop_cached(&self, offset: u64, len: u64) {
        self.inner.drop_cached(offset, len);
    }

    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len();
        let mut first = Some(buf);
        let op = Op { what: "read", offset, len: len as u64, durable: false };
        let r = self
            .drive(Kind::Read, op, || {
                let inner = self.inner.clone();
                // The caller's buffer for the first attempt; a hedged one needs its own.
                let b = first.take().unwrap_or_else(|| AlignedBuf::uninit_for_fill(len));
                Box::pin(async move { inner.read(offset, b).await })
            })
            .await;
        match r {
            Ok(out) => out,
            Err(e) => (first.unwrap_or_else(|| AlignedBuf::zeroed(len)), Err(e)),
        }
    }

    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len();
        let mut once = Some(buf);
        let op = Op { what: "write", offset, len: len as u64, durable: fua };
        let r = self
            .drive(Kind::Write, op, || {
                let inner = self.inner.clone();
                let b = once.take().expect("a write is issued once");
                Box::pin(async move { inner.write(offset, b, fua).await })
            })
            .await;
        match r {
            Ok(out) => out,
            // The buffer is still the device's (or was never taken: the fence wait expired).
            Err(e) => (once.unwrap_or_else(|| AlignedBuf::zeroed(len)), Err(e)),
        }
    }

    async fn write_shared(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        let op = Op { what: "write", offset, len: data.len() as u64, durable: fua };
        self.drive(Kind::Write, op, || {
            let (inner, data) = (self.inner.clone(), data.clone());
            Box::pin(async move { inner.write_shared(offset, data, fua).await })
        })
        .await?
    }

    /// Flushes one at a time (see [`Shared::gate`]); calls that arrive while one is issued share
    /// the next. A flush is issued even after durability was lost (metadata writes still need
    /// theirs); callers that promise durability to a client check [`Durability`] as well.
    async fn flush(&self) -> io::Result<()> {
        let sh = &self.shared;
        let me = sh.flush_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let _turn = bounded(sh.flush_turn.lock()).await?;
        if sh.flush_covered.load(Ordering::SeqCst) >= me {
            // A flush issued after this call began succeeded: every write acknowledged before
            // the call is durable (unless durability was lost, which the caller checks).
            return Ok(());
        }
        let covers = sh.flush_calls.load(Ordering::SeqCst);
        let op = Op { what: "flush", offset: 0, len: 0, durable: true };
        self.drive(Kind::Flush, op, || {
            let inner = self.inner.clone();
            Box::pin(async move { inner.flush().await })
        })
        .await??;
        sh.flush_covered.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let op = Op { what: "write_zeroes", offset, len, durable: false };
        self.drive(Kind::Write, op, || {
            let inner = self.inner.clone();
            Box::pin(async move { inner.write_zeroes(offset, len, may_unmap).await })
        })
        .await?
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        // A hole map is a read: a write still landing could allocate the range.
        let op = Op { what: "allocation", offset, len, durable: false };
        self.drive(Kind::Read, op, || {
            let inner = self.inner.clone();
            Box::pin(async move { inner.allocation(offset, len).await })
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::fault::{FaultDevice, FaultOp};
    use crate::device::sim::mem::MemDevice;

    const SIZE: u64 = 1 << 20;

    fn policy() -> IoPolicy {
        IoPolicy {
            attempt_timeout: Duration::from_millis(20),
            read_retries: 2,
            retry_backoff: Duration::from_millis(5),
            deadline: Duration::from_millis(150),
        }
    }

    fn filled(len: usize, v: u8) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(len);
        b.fill(v);
        b
    }

    /// Fails the test instead of hanging it if something is never bounded.
    async fn bounded_test<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f).await.expect("the test hung: a wait is not bounded")
    }

    fn guarded(dev: FaultDevice<MemDevice>) -> Guarded<FaultDevice<MemDevice>> {
        Guarded::new(dev, policy(), Arc::new(BackingIoStats::default()), "test")
    }

    fn load(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_stalled_write_fails_at_the_deadline_stays_fenced_and_lands_before_the_next() {
        bounded_test(async {
            let dev = FaultDevice::new(MemDevice::new(SIZE), 1);
            let h = dev.handle();
            let g = guarded(dev.clone());
            h.hang(&[FaultOp::Write]);
            let (_, r) = g.write(4096, filled(8192, 0xa), false).await;
            let e = r.expect_err("a write the device never answers must fail");
            assert!(is_deadline_error(&e), "{e}");
            assert_eq!(load(&g.stats().deadline_errors), 1);
            assert!(load(&g.stats().timeouts) >= 1);
            assert!(g.in_outage());
            assert_eq!(h.held(), 1, "the given-up write is still pending at the device");

            // A second write to overlapping bytes waits behind the first and is never issued.
            let (_, r) = g.write(8192, filled(4096, 0xb), false).await;
            assert!(is_deadline_error(&r.unwrap_err()));
            assert_eq!(h.ops(FaultOp::Write), 1, "no write may be issued over one that may still land");
            // A read of those bytes waits for the given-up write too; a disjoint read does not.
            let (_, r) = g.read(0, AlignedBuf::zeroed(8192)).await;
            assert!(is_deadline_error(&r.unwrap_err()));
            let (b, r) = g.read(65536, AlignedBuf::zeroed(4096)).await;
            r.unwrap();
            assert!(b.iter().all(|&x| x == 0));
            // A disjoint write is issued (and hangs like the first).
            let (_, r) = g.write(65536, filled(4096, 0xc), false).await;
            assert!(r.is_err());
            assert_eq!(h.ops(FaultOp::Write), 2);

            // The device answers again: the given-up writes land, late, and the fence opens.
            h.resume();
            g.wait_answering(Duration::from_secs(10)).await;
            assert!(!g.in_outage());
            assert_eq!(load(&g.stats().stalled_ops), 0);
            let (b, r) = g.read(4096, AlignedBuf::zeroed(8192)).await;
            r.unwrap();
            assert!(b.iter().all(|&x| x == 0xa), "the late write landed");
            let (_, r) = g.write(8192, filled(4096, 0xd), false).await;
            r.unwrap();
            let img = dev.inner().contents();
            assert!(img[4096..8192].iter().all(|&x| x == 0xa));
            assert!(img[8192..12288].iter().all(|&x| x == 0xd), "the acknowledged write is last");
            assert!(img[65536..69632].iter().all(|&x| x == 0xc));
        })
        .await;
    }

    /// A zero-copy source is a read like any other: while a write whose caller gave up may still
    /// land on the range, it is not offered (the read path waits for the write instead), so two
    /// reads after the failed write never tell different stories.
    #[tokio::test]
    async fn no_zero_copy_source_over_a_write_that_may_still_land() {
        bounded_test(async {
            let dev = FaultDevice::new(MemDevice::new(SIZE), 7);
            let h = dev.handle();
            let g = guarded(dev.clone());
            assert!(g.zero_copy_source(8192, 4096).is_some(), "MemDevice offers its bytes");
            h.hang(&[FaultOp::Write]);
            let (_, r) = g.write(8192, filled(4096, 0xe), false).await;
            assert!(is_deadline_error(&r.unwrap_err()));
            assert!(g.zero_copy_source(8192, 4096).is_none(), "offered bytes a late write may still replace");
            assert!(g.zero_copy_source(10240, 100).is_none());
            assert!(g.zero_copy_source(65536, 4096).is_some(), "a disjoint range is still offered");
            h.resume();
            g.wait_answering(Duration::from_secs(10)).await;
            let slice = g.zero_copy_source(8192, 4096).expect("offered again once the write landed");
            let mut got = vec![0u8; 4096];
            let file = std::fs::File::from(slice.file.fd().try_clone_to_owned().unwrap());
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, 8192).unwrap();
            assert!(got.iter().all(|&b| b == 0xe), "the landed write");
        })
        .await;
    }

    /// A flush (or FUA write) the device fails loses durability for good; another flush beside
    /// it cannot overlap it (so it cannot report success for what the failed one lost), and
    /// concurrent flush calls share one device flush.
    #[tokio::test]
    async fn a_failed_flush_is_recorded_and_flushes_never_overlap() {
        bounded_test(async {
            let dev = FaultDevice::new(MemDevice::new(SIZE), 8);
            let h = dev.handle();
            let g = Arc::new(guarded(dev.clone()));
            assert!(!g.durability().is_lost());
            h.set_latency(Duration::from_millis(5), Duration::from_millis(6));
            let flushes: Vec<_> = (0..8)
                .map(|_| {
                    let g = g.clone();
                    tokio::spawn(async move { g.flush().await })
                })
                .collect();
            for f in flushes {
                f.await.unwrap().unwrap();
            }
            assert!(h.ops(FaultOp::Flush) <= 3, "8 concurrent flushes took {} device flushes", h.ops(FaultOp::Flush));
            h.set_latency(Duration::ZERO, Duration::ZERO);
            g.write(0, filled(4096, 1), false).await.1.unwrap();
            h.set_error_ppm(FaultOp::Flush, 1_000_000);
            assert!(g.flush().await.is_err());
            h.heal();
            let loss = g.durability().loss().expect("the failed flush is remembered");
            assert!(loss.cause.contains("flush"), "{loss:?}");
            assert!(g.durability().check().is_err());
            // The device flushes fine again (errseq reports once); the loss stays until cleared.
            g.flush().await.unwrap();
            assert!(g.durability().is_lost());
            // A FUA write the device fails loses durability as well.
            g.durability().clear();
            h.set_error_ppm(FaultOp::Write, 1_000_000);
            assert!(g.write(0, filled(4096, 2), true).await.1.is_err());
            h.heal();
            assert!(g.durability().is_lost(), "a failed FUA write");
            assert_eq!(g.durability().failures(), 2);
        })
        .await;
    }

    /// A device whose first read never answers; later ones do.
    struct FirstReadHangs {
        inner: MemDevice,
        reads: AtomicU64,
    }

    impl BlockDevice for FirstReadHangs {
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
        fn logical_block_bytes(&self) -> u32 {
            1
        }
        fn fast_zero(&self) -> bool {
            true
        }
        async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
            if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
            self.inner.read(offset, buf).await
        }
        async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
            self.inner.write(offset, buf, fua).await
        }
        async fn flush(&self) -> io::Result<()> {
            self.inner.flush().await
        }
        async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
            self.inner.write_zeroes(offset, len, may_unmap).await
        }
        async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
            self.inner.allocation(offset, len).await
        }
    }

    #[tokio::test]
    async fn a_stalled_read_is_reissued_and_the_second_answer_serves() {
        bounded_test(async {
            let dev = FirstReadHangs { inner: MemDevice::new(SIZE), reads: AtomicU64::new(0) };
            dev.inner.write(0, filled(4096, 7), false).await.1.unwrap();
            let g = Guarded::new(dev, policy(), Arc::new(BackingIoStats::default()), "test");
            let (b, r) = g.read(0, AlignedBuf::zeroed(4096)).await;
            r.unwrap();
            assert!(b.iter().all(|&x| x == 7));
            assert_eq!(load(&g.stats().retries), 1);
            assert_eq!(load(&g.stats().timeouts), 1);
            assert_eq!(load(&g.stats().deadline_errors), 0);
            assert!(g.in_outage(), "the first read is still unanswered");
        })
        .await;
    }

    #[tokio::test]
    async fn a_failing_read_is_retried_and_then_reports_the_device_error() {
        bounded_test(async {
            let dev = FaultDevice::new(MemDevice::new(SIZE), 2);
            let h = dev.handle();
            let g = guarded(dev);
            h.set_error_ppm(FaultOp::Read, 1_000_000);
            let (_, r) = g.read(0, AlignedBuf::zeroed(512)).await;
            let e = r.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "the device's own error, not a deadline: {e}");
            assert_eq!(h.ops(FaultOp::Read), 3, "one attempt and two retries");
            assert_eq!(load(&g.stats().retries), 2);
            // Writes are not retried: the error is the client's to see.
            h.set_error_ppm(FaultOp::Write, 1_000_000);
            assert!(g.write(0, filled(512, 1), false).await.1.is_err());
            assert_eq!(h.ops(FaultOp::Write), 1);
        })
        .await;
    }

    #[tokio::test]
    async fn a_flush_past_its_deadline_fails_and_is_not_reissued() {
        bounded_test(async {
            let dev = FaultDevice::new(MemDevice::new(SIZE), 3);
            let h = dev.handle();
            let g = guarded(dev);
            h.hang(&[FaultOp::Flush]);
            assert!(is_deadline_error(&g.flush().await.unwrap_err()));
            assert_eq!(h.ops(FaultOp::Flush), 1);
            h.resume();
            g.wait_answering(Duration::from_secs(10)).await;
            g.flush().await.unwrap();
            assert_eq!(h.ops(FaultOp::Flush), 2);
        })
        .await;
    }

    #[tokio::test]
    async fn past_the_stall_cap_requests_wait_instead_of_issuing() {
        bounded_test(async {
            let dev = FaultDevice::new(MemDevice::new(SIZE), 4);
            let h = dev.handle();
            let g = Arc::new(guarded(dev));
            h.hang(&[FaultOp::Write]);
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..MAX_STALLED_OPS {
                let g = g.clone();
                tasks.spawn(async move { g.write(i * 4096, filled(4096, 1), false).await.1 });
            }
            while let Some(r) = tasks.join_next().await {
                assert!(r.unwrap().is_err());
            }
            assert_eq!(load(&g.stats().stalled_ops), MAX_STALLED_OPS);
            let (_, r) = g.write(MAX_STALLED_OPS * 4096, filled(4096, 1), false).await;
            assert!(is_deadline_error(&r.unwrap_err()));
            assert_eq!(h.ops(FaultOp::Write), MAX_STALLED_OPS, "nothing more was issued");
            h.resume();
            g.wait_answering(Duration::from_secs(10)).await;
            g.write(0, filled(4096, 2), false).await.1.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn a_cancelled_operation_is_a_stall_only_once_it_passes_the_attempt_timeout() {
        bounded_test(async {
            let dev = FaultDevice::new(MemDevice::new(SIZE), 6);
            let h = dev.handle();
            let mut p = policy();
            // Long enough that a loaded machine cannot pass it between the drop and the check.
            p.attempt_timeout = Duration::from_secs(1);
            p.deadline = Duration::from_secs(10);
            let g = Guarded::new(dev, p, Arc::new(BackingIoStats::default()), "test");
            let outages = |g: &Guarded<_>| load(&g.stats().outages);

            // A read its caller drops while the device works on it (a hedged read that lost):
            // the device answers soon after, and there was no outage.
            h.hang(&[FaultOp::Read]);
            let cancelled = tokio::time::timeout(Duration::from_millis(5), g.read(0, AlignedBuf::zeroed(4096))).await;
            assert!(cancelled.is_err(), "the read must still be pending when dropped");
            assert!(!g.in_outage(), "a dropped operation is not a stall");
            assert_eq!(h.held(), 1);
            h.resume();
            while h.held() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(1100)).await;
            assert_eq!((outages(&g), load(&g.stats().timeouts), load(&g.stats().stalled_ops)), (0, 0, 0));

            // Dropped on a device that then stays silent: a stall from its attempt timeout on,
            // counted once, and over when the device answers.
            h.hang(&[FaultOp::Read]);
            let cancelled = tokio::time::timeout(Duration::from_millis(5), g.read(0, AlignedBuf::zeroed(4096))).await;
            assert!(cancelled.is_err());
            while !g.in_outage() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!((outages(&g), load(&g.stats().timeouts), load(&g.stats().stalled_ops)), (1, 1, 1));
            h.resume();
            g.wait_answering(Duration::from_secs(10)).await;
            assert!(!g.in_outage());
            assert_eq!(load(&g.stats().stalled_ops), 0);
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_deadline_bounds_every_wait_inside_it() {
        bounded_test(async {
            let d = Instant::now() + Duration::from_millis(30);
            let r = with_deadline(d, bounded(std::future::pending::<()>())).await;
            assert!(is_deadline_error(&r.unwrap_err()));
            // An inner scope cannot extend an outer one.
            let inner =
                with_deadline(d, with_deadline(d + Duration::from_secs(60), async { current_deadline() })).await;
            assert_eq!(inner, Some(d));
            assert_eq!(current_deadline(), None);
            assert!(bounded(async { 1 }).await.is_ok());
            // A device operation inside a scope ends by the scope's deadline, not its own.
            let dev = FaultDevice::new(MemDevice::new(SIZE), 5);
            dev.handle().hang(&[FaultOp::Read]);
            let mut p = policy();
            p.deadline = Duration::from_secs(3600);
            p.attempt_timeout = Duration::from_secs(3600);
            let g = Guarded::new(dev.clone(), p, Arc::new(BackingIoStats::default()), "test");
            let d = Instant::now() + Duration::from_millis(30);
            let (_, r) = with_deadline(d, g.read(0, AlignedBuf::zeroed(512))).await;
            assert!(is_deadline_error(&r.unwrap_err()));
            // Given up on long before its attempt timeout, it still counts against the stall cap.
            assert!(g.in_outage(), "an operation the deadline gave up on is stalled");
            dev.handle().resume();
            g.wait_answering(Duration::from_secs(10)).await;
            assert!(!g.in_outage());
        })
        .await;
    }
}

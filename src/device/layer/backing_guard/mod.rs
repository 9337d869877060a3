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

mod attempt;
mod deadline;
mod durability;
mod shared;
#[cfg(test)]
mod tests;

pub use deadline::{bounded, current_deadline, is_deadline_error, with_deadline};
pub use durability::{Durability, DurabilityLoss};

use crate::device::RangeLocks;
use crate::device::{AlignedBuf, BlockDevice, Extent};
use attempt::{Attempt, Driver, Holds};
use deadline::within;
use shared::{transient, Health, Op, Shared};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::task::Poll;
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

    /// Operations the device has not answered although their callers gave up or they stalled:
    /// each may still reach the device, so no other process may write there meanwhile.
    pub fn ops_in_doubt(&self) -> u64 {
        self.shared.stalled() + self.shared.abandoned_count.load(std::sync::atomic::Ordering::SeqCst) as u64
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
        let max_attempts = if kind == Kind::Read { sh.policy.read_retries.saturating_add(1) } else { 1 };
        let mut holds = Holds { fence: None, gate: None };
        let mut first: Option<Attempt<T>> = None;
        let mut last_failure: Option<T> = None;
        // Fast path, for a device that answers: nothing to wait for before issuing, and an answer
        // on the first poll. No clock read, no timer, no allocation but the operation's box.
        if sh.stalled() < MAX_STALLED_OPS && self.try_enter(kind, op, &mut holds) {
            let mut a = Attempt::new(sh, start(), op, holds.take());
            match std::future::poll_fn(|cx| Poll::Ready(a.poll_done(cx))).await {
                Poll::Ready(out) => match out.error() {
                    Some(e) if kind == Kind::Read && max_attempts > 1 && transient(e) => last_failure = Some(out),
                    _ => return Ok(out),
                },
                Poll::Pending => first = Some(a),
            }
        }
        let issued_fast = first.is_some() || last_failure.is_some();
        let mut d = Driver::new(sh, kind, op, max_attempts, first, last_failure, issued_fast);
        if !issued_fast {
            // The slow way in: wait (within the deadline) for what kept the fast path from issuing.
            self.enter(kind, op, d.deadline, &mut holds).await?;
        }
        loop {
            let now = Instant::now();
            if now >= d.deadline {
                return d.give_up();
            }
            let blocked = d.issue_if_due(now, &mut start, &mut holds);
            if d.attempts.is_empty() && !blocked && (d.issue_at.is_none() || d.issued >= d.max_attempts) {
                return Ok(d.last_failure.expect("an attempt ended"));
            }
            match d.wait(now, blocked).await {
                Some((i, out)) => {
                    if let Some(answer) = d.answered(i, out) {
                        return Ok(answer);
                    }
                }
                None => d.timer_fired(Instant::now()),
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
    fn open_files(&self, out: &mut Vec<crate::device::OpenFile>) {
        self.inner.open_files(out)
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

    /// Flushes one at a time (see `Shared::gate`); calls that arrive while one is issued share
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

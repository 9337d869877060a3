//! What every operation of one guarded device shares: its policy and counters, the write fence,
//! the writes given up on and not yet landed, the outage state, and the sync gate.

use super::deadline::deadline_error;
use super::{BackingIoStats, IoPolicy, Kind};
use crate::device::RangeLocks;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Errors worth a second read: a path or a server that may come back. Not: bad arguments, a
/// device that is gone, reads past the end.
pub(super) fn transient(e: &io::Error) -> bool {
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

pub(super) struct Outage {
    pub(super) since: Instant,
    pub(super) timeouts_at_start: u64,
    pub(super) deadline_errors_at_start: u64,
}

pub(super) struct Health {
    pub(super) stalled: u64,
    pub(super) outage: Option<Outage>,
}

pub(super) struct Shared {
    pub(super) name: &'static str,
    pub(super) policy: IoPolicy,
    pub(super) stats: Arc<BackingIoStats>,
    /// Every write (and write_zeroes) holds its range here from issue until the device answers.
    pub(super) fence: Arc<RangeLocks>,
    /// Ranges of writes whose caller gave up and that the device has not answered: (id, start, end).
    pub(super) abandoned: Mutex<Vec<(u64, u64, u64)>>,
    pub(super) abandoned_count: AtomicUsize,
    pub(super) next_id: AtomicU64,
    pub(super) health: Mutex<Health>,
    /// Wakes readers waiting for an abandoned write, and [`Guarded::wait_answering`].
    pub(super) changed: tokio::sync::Notify,
    /// Flushes hold it exclusively and FUA writes shared, from issue until the device answers:
    /// with errseq only one of two overlapping syncs sees a write-back error, so a flush that
    /// overlapped the failing one could report success for data that is gone. In turn, the
    /// failure is recorded before the next sync can start.
    pub(super) gate: Arc<tokio::sync::RwLock<()>>,
    /// One flush at a time comes through here; flush calls that arrived while one was issued
    /// are all covered by the next one (group commit).
    pub(super) flush_turn: tokio::sync::Mutex<()>,
    /// Flush calls so far, and how many of them a successful flush has covered.
    pub(super) flush_calls: AtomicU64,
    pub(super) flush_covered: AtomicU64,
}

/// A sync's hold on [`Shared::gate`] (held only to be dropped).
#[allow(dead_code)]
pub(super) enum GateGuard {
    Shared(tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(tokio::sync::OwnedRwLockWriteGuard<()>),
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One operation for the log: what, where.
#[derive(Clone, Copy)]
pub(super) struct Op {
    pub(super) what: &'static str,
    pub(super) offset: u64,
    pub(super) len: u64,
    /// A flush or a FUA write: its failure means durability is lost ([`Durability`]).
    pub(super) durable: bool,
}

impl Shared {
    pub(super) fn stall(&self, op: Op, timed_out: bool) {
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

    pub(super) fn unstall(&self) {
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
    pub(super) fn stalled(&self) -> u64 {
        self.stats.stalled_ops.load(Ordering::Relaxed)
    }

    pub(super) fn abandon(&self, start: u64, end: u64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.abandoned).push((id, start, end));
        self.abandoned_count.fetch_add(1, Ordering::SeqCst);
        id
    }

    pub(super) fn landed(&self, id: u64) {
        let mut a = lock(&self.abandoned);
        if let Some(i) = a.iter().position(|e| e.0 == id) {
            a.swap_remove(i);
            self.abandoned_count.fetch_sub(1, Ordering::SeqCst);
        }
        drop(a);
        self.changed.notify_waiters();
    }

    pub(super) fn overlaps_abandoned(&self, start: u64, end: u64) -> bool {
        self.abandoned_count.load(Ordering::SeqCst) > 0
            && lock(&self.abandoned).iter().any(|&(_, s, e)| s < end && start < e)
    }

    /// Waits until no write that overlaps `[start, end)` is outstanding without its caller.
    pub(super) async fn wait_abandoned(&self, start: u64, end: u64, deadline: Instant) -> Result<(), ()> {
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
    pub(super) fn try_gate(&self, kind: Kind) -> Option<GateGuard> {
        if kind == Kind::Flush {
            self.gate.clone().try_write_owned().ok().map(GateGuard::Exclusive)
        } else {
            self.gate.clone().try_read_owned().ok().map(GateGuard::Shared)
        }
    }

    pub(super) async fn lock_gate(&self, kind: Kind) -> GateGuard {
        if kind == Kind::Flush {
            GateGuard::Exclusive(self.gate.clone().write_owned().await)
        } else {
            GateGuard::Shared(self.gate.clone().read_owned().await)
        }
    }

    /// A flush or FUA write the device failed (possibly long after its caller gave up).
    pub(super) fn durability_failed(&self, op: Op, e: &io::Error) {
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

    pub(super) fn deadline_failed(&self, op: Op) -> io::Error {
        self.stats.deadline_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(device = self.name, op = op.what, offset = op.offset, len = op.len, "deadline passed");
        deadline_error(Some(op.what))
    }
}

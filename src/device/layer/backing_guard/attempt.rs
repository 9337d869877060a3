//! One issued operation ([`Attempt`]), which outlives a caller that gives up on it, and one
//! request's attempts in flight ([`Driver`]): issue, re-issue reads, time out, give up.

use super::deadline::current_deadline;
use super::shared::{transient, GateGuard, Op, Shared};
use super::{Kind, OpFuture, Outcome, CAPACITY_POLL, MAX_STALLED_OPS};
use crate::device::rangelock::OwnedRangeGuard;
use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// One issued operation. Dropped before the device answered, it moves to a background task that
/// drives it to the end, keeping its write fence (and registering its range as abandoned, so reads
/// wait for it) until then.
pub(super) struct Attempt<T: Outcome> {
    pub(super) fut: Option<OpFuture<T>>,
    pub(super) shared: Arc<Shared>,
    pub(super) op: Op,
    /// Set once the attempt has to be waited for (the fast path reads no clock).
    pub(super) started: Option<Instant>,
    pub(super) stalled: bool,
    pub(super) fence: Option<OwnedRangeGuard>,
    pub(super) gate: Option<GateGuard>,
    pub(super) abandoned: Option<u64>,
    /// Already the background remainder: dropping it again (runtime shutdown) must not respawn.
    pub(super) detached: bool,
}

/// What an attempt holds while it is in flight: its write fence and its hold on the sync gate.
pub(super) struct Holds {
    pub(super) fence: Option<OwnedRangeGuard>,
    pub(super) gate: Option<GateGuard>,
}

impl Holds {
    pub(super) fn take(&mut self) -> Holds {
        Holds { fence: self.fence.take(), gate: self.gate.take() }
    }
}

impl<T: Outcome> Attempt<T> {
    pub(super) fn new(shared: &Arc<Shared>, fut: OpFuture<T>, op: Op, holds: Holds) -> Self {
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

    pub(super) fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<T> {
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
    pub(super) fn settle(&mut self) {
        drop(self.gate.take());
        drop(self.fence.take());
        if let Some(id) = self.abandoned.take() {
            self.shared.landed(id);
        }
        if std::mem::take(&mut self.stalled) {
            self.shared.unstall();
        }
    }

    pub(super) fn mark_stalled(&mut self, timed_out: bool) {
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

pub(super) fn poll_any<T: Outcome>(attempts: &mut [Attempt<T>], cx: &mut Context<'_>) -> Poll<(usize, T)> {
    for (i, a) in attempts.iter_mut().enumerate() {
        if let Poll::Ready(v) = a.poll_done(cx) {
            return Poll::Ready((i, v));
        }
    }
    Poll::Pending
}

/// One request's attempts in flight, once it could not be answered on the fast path.
pub(super) struct Driver<'a, T: Outcome> {
    pub(super) sh: &'a Arc<Shared>,
    pub(super) kind: Kind,
    pub(super) op: Op,
    pub(super) max_attempts: u32,
    pub(super) attempts: Vec<Attempt<T>>,
    pub(super) issued: u32,
    pub(super) last_failure: Option<T>,
    /// When the next attempt may be issued (a retry after a failure, a hedge after a stall).
    pub(super) issue_at: Option<Instant>,
    pub(super) begun: Instant,
    pub(super) deadline: Instant,
}

impl<'a, T: Outcome> Driver<'a, T> {
    pub(super) fn new(
        sh: &'a Arc<Shared>,
        kind: Kind,
        op: Op,
        max_attempts: u32,
        first: Option<Attempt<T>>,
        last_failure: Option<T>,
        issued_fast: bool,
    ) -> Self {
        let pol = &sh.policy;
        let begun = Instant::now();
        let deadline = current_deadline().map_or(begun + pol.deadline, |d| d.min(begun + pol.deadline));
        let mut attempts: Vec<Attempt<T>> = first.into_iter().collect();
        for a in &mut attempts {
            a.started.get_or_insert(begun);
        }
        let issue_at = match (issued_fast, &last_failure) {
            (false, _) => Some(begun),
            (true, Some(_)) => Some(begun + pol.retry_backoff.min(pol.attempt_timeout)),
            _ => None,
        };
        Driver {
            sh,
            kind,
            op,
            max_attempts,
            attempts,
            issued: u32::from(issued_fast),
            last_failure,
            issue_at,
            begun,
            deadline,
        }
    }

    /// The deadline passed: the last failure if nothing is in flight, else EIO. What is in flight
    /// is detached (fenced, registered as abandoned) before the error can reach anyone, and counts
    /// as stalled from now, so that the stall cap holds back more requests to a silent device.
    pub(super) fn give_up(mut self) -> io::Result<T> {
        if self.attempts.is_empty() {
            if let Some(out) = self.last_failure.take() {
                return Ok(out);
            }
        }
        for a in self.attempts.iter_mut() {
            a.mark_stalled(false);
        }
        drop(std::mem::take(&mut self.attempts));
        Err(self.sh.deadline_failed(self.op))
    }

    /// Issues the next attempt if one is due; true if the stall cap holds it back.
    pub(super) fn issue_if_due(
        &mut self,
        now: Instant,
        start: &mut impl FnMut() -> OpFuture<T>,
        holds: &mut Holds,
    ) -> bool {
        let due = self.issue_at.is_some_and(|t| t <= now) && self.issued < self.max_attempts;
        if !due {
            return false;
        }
        if self.sh.stalled() >= MAX_STALLED_OPS {
            return true;
        }
        if self.issued > 0 {
            self.sh.stats.retries.fetch_add(1, Ordering::Relaxed);
        }
        self.issued += 1;
        self.issue_at = None;
        let mut a = Attempt::new(self.sh, start(), self.op, holds.take());
        a.started = Some(now);
        self.attempts.push(a);
        false
    }

    /// The first attempt to answer, or None when a timer (attempt timeout, retry, deadline) is due.
    pub(super) async fn wait(&mut self, now: Instant, blocked: bool) -> Option<(usize, T)> {
        // Most operations answer on their first poll: look before arming any timer.
        if let Poll::Ready(d) = std::future::poll_fn(|cx| Poll::Ready(poll_any(&mut self.attempts, cx))).await {
            return Some(d);
        }
        let pol = &self.sh.policy;
        let mut wake = self.deadline;
        for a in self.attempts.iter().filter(|a| !a.stalled) {
            wake = wake.min(a.started.unwrap_or(self.begun) + pol.attempt_timeout);
        }
        if let Some(t) = self.issue_at.filter(|_| self.issued < self.max_attempts) {
            wake = wake.min(t);
        }
        if blocked {
            wake = wake.min(now + CAPACITY_POLL);
        }
        tokio::select! {
            biased;
            d = std::future::poll_fn(|cx| poll_any(&mut self.attempts, cx)) => Some(d),
            _ = tokio::time::sleep_until(wake.into()) => None,
        }
    }

    /// Attempt `i` answered: the answer to return, or None to keep going (a read retried after a
    /// transient error, or its other attempts still racing).
    pub(super) fn answered(&mut self, i: usize, out: T) -> Option<T> {
        drop(self.attempts.swap_remove(i));
        let Some(e) = out.error() else {
            // The others (hedged reads) finish in the background.
            return Some(out);
        };
        if self.kind == Kind::Read && self.issued < self.max_attempts && transient(e) {
            let pol = &self.sh.policy;
            let shift = self.issued.saturating_sub(1).min(16);
            let backoff = pol.retry_backoff.saturating_mul(1 << shift).min(pol.attempt_timeout);
            let at = Instant::now() + backoff;
            self.issue_at = Some(self.issue_at.map_or(at, |t| t.min(at)));
        }
        self.last_failure = Some(out);
        None
    }

    /// Attempts past their timeout count as stalled; a stalled read is hedged with a fresh one,
    /// which may take another path, or find the device back.
    pub(super) fn timer_fired(&mut self, now: Instant) {
        let timeout = self.sh.policy.attempt_timeout;
        for a in self.attempts.iter_mut() {
            if !a.stalled && now >= a.started.unwrap_or(self.begun) + timeout {
                a.mark_stalled(true);
                if self.kind == Kind::Read && self.issued < self.max_attempts {
                    self.issue_at = Some(now);
                }
            }
        }
    }
}

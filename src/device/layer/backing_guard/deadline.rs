//! Request deadlines: one instant for everything a client request does (its device operations and
//! its waits for locks), carried in a task-local scope.

use std::future::Future;
use std::io;
use std::task::Poll;
use std::time::Instant;

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
pub(super) struct DeadlineExceeded {
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

pub(super) fn deadline_error(op: Option<&'static str>) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, DeadlineExceeded { op })
}

/// Whether `e` is a request failing at its deadline (rather than an error the device returned).
pub fn is_deadline_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<DeadlineExceeded>())
}

/// Polls `f` once, and only if it is not ready arms a timer: the common case (done at once) costs
/// no timer, and runtimes without a time driver work as long as nothing has to wait.
pub(super) async fn within<F: Future>(deadline: Instant, f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let first = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(v) => Some(v),
        Poll::Pending => tokio::time::timeout_at(deadline.into(), f).await.ok(),
    }
}

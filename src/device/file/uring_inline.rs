//! io_uring rings owned by the runtime's worker threads: an operation is submitted on the thread
//! that decoded its request, and its completion is reaped on the thread the reactor wakes for the
//! ring's eventfd, which is the thread that polls the reactor: no hand-off to a ring thread and
//! back.
//!
//! ```text
//!   ring thread (uring-thread):  worker ─chan+eventfd─► ring thread ─SQE─► device
//!                                worker ◄─oneshot+wake── ring thread ◄─CQE─┘        3 thread wake-ups
//!   inline (uring, the default): worker ─SQE (io_uring_enter)─► device
//!                                worker ◄─eventfd via the reactor─ CQE              1 wake-up, the reactor's
//! ```
//!
//! Why: on the O_DIRECT path (NVMe at ~20 µs) every wake-up of a halted vCPU costs about as much
//! as the device. An operation that completes during submission (tmpfs, a page-cache hit under
//! O_DIRECT fallback) completes before its future is first polled and costs no wake-up at all.
//!
//! A future can move between workers (work stealing), so an operation's state is shared: whoever
//! reaps its ring's completion queue (the submitting thread right after `io_uring_enter`, or the
//! ring's reaper task when the eventfd fires) stores the result and wakes the future. A future
//! dropped before its completion leaves the buffer with the operation until the kernel is done.

use super::uring::{buf_of, sqe_for, Registered, UringOp};
use crate::device::buf::{AlignedBuf, Arena};
use io_uring::IoUring;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::unix::AsyncFd;

const RING_ENTRIES: u32 = 256;

type Outcome = (Option<AlignedBuf>, io::Result<()>);

/// One operation: what the kernel works on, and how it ended.
struct Op {
    state: Mutex<OpState>,
}

struct OpState {
    /// Present while the kernel may still use it (in flight or queued for SQ space).
    op: Option<UringOp>,
    done_bytes: usize,
    outcome: Option<Outcome>,
    waker: Option<Waker>,
    /// The device's counter of registered-buffer submissions.
    fixed_ops: Arc<AtomicU64>,
}

impl Op {
    fn complete(&self, outcome: Outcome) {
        let waker = {
            let mut s = lock(&self.state);
            s.outcome = Some(outcome);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A worker thread's ring.
struct LocalRing {
    state: Mutex<RingState>,
    reg: Registered,
    efd: AsyncFd<OwnedFd>,
    /// Cleared when the reaper task is dropped (its runtime shut down): a thread that later runs
    /// another runtime makes a new ring rather than submit to one nobody reaps.
    reaped: std::sync::atomic::AtomicBool,
}

struct RingState {
    ring: IoUring,
    /// Operations in flight, by `user_data`.
    slab: Vec<Option<Arc<Op>>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Waiting for room in the submission queue.
    queued: VecDeque<Arc<Op>>,
}

impl Drop for RingState {
    fn drop(&mut self) {
        // The kernel may still write into buffers of operations in flight until the ring is torn
        // down, which happens after this returns: leak them rather than free memory it may use.
        if self.in_flight > 0 {
            for op in self.slab.drain(..).flatten() {
                std::mem::forget(op);
            }
        }
    }
}

thread_local! {
    static RING: RefCell<Option<Arc<LocalRing>>> = const { RefCell::new(None) };
}

/// Submits `op` on this thread's ring; None when this thread has no ring and cannot make one
/// (not a runtime thread, or io_uring refused), and then the caller uses its ring thread.
pub(super) fn submit(op: UringOp, fixed_ops: &Arc<AtomicU64>) -> Result<Submitted, UringOp> {
    let Some(ring) = current_ring() else { return Err(op) };
    let op = Arc::new(Op {
        state: Mutex::new(OpState {
            op: Some(op),
            done_bytes: 0,
            outcome: None,
            waker: None,
            fixed_ops: fixed_ops.clone(),
        }),
    });
    let mut st = lock(&ring.state);
    st.queued.push_back(op.clone());
    st.push_queued(ring.reg);
    let r = st.ring.submit();
    // Whatever completed during the submission (tmpfs, a cached read) is finished here, before
    // the future is first polled.
    st.reap(ring.reg);
    drop(st);
    if let Err(e) = r {
        if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
            tracing::error!(error = %e, "io_uring_enter failed");
        }
    }
    Ok(Submitted { op })
}

fn current_ring() -> Option<Arc<LocalRing>> {
    RING.with(|r| {
        let mut r = r.borrow_mut();
        if !r.as_ref().is_some_and(|ring| ring.reaped.load(Ordering::Acquire)) {
            *r = LocalRing::new().map(Arc::new);
            if let Some(ring) = r.as_ref() {
                spawn_reaper(ring.clone());
            }
        }
        r.clone()
    })
}

impl LocalRing {
    fn new() -> Option<LocalRing> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let ring = IoUring::builder().build(RING_ENTRIES).ok()?;
        let arena = Arena::get_or_create().filter(|a| {
            // SAFETY: the arena is never unmapped, so the memory outlives the ring.
            unsafe { ring.submitter().register_buffers(&[a.iovec()]) }.is_ok()
        });
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return None;
        }
        // SAFETY: raw is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(efd.as_raw_fd()).ok()?;
        let _guard = handle.enter();
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open for as long as it is
        // registered with the reactor, and nothing else closes it.
        let efd = unsafe { AsyncFd::register(efd) }.ok()?;
        let state = RingState { ring, slab: Vec::new(), free: Vec::new(), in_flight: 0, queued: VecDeque::new() };
        let ring = LocalRing {
            state: Mutex::new(state),
            reg: Registered { fixed: None, arena },
            efd,
            reaped: std::sync::atomic::AtomicBool::new(true),
        };
        Some(ring).inspect(|_| tracing::debug!("io_uring ring for this worker thread"))
    }
}

impl RingState {
    /// Moves queued operations into the submission queue while it has room.
    fn push_queued(&mut self, reg: Registered) {
        while let Some(op) = self.queued.pop_front() {
            let key = self.free.pop().unwrap_or_else(|| {
                self.slab.push(None);
                self.slab.len() - 1
            });
            let sqe = {
                let mut s = lock(&op.state);
                let done = s.done_bytes;
                let Some(o) = s.op.as_mut() else { continue };
                let sqe = sqe_for(o, done, key as u64, reg);
                if matches!(
                    sqe.get_opcode() as u8,
                    io_uring::opcode::ReadFixed::CODE | io_uring::opcode::WriteFixed::CODE
                ) {
                    s.fixed_ops.fetch_add(1, Ordering::Relaxed);
                }
                sqe
            };
            // SAFETY: the SQE points into the operation's buffer, which stays in `op.state` (held
            // by the slab below) until its completion is reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                self.free.push(key);
                self.queued.push_front(op);
                break;
            }
            self.slab[key] = Some(op);
            self.in_flight += 1;
        }
    }

    /// Completes what the completion queue holds; short transfers go back in the queue.
    fn reap(&mut self, reg: Registered) {
        let done: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        if done.is_empty() {
            return;
        }
        for (key, res) in done {
            let Some(op) = self.slab.get_mut(key as usize).and_then(Option::take) else { continue };
            self.free.push(key as usize);
            self.in_flight -= 1;
            if let Some(outcome) = finish(&op, res) {
                op.complete(outcome);
            } else {
                self.queued.push_back(op);
            }
        }
        self.push_queued(reg);
        if !self.ring.submission().is_empty() {
            let _ = self.ring.submit();
        }
    }
}

/// The outcome of a completion with result `res`, or None when a short transfer must go on.
fn finish(op: &Op, res: i32) -> Option<Outcome> {
    let mut s = lock(&op.state);
    if res < 0 {
        return Some((s.op.take().and_then(buf_of), Err(io::Error::from_raw_os_error(-res))));
    }
    let total = s.op.as_ref().map_or(0, UringOp::transfer_bytes);
    s.done_bytes += res as usize;
    if s.done_bytes < total {
        if res == 0 {
            return Some((s.op.take().and_then(buf_of), Err(io::ErrorKind::UnexpectedEof.into())));
        }
        return None;
    }
    Some((s.op.take().and_then(buf_of), Ok(())))
}

/// Marks its ring unreaped when the reaper task goes (with its runtime).
struct Reaper(Arc<LocalRing>);

impl Drop for Reaper {
    fn drop(&mut self) {
        self.0.reaped.store(false, Ordering::Release);
    }
}

/// Reaps `ring` whenever its eventfd fires; one per ring, for the life of the runtime.
fn spawn_reaper(ring: Arc<LocalRing>) {
    let reaper = Reaper(ring);
    tokio::spawn(async move {
        let ring = &reaper.0;
        loop {
            let Ok(mut ready) = ring.efd.readable().await else { return };
            let mut counter = [0u8; 8];
            // SAFETY: reading 8 bytes from the nonblocking eventfd into a local buffer.
            let n = unsafe { libc::read(ring.efd.get_ref().as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
            if n < 0 {
                ready.clear_ready();
            }
            lock(&ring.state).reap(ring.reg);
        }
    });
}

/// An operation in flight on a worker's ring.
pub(super) struct Submitted {
    op: Arc<Op>,
}

impl Future for Submitted {
    type Output = Outcome;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut s = lock(&self.op.state);
        if let Some(outcome) = s.outcome.take() {
            return Poll::Ready(outcome);
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

//! The io_uring engine: one thread owns a ring and turns queued operations into SQEs; completions
//! go back to the async callers through oneshot channels. Callers never block; the ring thread
//! batches whatever arrived since its last wake-up into one `io_uring_enter`.
//!
//! Two costs per operation are avoided:
//! - the device's descriptor is registered with the ring (`IOSQE_FIXED_FILE`), so the kernel does
//!   not look it up and take a reference for every SQE;
//! - buffers from the registered arena (`Arena`) are registered with the ring once
//!   (`READ_FIXED`/`WRITE_FIXED`), so an O_DIRECT request does not pin and unpin its pages each
//!   time; buffers from elsewhere use plain `READ`/`WRITE`;
//! - a caller wakes the ring thread (an eventfd write, one syscall) only when that thread is
//!   parked in `io_uring_enter` with nothing queued: under load the thread is already awake,
//!   reaping completions, and finds the new operation on its next pass.

use crate::device::buf::{AlignedBuf, Arena};
use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
// Operations hold the descriptor by Arc: it stays open until the kernel is done with it, even if
// the caller's future was dropped.
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// Ring size: bounds the SQEs in one batch, not the operations in flight (those queue in the
/// channel and wait for a free slot).
const RING_ENTRIES: u32 = 256;
const EVENTFD_TAG: u64 = u64::MAX;

pub(crate) enum UringOp {
    Read {
        fd: Arc<OwnedFd>,
        buf: AlignedBuf,
        offset: u64,
    },
    Write {
        fd: Arc<OwnedFd>,
        buf: AlignedBuf,
        offset: u64,
        dsync: bool,
    },
    /// A write from a buffer other writes share (the mirror's two devices): the operation holds
    /// a reference, so the memory outlives the kernel's use of it even if the caller goes away.
    WriteShared {
        fd: Arc<OwnedFd>,
        buf: Arc<AlignedBuf>,
        offset: u64,
        dsync: bool,
    },
    Fsync {
        fd: Arc<OwnedFd>,
    },
    Fallocate {
        fd: Arc<OwnedFd>,
        mode: i32,
        offset: u64,
        len: u64,
    },
}

type Completion = oneshot::Sender<(Option<AlignedBuf>, io::Result<()>)>;

struct Pending {
    op: UringOp,
    /// Bytes already transferred: a short read or write is resubmitted for the rest.
    done_bytes: usize,
    reply: Completion,
}

pub struct UringEngine {
    /// Submit on the calling worker's own ring (`uring_inline`); the ring thread only serves
    /// callers outside a runtime.
    inline: bool,
    tx: mpsc::Sender<Pending>,
    wake: Arc<OwnedFd>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    stopping: AtomicBool,
    /// The ring thread is (about to be) blocked waiting: a new operation must wake it.
    parked: AtomicBool,
    /// Eventfd writes issued, for tests and profiles: far fewer than operations under load.
    pokes: AtomicU64,
    /// The descriptor registered with the ring as fixed file 0, if registration succeeded.
    fixed: Option<RawFd>,
    /// The arena registered with the ring as buffer 0, if registration succeeded.
    fixed_buffers: Option<&'static Arena>,
    /// Reads and writes submitted from a registered buffer (each resubmission counts), on the
    /// ring thread or a worker's ring.
    fixed_buffer_ops: Arc<AtomicU64>,
}

impl UringEngine {
    /// Fails when io_uring is not available (old kernel, seccomp); the caller falls back to psync.
    /// `fd` is the device's descriptor, registered with the ring (operations on any other
    /// descriptor still work, unregistered).
    pub fn new(name: &str, fd: RawFd, inline: bool) -> io::Result<Self> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        // Not fatal: a kernel or seccomp profile that refuses registration still runs the ring.
        let fixed = ring.submitter().register_files(&[fd]).ok().map(|()| fd);
        let fixed_buffers = Arena::get_or_create().filter(|arena| {
            // SAFETY: the arena is never unmapped, so the memory outlives the ring.
            match unsafe { ring.submitter().register_buffers(&[arena.iovec()]) } {
                Ok(()) => {
                    arena.mark_registered();
                    true
                }
                Err(e) => {
                    // Pinning is charged to RLIMIT_MEMLOCK without CAP_IPC_LOCK; the unit sets it.
                    tracing::info!(error = %e, device = name, "cannot register I/O buffers with io_uring (RLIMIT_MEMLOCK?); using unregistered buffers");
                    false
                }
            }
        });
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh, owned descriptor.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            pokes: AtomicU64::new(0),
            fixed,
            fixed_buffers,
            fixed_buffer_ops: Arc::new(AtomicU64::new(0)),
        });
        let (w, s) = (wake.clone(), shared.clone());
        let thread =
            std::thread::Builder::new().name(format!("uring-{name}")).spawn(move || ring_thread(ring, rx, w, s))?;
        Ok(UringEngine { inline, tx, wake, shared, thread: Some(thread) })
    }

    /// Whether the device's descriptor is registered with the ring.
    pub fn fixed_file(&self) -> bool {
        self.shared.fixed.is_some()
    }

    /// Whether the registered-buffer arena is registered with the ring.
    pub fn fixed_buffers(&self) -> bool {
        self.shared.fixed_buffers.is_some()
    }

    /// Reads and writes submitted from registered buffers so far.
    pub fn fixed_buffer_ops(&self) -> u64 {
        self.shared.fixed_buffer_ops.load(Ordering::Relaxed)
    }

    /// Wake-ups written so far (each is one syscall on a caller's thread).
    pub fn pokes(&self) -> u64 {
        self.shared.pokes.load(Ordering::Relaxed)
    }

    pub(crate) async fn submit(&self, op: UringOp) -> (Option<AlignedBuf>, io::Result<()>) {
        let op = if self.inline {
            match super::uring_inline::submit(op, &self.shared.fixed_buffer_ops) {
                Ok(submitted) => return submitted.await,
                Err(op) => op,
            }
        } else {
            op
        };
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Pending { op, done_bytes: 0, reply }).is_err() {
            return (None, Err(io::Error::other("io_uring thread has stopped")));
        }
        // Pairs with the fence in the ring thread: either it sees this operation in the channel
        // before it blocks, or this sees it parked and wakes it.
        fence(Ordering::SeqCst);
        if self.shared.parked.swap(false, Ordering::AcqRel) {
            self.shared.pokes.fetch_add(1, Ordering::Relaxed);
            poke(self.wake.as_raw_fd());
        }
        rx.await.unwrap_or_else(|_| (None, Err(io::Error::other("io_uring thread dropped an operation"))))
    }
}

fn poke(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes to an eventfd we own; failure (counter overflow) still leaves it readable.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        poke(self.wake.as_raw_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Builds `body` with `t` bound to the SQE target for `fd`: the registered slot when it is the
/// registered descriptor (the two are different types, hence a macro).
macro_rules! with_target {
    ($fd:expr, $fixed:expr, |$t:ident| $body:expr) => {
        if $fixed == Some($fd.as_raw_fd()) {
            let $t = types::Fixed(0);
            $body
        } else {
            let $t = types::Fd($fd.as_raw_fd());
            $body
        }
    };
}

/// What a ring has registered: the descriptor in fixed-file slot 0 and the arena as buffer 0.
#[derive(Clone, Copy)]
pub(super) struct Registered {
    pub fixed: Option<RawFd>,
    pub arena: Option<&'static Arena>,
}

impl Shared {
    fn registered(&self) -> Registered {
        Registered { fixed: self.fixed, arena: self.fixed_buffers }
    }
}

/// Whether `buf` lies in the arena registered with this ring (then it is registered buffer 0).
fn registered(reg: Registered, buf: &AlignedBuf) -> bool {
    reg.arena.is_some_and(|a| a.contains(buf.as_ptr()))
}

/// A write of `buf[done..]` at `offset + done`.
fn write_sqe(
    fd: &OwnedFd,
    buf: &AlignedBuf,
    done: usize,
    offset: u64,
    dsync: bool,
    reg: Registered,
) -> io_uring::squeue::Entry {
    let len = u32::try_from(buf.len() - done).expect("I/O sizes fit in u32");
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    // SAFETY: `done` < the buffer's length, so the pointer stays inside it. (The kernel's use of
    // it is safe because the buffer is held by the pending operation, which stays in the slab
    // until its completion arrives.)
    let ptr = unsafe { buf.as_ptr().add(done) };
    let at = offset + done as u64;
    if registered(reg, buf) {
        with_target!(fd, reg.fixed, |t| opcode::WriteFixed::new(t, ptr, len, 0).offset(at).rw_flags(flags).build())
    } else {
        with_target!(fd, reg.fixed, |t| opcode::Write::new(t, ptr, len).offset(at).rw_flags(flags).build())
    }
}

/// The SQE for `op`, `d` bytes of it already done, tagged `key`. The caller keeps `op` (and with
/// it the buffer the SQE points into) alive until the completion for `key` is reaped.
pub(super) fn sqe_for(op: &mut UringOp, d: usize, key: u64, reg: Registered) -> io_uring::squeue::Entry {
    let fixed = reg.fixed;
    let sqe = match op {
        UringOp::Read { fd, buf, offset } => {
            let len = u32::try_from(buf.len() - d).expect("I/O sizes fit in u32");
            let at = *offset + d as u64;
            let in_arena = registered(reg, buf);
            // SAFETY: `d` < the buffer's length, so the pointer stays inside it. (The kernel's use
            // of it is safe because the buffer lives in the operation, which the caller keeps
            // until its completion arrives.)
            let ptr = unsafe { buf.as_mut_ptr().add(d) };
            if in_arena {
                with_target!(fd, fixed, |t| opcode::ReadFixed::new(t, ptr, len, 0).offset(at).build())
            } else {
                with_target!(fd, fixed, |t| opcode::Read::new(t, ptr, len).offset(at).build())
            }
        }
        UringOp::Write { fd, buf, offset, dsync } => write_sqe(fd, buf, d, *offset, *dsync, reg),
        // The Arc in the operation keeps the shared memory alive as the owned buffer does for Write.
        UringOp::WriteShared { fd, buf, offset, dsync } => write_sqe(fd, buf, d, *offset, *dsync, reg),
        UringOp::Fsync { fd } => {
            with_target!(fd, fixed, |t| opcode::Fsync::new(t).flags(types::FsyncFlags::DATASYNC).build())
        }
        UringOp::Fallocate { fd, mode, offset, len } => {
            with_target!(fd, fixed, |t| opcode::Fallocate::new(t, *len).offset(*offset).mode(*mode).build())
        }
    };
    sqe.user_data(key)
}

fn ring_thread(ring: IoUring, rx: mpsc::Receiver<Pending>, wake: Arc<OwnedFd>, shared: Arc<Shared>) {
    // `efd_buf` is declared before the ring so it is dropped after it: the kernel may still own
    // the eventfd read into it until the ring is gone.
    let mut efd_buf = Box::new(0u64);
    let mut t = RingThread {
        ring,
        slab: Vec::new(),
        free: Vec::new(),
        in_flight: 0,
        queued: Default::default(),
        efd_armed: false,
        shared,
    };
    loop {
        t.arm_eventfd(&wake, &mut efd_buf);
        while let Ok(p) = rx.try_recv() {
            t.queued.push_back(p);
        }
        t.submit_queued();
        if t.shared.stopping.load(Ordering::Acquire) && t.in_flight == 0 && t.queued.is_empty() {
            return;
        }
        if let Err(e) = t.park_and_wait(&rx) {
            tracing::error!(error = %e, "io_uring_enter failed; failing queued I/O");
            t.fail_everything();
            return;
        }
        t.reap();
    }
}

/// The ring thread's state: the ring, operations in flight (a slab keyed by `user_data`), and
/// those waiting for a free submission slot.
struct RingThread {
    ring: IoUring,
    slab: Vec<Option<Pending>>,
    free: Vec<usize>,
    in_flight: usize,
    queued: std::collections::VecDeque<Pending>,
    efd_armed: bool,
    shared: Arc<Shared>,
}

impl RingThread {
    /// Keeps one read of the wake-up eventfd in the ring, so a submitter can end the wait.
    fn arm_eventfd(&mut self, wake: &OwnedFd, efd_buf: &mut u64) {
        if self.efd_armed {
            return;
        }
        let e = opcode::Read::new(types::Fd(wake.as_raw_fd()), (efd_buf as *mut u64).cast(), 8)
            .build()
            .user_data(EVENTFD_TAG);
        // SAFETY: efd_buf outlives the ring (see ring_thread), so the kernel never writes into
        // freed memory.
        if unsafe { self.ring.submission().push(&e) }.is_ok() {
            self.efd_armed = true;
        }
    }

    /// Moves queued operations into the submission queue while it has room.
    fn submit_queued(&mut self) {
        while let Some(mut p) = self.queued.pop_front() {
            let key = self.free.pop().unwrap_or_else(|| {
                self.slab.push(None);
                self.slab.len() - 1
            });
            let sqe = sqe_for(&mut p.op, p.done_bytes, key as u64, self.shared.registered());
            // SAFETY: the buffer the SQE points into is owned by `p`, moved into the slab below
            // and kept there until the completion for `key` is reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                self.free.push(key);
                self.queued.push_front(p);
                break;
            }
            if matches!(sqe.get_opcode() as u8, opcode::ReadFixed::CODE | opcode::WriteFixed::CODE) {
                self.shared.fixed_buffer_ops.fetch_add(1, Ordering::Relaxed);
            }
            self.slab[key] = Some(p);
            self.in_flight += 1;
        }
    }

    /// Submits and waits for a completion. Parks first: announces it, then looks at the channel
    /// once more (pairs with the submitter's fence), so an operation sent meanwhile is either
    /// seen here or followed by a wake-up.
    fn park_and_wait(&mut self, rx: &mpsc::Receiver<Pending>) -> io::Result<()> {
        self.shared.parked.store(true, Ordering::Release);
        fence(Ordering::SeqCst);
        let mut wait_for = 1;
        while let Ok(p) = rx.try_recv() {
            self.queued.push_back(p);
        }
        if !self.queued.is_empty() || !self.ring.completion().is_empty() {
            self.shared.parked.store(false, Ordering::Release);
            // Submit what is already in the SQ without blocking; the loop comes back for the rest.
            wait_for = 0;
        }
        let r = self.ring.submit_and_wait(wait_for);
        self.shared.parked.store(false, Ordering::Release);
        match r {
            Err(e) if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) => Err(e),
            _ => Ok(()),
        }
    }

    fn fail_everything(&mut self) {
        for p in self.slab.iter_mut().filter_map(Option::take).chain(self.queued.drain(..)) {
            let _ = p.reply.send((buf_of(p.op), Err(io::Error::other("io_uring failed"))));
        }
    }

    /// Completes every reaped operation; a short transfer is queued again for its remainder.
    fn reap(&mut self) {
        let completions: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (key, res) in completions {
            if key == EVENTFD_TAG {
                self.efd_armed = false;
                continue;
            }
            let key = key as usize;
            let mut p = self.slab[key].take().expect("completion for a live slot");
            self.free.push(key);
            self.in_flight -= 1;
            if res < 0 {
                let _ = p.reply.send((buf_of(p.op), Err(io::Error::from_raw_os_error(-res))));
                continue;
            }
            let total = p.op.transfer_bytes();
            p.done_bytes += res as usize;
            if p.done_bytes < total {
                if res == 0 {
                    let _ = p.reply.send((buf_of(p.op), Err(io::Error::from(io::ErrorKind::UnexpectedEof))));
                } else {
                    self.queued.push_back(p);
                }
                continue;
            }
            let _ = p.reply.send((buf_of(p.op), Ok(())));
        }
    }
}

impl UringOp {
    /// Bytes a read or write moves (0 for the others): a completion short of it is resubmitted.
    pub(super) fn transfer_bytes(&self) -> usize {
        match self {
            UringOp::Read { buf, .. } | UringOp::Write { buf, .. } => buf.len(),
            UringOp::WriteShared { buf, .. } => buf.len(),
            _ => 0,
        }
    }
}

pub(super) fn buf_of(op: UringOp) -> Option<AlignedBuf> {
    match op {
        UringOp::Read { buf, .. } | UringOp::Write { buf, .. } => Some(buf),
        _ => None,
    }
}

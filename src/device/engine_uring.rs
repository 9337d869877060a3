//! The io_uring engine: one thread owns a ring and turns queued operations into SQEs; completions
//! go back to the async callers through oneshot channels. Callers never block; the ring thread
//! batches whatever arrived since its last wake-up into one `io_uring_enter`.

use super::buf::AlignedBuf;
use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
// Operations hold the descriptor by Arc: it stays open until the kernel is done with it, even if
// the caller's future was dropped.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// Ring size: bounds the SQEs in one batch, not the operations in flight (those queue in the
/// channel and wait for a free slot).
const RING_ENTRIES: u32 = 256;
const EVENTFD_TAG: u64 = u64::MAX;

pub(crate) enum UringOp {
    Read { fd: Arc<OwnedFd>, buf: AlignedBuf, offset: u64 },
    Write { fd: Arc<OwnedFd>, buf: AlignedBuf, offset: u64, dsync: bool },
    Fsync { fd: Arc<OwnedFd> },
    Fallocate { fd: Arc<OwnedFd>, mode: i32, offset: u64, len: u64 },
}

type Completion = oneshot::Sender<(Option<AlignedBuf>, io::Result<()>)>;

struct Pending {
    op: UringOp,
    /// Bytes already transferred: a short read or write is resubmitted for the rest.
    done_bytes: usize,
    reply: Completion,
}

pub struct UringEngine {
    tx: mpsc::Sender<Pending>,
    wake: Arc<OwnedFd>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UringEngine {
    /// Fails when io_uring is not available (old kernel, seccomp); the caller falls back to psync.
    pub fn new(name: &str) -> io::Result<Self> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh, owned descriptor.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let (w, s) = (wake.clone(), stopping.clone());
        let thread =
            std::thread::Builder::new().name(format!("uring-{name}")).spawn(move || ring_thread(ring, rx, w, s))?;
        Ok(UringEngine { tx, wake, stopping, thread: Some(thread) })
    }

    pub(crate) async fn submit(&self, op: UringOp) -> (Option<AlignedBuf>, io::Result<()>) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Pending { op, done_bytes: 0, reply }).is_err() {
            return (None, Err(io::Error::other("io_uring thread has stopped")));
        }
        poke(self.wake.as_raw_fd());
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
        self.stopping.store(true, Ordering::Release);
        poke(self.wake.as_raw_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sqe_for(p: &mut Pending, key: u64) -> io_uring::squeue::Entry {
    let d = p.done_bytes;
    match &mut p.op {
        UringOp::Read { fd, buf, offset } => {
            let len = u32::try_from(buf.len() - d).expect("I/O sizes fit in u32");
            // SAFETY (for the kernel's use of the pointer): the buffer lives in `p`, which stays in
            // the slab until its completion arrives.
            opcode::Read::new(types::Fd(fd.as_raw_fd()), unsafe { buf.as_mut_ptr().add(d) }, len)
                .offset(*offset + d as u64)
                .build()
        }
        UringOp::Write { fd, buf, offset, dsync } => {
            let len = u32::try_from(buf.len() - d).expect("I/O sizes fit in u32");
            let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(types::Fd(fd.as_raw_fd()), unsafe { buf.as_ptr().add(d) }, len)
                .offset(*offset + d as u64)
                .rw_flags(flags)
                .build()
        }
        UringOp::Fsync { fd } => {
            opcode::Fsync::new(types::Fd(fd.as_raw_fd())).flags(types::FsyncFlags::DATASYNC).build()
        }
        UringOp::Fallocate { fd, mode, offset, len } => {
            opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), *len).offset(*offset).mode(*mode).build()
        }
    }
    .user_data(key)
}

fn ring_thread(ring: IoUring, rx: mpsc::Receiver<Pending>, wake: Arc<OwnedFd>, stopping: Arc<AtomicBool>) {
    let mut slab: Vec<Option<Pending>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut in_flight = 0usize;
    let mut queued: std::collections::VecDeque<Pending> = Default::default();
    let mut efd_buf = Box::new(0u64);
    // Declared after efd_buf so it is dropped first: the kernel may still own the eventfd read.
    let mut ring = ring;
    let mut efd_armed = false;
    loop {
        if !efd_armed {
            let e = opcode::Read::new(types::Fd(wake.as_raw_fd()), (&mut *efd_buf as *mut u64).cast(), 8)
                .build()
                .user_data(EVENTFD_TAG);
            // SAFETY: efd_buf outlives the ring (see its declaration), so the kernel never writes
            // into freed memory.
            if unsafe { ring.submission().push(&e) }.is_ok() {
                efd_armed = true;
            }
        }
        while let Ok(p) = rx.try_recv() {
            queued.push_back(p);
        }
        while let Some(mut p) = queued.pop_front() {
            let key = free.pop().unwrap_or_else(|| {
                slab.push(None);
                slab.len() - 1
            });
            let sqe = sqe_for(&mut p, key as u64);
            // SAFETY: the buffer the SQE points into is owned by `p`, moved into the slab below and
            // kept there until the completion for `key` is reaped.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                free.push(key);
                queued.push_front(p);
                break;
            }
            slab[key] = Some(p);
            in_flight += 1;
        }
        if stopping.load(Ordering::Acquire) && in_flight == 0 && queued.is_empty() {
            return;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                tracing::error!(error = %e, "io_uring_enter failed; failing queued I/O");
                for p in slab.iter_mut().filter_map(Option::take).chain(queued.drain(..)) {
                    let _ = p.reply.send((buf_of(p.op), Err(io::Error::other("io_uring failed"))));
                }
                return;
            }
        }
        let completions: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (key, res) in completions {
            if key == EVENTFD_TAG {
                efd_armed = false;
                continue;
            }
            let key = key as usize;
            let mut p = slab[key].take().expect("completion for a live slot");
            free.push(key);
            in_flight -= 1;
            if res < 0 {
                let _ = p.reply.send((buf_of(p.op), Err(io::Error::from_raw_os_error(-res))));
                continue;
            }
            let total = match &p.op {
                UringOp::Read { buf, .. } | UringOp::Write { buf, .. } => buf.len(),
                _ => 0,
            };
            p.done_bytes += res as usize;
            if p.done_bytes < total {
                if res == 0 {
                    let _ = p.reply.send((buf_of(p.op), Err(io::Error::from(io::ErrorKind::UnexpectedEof))));
                } else {
                    queued.push_back(p);
                }
                continue;
            }
            let _ = p.reply.send((buf_of(p.op), Ok(())));
        }
    }
}

fn buf_of(op: UringOp) -> Option<AlignedBuf> {
    match op {
        UringOp::Read { buf, .. } | UringOp::Write { buf, .. } => Some(buf),
        _ => None,
    }
}

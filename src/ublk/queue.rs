//! One ublk queue: a dedicated thread that owns the queue's io_uring, fetches the kernel's
//! requests tag by tag, hands each to the daemon's runtime as a `Volume` call, and commits the
//! result. The kernel accepts a queue's commands only from the thread that fetched (before 6.16's
//! PER_IO_DAEMON), so this thread never moves and never runs the storage work itself.
//!
//! ```text
//!  kernel ──FETCH CQE (tag t)──► queue thread ──Handle::spawn──► Volume::read/write/… (runtime workers)
//!  kernel ◄─COMMIT_AND_FETCH(t)── queue thread ◄─done list + eventfd read CQE──┘
//! ```
//!
//! Each tag owns one buffer of `max_io_bytes`: the kernel copies a write's data into it before
//! delivering the request and a read's data out of it at commit. The kernel may write into a
//! tag's buffer whenever the tag is armed and this thread is in the kernel, so a buffer is never
//! freed here: the thread hands them all back when it ends, and the caller frees them after the
//! thread has exited (an exiting task gets no more copies).

use super::sys::{self, IoCmd, IoDesc};
use super::QueueStats;
use crate::device::AlignedBuf;
use crate::server::stats::ServerStats;
use crate::volume::Volume;
use io_uring::{opcode, squeue, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const EVENT_TAG: u64 = u64::MAX;

/// What the runtime and the queue thread share.
pub(super) struct QueueShared {
    pub q_id: u16,
    done: Mutex<Vec<Done>>,
    efd: OwnedFd,
    /// Stop taking requests, finish and commit those in flight, then end without aborting the
    /// device: what an upgrade does before the successor recovers the device. Requests the
    /// kernel delivers meanwhile stay unanswered; it re-issues them to the next server.
    park: AtomicBool,
    pub stats: QueueStats,
    /// The server-wide request counters (per kind), shared with the NBD front end.
    requests: Arc<ServerStats>,
}

struct Done {
    tag: u16,
    result: i32,
    buf: AlignedBuf,
}

impl QueueShared {
    pub fn new(q_id: u16, requests: Arc<ServerStats>) -> io::Result<Arc<Self>> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        let park = AtomicBool::new(false);
        Ok(Arc::new(QueueShared {
            q_id,
            done: Mutex::new(Vec::new()),
            efd,
            park,
            stats: QueueStats::default(),
            requests,
        }))
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a local array to our eventfd.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    pub fn request_park(&self) {
        self.park.store(true, Ordering::Release);
        self.wake();
    }
}

/// How a queue thread ended.
pub(super) struct QueueEnd {
    /// The tags' buffers: free them only after the thread has exited.
    pub buffers: Vec<AlignedBuf>,
    pub error: Option<String>,
}

/// The queue's shape and the device it serves.
pub(super) struct QueueSpec {
    pub depth: u16,
    pub max_io_bytes: usize,
    pub cdev: Arc<File>,
}

/// The descriptor array the kernel fills for this queue, mapped read-only.
struct Descs {
    ptr: *const IoDesc,
    len_bytes: usize,
}

impl Descs {
    fn map(cdev: &File, q_id: u16, depth: u16) -> io::Result<Self> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let round = |n: usize| n.div_ceil(page) * page;
        let desc = std::mem::size_of::<IoDesc>();
        let len_bytes = round(depth as usize * desc);
        let offset = q_id as usize * round(sys::MAX_QUEUE_DEPTH as usize * desc);
        // SAFETY: a fresh shared read-only mapping of the queue's descriptors; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Descs { ptr: ptr.cast(), len_bytes })
    }

    fn get(&self, tag: u16) -> IoDesc {
        // SAFETY: tag < depth (the kernel's tags), inside the mapping; the kernel wrote it before
        // delivering the CQE, so a volatile read sees the current request.
        unsafe { std::ptr::read_volatile(self.ptr.add(tag as usize)) }
    }
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped; the mapping holds a reference to
        // /dev/ublkcN, which must go before a successor can recover the device.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len_bytes) };
    }
}

/// Runs queue `shared.q_id` until the kernel aborts every tag (device stopped) or a park
/// finishes. `ready` is told once every tag's FETCH is submitted.
pub(super) fn run<V: Volume>(
    spec: QueueSpec,
    shared: Arc<QueueShared>,
    volume: Arc<V>,
    rt: tokio::runtime::Handle,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) -> QueueEnd {
    let mut buffers: Vec<AlignedBuf> = Vec::new();
    let mut q = match Queue::new(&spec, &shared, &mut buffers) {
        Ok(q) => q,
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), format!("queue {}: {e}", shared.q_id))));
            return QueueEnd { buffers, error: Some(e.to_string()) };
        }
    };
    let _ = ready.send(Ok(()));
    let mut slots: Vec<Option<AlignedBuf>> = buffers.drain(..).map(Some).collect();
    let outcome = q.serve(&mut slots, &shared, &volume, &rt);
    drop(q);
    // Every buffer is back (no volume call is in flight when serve returns).
    let buffers = slots.into_iter().flatten().collect();
    match outcome {
        Ok(_) => QueueEnd { buffers, error: None },
        Err(e) => QueueEnd { buffers, error: Some(e.to_string()) },
    }
}

struct Queue {
    // Field order is drop order: the ring (and with it the outstanding commands) goes before the
    // descriptor mapping and the char device.
    ring: IoUring,
    descs: Descs,
    depth: usize,
    /// Tags the kernel aborted (or whose fetch failed): never delivered again. All of them
    /// gone means the device was stopped.
    gone: usize,
    q_id: u16,
    cdev_fd: i32,
    /// The eventfd read's 8-byte target, leaked: the kernel owns it while the read is armed.
    event_buf: &'static mut [u8; 8],
    serving: usize,
}

impl Queue {
    fn new(spec: &QueueSpec, shared: &QueueShared, buffers: &mut Vec<AlignedBuf>) -> io::Result<Self> {
        let descs = Descs::map(&spec.cdev, shared.q_id, spec.depth)?;
        let ring = IoUring::builder().setup_coop_taskrun().build((spec.depth as u32 + 1).next_power_of_two())?;
        let mut q = Queue {
            ring,
            descs,
            depth: spec.depth as usize,
            gone: 0,
            q_id: shared.q_id,
            cdev_fd: spec.cdev.as_raw_fd(),
            event_buf: Box::leak(Box::new([0u8; 8])),
            serving: 0,
        };
        for tag in 0..spec.depth {
            let buf = AlignedBuf::zeroed(spec.max_io_bytes);
            q.push(q.io_cmd(sys::IO_FETCH_REQ, tag, 0, &buf))?;
            buffers.push(buf);
        }
        q.arm_event(shared)?;
        q.ring.submit()?;
        Ok(q)
    }

    fn io_cmd(&self, op: u32, tag: u16, result: i32, buf: &AlignedBuf) -> squeue::Entry {
        let cmd = IoCmd { q_id: self.q_id, tag, result, addr: buf.as_ptr() as u64 };
        opcode::UringCmd16::new(types::Fd(self.cdev_fd), op).cmd(sys::as_bytes(&cmd)).build().user_data(tag as u64)
    }

    fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the SQE points at a tag buffer that stays allocated until the thread has
            // exited (see the module doc), or at the leaked eventfd target.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_event(&mut self, shared: &QueueShared) -> io::Result<()> {
        let sqe = opcode::Read::new(types::Fd(shared.efd.as_raw_fd()), self.event_buf.as_mut_ptr(), 8)
            .build()
            .user_data(EVENT_TAG);
        self.push(sqe)
    }

    /// The loop; Ok(true) when the kernel aborted every tag, Ok(false) after a park.
    fn serve<V: Volume>(
        &mut self,
        slots: &mut [Option<AlignedBuf>],
        shared: &Arc<QueueShared>,
        volume: &Arc<V>,
        rt: &tokio::runtime::Handle,
    ) -> io::Result<bool> {
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(self.depth + 1);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return self.fail(e, slots, shared),
            }
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (user_data, result) in cqes.drain(..) {
                if user_data == EVENT_TAG {
                    self.commit_done(slots, shared)?;
                    if !shared.park.load(Ordering::Acquire) || self.serving > 0 {
                        self.arm_event(shared)?;
                    }
                } else {
                    self.delivered(user_data as u16, result, slots, shared, volume, rt);
                }
            }
            if self.gone == self.depth {
                return Ok(true);
            }
            // `serving` counts requests until their commit is queued, so at 0 nothing is left
            // to commit.
            if shared.park.load(Ordering::Acquire) && self.serving == 0 {
                // The last commits must reach the kernel before the ring goes, or their
                // requests would be re-issued to the successor and run twice.
                self.ring.submit()?;
                return Ok(false);
            }
        }
    }

    /// A fetch completed: a request for `tag`, or the kernel's abort of it.
    fn delivered<V: Volume>(
        &mut self,
        tag: u16,
        result: i32,
        slots: &mut [Option<AlignedBuf>],
        shared: &Arc<QueueShared>,
        volume: &Arc<V>,
        rt: &tokio::runtime::Handle,
    ) {
        let t = tag as usize;
        if result == sys::IO_RES_ABORT {
            self.gone += 1;
            return;
        }
        if result != 0 {
            tracing::error!(queue = self.q_id, tag, errno = -result, "ublk fetch failed; the tag is lost");
            self.gone += 1;
            return;
        }
        if shared.park.load(Ordering::Acquire) {
            // Left unanswered: the kernel re-issues it to the next server.
            return;
        }
        let desc = self.descs.get(tag);
        let Some(buf) = slots[t].take() else {
            tracing::error!(queue = self.q_id, tag, "ublk delivered a tag already being served");
            return;
        };
        self.serving += 1;
        shared.stats.started();
        let (volume, shared) = (volume.clone(), shared.clone());
        rt.spawn(async move {
            let (buf, result) = super::serve_request(&*volume, desc, buf, &shared.requests).await;
            shared.stats.finished(result);
            // One wake-up per batch: a list that already holds results has a wake-up pending,
            // and the queue thread takes the whole list when it sees that one.
            let was_empty = {
                let mut done = super::lock(&shared.done);
                done.push(Done { tag, result, buf });
                done.len() == 1
            };
            if was_empty {
                shared.wake();
            }
        });
    }

    /// Commits every finished request and re-arms its tag.
    fn commit_done(&mut self, slots: &mut [Option<AlignedBuf>], shared: &QueueShared) -> io::Result<()> {
        let done = std::mem::take(&mut *super::lock(&shared.done));
        for d in done {
            let sqe = self.io_cmd(sys::IO_COMMIT_AND_FETCH_REQ, d.tag, d.result, &d.buf);
            slots[d.tag as usize] = Some(d.buf);
            self.serving -= 1;
            self.push(sqe)?;
        }
        Ok(())
    }

    /// The ring failed: wait for the volume calls in flight (their buffers must come back), then
    /// report it.
    fn fail(&mut self, e: io::Error, slots: &mut [Option<AlignedBuf>], shared: &QueueShared) -> io::Result<bool> {
        tracing::error!(queue = self.q_id, error = %e, "ublk queue ring failed");
        while self.serving > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            for d in std::mem::take(&mut *super::lock(&shared.done)) {
                slots[d.tag as usize] = Some(d.buf);
                self.serving -= 1;
            }
        }
        Err(e)
    }
}

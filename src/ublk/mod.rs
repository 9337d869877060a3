//! The ublk front end: the kernel's userspace block driver hands `/dev/ublkbN`'s requests to
//! superdisk through io_uring commands and a per-tag buffer, with no socket and no protocol
//! framing between the filesystem and the [`Volume`]. It runs beside the NBD listeners, over the
//! same volume.
//!
//! The protocol is written here on the `io-uring` crate (control commands in `ctrl.rs`, the queue
//! loop in `queue.rs`, the ABI in [`sys`]) rather than on libublk: libublk 0.4's failed add deletes
//! the live device that holds the id it asked for, it needs libclang at build time, brings smol
//! and ~40 crates beside tokio, and writes `/run/ublksrvd` (see docs/UBLK.md §4).
//!
//! Life of the device (the kernel's states in brackets):
//! ```text
//!  start ── no device of ours ──► ADD_DEV, SET_PARAMS, queues FETCH, START_DEV ──► [LIVE] serving
//!        └─ ours, [QUIESCED] ───► START_USER_RECOVERY, queues FETCH, END_USER_RECOVERY ─┘
//!  SIGTERM: (NBD drained) STOP_DEV → every tag aborted → queues end → DEL_DEV; then the volume's
//!           clean shutdown. The disk is gone, as after `superdisk detach`.
//!  crash:   the kernel quiesces the device [QUIESCED]; requests queue, those in flight are
//!           re-issued to the next daemon (USER_RECOVERY_REISSUE); the filesystem sees a pause.
//!  upgrade: queues park (finish and commit what is in flight, leave the rest) and close;
//!           [QUIESCED]; the successor recovers it as after a crash.
//! ```
//! "Ours" is the cookie in the device's `ublksrv_flags`, which the kernel keeps for the device's
//! life: a hash of the backing device's path, so a restarted daemon finds its device without a
//! state file, and never adopts another volume's.

mod ctrl;
mod queue;
pub mod sys;

pub use ctrl::{existing_ids, Control, ControlError};

use crate::device::AlignedBuf;
use crate::server::stats::{ReqOp, ServerStats};
use crate::volume::Volume;
use queue::QueueShared;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Requests up to this size arrive whole; the kernel splits larger ones.
pub const MAX_IO_BYTES: usize = 512 << 10;
/// The device's logical block: what XFS and databases expect of an NVMe or a cloud disk.
pub const LOGICAL_BLOCK_BYTES: u32 = 4096;
/// Largest discard or write-zeroes request.
const MAX_DISCARD_BYTES: u64 = 1 << 30;

/// What the config asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkOptions {
    /// `ublk_id`: None lets the kernel pick.
    pub id: Option<u32>,
    pub queues: u16,
    pub queue_depth: u16,
    pub read_only: bool,
}

/// One queue's counters (requests are also counted per kind in the server's request stats).
#[derive(Default, Debug)]
pub struct QueueStats {
    pub in_flight: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

impl QueueStats {
    fn started(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }
    fn finished(&self, result: i32) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
        if result < 0 {
            self.errors.fetch_add(1, Relaxed);
        }
    }
}

/// What `superdisk status` and the metrics show.
#[derive(Debug)]
pub struct UblkInfo {
    pub dev_id: u32,
    pub path: String,
    pub queue_depth: u16,
    pub flags: u64,
    /// Whether this run resumed a device a previous process left (crash or upgrade).
    pub recovered: bool,
    pub queues: Vec<Arc<QueueStatsHandle>>,
}

/// A queue's counters, shared with the queue thread.
#[derive(Debug)]
pub struct QueueStatsHandle {
    pub q_id: u16,
    shared: Arc<QueueShared>,
}

impl QueueStatsHandle {
    pub fn stats(&self) -> &QueueStats {
        &self.shared.stats
    }
}

impl std::fmt::Debug for QueueShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueShared").field("q_id", &self.q_id).finish_non_exhaustive()
    }
}

/// A ublk device being served.
pub struct UblkServer {
    pub info: Arc<UblkInfo>,
    threads: Vec<std::thread::JoinHandle<queue::QueueEnd>>,
    shared: Vec<Arc<QueueShared>>,
    cdev: Option<Arc<std::fs::File>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// superdisk's mark on its devices: "SD" in the top 16 bits, 48 bits of a hash of the backing
/// device's canonical path below.
pub fn cookie_for(backing: &Path) -> u64 {
    let path = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0x5344 << 48) | (h & 0xffff_ffff_ffff)
}

/// Serves one request through the volume; the result as the kernel wants it (bytes for a read
/// or write, 0 for the rest, -errno on failure).
async fn serve_request<V: Volume>(
    v: &V,
    d: sys::IoDesc,
    mut buf: AlignedBuf,
    stats: &ServerStats,
) -> (AlignedBuf, i32) {
    let started = Instant::now();
    let capacity = buf.capacity();
    let op = (d.op_flags & 0xff) as u8;
    let (offset, len) = (d.start_sector << 9, u64::from(d.nr_sectors) << 9);
    let fua = d.op_flags & sys::IO_F_FUA != 0;
    let errno = |e: io::Error| -e.raw_os_error().filter(|n| *n > 0).unwrap_or(libc::EIO);
    let in_range = offset.checked_add(len).is_some_and(|end| end <= v.size_bytes());
    let (kind, result) = match op {
        _ if op != sys::IO_OP_FLUSH && !in_range => (ReqOp::Other, -libc::EIO),
        sys::IO_OP_READ | sys::IO_OP_WRITE if len as usize > buf.capacity() => (ReqOp::Other, -libc::EIO),
        sys::IO_OP_READ => {
            // SAFETY: len ≤ capacity (checked above), and the tag buffers are made zeroed.
            unsafe { buf.set_len(len as usize) };
            let (b, r) = v.read(offset, buf).await;
            buf = b;
            (ReqOp::Read, r.map_or_else(errno, |()| len as i32))
        }
        sys::IO_OP_WRITE => {
            // SAFETY: as for a read; the kernel copied the request's data into [0, len).
            unsafe { buf.set_len(len as usize) };
            let (b, r) = v.write(offset, buf, fua).await;
            buf = b;
            (ReqOp::Write, r.map_or_else(errno, |()| len as i32))
        }
        sys::IO_OP_FLUSH => (ReqOp::Flush, v.flush().await.map_or_else(errno, |()| 0)),
        sys::IO_OP_DISCARD => (ReqOp::Trim, v.trim(offset, len, fua).await.map_or_else(errno, |()| 0)),
        sys::IO_OP_WRITE_ZEROES => {
            let may_unmap = d.op_flags & sys::IO_F_NOUNMAP == 0;
            (ReqOp::WriteZeroes, v.write_zeroes(offset, len, may_unmap, fua).await.map_or_else(errno, |()| 0))
        }
        _ => (ReqOp::Other, -libc::EOPNOTSUPP),
    };
    let bytes = if matches!(kind, ReqOp::Flush | ReqOp::Other) { 0 } else { len };
    stats.request(kind).record(bytes, result >= 0, started);
    if result < 0 {
        tracing::warn!(op, offset, len, errno = -result, "ublk request failed");
    }
    (keep_capacity(buf, capacity), result)
}

/// The tag's buffer must keep its full capacity: the kernel copies the tag's next request (up to
/// `max_io_buf_bytes`) into whatever address the commit names, and knows nothing of our sizes. A
/// volume may hand back a different, smaller buffer than it was given (a read answered from
/// another copy, a write whose buffer a stalled device still holds): its bytes move into a
/// full-size one.
fn keep_capacity(buf: AlignedBuf, capacity: usize) -> AlignedBuf {
    if buf.capacity() >= capacity {
        return buf;
    }
    let mut full = AlignedBuf::zeroed(capacity);
    // SAFETY: buf.len() ≤ capacity; `full` is zeroed over its whole capacity.
    unsafe { full.set_len(buf.len()) };
    full.copy_from_slice(&buf);
    full
}

/// The device's parameters: a 4 KiB-sector disk with a volatile cache and FUA (so the kernel
/// sends FLUSH and FUA writes, which the volume makes durable on the backing), and discard and
/// write-zeroes up to 1 GiB.
fn params_for(size_bytes: u64, rotational: bool, read_only: bool) -> sys::Params {
    let mut attrs = sys::ATTR_VOLATILE_CACHE | sys::ATTR_FUA;
    if rotational {
        attrs |= sys::ATTR_ROTATIONAL;
    }
    if read_only {
        attrs |= sys::ATTR_READ_ONLY;
    }
    let shift = LOGICAL_BLOCK_BYTES.trailing_zeros() as u8;
    sys::Params {
        len: std::mem::size_of::<sys::Params>() as u32,
        types: sys::PARAM_TYPE_BASIC | if read_only { 0 } else { sys::PARAM_TYPE_DISCARD },
        basic: sys::ParamBasic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: 12,
            io_min_shift: shift,
            max_sectors: (MAX_IO_BYTES >> 9) as u32,
            dev_sectors: size_bytes >> 9,
            ..Default::default()
        },
        discard: sys::ParamDiscard {
            discard_granularity: LOGICAL_BLOCK_BYTES,
            max_discard_sectors: (MAX_DISCARD_BYTES >> 9) as u32,
            max_write_zeroes_sectors: (MAX_DISCARD_BYTES >> 9) as u32,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

mod start;
pub use start::{delete_device, warn_if_left_waiting, StartError};

#[cfg(test)]
mod tests;

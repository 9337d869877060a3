//! Block devices: the [`BlockDevice`] trait every layer speaks, and the small types it uses. The
//! mirror engine and the NBD front end only see the trait.
//!
//! Where the bytes live, and the layers the daemon stacks on them (outermost first):
//!
//! ```text
//!   backing:  Guarded (layer::backing_guard: timeouts, read retries, write fences, durability)
//!               └─ Instrumented (layer::instrumented: counters, latency histograms)
//!                    └─ Stalled (layer::injected_stall: SUPERDISK_INJECT_READ_STALL, benchmarks only)
//!                         └─ FileDevice (file: a block device or file, io_uring or psync, O_DIRECT)
//!
//!   cache:    Striped (layer::striped: RAID0 over the members)
//!               └─ Timed, one per member (layer::cache_time_limit: cache_timeout_ms, the set's wire)
//!                    └─ Instrumented └─ Stalled └─ FileDevice
//! ```
//!
//! * `file/`: the real device and its engines (`uring`, `psync`), its alignment layer is
//!   `align` (shared with the simulated device), page-cache sends (`page_cache`).
//! * `layer/`: wrappers, each a `BlockDevice` around a `BlockDevice`; every one forwards every
//!   capability it does not change (`conformance` checks that).
//! * `sim/` (feature `sim`, tests, fuzzing and benchmarks only): a simulated disk with crash and
//!   write-back error semantics, the model of what it may read as, and fault injection.

pub mod align;
pub mod buf;
#[cfg(test)]
pub(crate) mod conformance;
pub mod file;
pub(crate) mod join;
pub mod layer;
pub(crate) mod rangelock;
pub mod rng;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

pub use buf::AlignedBuf;
pub use file::page_cache::PageCacheFile;
pub use file::{page_cache_visible, EngineKind, FileDevice, OpenOptions};
pub use layer::backing_guard::{BackingIoStats, Guarded, IoPolicy};
pub use layer::cache_time_limit::{CacheTimeouts, Timed, Tripwire};
pub use rangelock::RangeLocks;

use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

/// Which physical device (or file) a [`BlockDevice`] reaches, so operations still outstanding on
/// it can be recognised when the same device is offered again under another handle or path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceId {
    pub major_space: u64,
    pub minor_space: u64,
}

impl DeviceId {
    /// The identity of the file or device node `meta` describes: a block device by its device
    /// number (every path to it agrees), a regular file by its inode.
    pub fn of(meta: &std::fs::Metadata) -> DeviceId {
        use std::os::unix::fs::MetadataExt;
        if meta.file_type().is_block_device() {
            DeviceId { major_space: u64::MAX - 1, minor_space: meta.rdev() }
        } else {
            DeviceId { major_space: meta.dev(), minor_space: meta.ino() }
        }
    }
}

/// One extent of `base:allocation` information: `hole` means unallocated and reading as zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length_bytes: u64,
    pub hole: bool,
}

/// The capability every device offers. All methods are cancellation-safe in the sense that a
/// dropped future never leaves memory owned by the kernel: buffers travel with the operation.
pub trait BlockDevice: Send + Sync + 'static {
    fn size_bytes(&self) -> u64;
    /// The smallest unit the device can write without read-modify-write.
    fn logical_block_bytes(&self) -> u32;
    /// Whether write_zeroes is cheaper than writing zeroes (so NBD FAST_ZERO may succeed).
    fn fast_zero(&self) -> bool;
    /// Fills `buf` from `offset`; always returns the buffer.
    fn read(&self, offset: u64, buf: AlignedBuf) -> impl Future<Output = (AlignedBuf, io::Result<()>)> + Send;
    /// Writes `buf` at `offset`; with `fua` the data is durable when this returns Ok.
    fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> impl Future<Output = (AlignedBuf, io::Result<()>)> + Send;
    /// Writes `data` at `offset` without taking the buffer, so several devices can write one
    /// buffer at the same time (the mirror's write to the backing and the cache). Devices that can
    /// write from shared memory override this; the default copies into an owned buffer.
    fn write_shared(
        &self,
        offset: u64,
        data: Arc<AlignedBuf>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            let mut own = AlignedBuf::uninit_for_fill(data.len());
            own.copy_from_slice(&data);
            self.write(offset, own, fua).await.1
        }
    }
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Afterwards the range reads as zeroes. `may_unmap` lets the device deallocate it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> impl Future<Output = io::Result<()>> + Send;
    /// Allocation map of `[offset, offset+len)`, possibly covering only a prefix of it.
    fn allocation(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<Vec<Extent>>> + Send;
    /// The physical device (or file) behind this handle, where known.
    fn identity(&self) -> Option<DeviceId> {
        None
    }
    /// A hint that `[offset, offset+len)`, already flushed, will not be read soon: a device
    /// backed by the page cache may drop those pages. Never changes what reads return.
    fn drop_cached(&self, _offset: u64, _len: u64) {}
    /// The files under this handle, each with a duplicate of its descriptor (the same open file,
    /// so the same lock): what an in-place upgrade hands to the next process.
    fn open_files(&self, _out: &mut Vec<OpenFile>) {}
    /// Where `[offset, offset+len)` can be sent to a socket from without being read into memory
    /// first (`sendfile`): only a device whose bytes are in the page cache right now, so the send
    /// neither waits for the device nor bypasses a wrapper's checks. A read counted by a wrapper
    /// is counted here too. None means "read it".
    fn zero_copy_source(&self, _offset: u64, _len: usize) -> Option<FileSlice> {
        None
    }
}

/// One file under a device handle, with a duplicate of its descriptor (see
/// [`BlockDevice::open_files`]).
#[derive(Debug)]
pub struct OpenFile {
    pub path: std::path::PathBuf,
    pub fd: std::os::fd::OwnedFd,
}

/// Bytes of an open file, to be sent from its page cache (`sendfile`, or `send` from a mapped
/// window). Holding the file keeps its descriptor and mappings valid while the reply waits for
/// the socket, even if the device is detached meanwhile.
#[derive(Clone, Debug)]
pub struct FileSlice {
    pub file: Arc<PageCacheFile>,
    pub offset: u64,
    pub len: usize,
}

/// A shared device is a device: lets one opened device be handed to code that wants ownership
/// (a cache set, a verifier) while the caller keeps a handle.
impl<D: BlockDevice> BlockDevice for Arc<D> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn logical_block_bytes(&self) -> u32 {
        (**self).logical_block_bytes()
    }
    fn fast_zero(&self) -> bool {
        (**self).fast_zero()
    }
    fn read(&self, offset: u64, buf: AlignedBuf) -> impl Future<Output = (AlignedBuf, io::Result<()>)> + Send {
        (**self).read(offset, buf)
    }
    fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> impl Future<Output = (AlignedBuf, io::Result<()>)> + Send {
        (**self).write(offset, buf, fua)
    }
    fn write_shared(
        &self,
        offset: u64,
        data: Arc<AlignedBuf>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        (**self).write_shared(offset, data, fua)
    }
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send {
        (**self).flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> impl Future<Output = io::Result<()>> + Send {
        (**self).write_zeroes(offset, len, may_unmap)
    }
    fn allocation(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        (**self).allocation(offset, len)
    }
    fn identity(&self) -> Option<DeviceId> {
        (**self).identity()
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        (**self).drop_cached(offset, len)
    }
    fn open_files(&self, out: &mut Vec<OpenFile>) {
        (**self).open_files(out)
    }
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<FileSlice> {
        (**self).zero_copy_source(offset, len)
    }
}

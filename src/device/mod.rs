//! Block devices: where the bytes live (a regular file or a block device) times how the syscalls
//! are issued (io_uring or plain pread/pwrite). The mirror engine and the NBD front end only see the
//! [`BlockDevice`] trait.
//!
//! ```text
//!   BlockDevice (trait: read, write, flush, discard, write_zeroes, allocation, size)
//!        │
//!        └── FileDevice: fd + geometry + alignment handling (bounce buffers, read-modify-write)
//!               └── Engine: Uring(ring thread)  |  Sync(pread/pwrite on the blocking pool)
//! ```

pub mod align;
pub mod buf;
mod engine_sync;
mod engine_uring;
pub mod fault;
pub mod guard;
pub mod mapped;
pub mod mem;
mod rangelock;
pub mod timeout;

pub use buf::AlignedBuf;
pub use engine_uring::UringEngine;
pub use guard::{BackingIoStats, Guarded, IoPolicy};
pub use mapped::PageCacheFile;
pub use rangelock::RangeLocks;
pub use timeout::{CacheTimeouts, Timed, Tripwire};

use engine_uring::UringOp;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Where `[offset, offset+len)` can be sent to a socket from without being read into memory
    /// first (`sendfile`): only a device whose bytes are in the page cache right now, so the send
    /// neither waits for the device nor bypasses a wrapper's checks. A read counted by a wrapper
    /// is counted here too. None means "read it".
    fn zero_copy_source(&self, _offset: u64, _len: usize) -> Option<FileSlice> {
        None
    }
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
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<FileSlice> {
        (**self).zero_copy_source(offset, len)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring, falling back to psync if the kernel refuses it.
    #[default]
    Uring,
    Psync,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            "psync" | "sync" => Ok(EngineKind::Psync),
            _ => Err(format!("unknown I/O engine {s:?}: expected \"uring\" or \"psync\"")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub read_only: bool,
    /// None: O_DIRECT for block devices, buffered for regular files.
    pub direct: Option<bool>,
    pub engine: EngineKind,
}

enum Engine {
    Uring(UringEngine),
    Sync,
}

pub struct FileDevice {
    path: PathBuf,
    fd: Arc<OwnedFd>,
    size_bytes: u64,
    logical_block_bytes: u32,
    is_block_device: bool,
    id: DeviceId,
    direct: bool,
    engine: Engine,
    /// Serialises read-modify-write cycles on shared edge blocks (O_DIRECT only).
    rmw_locks: RangeLocks,
    /// Page-cache fast path (see `engine_sync::try_nowait`); off with O_DIRECT, where every I/O
    /// reaches the device and would only fail with EAGAIN.
    nowait_reads: AtomicBool,
    nowait_writes: AtomicBool,
    /// The file lives on a network or userspace filesystem (NFS, FUSE, SMB, …), where even a
    /// buffered write can wait for a server: never do I/O on the caller's thread (see `raw_write`).
    remote_fs: bool,
    /// The same descriptor, for sending reads from the page cache (mapped lazily, if ever).
    page_cache: Arc<PageCacheFile>,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKROTATIONAL: libc::c_ulong = 0x127e;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_secs(3);
const MAX_EXTENTS: usize = 4096;

/// `cachestat(2)` (Linux 6.5): the same number on every architecture, not yet in the libc crate.
const SYS_CACHESTAT: libc::c_long = 451;
/// Set once the kernel answers ENOSYS: older kernels never send from the page cache.
static CACHESTAT_MISSING: AtomicBool = AtomicBool::new(false);

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Whether this kernel can say which pages are in the page cache (zero-copy reads need it).
pub fn page_cache_visible() -> bool {
    // SAFETY: cachestat with a null range pointer fails with EFAULT where it exists, ENOSYS where
    // it does not; nothing is written.
    let r = unsafe {
        libc::syscall(SYS_CACHESTAT, -1, std::ptr::null::<CachestatRange>(), std::ptr::null_mut::<Cachestat>(), 0)
    };
    !(r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS))
}

/// Whether every page of `[offset, offset+len)` of `fd` is in the page cache.
fn page_cache_holds(fd: std::os::fd::RawFd, offset: u64, len: u64) -> bool {
    if CACHESTAT_MISSING.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: sysconf only reads a constant of the running system.
    let page_bytes = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(512);
    let first = offset / page_bytes;
    let pages = (offset + len).div_ceil(page_bytes) - first;
    let range = CachestatRange { off: first * page_bytes, len: pages * page_bytes };
    let mut st = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes one `struct cachestat` into `st`, both ours.
    let r = unsafe { libc::syscall(SYS_CACHESTAT, fd, &range as *const CachestatRange, &mut st as *mut Cachestat, 0) };
    if r < 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            CACHESTAT_MISSING.store(true, Ordering::Relaxed);
        }
        return false;
    }
    st.nr_cache >= pages
}

fn annotate(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

impl FileDevice {
    pub fn open(path: &Path, opts: &OpenOptions) -> io::Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| annotate(path, "cannot stat", e))?;
        let ft = meta.file_type();
        let is_block_device = ft.is_block_device();
        if !is_block_device && !ft.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file or a block device", path.display()),
            ));
        }
        let direct = opts.direct.unwrap_or(is_block_device);
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| annotate(path, "cannot open", e))?;
        let fd: OwnedFd = file.into();
        let raw = fd.as_raw_fd();
        // An exclusive advisory lock: two daemons writing one device would corrupt it silently.
        // A daemon that was just SIGKILLed with io_uring requests in flight releases its files a
        // moment after it is reaped, so a restart retries briefly before calling the device busy.
        let deadline = std::time::Instant::now() + LOCK_RETRY;
        // SAFETY: plain syscall on our descriptor.
        while unsafe { libc::flock(raw, libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) || std::time::Instant::now() >= deadline {
                return Err(annotate(path, "already in use by another process (flock)", e));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (size_bytes, logical_block_bytes) = if is_block_device {
            let mut size: u64 = 0;
            let mut ssz: libc::c_int = 0;
            // SAFETY: ioctls that write one integer into the pointed-to variable.
            unsafe {
                if libc::ioctl(raw, BLKGETSIZE64, &mut size) < 0 {
                    return Err(annotate(path, "BLKGETSIZE64", io::Error::last_os_error()));
                }
                if libc::ioctl(raw, BLKSSZGET, &mut ssz) < 0 {
                    return Err(annotate(path, "BLKSSZGET", io::Error::last_os_error()));
                }
            }
            (size, u32::try_from(ssz).unwrap_or(512).max(512))
        } else {
            // For files, O_DIRECT alignment is the filesystem's; 4096 satisfies every common one.
            (meta.len(), if direct { 4096 } else { 1 })
        };
        let remote_fs = !is_block_device && on_remote_filesystem(raw);
        let engine = match opts.engine {
            EngineKind::Psync => Engine::Sync,
            EngineKind::Uring => match UringEngine::new(&path.file_name().unwrap_or_default().to_string_lossy(), raw) {
                Ok(u) => Engine::Uring(u),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "io_uring unavailable; using psync");
                    Engine::Sync
                }
            },
        };
        let fd = Arc::new(fd);
        Ok(FileDevice {
            path: path.to_owned(),
            page_cache: Arc::new(PageCacheFile::new(fd.clone(), size_bytes)),
            fd,
            size_bytes,
            logical_block_bytes,
            is_block_device,
            id: DeviceId::of(&meta),
            direct,
            engine,
            rmw_locks: RangeLocks::default(),
            // RWF_NOWAIT is only a hint to some filesystems: FUSE may still send a request and wait
            // for its server, which would block a runtime thread for as long as the server is gone.
            nowait_reads: AtomicBool::new(!direct && !remote_fs),
            nowait_writes: AtomicBool::new(!direct && !remote_fs),
            remote_fs,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }
    pub fn is_direct(&self) -> bool {
        self.direct
    }
    /// Whether reads and writes from the registered-buffer arena go to the ring as fixed buffers.
    pub fn registered_buffers(&self) -> bool {
        matches!(&self.engine, Engine::Uring(u) if u.fixed_buffers())
    }

    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Uring(_) => "uring",
            Engine::Sync => "psync",
        }
    }

    pub fn rotational(&self) -> bool {
        if !self.is_block_device {
            return false;
        }
        let mut rot: libc::c_ushort = 0;
        // SAFETY: ioctl writing one short.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), BLKROTATIONAL, &mut rot) >= 0 && rot != 0 }
    }

    fn align(&self) -> u64 {
        u64::from(if self.direct { self.logical_block_bytes } else { 1 })
    }

    async fn raw_read(&self, offset: u64, mut buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len();
        if self.nowait_reads.load(Ordering::Relaxed) {
            match engine_sync::try_nowait(self.fd.as_raw_fd(), buf.as_mut_ptr(), len, offset, false) {
                Ok(n) if n == len => return (buf, Ok(())),
                Err(libc::EOPNOTSUPP) => self.nowait_reads.store(false, Ordering::Relaxed),
                _ => {}
            }
            // A partial hit still has to be finished; re-reading the whole range is simpler and
            // the bytes are in the page cache anyway.
        }
        let (b, r) = match &self.engine {
            Engine::Uring(u) => u.submit(UringOp::Read { fd: self.fd.clone(), buf, offset }).await,
            Engine::Sync => engine_sync::read(self.fd.clone(), buf, offset).await,
        };
        (b.unwrap_or_else(|| AlignedBuf::zeroed(len)), r)
    }

    /// The buffered write done on the caller's thread, shared by both write paths: `Some` with
    /// the result when it was done here, `None` when the engine must do (the rest of) it.
    fn write_in_place(&self, data: &[u8], offset: u64, fua: bool) -> Option<io::Result<()>> {
        // On a remote filesystem a buffered write waits for the server (FUSE and NFS write through
        // or throttle on it); done in place it would stall a runtime thread, and every request on
        // it, for the whole outage. There, every write goes through the engine.
        if self.direct || fua || self.remote_fs {
            return None;
        }
        if !self.nowait_writes.load(Ordering::Relaxed) {
            // Without NOWAIT support, io_uring would punt every buffered write to a kernel
            // worker thread (a hop each way). A buffered write is a copy into the page cache
            // and blocks only under dirty-page throttling, so do it here, as nbdkit's worker
            // threads do. Block devices and O_DIRECT files never take this path.
            return Some(engine_sync::pwrite_full(self.fd.as_raw_fd(), data, offset, false));
        }
        // The kernel only reads through the pointer of a write.
        match engine_sync::try_nowait(self.fd.as_raw_fd(), data.as_ptr().cast_mut(), data.len(), offset, true) {
            Ok(n) if n == data.len() => return Some(Ok(())),
            // The filesystem cannot do non-blocking buffered writes (ext4): stop asking.
            Err(libc::EOPNOTSUPP) => self.nowait_writes.store(false, Ordering::Relaxed),
            _ => {}
        }
        // Rewriting an already-written prefix with the same bytes is harmless.
        None
    }

    async fn raw_write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len();
        if let Some(r) = self.write_in_place(&buf, offset, fua) {
            return (buf, r);
        }
        let (b, r) = match &self.engine {
            Engine::Uring(u) => u.submit(UringOp::Write { fd: self.fd.clone(), buf, offset, dsync: fua }).await,
            Engine::Sync => engine_sync::write(self.fd.clone(), buf, offset, fua).await,
        };
        (b.unwrap_or_else(|| AlignedBuf::zeroed(len)), r)
    }

    /// [`Self::raw_write`] from a shared buffer: the same paths, with no copy on any of them.
    async fn raw_write_shared(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        if let Some(r) = self.write_in_place(&data, offset, fua) {
            return r;
        }
        match &self.engine {
            Engine::Uring(u) => {
                u.submit(UringOp::WriteShared { fd: self.fd.clone(), buf: data, offset, dsync: fua }).await.1
            }
            Engine::Sync => {
                let fd = self.fd.clone();
                engine_sync::blocking(move || engine_sync::pwrite_full(fd.as_raw_fd(), &data, offset, fua)).await?
            }
        }
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        match &self.engine {
            Engine::Uring(u) => u.submit(UringOp::Fallocate { fd: self.fd.clone(), mode, offset, len }).await.1,
            Engine::Sync => {
                let fd = self.fd.clone();
                engine_sync::blocking(move || engine_sync::fallocate(fd.as_raw_fd(), mode, offset, len)).await?
            }
        }
    }
}

impl align::BlockIo for FileDevice {
    fn io_align(&self) -> u64 {
        self.align()
    }

    /// fallocate on a block device takes whole logical blocks only; on a file, any range.
    fn zero_align(&self) -> u64 {
        u64::from(if self.is_block_device { self.logical_block_bytes } else { 1 })
    }

    fn rmw_locks(&self) -> &RangeLocks {
        &self.rmw_locks
    }

    async fn raw_read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        FileDevice::raw_read(self, offset, buf).await
    }

    async fn raw_write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        FileDevice::raw_write(self, offset, buf, fua).await
    }

    async fn raw_write_shared(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        FileDevice::raw_write_shared(self, offset, data, fua).await
    }

    /// fallocate, falling back to the other mode where that is a safe substitute; `Unsupported`
    /// when neither works, so zeroes are written instead.
    async fn zero_blocks(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let mode =
            libc::FALLOC_FL_KEEP_SIZE | if may_unmap { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
        match self.fallocate(mode, offset, len).await {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // PUNCH_HOLE when NO_HOLE was asked would break the client's request, so only
                // the unmap→zero-range direction is a valid substitute.
                let alt = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_ZERO_RANGE;
                if may_unmap && self.fallocate(alt, offset, len).await.is_ok() {
                    return Ok(());
                }
                Err(io::ErrorKind::Unsupported.into())
            }
            r => r,
        }
    }
}

impl BlockDevice for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn identity(&self) -> Option<DeviceId> {
        Some(self.id)
    }
    /// Drops the range's clean pages from a buffered regular file. Why: on Linux 6.18 ext4, the
    /// rebuild's 1 MiB writes (and sequential readahead) leave large folios in the page cache,
    /// and each later 4 KiB buffered write into a large folio walks all of its blocks
    /// (`ext4_block_write_begin`): the mirror's random writes ran at a third of the speed until
    /// the rebuilt pages were dropped (docs/PERFORMANCE.md). Dirty pages are left alone.
    fn drop_cached(&self, offset: u64, len: u64) {
        if self.direct || self.is_block_device {
            return;
        }
        // The kernel drops only whole folios inside the range; the largest (a PMD, 2 MiB with
        // 4 KiB pages) can straddle the range's ends, so widen it to that alignment. The
        // neighbours' clean pages go too, which costs at most a re-read.
        const FOLIO_MAX_BYTES: u64 = 2 << 20;
        let start = offset / FOLIO_MAX_BYTES * FOLIO_MAX_BYTES;
        let end = offset.saturating_add(len).div_ceil(FOLIO_MAX_BYTES) * FOLIO_MAX_BYTES;
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(start), libc::off_t::try_from(end - start)) else { return };
        // SAFETY: an advisory syscall on our descriptor; failure changes nothing.
        unsafe { libc::posix_fadvise(self.fd.as_raw_fd(), off, l, libc::POSIX_FADV_DONTNEED) };
    }

    /// Only a buffered file or block device on a local filesystem, and only while every page of
    /// the range is in the page cache (`cachestat`): `sendfile` on the runtime's thread must not
    /// wait for the device. A page evicted between this check and the send costs one synchronous
    /// read of that page, nothing worse.
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<FileSlice> {
        if self.direct || self.remote_fs || len == 0 || offset.checked_add(len as u64)? > self.size_bytes {
            return None;
        }
        page_cache_holds(self.fd.as_raw_fd(), offset, len as u64).then(|| FileSlice {
            file: self.page_cache.clone(),
            offset,
            len,
        })
    }

    fn logical_block_bytes(&self) -> u32 {
        self.logical_block_bytes
    }

    fn fast_zero(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        align::read(self, offset, buf).await
    }

    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        align::write(self, offset, buf, fua).await
    }

    async fn write_shared(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        align::write_shared(self, offset, data, fua).await
    }

    async fn flush(&self) -> io::Result<()> {
        match &self.engine {
            Engine::Uring(u) => u.submit(UringOp::Fsync { fd: self.fd.clone() }).await.1,
            Engine::Sync => {
                let fd = self.fd.clone();
                engine_sync::blocking(move || engine_sync::fdatasync(fd.as_raw_fd())).await?
            }
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        align::write_zeroes(self, offset, len, may_unmap).await
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        if self.is_block_device || len == 0 {
            return Ok(vec![Extent { length_bytes: len, hole: false }]);
        }
        let fd = self.fd.clone();
        engine_sync::blocking(move || seek_extents(fd.as_raw_fd(), offset, offset + len)).await?
    }
}

/// Whether `fd` is on a filesystem whose I/O can wait on a server or a userspace process (statfs
/// magic numbers from linux/magic.h and the filesystems' sources).
fn on_remote_filesystem(fd: i32) -> bool {
    const REMOTE: [u32; 12] = [
        0x6573_5546, // FUSE (sshfs, nbdfuse, s3fs, glusterfs, …)
        0x0000_6969, // NFS
        0xff53_4d42, // CIFS
        0xfe53_4d42, // SMB2
        0x0000_517b, // SMB
        0x00c3_6400, // Ceph
        0x0102_1997, // 9p
        0x5346_414f, // AFS
        0x7375_7245, // Coda
        0x0bd0_0bd0, // Lustre
        0x7461_636f, // OCFS2
        0x0116_1970, // GFS2
    ];
    // SAFETY: fstatfs fills the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(fd, &mut st) } < 0 {
        return false;
    }
    // Magic numbers are 32-bit; f_type is signed and word-sized.
    REMOTE.contains(&(st.f_type as u32))
}

/// Walks SEEK_DATA/SEEK_HOLE over `[start, end)`. Filesystems without hole support report one
/// data extent, which is correct (allocated-or-unknown).
fn seek_extents(fd: i32, start: u64, end: u64) -> io::Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = start;
    let seek = |whence: i32, at: u64| -> io::Result<Option<u64>> {
        // SAFETY: lseek on our fd.
        let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
        }
        Ok(Some(r as u64))
    };
    while pos < end && out.len() < MAX_EXTENTS {
        let data = match seek(libc::SEEK_DATA, pos) {
            Ok(d) => d.unwrap_or(end).min(end),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(vec![Extent { length_bytes: end - start, hole: false }]);
            }
            Err(e) => return Err(e),
        };
        if data > pos {
            out.push(Extent { length_bytes: data - pos, hole: true });
            pos = data;
            continue;
        }
        let hole = seek(libc::SEEK_HOLE, pos)?.unwrap_or(end).min(end);
        let hole = hole.max(pos + 1);
        out.push(Extent { length_bytes: hole - pos, hole: false });
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;

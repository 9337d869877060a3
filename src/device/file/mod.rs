//! The real device: a regular file or a block device, opened buffered or O_DIRECT, with its
//! geometry (BLKGETSIZE64, BLKSSZGET) and an exclusive lock, its requests issued by one of three
//! engines: io_uring on the calling worker's own ring (`uring_inline`, the default), io_uring on
//! a ring thread per device (`uring`), or pread/pwrite on the blocking pool (`psync`). Byte-granular
//! requests on an aligned-only device go through `device::align`.

pub mod page_cache;
mod probe;
mod psync;
#[cfg(test)]
pub(crate) mod tests;
pub mod uring;
mod uring_inline;

use super::{align, AlignedBuf, BlockDevice, DeviceId, Extent, FileSlice, RangeLocks};
use page_cache::PageCacheFile;
pub use probe::page_cache_visible;
use probe::{on_remote_filesystem, page_cache_holds, seek_extents};
use psync as engine_sync;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use uring::{UringEngine, UringOp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring, each operation submitted on the runtime worker's own ring (`uring_inline`),
    /// falling back to psync if the kernel refuses io_uring.
    #[default]
    Uring,
    /// io_uring through one ring thread per device (the engine before `uring_inline`; kept to
    /// compare against).
    UringThread,
    Psync,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            "uring-thread" => Ok(EngineKind::UringThread),
            "psync" | "sync" => Ok(EngineKind::Psync),
            _ => Err(format!("unknown I/O engine {s:?}: expected \"uring\", \"uring-thread\" or \"psync\"")),
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

/// An exclusive advisory lock: two daemons writing one device would corrupt it silently. A daemon
/// that was just SIGKILLed with io_uring requests in flight releases its files a moment after it is
/// reaped, so a restart retries briefly before calling the device busy.
fn lock_exclusive(path: &Path, raw: std::os::fd::RawFd) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LOCK_RETRY;
    // SAFETY: plain syscall on our descriptor.
    while unsafe { libc::flock(raw, libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || std::time::Instant::now() >= deadline {
            return Err(annotate(path, "already in use by another process (flock)", e));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// Size and logical block size: the kernel's for a block device; for a file, its length, and
/// 4096 under O_DIRECT (the filesystem's alignment; 4096 satisfies every common one).
fn geometry(path: &Path, raw: std::os::fd::RawFd, meta: &std::fs::Metadata, direct: bool) -> io::Result<(u64, u32)> {
    if !meta.file_type().is_block_device() {
        return Ok((meta.len(), if direct { 4096 } else { 1 }));
    }
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
    Ok((size, u32::try_from(ssz).unwrap_or(512).max(512)))
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
        lock_exclusive(path, fd.as_raw_fd())?;
        Self::finish_open(path, fd, &meta, direct, opts)
    }

    /// A device the previous process had open, handed over with its descriptor (an in-place
    /// upgrade): the same open file, so the same exclusive lock, which this process now holds too.
    /// Refused unless the descriptor is the file at `path` and opened as `opts` asks.
    pub fn adopt(path: &Path, fd: OwnedFd, opts: &OpenOptions) -> io::Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| annotate(path, "cannot stat", e))?;
        let held = std::fs::File::from(fd);
        let held_meta = held.metadata().map_err(|e| annotate(path, "cannot stat the handed-over descriptor", e))?;
        let same = if meta.file_type().is_block_device() {
            meta.rdev() == held_meta.rdev()
        } else {
            meta.ino() == held_meta.ino() && meta.dev() == held_meta.dev()
        };
        if !same {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: the handed-over descriptor is another file", path.display()),
            ));
        }
        let fd: OwnedFd = held.into();
        // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
        let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if fl < 0 {
            return Err(annotate(path, "cannot read the handed-over descriptor's flags", io::Error::last_os_error()));
        }
        let direct = fl & libc::O_DIRECT != 0;
        let writable = fl & libc::O_ACCMODE == libc::O_RDWR;
        if opts.direct.is_some_and(|d| d != direct) || writable == opts.read_only {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: the handed-over descriptor was opened with other flags (direct={direct}, writable={writable})",
                    path.display()
                ),
            ));
        }
        // Re-taking the lock on the same open file only confirms it.
        lock_exclusive(path, fd.as_raw_fd())?;
        Self::finish_open(path, fd, &meta, direct, opts)
    }

    fn finish_open(
        path: &Path,
        fd: OwnedFd,
        meta: &std::fs::Metadata,
        direct: bool,
        opts: &OpenOptions,
    ) -> io::Result<Self> {
        let raw = fd.as_raw_fd();
        let is_block_device = meta.file_type().is_block_device();
        let (size_bytes, logical_block_bytes) = geometry(path, raw, meta, direct)?;
        let remote_fs = !is_block_device && on_remote_filesystem(raw);
        let engine = match opts.engine {
            EngineKind::Psync => Engine::Sync,
            EngineKind::Uring | EngineKind::UringThread => match UringEngine::new(
                &path.file_name().unwrap_or_default().to_string_lossy(),
                raw,
                opts.engine == EngineKind::Uring,
            ) {
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
            id: DeviceId::of(meta),
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

    /// A duplicate of the device's descriptor (the same open file and lock), for a handover.
    pub fn dup_fd(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.fd.as_fd().try_clone_to_owned()
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
    fn open_files(&self, out: &mut Vec<super::OpenFile>) {
        match self.dup_fd() {
            Ok(fd) => out.push(super::OpenFile { path: self.path.clone(), fd }),
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot duplicate the descriptor"),
        }
    }
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

//! What the kernel says about an open file: whether a range is in the page cache (`cachestat`),
//! whether the filesystem is one whose I/O can wait on a server, and where its holes are.

use super::super::Extent;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

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
pub(super) fn page_cache_holds(fd: std::os::fd::RawFd, offset: u64, len: u64) -> bool {
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

/// Whether `fd` is on a filesystem whose I/O can wait on a server or a userspace process (statfs
/// magic numbers from linux/magic.h and the filesystems' sources).
pub(super) fn on_remote_filesystem(fd: i32) -> bool {
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
    // SAFETY: the struct is ours and of the size fstatfs writes.
    if unsafe { libc::fstatfs(fd, &mut st) } < 0 {
        return false;
    }
    // Magic numbers are 32-bit; f_type is signed and word-sized.
    REMOTE.contains(&(st.f_type as u32))
}

/// Walks SEEK_DATA/SEEK_HOLE over `[start, end)`. Filesystems without hole support report one
/// data extent, which is correct (allocated-or-unknown).
pub(super) fn seek_extents(fd: i32, start: u64, end: u64) -> io::Result<Vec<Extent>> {
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

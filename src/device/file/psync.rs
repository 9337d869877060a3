//! The portable engine: plain pread/pwrite/fdatasync/fallocate on tokio's blocking pool. Used where
//! io_uring is unavailable (old kernels, seccomp profiles that forbid it) or when selected.

use crate::device::buf::AlignedBuf;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

pub(crate) fn pread_full(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let off =
            libc::off_t::try_from(offset + done as u64).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::pread(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done, off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        done += n as usize;
    }
    Ok(())
}

pub(crate) fn pwrite_full(fd: RawFd, buf: &[u8], offset: u64, dsync: bool) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let iov = libc::iovec { iov_base: buf[done..].as_ptr() as *mut _, iov_len: buf.len() - done };
        let off =
            libc::off_t::try_from(offset + done as u64).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        // SAFETY: one iovec describing the unwritten tail of `buf`.
        let n = unsafe { libc::pwritev2(fd, &iov, 1, off, flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n as usize;
    }
    Ok(())
}

/// Tries to complete a buffered read or write without blocking (RWF_NOWAIT): succeeds when the
/// data is in the page cache, so the common hit costs one syscall on the caller's thread instead of
/// a hop to the ring or the blocking pool. Returns the bytes transferred (possibly short, possibly
/// 0); the caller finishes the rest through the engine.
pub(crate) fn try_nowait(fd: RawFd, buf: *mut u8, len: usize, offset: u64, write: bool) -> Result<usize, i32> {
    let Ok(off) = libc::off_t::try_from(offset) else { return Ok(0) };
    let iov = libc::iovec { iov_base: buf.cast(), iov_len: len };
    // SAFETY: the iovec describes memory the caller owns for the duration of the call.
    let n = unsafe {
        if write {
            libc::pwritev2(fd, &iov, 1, off, libc::RWF_NOWAIT)
        } else {
            libc::preadv2(fd, &iov, 1, off, libc::RWF_NOWAIT)
        }
    };
    if n < 0 {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        Ok(n as usize)
    }
}

pub(crate) fn fdatasync(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the caller keeps open.
    if unsafe { libc::fdatasync(fd) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
    );
    // SAFETY: plain syscall.
    if unsafe { libc::fallocate(fd, mode, o, l) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs a blocking syscall on the blocking pool, mapping a lost task to EIO.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| io::Error::other(format!("I/O task failed: {e}")))
}

pub(crate) async fn read(fd: Arc<OwnedFd>, mut buf: AlignedBuf, offset: u64) -> (Option<AlignedBuf>, io::Result<()>) {
    match blocking(move || {
        let r = pread_full(fd.as_raw_fd(), &mut buf, offset);
        (buf, r)
    })
    .await
    {
        Ok((b, r)) => (Some(b), r),
        Err(e) => (None, Err(e)),
    }
}

pub(crate) async fn write(
    fd: Arc<OwnedFd>,
    buf: AlignedBuf,
    offset: u64,
    dsync: bool,
) -> (Option<AlignedBuf>, io::Result<()>) {
    match blocking(move || {
        let r = pwrite_full(fd.as_raw_fd(), &buf, offset, dsync);
        (buf, r)
    })
    .await
    {
        Ok((b, r)) => (Some(b), r),
        Err(e) => (None, Err(e)),
    }
}

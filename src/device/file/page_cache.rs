//! A device file's page cache, mapped read-only so a large read can be written to a socket
//! straight from its pages: one copy (page cache → socket buffer) instead of two (page cache →
//! our buffer → socket buffer), and one system call instead of a read plus a send.
//!
//! Safety rests on one rule: **user space never touches the mapping**. Only the kernel reads it,
//! inside `send(2)`. A page that cannot be read (an I/O error, or a file cut short under us) then
//! fails the kernel's copy with `EFAULT`, and the caller reads those bytes the ordinary way; the
//! same access from user space would be a `SIGBUS` that kills the daemon. So the mapping is only
//! ever handed out as a raw pointer and length, never as a Rust slice.
//!
//! Page tables cost memory (8 bytes per 4 KiB page touched, kept while mapped), so a file is
//! mapped in windows of `WINDOW_BYTES`, at most `MAX_WINDOWS` at once, the least recently used
//! unmapped first: at most 4 GiB of a file mapped, 8 MiB of page tables, whatever its size.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// One mapped window's span of the file. Large enough that a sequential reader maps a new one
/// only every 256 MiB; small enough that the mapping of a huge cache is bounded by `MAX_WINDOWS`.
pub const WINDOW_BYTES: u64 = 256 << 20;
/// Windows mapped at once per file.
pub const MAX_WINDOWS: usize = 16;

/// An open device file whose bytes can be sent from the page cache, by `sendfile` on its
/// descriptor or by `send` from a mapped window. Holding it keeps the descriptor open.
pub struct PageCacheFile {
    fd: Arc<OwnedFd>,
    size_bytes: u64,
    windows: Mutex<Windows>,
}

#[derive(Default)]
struct Windows {
    uses: u64,
    /// (window index, last use, window); a window still being sent from stays mapped through
    /// its `Arc` even after it leaves this list.
    live: Vec<(u64, u64, Arc<Window>)>,
}

/// `[file_offset, file_offset + len)` of the file, mapped read-only and shared.
pub struct Window {
    base: NonNull<u8>,
    file_offset: u64,
    len: usize,
}

// SAFETY: the mapping is read-only, never dereferenced in user space (see the module comment), and
// unmapped exactly once, by the last owner's drop.
unsafe impl Send for Window {}
// SAFETY: as above; `span` only computes addresses.
unsafe impl Sync for Window {}

impl Window {
    /// Address and length of the file's bytes from `offset`, at most `len`, clipped to the end of
    /// the window. Only for the kernel to read (`send`); never to be made into a slice.
    pub fn span(&self, offset: u64, len: usize) -> (*const u8, usize) {
        assert!(
            offset >= self.file_offset && offset < self.file_offset + self.len as u64,
            "offset {offset} is outside the window at {} of {} bytes",
            self.file_offset,
            self.len
        );
        let skip = (offset - self.file_offset) as usize;
        // SAFETY: `skip < self.len`, so the address lies inside the mapping.
        let ptr = unsafe { self.base.as_ptr().add(skip) };
        (ptr.cast_const(), len.min(self.len - skip))
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned, and this is the last owner.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl PageCacheFile {
    pub fn new(fd: Arc<OwnedFd>, size_bytes: u64) -> Self {
        PageCacheFile { fd, size_bytes, windows: Mutex::default() }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The window holding `offset`, mapping it if it is not mapped (and unmapping the least
    /// recently used one if `MAX_WINDOWS` are).
    pub fn window(&self, offset: u64) -> io::Result<Arc<Window>> {
        if offset >= self.size_bytes {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("offset {offset} is past the file's end")));
        }
        let index = offset / WINDOW_BYTES;
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        w.uses += 1;
        let now = w.uses;
        if let Some(entry) = w.live.iter_mut().find(|e| e.0 == index) {
            entry.1 = now;
            return Ok(entry.2.clone());
        }
        let window = Arc::new(self.map(index)?);
        if w.live.len() >= MAX_WINDOWS {
            let oldest = (0..w.live.len()).min_by_key(|&i| w.live[i].1).expect("the list is full");
            w.live.swap_remove(oldest);
        }
        w.live.push((index, now, window.clone()));
        Ok(window)
    }

    fn map(&self, index: u64) -> io::Result<Window> {
        let file_offset = index * WINDOW_BYTES;
        let len = usize::try_from(WINDOW_BYTES.min(self.size_bytes - file_offset))
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let off = libc::off_t::try_from(file_offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh read-only shared mapping of our own descriptor; the kernel picks the
        // address. No page is touched here (no MAP_POPULATE): pages are mapped as sends fault them.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, self.fd.as_raw_fd(), off)
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Window { base, file_offset, len })
    }

    #[cfg(test)]
    fn mapped_windows(&self) -> Vec<u64> {
        let w = self.windows.lock().unwrap();
        let mut v: Vec<u64> = w.live.iter().map(|e| e.0).collect();
        v.sort_unstable();
        v
    }
}

impl std::fmt::Debug for PageCacheFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCacheFile").field("fd", &self.fd.as_raw_fd()).field("size_bytes", &self.size_bytes).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;

    /// `send(2)` from a window, as the connection's writer does it, on a blocking socket.
    fn send_from(w: &Window, sock: &UnixStream, offset: u64, len: usize) -> io::Result<usize> {
        let (ptr, n) = w.span(offset, len);
        // SAFETY: `ptr..ptr+n` lies inside the mapping `w` keeps alive; only the kernel reads it.
        let sent = unsafe { libc::send(sock.as_raw_fd(), ptr.cast(), n, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
    }

    fn file_of(len: usize) -> (tempfile::TempDir, std::fs::File, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        f.write_all_at(&bytes, 0).unwrap();
        (dir, f, bytes)
    }

    #[test]
    fn sends_the_files_bytes_and_sees_later_writes() {
        let (_dir, f, mut bytes) = file_of(1 << 20);
        let pc = PageCacheFile::new(Arc::new(OwnedFd::from(f.try_clone().unwrap())), bytes.len() as u64);
        let (a, mut b) = UnixStream::pair().unwrap();
        let w = pc.window(4096).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 2 * 65536];
            b.read_exact(&mut got).unwrap();
            got
        });
        assert_eq!(send_from(&w, &a, 100, 65536).unwrap(), 65536);
        // A write through the descriptor is what the next send sees: the mapping is the page cache.
        bytes[200_000..200_000 + 65536].fill(0xAB);
        f.write_all_at(&bytes[200_000..200_000 + 65536], 200_000).unwrap();
        let mut sent = 0;
        while sent < 65536 {
            sent += send_from(&w, &a, 200_000 + sent as u64, 65536 - sent).unwrap();
        }
        let got = reader.join().unwrap();
        assert!(got[..65536] == bytes[100..100 + 65536]);
        assert!(got[65536..] == bytes[200_000..200_000 + 65536]);
        // The span is clipped to the window's (here the file's) end.
        assert_eq!(w.span(bytes.len() as u64 - 10, 4096).1, 10);
        assert!(pc.window(bytes.len() as u64).is_err());
    }

    /// The reason the mapping is never read from user space: a page the kernel cannot supply
    /// (here, cut off by truncation; an I/O error goes the same way) fails the send with EFAULT
    /// instead of killing the process with SIGBUS.
    #[test]
    fn a_page_that_cannot_be_read_fails_the_send_instead_of_raising_sigbus() {
        let (_dir, f, bytes) = file_of(1 << 20);
        let pc = PageCacheFile::new(Arc::new(OwnedFd::from(f.try_clone().unwrap())), bytes.len() as u64);
        let (a, mut b) = UnixStream::pair().unwrap();
        let w = pc.window(0).unwrap();
        // Fault the pages in first, so the truncation has mapped pages to take away.
        assert_eq!(send_from(&w, &a, 0, 8192).unwrap(), 8192);
        let mut first = vec![0u8; 8192];
        b.read_exact(&mut first).unwrap();
        assert!(first == bytes[..8192]);
        f.set_len(4096).unwrap();
        let e = send_from(&w, &a, 8192, 65536).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
        // What is still in the file is still sent.
        assert_eq!(send_from(&w, &a, 0, 4096).unwrap(), 4096);
    }

    #[test]
    fn maps_windows_on_demand_and_keeps_at_most_max_windows() {
        let dir = tempfile::tempdir().unwrap();
        // Readable: a write-only descriptor cannot be mapped, and devices are opened read-write.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("sparse"))
            .unwrap();
        let size = WINDOW_BYTES * (MAX_WINDOWS as u64 + 3) + 4096;
        f.set_len(size).unwrap();
        let pc = PageCacheFile::new(Arc::new(OwnedFd::from(f)), size);
        let held = pc.window(0).unwrap();
        for i in 1..=MAX_WINDOWS as u64 + 2 {
            let w = pc.window(i * WINDOW_BYTES + 5).unwrap();
            assert_eq!(w.span(i * WINDOW_BYTES + 5, 100).1, 100);
            // Window 0 stays most recently used, so others are the ones unmapped.
            pc.window(1).unwrap();
        }
        let live = pc.mapped_windows();
        assert_eq!(live.len(), MAX_WINDOWS);
        assert!(live.contains(&0), "{live:?}");
        // The last, short window ends at the file's end.
        let last = pc.window(size - 1).unwrap();
        assert_eq!(last.span(size - 4096, 1 << 20).1, 4096);
        // A window dropped from the list stays usable by whoever still holds it.
        assert_eq!(held.span(0, 10).1, 10);
    }
}

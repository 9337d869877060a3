//! An in-memory block device with crash semantics, for tests that must lose power on purpose.
//!
//! The model is a disk with a volatile write cache that honours FLUSH and FUA but may persist the
//! writes in between in any subset (a subset per write, applied in issue order), and may tear a
//! write at a 512-byte sector boundary:
//!
//! ```text
//!   durable image (as of the last flush) ──┐
//!   pending: [w1, w2 (FUA), w3, …]  ───────┴─► crash(): durable + w2 + each other wi kept, dropped
//!                                                       or cut to a sector-aligned prefix
//! ```
//!
//! Reads always see every completed write (the volatile view). Clones share one device, so a test
//! can hand one clone to a volume, crash the device, and open a new volume over [`MemDevice::reopen`].
//! A crash also "powers off" every handle that existed before it: their operations fail with EIO
//! from then on, so a volume (or a background task of one) that outlives the crash cannot write into
//! the image that the next incarnation reads.
//!
//! A failed write-back follows Linux's errseq semantics ([`SimStorage::lose_unflushed`]): the
//! writes since the last good flush are gone from what survives a crash, reads keep seeing them
//! (the page cache keeps the pages, now clean) until [`BlockDevice::drop_cached`] evicts them, and
//! the next flush succeeds, as the next `fdatasync` after an EIO does.
//!
//! [`super::shadow::ShadowDisk`] is the other half of the story: the model of what such a disk may legally read
//! as, which model-based tests check every read against (tests/plain_model.rs,
//! tests/mirror_model.rs). A unit test below keeps the two in agreement.

use crate::device::rng::SimRng;
use crate::device::{align, AlignedBuf, BlockDevice, Extent};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// The granularity at which a crash may tear a write, as a disk's sector does.
pub const TEAR_GRANULARITY_BYTES: u64 = 512;
/// The granularity of [`BlockDevice::allocation`] answers.
pub const ALLOCATION_BLOCK_BYTES: u64 = 4096;

#[derive(Clone, Debug)]
enum PendingData {
    Bytes(Vec<u8>),
    Zeroes(u64),
}

#[derive(Clone, Debug)]
struct PendingWrite {
    offset: u64,
    data: PendingData,
    /// A FUA write survives every crash; it is kept in the log (rather than folded into the durable
    /// image) so that an earlier unflushed write to the same bytes cannot be replayed over it.
    fua: bool,
}

impl PendingWrite {
    fn len(&self) -> u64 {
        match &self.data {
            PendingData::Bytes(b) => b.len() as u64,
            PendingData::Zeroes(n) => *n,
        }
    }

    /// Applies the first `keep` bytes of the write to `image`.
    fn apply_prefix(&self, image: &mut [u8], keep: u64) {
        let start = self.offset as usize;
        let keep = keep.min(self.len()) as usize;
        match &self.data {
            PendingData::Bytes(b) => image[start..start + keep].copy_from_slice(&b[..keep]),
            PendingData::Zeroes(_) => image[start..start + keep].fill(0),
        }
    }
}

/// What a crash did, for tests that want to assert on it or print it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    pub kept: usize,
    pub dropped: usize,
    pub torn: usize,
    pub fua: usize,
}

struct State {
    /// What reads see: every completed write.
    current: Vec<u8>,
    /// What survives a crash for certain: the image as of the last flush.
    durable: Vec<u8>,
    pending: Vec<PendingWrite>,
    /// Bumped by every crash; handles from an older power cycle are dead.
    power_cycle: u64,
    flushes: u64,
}

#[derive(Clone)]
pub struct MemDevice {
    state: Arc<Mutex<State>>,
    power_cycle: u64,
    logical_block_bytes: u32,
    /// Set by [`MemDevice::with_logical_block_bytes`]: native I/O only in whole logical blocks,
    /// byte-granular requests through the alignment layer, as on a block device or O_DIRECT.
    strict: bool,
    rmw_locks: Arc<crate::device::RangeLocks>,
}

/// A dead handle fails as a device that lost power does: a bare EIO, which the NBD layer maps by
/// its errno.
fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("memory device: [{offset}, +{len}) is past the end of the device ({size} bytes)"),
        )),
    }
}

impl MemDevice {
    /// A zero-filled device of `size_bytes` (which counts as durable: a fresh disk reads as zeroes).
    pub fn new(size_bytes: u64) -> Self {
        Self::from_image(vec![0; usize::try_from(size_bytes).expect("memory device fits in memory")])
    }

    /// A device whose durable contents are `image`.
    pub fn from_image(image: Vec<u8>) -> Self {
        MemDevice {
            state: Arc::new(Mutex::new(State {
                current: image.clone(),
                durable: image,
                pending: Vec::new(),
                power_cycle: 0,
                flushes: 0,
            })),
            power_cycle: 0,
            logical_block_bytes: 512,
            strict: false,
            rmw_locks: Arc::default(),
        }
    }

    /// The same device as a block device of `bytes` logical blocks: it does native I/O (and
    /// zeroing) only in whole blocks, refusing anything else with EINVAL, and serves
    /// byte-granular requests through the same alignment layer (`device::align`) as `FileDevice`
    /// does for block devices and O_DIRECT. Without it the device is byte-granular.
    pub fn with_logical_block_bytes(mut self, bytes: u32) -> Self {
        assert!(bytes.is_power_of_two(), "logical block size must be a power of two");
        self.logical_block_bytes = bytes;
        self.strict = bytes > 1;
        self
    }

    fn native_align(&self) -> u64 {
        if self.strict {
            u64::from(self.logical_block_bytes)
        } else {
            1
        }
    }

    /// EINVAL for what a block device refuses: a range not in whole logical blocks.
    fn check_aligned(&self, offset: u64, len: u64) -> io::Result<()> {
        let a = self.native_align();
        if offset % a == 0 && len % a == 0 {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("memory device: [{offset}, +{len}) is not in whole {a}-byte blocks"),
        ))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock already failed; the image is still usable
        // for its report.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> io::Result<MutexGuard<'_, State>> {
        let st = self.lock();
        if st.power_cycle != self.power_cycle {
            return Err(eio());
        }
        Ok(st)
    }

    /// Loses power: each unflushed, non-FUA write is independently kept, dropped, or (with a
    /// sector boundary inside it) torn to a prefix; FUA writes and everything flushed survive.
    /// Afterwards the device holds exactly the surviving image and every existing handle is dead.
    pub fn crash(&self, rng: &mut SimRng) -> CrashReport {
        let mut st = self.lock();
        let mut image = std::mem::take(&mut st.durable);
        let mut report = CrashReport::default();
        // Issue order matters: a later write to the same bytes wins if both survive, as a disk
        // never lets an older cached write overtake a newer one to the same sector.
        for w in &st.pending {
            let len = w.len();
            if w.fua {
                w.apply_prefix(&mut image, len);
                report.fua += 1;
                continue;
            }
            // Sector boundaries strictly inside the write: the places it can be torn.
            let first_cut = (w.offset / TEAR_GRANULARITY_BYTES + 1) * TEAR_GRANULARITY_BYTES;
            let end = w.offset + len;
            let cuts = if first_cut < end { (end - 1 - first_cut) / TEAR_GRANULARITY_BYTES + 1 } else { 0 };
            match rng.below(8) {
                0..=2 => report.dropped += 1,
                3 if cuts > 0 => {
                    let cut = first_cut + rng.below(cuts) * TEAR_GRANULARITY_BYTES;
                    w.apply_prefix(&mut image, cut - w.offset);
                    report.torn += 1;
                }
                _ => {
                    w.apply_prefix(&mut image, len);
                    report.kept += 1;
                }
            }
        }
        st.pending.clear();
        st.current.clone_from(&image);
        st.durable = image;
        st.power_cycle += 1;
        report
    }

    /// Makes every existing handle dead without losing anything, as the exit of the process that
    /// held them does: a test "restarts" a volume cleanly with this and [`MemDevice::reopen`], so
    /// no task left over from the old volume can write under the new one.
    pub fn revoke_handles(&self) {
        self.lock().power_cycle += 1;
    }

    /// A live handle after a crash (power restored). Other handles stay dead.
    pub fn reopen(&self) -> MemDevice {
        let power_cycle = self.lock().power_cycle;
        MemDevice { state: self.state.clone(), power_cycle, ..self.clone() }
    }

    /// Whether this handle still works (no crash since it was made).
    pub fn is_live(&self) -> bool {
        self.lock().power_cycle == self.power_cycle
    }

    /// The volatile view: what a read would return now.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// What survives a crash for certain (the image as of the last flush, without FUA writes since).
    pub fn durable_contents(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// Writes (FUA ones included) since the last flush.
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }
}

/// What a simulated storage device does when a write-back fails (see the module docs).
pub trait SimStorage {
    /// Linux's errseq behaviour after a failed `fdatasync` (or a failed `RWF_DSYNC` write):
    /// every unflushed, non-FUA write is dropped from what the media will hold, while reads keep
    /// returning it until the range is evicted ([`BlockDevice::drop_cached`]) or power is lost.
    /// Returns how many writes were dropped.
    fn lose_unflushed(&self) -> usize;
}

impl SimStorage for MemDevice {
    fn lose_unflushed(&self) -> usize {
        let mut st = self.lock();
        let st = &mut *st;
        let mut dropped = 0;
        for w in std::mem::take(&mut st.pending) {
            if w.fua {
                w.apply_prefix(&mut st.durable, w.len());
            } else {
                dropped += 1;
            }
        }
        dropped
    }
}

impl align::BlockIo for MemDevice {
    fn io_align(&self) -> u64 {
        self.native_align()
    }

    fn zero_align(&self) -> u64 {
        self.native_align()
    }

    fn rmw_locks(&self) -> &crate::device::RangeLocks {
        &self.rmw_locks
    }

    async fn raw_read(&self, offset: u64, mut buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let r = (|| {
            self.check_aligned(offset, buf.len() as u64)?;
            let st = self.live()?;
            check_range(offset, buf.len() as u64, st.current.len() as u64)?;
            let (start, n) = (offset as usize, buf.len());
            buf.copy_from_slice(&st.current[start..start + n]);
            Ok(())
        })();
        (buf, r)
    }

    async fn raw_write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        let r = self.store(offset, &buf, fua);
        (buf, r)
    }

    async fn raw_write_shared(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        self.store(offset, &data, fua)
    }

    async fn zero_blocks(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.check_aligned(offset, len)?;
        let mut st = self.live()?;
        check_range(offset, len, st.current.len() as u64)?;
        if len == 0 {
            return Ok(());
        }
        let start = offset as usize;
        st.current[start..start + len as usize].fill(0);
        st.pending.push(PendingWrite { offset, data: PendingData::Zeroes(len), fua: false });
        Ok(())
    }
}

impl MemDevice {
    /// One native write: visible to reads at once, durable at the next flush (or now, with FUA).
    fn store(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check_aligned(offset, data.len() as u64)?;
        let mut st = self.live()?;
        check_range(offset, data.len() as u64, st.current.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let start = offset as usize;
        st.current[start..start + data.len()].copy_from_slice(data);
        st.pending.push(PendingWrite { offset, data: PendingData::Bytes(data.to_vec()), fua });
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.lock().current.len() as u64
    }
    /// Every handle of one simulated device (clones, reopens) is the same device.
    fn identity(&self) -> Option<crate::device::DeviceId> {
        Some(crate::device::DeviceId { major_space: u64::MAX, minor_space: Arc::as_ptr(&self.state) as u64 })
    }

    fn logical_block_bytes(&self) -> u32 {
        self.logical_block_bytes
    }

    fn fast_zero(&self) -> bool {
        true
    }

    /// Evicts the range from the simulated page cache: reads of it return what the media holds
    /// plus the writes since the last flush. Only a write-back lost by [`SimStorage::lose_unflushed`]
    /// makes that differ from what reads returned before, as on Linux.
    fn drop_cached(&self, offset: u64, len: u64) {
        let Ok(mut st) = self.live() else { return };
        let size = st.current.len() as u64;
        let (start, end) = (offset.min(size), offset.saturating_add(len).min(size));
        if start >= end {
            return;
        }
        let st = &mut *st;
        let (s, e) = (start as usize, end as usize);
        st.current[s..e].copy_from_slice(&st.durable[s..e]);
        for w in &st.pending {
            let (ws, we) = (w.offset, w.offset + w.len());
            let (from, to) = (ws.max(start), we.min(end));
            if from >= to {
                continue;
            }
            for i in from..to {
                st.current[i as usize] = match &w.data {
                    PendingData::Bytes(b) => b[(i - ws) as usize],
                    PendingData::Zeroes(_) => 0,
                };
            }
        }
    }

    /// The range's bytes as of now, in a memfd at the same offset: lets tests drive the zero-copy
    /// read path (a page-cache file's bytes are likewise what the device holds at send time).
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<crate::device::FileSlice> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let bytes = {
            let st = self.live().ok()?;
            check_range(offset, len as u64, st.current.len() as u64).ok()?;
            st.current[offset as usize..offset as usize + len].to_vec()
        };
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor or -1.
        let raw = unsafe { libc::memfd_create(c"superdisk-memdevice".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return None;
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes, offset).ok()?;
        let fd = OwnedFd::from(file);
        let file = crate::device::PageCacheFile::new(Arc::new(fd), offset + len as u64);
        Some(crate::device::FileSlice { file: Arc::new(file), offset, len })
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
        let mut st = self.live()?;
        let st = &mut *st;
        // Replaying the log costs what was written since, not the size of the device.
        for w in std::mem::take(&mut st.pending) {
            w.apply_prefix(&mut st.durable, w.len());
        }
        st.flushes += 1;
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        align::write_zeroes(self, offset, len, may_unmap).await
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let st = self.live()?;
        check_range(offset, len, st.current.len() as u64)?;
        // A 4 KiB block that reads as zeroes is reported as a hole (as a thin device that detects
        // zeroes would): always true to what reads return, and it gives callers' hole paths work.
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let next = ((pos / ALLOCATION_BLOCK_BYTES + 1) * ALLOCATION_BLOCK_BYTES).min(end);
            let hole = st.current[pos as usize..next as usize].iter().all(|&b| b == 0);
            match out.last_mut() {
                Some(e) if e.hole == hole => e.length_bytes += next - pos,
                _ => out.push(Extent { length_bytes: next - pos, hole }),
            }
            pos = next;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::shadow::ShadowDisk;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    fn buf_of(bytes: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(bytes.len());
        b.copy_from_slice(bytes);
        b
    }

    async fn write(dev: &MemDevice, offset: u64, bytes: &[u8], fua: bool) {
        let (_, r) = dev.write(offset, buf_of(bytes), fua).await;
        r.unwrap();
    }

    async fn read(dev: &MemDevice, offset: u64, len: usize) -> Vec<u8> {
        let (b, r) = dev.read(offset, AlignedBuf::zeroed(len)).await;
        r.unwrap();
        b.to_vec()
    }

    #[test]
    fn reads_see_unflushed_writes_and_bounds_are_checked() {
        block_on(async {
            let dev = MemDevice::new(8192);
            write(&dev, 100, b"hello", false).await;
            assert_eq!(read(&dev, 98, 9).await, b"\0\0hello\0\0");
            dev.write_zeroes(101, 2, false).await.unwrap();
            assert_eq!(read(&dev, 100, 5).await, b"h\0\0lo");
            let (_, r) = dev.write(8190, buf_of(b"abc"), false).await;
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
            let (_, r) = dev.read(u64::MAX - 1, AlignedBuf::zeroed(4)).await;
            assert!(r.is_err());
            assert_eq!(dev.pending_writes(), 2);
            // Zero blocks are holes, at 4 KiB granularity (and clipped to the request).
            let ext = dev.allocation(50, 8000).await.unwrap();
            let want = [Extent { length_bytes: 4046, hole: false }, Extent { length_bytes: 3954, hole: true }];
            assert_eq!(ext, want);
            assert_eq!(dev.allocation(4096, 4096).await.unwrap(), vec![Extent { length_bytes: 4096, hole: true }]);
        });
    }

    #[test]
    fn crash_keeps_flushed_and_fua_writes_and_only_drops_unflushed_ones() {
        // Over many seeds, every kind of outcome must occur, and none may touch flushed data.
        let mut seen = CrashReport::default();
        for seed in 0..200 {
            block_on(async {
                let dev = MemDevice::new(1 << 16);
                write(&dev, 0, &[1; 4096], false).await;
                dev.flush().await.unwrap();
                write(&dev, 8192, &[2; 4096], true).await;
                write(&dev, 0, &[3; 2048], false).await; // over flushed data
                write(&dev, 16384, &[4; 4096], false).await;
                dev.write_zeroes(8192, 100, false).await.unwrap(); // over the FUA write
                let r = dev.crash(&mut SimRng::new(seed));
                assert_eq!(r.fua, 1);
                assert_eq!(r.kept + r.dropped + r.torn, 3);
                seen.kept += r.kept;
                seen.dropped += r.dropped;
                seen.torn += r.torn;
                let img = dev.contents();
                assert_eq!(img, dev.durable_contents());
                // Flushed bytes: either still 1 or replaced by the later unflushed 3, per sector.
                for (i, sector) in img[..2048].chunks(512).enumerate() {
                    let v = sector[0];
                    assert!(v == 1 || v == 3, "sector {i}: {v}");
                    assert!(sector.iter().all(|&b| b == v), "a sector is never torn inside");
                }
                // Monotone prefix: once a sector of the torn write is old, the rest is old too.
                let first_old = img[..2048].chunks(512).position(|s| s[0] == 1).unwrap_or(4);
                assert!(img[first_old * 512..2048].iter().all(|&b| b == 1));
                assert!(img[2048..4096].iter().all(|&b| b == 1));
                // The FUA write survives; only the later zeroing may cover part of it.
                assert!(img[8192..8292].iter().all(|&b| b == 0 || b == 2));
                assert!(img[8292..12288].iter().all(|&b| b == 2));
                assert!(img[16384..20480].iter().all(|&b| b == 0 || b == 4));
                assert!(img[4096..8192].iter().all(|&b| b == 0));
            });
        }
        assert!(seen.kept > 0 && seen.dropped > 0 && seen.torn > 0, "{seen:?}");
    }

    #[test]
    fn fua_is_not_undone_by_an_older_unflushed_write() {
        for seed in 0..50 {
            block_on(async {
                let dev = MemDevice::new(4096);
                write(&dev, 0, &[7; 512], false).await;
                write(&dev, 0, &[8; 512], true).await;
                dev.crash(&mut SimRng::new(seed));
                assert!(dev.contents()[..512].iter().all(|&b| b == 8));
            });
        }
    }

    #[test]
    fn crash_is_deterministic_for_a_seed() {
        let run = |seed| {
            block_on(async {
                let dev = MemDevice::new(1 << 16);
                for i in 0..40u8 {
                    write(&dev, u64::from(i) * 1000, &[i + 1; 1500], false).await;
                }
                dev.crash(&mut SimRng::new(seed));
                dev.contents()
            })
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn flush_makes_everything_durable_and_a_crash_kills_old_handles() {
        block_on(async {
            let dev = MemDevice::new(4096);
            let other = dev.clone();
            write(&other, 0, b"abc", false).await;
            dev.flush().await.unwrap();
            assert_eq!(dev.pending_writes(), 0);
            assert_eq!(&dev.durable_contents()[..3], b"abc");
            dev.crash(&mut SimRng::new(1));
            assert!(!dev.is_live() && !other.is_live());
            let (_, r) = other.write(0, buf_of(b"zzz"), true).await;
            assert!(r.is_err(), "a handle from before the crash must not reach the new image");
            assert!(other.flush().await.is_err());
            let dev = dev.reopen();
            assert!(dev.is_live());
            assert_eq!(read(&dev, 0, 3).await, b"abc");
            write(&dev, 0, b"xyz", false).await;
            dev.revoke_handles();
            assert!(!dev.is_live());
            let dev = dev.reopen();
            assert_eq!(read(&dev, 0, 3).await, b"xyz", "revoking handles loses nothing");
            assert_eq!(dev.pending_writes(), 1);
        });
    }

    #[test]
    fn the_device_never_leaves_what_the_model_forbids() {
        // The two halves of the crash story must agree: whatever MemDevice keeps, ShadowDisk allows.
        for seed in 0..100 {
            block_on(async {
                let mut rng = SimRng::new(seed);
                let size = 16 << 10;
                let dev = MemDevice::new(size);
                let mut model = ShadowDisk::new(vec![0; size as usize]);
                let mut dev_live = dev.clone();
                for step in 0..60 {
                    let off = rng.below(size - 1);
                    let len = rng.in_range(1..(size - off).min(3000) + 1);
                    match rng.below(10) {
                        0..=4 => {
                            let mut data = vec![0u8; len as usize];
                            rng.fill(&mut data);
                            let fua = rng.below(4) == 0;
                            write(&dev_live, off, &data, fua).await;
                            model.write(off, &data, fua);
                        }
                        5 => {
                            dev_live.write_zeroes(off, len, false).await.unwrap();
                            model.write_zeroes(off, len, false);
                        }
                        6 => {
                            dev_live.flush().await.unwrap();
                            model.flush();
                        }
                        7 | 8 => {
                            let got = read(&dev_live, off, len as usize).await;
                            model.check_read(off, &got).unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                        }
                        _ => {
                            dev_live.crash(&mut rng);
                            dev_live = dev_live.reopen();
                            model.crash();
                        }
                    }
                }
                dev_live.crash(&mut rng);
                model.crash();
                model.check_read(0, &dev_live.contents()).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            });
        }
    }
}

//! Byte-granular requests on a device that only does whole logical blocks (a block device, or
//! any file opened O_DIRECT): bounce buffers for unaligned reads, read-modify-write under a range
//! lock for unaligned writes, and zeroing split into partial edge blocks (written) and whole
//! blocks (the device's zeroing primitive).
//!
//! ```text
//!   read/write/write_zeroes(offset, len) ── aligned? ──► BlockIo::raw_* (one device operation)
//!                                            └─ no ───► covering aligned span: bounce / RMW / edges
//! ```
//!
//! One home for this logic, used by [`super::FileDevice`] and by the simulated device in its
//! strict mode (`MemDevice::with_logical_block_bytes`), so the model tests run the very code that
//! production runs, with mixed block sizes on the backing and the caches.

use super::{AlignedBuf, RangeLocks};
use std::future::Future;
use std::io;
use std::sync::Arc;

/// Whole chunks of zeroes written by [`write_zeroes`]'s slow path come from one shared buffer.
pub const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// What a device does natively: I/O at its own alignment.
pub trait BlockIo: Send + Sync {
    /// Offsets and lengths of `raw_read`/`raw_write` must be multiples of this (1: any).
    fn io_align(&self) -> u64;
    /// Offsets and lengths of `zero_blocks` must be multiples of this (1: any).
    fn zero_align(&self) -> u64;
    /// Serialises read-modify-write cycles on shared edge blocks.
    fn rmw_locks(&self) -> &RangeLocks;
    fn raw_read(&self, offset: u64, buf: AlignedBuf) -> impl Future<Output = (AlignedBuf, io::Result<()>)> + Send;
    fn raw_write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> impl Future<Output = (AlignedBuf, io::Result<()>)> + Send;
    fn raw_write_shared(
        &self,
        offset: u64,
        data: Arc<AlignedBuf>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Zeroes an aligned range with the device's primitive (fallocate); `Unsupported` when it
    /// has none, so the caller writes zeroes instead.
    fn zero_blocks(&self, offset: u64, len: u64, may_unmap: bool) -> impl Future<Output = io::Result<()>> + Send;
}

fn aligned(a: u64, offset: u64, len: u64) -> bool {
    offset % a == 0 && len % a == 0
}

/// The aligned span covering `[offset, offset + len)`.
fn span(a: u64, offset: u64, len: u64) -> (u64, u64) {
    (offset / a * a, (offset + len).div_ceil(a) * a)
}

pub async fn read<D: BlockIo>(dev: &D, offset: u64, mut buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
    let (a, len) = (dev.io_align(), buf.len() as u64);
    if len == 0 {
        return (buf, Ok(()));
    }
    if aligned(a, offset, len) {
        return dev.raw_read(offset, buf).await;
    }
    let (start, end) = span(a, offset, len);
    let (bounce, r) = dev.raw_read(start, AlignedBuf::uninit_for_fill((end - start) as usize)).await;
    if r.is_ok() {
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + len as usize]);
    }
    (buf, r)
}

pub async fn write<D: BlockIo>(dev: &D, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
    let (a, len) = (dev.io_align(), buf.len() as u64);
    if len == 0 {
        return (buf, Ok(()));
    }
    if aligned(a, offset, len) {
        return dev.raw_write(offset, buf, fua).await;
    }
    let r = read_modify_write(dev, offset, &buf, fua).await;
    (buf, r)
}

pub async fn write_shared<D: BlockIo>(dev: &D, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
    let (a, len) = (dev.io_align(), data.len() as u64);
    if len == 0 {
        return Ok(());
    }
    if aligned(a, offset, len) {
        return dev.raw_write_shared(offset, data, fua).await;
    }
    read_modify_write(dev, offset, &data, fua).await
}

/// Two unaligned writes that share an edge block but not a byte are both legal in flight at once;
/// the range lock keeps one from writing back the other's block with stale bytes.
async fn read_modify_write<D: BlockIo>(dev: &D, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
    let (start, end) = span(dev.io_align(), offset, data.len() as u64);
    let _guard = dev.rmw_locks().lock(start, end).await;
    let (mut bounce, r) = dev.raw_read(start, AlignedBuf::uninit_for_fill((end - start) as usize)).await;
    r?;
    let skip = (offset - start) as usize;
    bounce[skip..skip + data.len()].copy_from_slice(data);
    dev.raw_write(start, bounce, fua).await.1
}

/// Zeroes `[offset, offset + len)`. The partial blocks at either end are written: `[offset,
/// head_end)` is the head, `[mid_start, mid_end)` the whole blocks, `[tail_start, end)` the tail;
/// each may be empty, and a range inside one block is all head (or, starting on a boundary, all
/// tail).
pub async fn write_zeroes<D: BlockIo>(dev: &D, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let a = dev.zero_align();
    let end = offset + len;
    let mid_start = offset.div_ceil(a) * a;
    let mid_end = (end / a * a).max(mid_start);
    let head_end = mid_start.min(end);
    let tail_start = mid_end.clamp(head_end, end);
    debug_assert!(offset <= head_end && head_end <= tail_start && tail_start <= end);
    if head_end > offset {
        write_zero_bytes(dev, offset, head_end - offset).await?;
    }
    if mid_end > mid_start {
        match dev.zero_blocks(mid_start, mid_end - mid_start, may_unmap).await {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                write_zero_bytes(dev, mid_start, mid_end - mid_start).await?;
            }
            r => r?,
        }
    }
    if end > tail_start {
        write_zero_bytes(dev, tail_start, end - tail_start).await?;
    }
    Ok(())
}

/// Writes zeroes by plain writes. Whole chunks come from one shared zero buffer, so zeroing a large
/// range costs no memory per call beyond a tail shorter than a chunk.
async fn write_zero_bytes<D: BlockIo>(dev: &D, offset: u64, len: u64) -> io::Result<()> {
    static ZEROES: std::sync::OnceLock<Arc<AlignedBuf>> = std::sync::OnceLock::new();
    let chunk = ZEROES.get_or_init(|| Arc::new(AlignedBuf::zeroed(ZERO_CHUNK_BYTES)));
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK_BYTES as u64);
        if n == ZERO_CHUNK_BYTES as u64 {
            write_shared(dev, offset + done, chunk.clone(), false).await?;
        } else {
            write(dev, offset + done, AlignedBuf::zeroed(n as usize), false).await.1?;
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A device that refuses anything unaligned, and records what it was asked to do.
    struct Strict {
        a: u64,
        bytes: Mutex<Vec<u8>>,
        locks: RangeLocks,
        zero_primitive: bool,
    }

    fn check(a: u64, offset: u64, len: u64) -> io::Result<()> {
        if aligned(a, offset, len) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }

    impl BlockIo for Strict {
        fn io_align(&self) -> u64 {
            self.a
        }
        fn zero_align(&self) -> u64 {
            self.a
        }
        fn rmw_locks(&self) -> &RangeLocks {
            &self.locks
        }
        async fn raw_read(&self, offset: u64, mut buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
            let r = check(self.a, offset, buf.len() as u64);
            if r.is_ok() {
                let b = self.bytes.lock().unwrap();
                let n = buf.len();
                buf.copy_from_slice(&b[offset as usize..offset as usize + n]);
            }
            (buf, r)
        }
        async fn raw_write(&self, offset: u64, buf: AlignedBuf, _fua: bool) -> (AlignedBuf, io::Result<()>) {
            let r = check(self.a, offset, buf.len() as u64);
            if r.is_ok() {
                self.bytes.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
            }
            (buf, r)
        }
        async fn raw_write_shared(&self, offset: u64, data: Arc<AlignedBuf>, _fua: bool) -> io::Result<()> {
            check(self.a, offset, data.len() as u64)?;
            self.bytes.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        }
        async fn zero_blocks(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
            check(self.a, offset, len)?;
            if !self.zero_primitive {
                return Err(io::ErrorKind::Unsupported.into());
            }
            self.bytes.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    #[test]
    fn every_offset_and_length_class_is_served_with_aligned_operations_only() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for a in [1u64, 512, 4096] {
            for zero_primitive in [true, false] {
                let dev = Strict {
                    a,
                    bytes: Mutex::new(vec![0xaa; 64 * 4096]),
                    locks: RangeLocks::default(),
                    zero_primitive,
                };
                let mut model = vec![0xaau8; 64 * 4096];
                let offsets = [0, 1, a / 2, a.saturating_sub(1), a, 3 * a + 5];
                let lens = [1, 7, a / 2 + 1, a.saturating_sub(1).max(1), a, a + 1, 2 * a, 3 * a + 7, (1 << 20) + 3];
                for (i, off) in offsets.iter().map(|o| 8192 + o).enumerate() {
                    for (j, &len) in lens.iter().enumerate() {
                        if off + len > model.len() as u64 {
                            continue;
                        }
                        rt.block_on(async {
                            if (i + j) % 2 == 0 {
                                write_zeroes(&dev, off, len, j % 3 == 0).await.unwrap();
                                model[off as usize..(off + len) as usize].fill(0);
                            } else {
                                let mut b = AlignedBuf::zeroed(len as usize);
                                b.fill((i * 10 + j) as u8);
                                model[off as usize..(off + len) as usize].copy_from_slice(&b);
                                write(&dev, off, b, false).await.1.unwrap();
                            }
                            let (got, r) =
                                read(&dev, off.saturating_sub(3), AlignedBuf::zeroed((len + 6) as usize)).await;
                            r.unwrap();
                            let s = off.saturating_sub(3) as usize;
                            assert!(got[..] == model[s..s + len as usize + 6], "a={a} [{off}, +{len})");
                        });
                    }
                }
                assert!(*dev.bytes.lock().unwrap() == model, "a={a}");
            }
        }
    }
}

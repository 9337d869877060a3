//! One conformance suite for every device: the leaves (the real file device with each engine,
//! buffered and O_DIRECT, in `file::tests`; the simulated device byte-granular and with strict
//! block sizes) and every layer the daemon stacks on them. The same checks run on each; only the
//! constructor differs.
//!
//! * [`check_data`]: random byte-granular writes (owned and shared buffers, some FUA), reads,
//!   zeroing with and without unmap, flushes and hole maps, against a model of the bytes.
//! * [`check_capabilities`]: a layer must forward every capability it does not change — a shared
//!   write reaches the device as a shared write (not a copy), and `identity`, `drop_cached` and
//!   `zero_copy_source` reach it at all. A layer that drops one silently makes production take
//!   another path than the tests (as `FaultDevice` once did for `write_shared`): the suite fails,
//!   as `a_layer_that_drops_a_capability_fails_the_suite` shows.

use super::sim::mem::MemDevice;
use super::{AlignedBuf, BlockDevice, DeviceId, Extent, FileSlice};
use crate::device::rng::SimRng;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Size of the devices the suite runs on.
pub(crate) const DEVICE_BYTES: u64 = 1 << 20;

fn buf_of(data: &[u8]) -> AlignedBuf {
    let mut b = AlignedBuf::uninit_for_fill(data.len());
    b.copy_from_slice(data);
    b
}

async fn read_exact<D: BlockDevice>(dev: &D, offset: u64, len: usize, what: &str) -> Vec<u8> {
    let (b, r) = dev.read(offset, AlignedBuf::zeroed(len)).await;
    r.unwrap_or_else(|e| panic!("{what}: read {offset}+{len}: {e}"));
    b.to_vec()
}

/// A random range of the shapes clients send: byte-granular, sector- and page-aligned.
fn range(rng: &mut SimRng, size: u64) -> (u64, u64) {
    let (align, len) = match rng.below(3) {
        0 => (1, rng.in_range(1..20_000)),
        1 => (512, 512 * rng.in_range(1..40)),
        _ => (4096, 4096 * rng.in_range(1..32)),
    };
    let off = rng.below(size - len) / align * align;
    (off, len)
}

/// The data path of `dev` (at least [`DEVICE_BYTES`] long, any contents) behaves as a disk.
pub(crate) async fn check_data<D: BlockDevice>(dev: &D, seed: u64, what: &str) {
    let mut rng = SimRng::new(seed);
    let size = DEVICE_BYTES;
    let mut model = read_exact(dev, 0, size as usize, what).await;
    for step in 0..150 {
        let (off, len) = range(&mut rng, size);
        let r = off as usize..(off + len) as usize;
        match rng.below(10) {
            0..=2 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                let fua = rng.below(5) == 0;
                let res = if rng.below(2) == 0 {
                    dev.write(off, buf_of(&data), fua).await.1
                } else {
                    let shared = Arc::new(buf_of(&data));
                    let res = dev.write_shared(off, shared.clone(), fua).await;
                    assert_eq!(Arc::strong_count(&shared), 1, "{what}: the device kept a shared buffer");
                    res
                };
                res.unwrap_or_else(|e| panic!("{what} step {step}: write {off}+{len}: {e}"));
                model[r].copy_from_slice(&data);
            }
            3 => {
                dev.write_zeroes(off, len, rng.below(2) == 0)
                    .await
                    .unwrap_or_else(|e| panic!("{what} step {step}: zero {off}+{len}: {e}"));
                model[r].fill(0);
            }
            4 => dev.flush().await.unwrap_or_else(|e| panic!("{what} step {step}: flush: {e}")),
            5 => check_allocation(dev, off, len, &model, what).await,
            _ => {
                let got = read_exact(dev, off, len as usize, what).await;
                assert!(got[..] == model[r], "{what} step {step}: read {off}+{len} differs from what was written");
            }
        }
    }
    dev.flush().await.unwrap();
    dev.drop_cached(0, size / 2);
    assert!(read_exact(dev, 0, size as usize, what).await == model, "{what}: the whole device differs at the end");
}

/// A hole map covers a prefix of the range, and every hole in it reads as zeroes.
async fn check_allocation<D: BlockDevice>(dev: &D, off: u64, len: u64, model: &[u8], what: &str) {
    let extents: Vec<Extent> = dev.allocation(off, len).await.unwrap_or_else(|e| panic!("{what}: allocation: {e}"));
    let mut at = off;
    for e in &extents {
        assert!(e.length_bytes > 0 && at + e.length_bytes <= off + len, "{what}: allocation {extents:?}");
        if e.hole {
            let r = at as usize..(at + e.length_bytes) as usize;
            assert!(model[r].iter().all(|&b| b == 0), "{what}: a hole over non-zero bytes at {at}");
        }
        at += e.length_bytes;
    }
}

/// A leaf that counts the capabilities that reach it.
pub(crate) struct Probe {
    inner: MemDevice,
    pub writes_shared: AtomicU64,
    pub writes_owned: AtomicU64,
    pub drops: AtomicU64,
    pub zero_copy_asks: AtomicU64,
}

pub(crate) const PROBE_ID: DeviceId = DeviceId { major_space: 7, minor_space: 42 };

impl Probe {
    pub fn new() -> Probe {
        Probe {
            inner: MemDevice::new(DEVICE_BYTES),
            writes_shared: AtomicU64::new(0),
            writes_owned: AtomicU64::new(0),
            drops: AtomicU64::new(0),
            zero_copy_asks: AtomicU64::new(0),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl BlockDevice for Arc<Probe> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn logical_block_bytes(&self) -> u32 {
        self.inner.logical_block_bytes()
    }
    fn fast_zero(&self) -> bool {
        true
    }
    fn identity(&self) -> Option<DeviceId> {
        Some(PROBE_ID)
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        bump(&self.drops);
        self.inner.drop_cached(offset, len);
    }
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<FileSlice> {
        bump(&self.zero_copy_asks);
        self.inner.zero_copy_source(offset, len)
    }
    fn open_files(&self, out: &mut Vec<crate::device::OpenFile>) {
        // Any descriptor will do: the check is that the layer asks its device.
        let fd = std::fs::File::open("/dev/null").expect("/dev/null").into();
        out.push(crate::device::OpenFile { path: "/dev/null".into(), fd });
    }
    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        bump(&self.writes_owned);
        self.inner.write(offset, buf, fua).await
    }
    async fn write_shared(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        bump(&self.writes_shared);
        self.inner.write_shared(offset, data, fua).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, may_unmap).await
    }
    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.allocation(offset, len).await
    }
}

/// The capabilities `layer` (built over `probe`) must pass on; the names of those it dropped.
pub(crate) async fn missing_capabilities<D: BlockDevice>(layer: &D, probe: &Probe) -> Vec<&'static str> {
    let mut missing = Vec::new();
    if layer.identity() != Some(PROBE_ID) {
        missing.push("identity");
    }
    let before = probe.writes_shared.load(Ordering::Relaxed);
    let data = Arc::new(buf_of(&[0x5a; 4096]));
    layer.write_shared(8192, data, false).await.expect("shared write");
    if probe.writes_shared.load(Ordering::Relaxed) == before {
        missing.push("write_shared");
    }
    let before = probe.drops.load(Ordering::Relaxed);
    layer.drop_cached(0, 4096);
    if probe.drops.load(Ordering::Relaxed) == before {
        missing.push("drop_cached");
    }
    let before = probe.zero_copy_asks.load(Ordering::Relaxed);
    let offered = layer.zero_copy_source(8192, 4096);
    if probe.zero_copy_asks.load(Ordering::Relaxed) == before || offered.is_none() {
        missing.push("zero_copy_source");
    }
    let mut files = Vec::new();
    layer.open_files(&mut files);
    if files.len() != 1 {
        missing.push("open_files");
    }
    missing
}

/// Both halves of the suite for one layer: `make` builds it over the device it is given.
pub(crate) async fn check_layer<D: BlockDevice>(name: &str, make: impl Fn(Arc<Probe>) -> D) {
    let probe = Arc::new(Probe::new());
    let layer = make(probe.clone());
    let missing = missing_capabilities(&layer, &probe).await;
    assert!(missing.is_empty(), "layer {name} does not forward {missing:?}");
    check_data(&layer, 11, name).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::layer::backing_guard::{Guarded, IoPolicy};
    use crate::device::layer::cache_time_limit::{CacheTimeouts, Timed, Tripwire};
    use crate::device::layer::injected_stall::Stalled;
    use crate::device::layer::instrumented::{DeviceStats, Instrumented};
    use crate::device::layer::striped::Striped;
    use crate::device::sim::fault::FaultDevice;
    use std::time::Duration;

    #[tokio::test]
    async fn every_layer_forwards_every_capability_and_keeps_the_data() {
        check_layer("Guarded", |d| Guarded::new(d, IoPolicy::default(), Arc::default(), "test")).await;
        check_layer("Timed", |d| {
            Timed::new(d, Arc::new(CacheTimeouts::new(Duration::from_secs(10))), Arc::new(Tripwire::default()))
        })
        .await;
        check_layer("Striped (one member)", |d| Striped::new(vec![d], DEVICE_BYTES, 4096)).await;
        check_layer("Instrumented", |d| Instrumented::new(d, Arc::new(DeviceStats::new("t", "t", DEVICE_BYTES)))).await;
        check_layer("Stalled (no stall)", |d| Stalled::new(d, None)).await;
        check_layer("Arc", Arc::new).await;
        check_layer("the daemon's backing stack", |d| {
            let stats = Arc::new(DeviceStats::new("backing", "t", DEVICE_BYTES));
            Guarded::new(Instrumented::new(Stalled::new(d, None), stats), IoPolicy::default(), Arc::default(), "b")
        })
        .await;
    }

    #[tokio::test]
    async fn the_simulated_leaves_and_the_fault_layer_behave_as_disks() {
        for block in [1u32, 512, 4096] {
            let dev = if block == 1 {
                MemDevice::new(DEVICE_BYTES)
            } else {
                MemDevice::new(DEVICE_BYTES).with_logical_block_bytes(block)
            };
            check_data(&dev, u64::from(block), &format!("MemDevice, {block} B blocks")).await;
            check_data(&FaultDevice::new(dev, 3), 5, &format!("FaultDevice over {block} B blocks")).await;
        }
    }

    /// A wrapper that forwards the required methods and leaves the rest to the trait's defaults.
    struct Forgetful<D>(D);

    impl<D: BlockDevice> BlockDevice for Forgetful<D> {
        fn size_bytes(&self) -> u64 {
            self.0.size_bytes()
        }
        fn logical_block_bytes(&self) -> u32 {
            self.0.logical_block_bytes()
        }
        fn fast_zero(&self) -> bool {
            self.0.fast_zero()
        }
        async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
            self.0.read(offset, buf).await
        }
        async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
            self.0.write(offset, buf, fua).await
        }
        async fn flush(&self) -> io::Result<()> {
            self.0.flush().await
        }
        async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
            self.0.write_zeroes(offset, len, may_unmap).await
        }
        async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
            self.0.allocation(offset, len).await
        }
    }

    #[tokio::test]
    async fn a_layer_that_drops_a_capability_fails_the_suite() {
        let probe = Arc::new(Probe::new());
        let missing = missing_capabilities(&Forgetful(probe.clone()), &probe).await;
        assert_eq!(missing, vec!["identity", "write_shared", "drop_cached", "zero_copy_source", "open_files"]);
        // Its data path is fine: only the capability check can tell.
        check_data(&Forgetful(probe), 2, "Forgetful").await;
    }
}

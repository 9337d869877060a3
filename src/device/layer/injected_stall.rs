//! Read stalls injected into a running daemon's device, for the hedging benchmark and its tests:
//! a layer placed under the counters, so the stall counts as the device's own latency, as a real
//! SSD's garbage-collection pause would. It passes everything through unless
//! `SUPERDISK_INJECT_READ_STALL` names its device.

use crate::device::rng::SimRng;
use crate::device::{AlignedBuf, BlockDevice, DeviceId, Extent, FileSlice};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read stalls injected into a running daemon's device, for the hedging benchmark and tests:
/// `SUPERDISK_INJECT_READ_STALL=DEVICE:PPM:MS[:FROM_S[:UNTIL_S]]` makes each read of `DEVICE`
/// (`backing`, `cache0`, …) wait `MS` milliseconds first with probability `PPM` per million, as an
/// SSD does during garbage collection; with `FROM_S`/`UNTIL_S`, only between that many seconds
/// after the first device was opened (so a test can bring the daemon up healthy first, and let
/// the device recover later). An environment variable rather than a config key: it exists to
/// break things on purpose and must never be left in a production config by accident.
#[derive(Debug)]
pub struct ReadStall {
    ppm: u32,
    stall: Duration,
    from: Duration,
    until: Option<Duration>,
    rng: Mutex<SimRng>,
}

/// The clock `FROM_S`/`UNTIL_S` count from: one per process, so a device opened later (a cache
/// added by the operator) stalls in the same window as the others.
static STALL_CLOCK: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

impl ReadStall {
    pub const ENV: &'static str = "SUPERDISK_INJECT_READ_STALL";

    /// Parses `DEVICE:PPM:MS[:FROM_S[:UNTIL_S]]` into the device name and the stall.
    pub fn parse(spec: &str) -> Result<(String, ReadStall), String> {
        let parts: Vec<&str> = spec.split(':').collect();
        let bad = |what: &str| format!("{}={spec:?}: {what}", Self::ENV);
        let (device, ppm, ms, from, until) = match parts[..] {
            [d, p, m] => (d, p, m, None, None),
            [d, p, m, f] => (d, p, m, Some(f), None),
            [d, p, m, f, u] => (d, p, m, Some(f), Some(u)),
            _ => return Err(bad("expected DEVICE:PPM:MS[:FROM_S[:UNTIL_S]], e.g. cache0:5000:20")),
        };
        let ppm: u32 = ppm.parse().ok().filter(|p| *p <= 1_000_000).ok_or_else(|| bad("PPM must be 0..=1000000"))?;
        let ms: u64 = ms.parse().ok().filter(|m| *m <= 60_000).ok_or_else(|| bad("MS must be 0..=60000"))?;
        let secs = |s: Option<&str>, what: &str| -> Result<Option<Duration>, String> {
            s.map(|s| {
                s.parse::<u64>().map(Duration::from_secs).map_err(|_| bad(&format!("{what} must be whole seconds")))
            })
            .transpose()
        };
        let from = secs(from, "FROM_S")?.unwrap_or_default();
        let until = secs(until, "UNTIL_S")?;
        if until.is_some_and(|u| u <= from) {
            return Err(bad("UNTIL_S must be after FROM_S"));
        }
        STALL_CLOCK.get_or_init(std::time::Instant::now);
        let stall =
            ReadStall { ppm, stall: Duration::from_millis(ms), from, until, rng: Mutex::new(SimRng::new(0x5eed)) };
        Ok((device.to_owned(), stall))
    }

    /// How long this read waits first, if it is one of the unlucky ones.
    pub fn roll(&self) -> Option<Duration> {
        if !self.from.is_zero() || self.until.is_some() {
            let t = STALL_CLOCK.get_or_init(std::time::Instant::now).elapsed();
            if t < self.from || self.until.is_some_and(|u| t >= u) {
                return None;
            }
        }
        lock(&self.rng).chance_ppm(self.ppm).then_some(self.stall)
    }
}

/// A device whose reads may first wait out an injected stall.
pub struct Stalled<D> {
    inner: D,
    stall: Option<Arc<ReadStall>>,
}

impl<D: BlockDevice> Stalled<D> {
    /// Passes everything through unless `stall` is given.
    pub fn new(inner: D, stall: Option<Arc<ReadStall>>) -> Self {
        Stalled { inner, stall }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: BlockDevice> BlockDevice for Stalled<D> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn logical_block_bytes(&self) -> u32 {
        self.inner.logical_block_bytes()
    }
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }
    fn identity(&self) -> Option<DeviceId> {
        self.inner.identity()
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        self.inner.drop_cached(offset, len);
    }
    fn open_files(&self, out: &mut Vec<crate::device::OpenFile>) {
        self.inner.open_files(out)
    }
    /// An injected stall must delay the read, so with one configured reads go the ordinary way.
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<FileSlice> {
        match self.stall {
            Some(_) => None,
            None => self.inner.zero_copy_source(offset, len),
        }
    }
    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        if let Some(d) = self.stall.as_ref().and_then(|s| s.roll()) {
            tokio::time::sleep(d).await;
        }
        self.inner.read(offset, buf).await
    }
    fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> impl std::future::Future<Output = (AlignedBuf, io::Result<()>)> + Send {
        self.inner.write(offset, buf, fua)
    }
    fn write_shared(
        &self,
        offset: u64,
        data: Arc<AlignedBuf>,
        fua: bool,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        self.inner.write_shared(offset, data, fua)
    }
    fn flush(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        self.inner.flush()
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn allocation(&self, offset: u64, len: u64) -> impl std::future::Future<Output = io::Result<Vec<Extent>>> + Send {
        self.inner.allocation(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_stall_specs_parse_or_name_the_problem() {
        let (dev, st) = ReadStall::parse("cache0:1000000:20").unwrap();
        assert_eq!(dev, "cache0");
        assert_eq!(st.roll(), Some(Duration::from_millis(20)));
        let (_, st) = ReadStall::parse("cache1:1000000:20:3600").unwrap();
        assert_eq!(st.roll(), None, "the window has not opened");
        let (_, st) = ReadStall::parse("cache1:1000000:20:0:3600").unwrap();
        assert_eq!(st.roll(), Some(Duration::from_millis(20)));
        for (bad, says) in [
            ("cache0:lots", "expected DEVICE:PPM:MS"),
            ("cache0:2000000:5", "PPM"),
            ("cache0:5:60001", "MS"),
            ("cache0:5:5:x", "FROM_S"),
            ("cache0:5:5:9:3", "UNTIL_S"),
            ("cache0:5:5:1:2:3", "expected"),
        ] {
            let e = ReadStall::parse(bad).unwrap_err();
            assert!(e.contains(says) && e.contains(ReadStall::ENV), "{bad}: {e}");
        }
    }
}

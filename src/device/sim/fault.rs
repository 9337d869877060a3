//! A fault-injecting wrapper for any [`BlockDevice`], driven by a seed so that a failing test
//! replays exactly.
//!
//! ```text
//!   caller ──► FaultDevice ── vanished? bad range? dice roll? ──► EIO (a failed write may leave
//!                  │                                                  a sector-aligned prefix)
//!                  └── latency (tokio sleep) ──► hung? wait for resume ──► inner device
//!   FaultHandle (shared, cloneable): switches faults on and off while the device is in use
//! ```
//!
//! Every decision comes from one [`SimRng`], drawn in the order operations arrive, so a test that
//! issues its operations in a fixed order sees the same faults for the same seed.
//!
//! A failed flush, and a failed FUA write, lose the device's unflushed writes as Linux does
//! ([`SimStorage::lose_unflushed`]): the error is reported once, and the next flush succeeds.

use super::mem::SimStorage;
pub use crate::device::rng::SimRng;
use crate::device::{AlignedBuf, BlockDevice, Extent};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The kinds of operation a fault can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultOp {
    Read,
    /// Writes and write_zeroes.
    Write,
    Flush,
}

impl FaultOp {
    const ALL: [FaultOp; 3] = [FaultOp::Read, FaultOp::Write, FaultOp::Flush];

    fn index(self) -> usize {
        match self {
            FaultOp::Read => 0,
            FaultOp::Write => 1,
            FaultOp::Flush => 2,
        }
    }
}

/// A byte range that always fails for the given operations: a bad patch of media.
#[derive(Clone, Debug)]
struct BadRange {
    range: Range<u64>,
    ops: Vec<FaultOp>,
}

#[derive(Debug, Default)]
struct Plan {
    /// Per [`FaultOp::index`], in parts per million.
    error_ppm: [u32; 3],
    latency_us: Range<u64>,
    /// Each operation yields to the scheduler up to this many times first: reorders concurrent
    /// operations deterministically (on a current-thread runtime) without real time passing.
    max_yields: u32,
    /// A write that fails persists a random sector-aligned prefix first, as a disk that lost
    /// power or a path mid-request can.
    torn_failed_writes: bool,
    bad_ranges: Vec<BadRange>,
    /// Operations touching these ranges wait until [`FaultHandle::resume`].
    hung_ranges: Vec<BadRange>,
    vanished: bool,
}

struct Shared {
    plan: Mutex<(Plan, SimRng)>,
    ops: [AtomicU64; 3],
    injected: [AtomicU64; 3],
    /// Per [`FaultOp::index`]: operations of this kind wait (a device that stopped answering).
    hung: [AtomicBool; 3],
    /// Operations waiting while hung; and the wake-up when the hang ends.
    held: AtomicU64,
    resumed: tokio::sync::Notify,
}

/// Controls the faults of one [`FaultDevice`] (and every clone of it) while it is in use.
#[derive(Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

pub struct FaultDevice<D> {
    inner: D,
    shared: Arc<Shared>,
}

impl<D: Clone> Clone for FaultDevice<D> {
    fn clone(&self) -> Self {
        FaultDevice { inner: self.inner.clone(), shared: self.shared.clone() }
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// What to do with one operation, decided under the plan's lock.
struct Verdict {
    yields: u32,
    delay: Option<Duration>,
    fail: bool,
    /// For failed writes: how many leading bytes reach the device anyway.
    torn_prefix_bytes: u64,
}

impl<D: BlockDevice + SimStorage> FaultDevice<D> {
    /// Wraps `inner` with no faults switched on.
    pub fn new(inner: D, seed: u64) -> Self {
        let shared = Shared {
            plan: Mutex::new((Plan::default(), SimRng::new(seed))),
            ops: Default::default(),
            injected: Default::default(),
            hung: Default::default(),
            held: AtomicU64::new(0),
            resumed: tokio::sync::Notify::new(),
        };
        FaultDevice { inner, shared: Arc::new(shared) }
    }

    pub fn handle(&self) -> FaultHandle {
        FaultHandle { shared: self.shared.clone() }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Decides a write's fate and waits out its latency and any hang: Err if it fails (after
    /// a torn prefix may have landed, and, for a FUA write, the unflushed writes were lost).
    async fn before_write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let range = offset..offset.saturating_add(data.len() as u64);
        let v = self.decide(FaultOp::Write, Some(range.clone()));
        pause(&v).await;
        hold(&self.shared, FaultOp::Write, Some(range)).await;
        if !v.fail {
            return Ok(());
        }
        if v.torn_prefix_bytes > 0 {
            let n = v.torn_prefix_bytes as usize;
            let mut prefix = AlignedBuf::zeroed(n);
            prefix.copy_from_slice(&data[..n]);
            // The write is reported failed either way; whether the prefix landed is the point.
            let _ = self.inner.write(offset, prefix, false).await;
        }
        if fua {
            // A DSYNC write reports the file's write-back error as a flush does (errseq).
            self.inner.lose_unflushed();
        }
        Err(eio())
    }

    fn decide(&self, op: FaultOp, range: Option<Range<u64>>) -> Verdict {
        self.shared.ops[op.index()].fetch_add(1, Ordering::Relaxed);
        let mut guard = lock(&self.shared.plan);
        let (plan, rng) = &mut *guard;
        let yields = if plan.max_yields > 0 { rng.below(u64::from(plan.max_yields) + 1) as u32 } else { 0 };
        let delay = (plan.latency_us.end > 0).then(|| Duration::from_micros(rng.in_range(plan.latency_us.clone())));
        let in_bad_range = range.as_ref().is_some_and(|r| {
            plan.bad_ranges.iter().any(|b| b.ops.contains(&op) && b.range.start < r.end && r.start < b.range.end)
        });
        let fail = plan.vanished || in_bad_range || rng.chance_ppm(plan.error_ppm[op.index()]);
        let mut torn_prefix_bytes = 0;
        if fail && op == FaultOp::Write && plan.torn_failed_writes && !plan.vanished {
            if let Some(r) = range {
                // Any sector boundary inside the write, or none of it at all.
                let first = r.start / 512 + 1;
                let last = (r.end.max(1) - 1) / 512;
                if last >= first && rng.below(2) == 0 {
                    torn_prefix_bytes = rng.in_range(first..last + 1) * 512 - r.start;
                }
            }
        }
        if fail {
            self.shared.injected[op.index()].fetch_add(1, Ordering::Relaxed);
        }
        Verdict { yields, delay, fail, torn_prefix_bytes }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn pause(v: &Verdict) {
    for _ in 0..v.yields {
        tokio::task::yield_now().await;
    }
    if let Some(d) = v.delay {
        tokio::time::sleep(d).await;
    }
}

/// Counts an operation as held while it waits out a hang (also if its future is dropped).
struct Held<'a>(&'a Shared);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits while operations of kind `op` are hung. What waited then reaches the device, late: a
/// request that a caller timed out on can still land, as a network disk's can.
async fn hold(shared: &Shared, op: FaultOp, range: Option<Range<u64>>) {
    let mut held = None;
    loop {
        let notified = shared.resumed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !shared.hung[op.index()].load(Ordering::Acquire) && !in_hung_range(shared, op, range.as_ref()) {
            return;
        }
        if held.is_none() {
            shared.held.fetch_add(1, Ordering::AcqRel);
            held = Some(Held(shared));
        }
        notified.await;
    }
}

fn in_hung_range(shared: &Shared, op: FaultOp, range: Option<&Range<u64>>) -> bool {
    let Some(r) = range else { return false };
    let plan = lock(&shared.plan);
    plan.0.hung_ranges.iter().any(|b| b.ops.contains(&op) && b.range.start < r.end && r.start < b.range.end)
}

impl FaultHandle {
    /// Fails `op` with EIO with probability `ppm` parts per million (0 switches it off).
    pub fn set_error_ppm(&self, op: FaultOp, ppm: u32) {
        assert!(ppm <= 1_000_000);
        lock(&self.shared.plan).0.error_ppm[op.index()] = ppm;
    }

    /// Every operation waits a uniform random time in `[min, max)` before it runs; `(0, 0)` off.
    pub fn set_latency(&self, min: Duration, max: Duration) {
        let (lo, hi) = (min.as_micros() as u64, max.as_micros() as u64);
        lock(&self.shared.plan).0.latency_us = lo..hi.max(lo);
    }

    /// Each operation first yields to the scheduler a random number of times in `[0, max]`.
    pub fn set_max_yields(&self, max: u32) {
        lock(&self.shared.plan).0.max_yields = max;
    }

    pub fn set_torn_failed_writes(&self, on: bool) {
        lock(&self.shared.plan).0.torn_failed_writes = on;
    }

    /// `ops` touching any byte of `range` fail from now on.
    pub fn fail_range(&self, range: Range<u64>, ops: &[FaultOp]) {
        lock(&self.shared.plan).0.bad_ranges.push(BadRange { range, ops: ops.to_vec() });
    }

    pub fn clear_ranges(&self) {
        lock(&self.shared.plan).0.bad_ranges.clear();
    }

    /// The device disappears: every operation fails until [`FaultHandle::revive`].
    pub fn vanish(&self) {
        lock(&self.shared.plan).0.vanished = true;
    }

    pub fn revive(&self) {
        lock(&self.shared.plan).0.vanished = false;
    }

    pub fn is_vanished(&self) -> bool {
        lock(&self.shared.plan).0.vanished
    }

    /// Switches every error off: rates, bad ranges, vanishing. Latency and yields stay (they are
    /// timing, not faults), and the random sequence continues where it was.
    pub fn heal(&self) {
        let mut g = lock(&self.shared.plan);
        let plan = &mut g.0;
        *plan = Plan { latency_us: plan.latency_us.clone(), max_yields: plan.max_yields, ..Plan::default() };
    }

    /// Operations of these kinds stop answering (they wait, unlike [`FaultHandle::vanish`]) until
    /// [`FaultHandle::resume`]; then each reaches the device, however long ago its caller gave up.
    pub fn hang(&self, ops: &[FaultOp]) {
        for op in ops {
            self.shared.hung[op.index()].store(true, Ordering::Release);
        }
    }

    /// `ops` touching any byte of `range` stop answering until [`FaultHandle::resume`] (a
    /// request stuck in one place, as a network disk's can be).
    pub fn hang_range(&self, range: Range<u64>, ops: &[FaultOp]) {
        lock(&self.shared.plan).0.hung_ranges.push(BadRange { range, ops: ops.to_vec() });
    }

    /// Ends every hang: the held operations go on to the device.
    pub fn resume(&self) {
        for h in &self.shared.hung {
            h.store(false, Ordering::Release);
        }
        lock(&self.shared.plan).0.hung_ranges.clear();
        self.shared.resumed.notify_waiters();
    }

    /// Operations waiting out a hang right now.
    pub fn held(&self) -> u64 {
        self.shared.held.load(Ordering::Acquire)
    }

    /// Operations of this kind seen so far.
    pub fn ops(&self, op: FaultOp) -> u64 {
        self.shared.ops[op.index()].load(Ordering::Relaxed)
    }

    /// Errors injected into operations of this kind so far.
    pub fn injected(&self, op: FaultOp) -> u64 {
        self.shared.injected[op.index()].load(Ordering::Relaxed)
    }

    pub fn injected_total(&self) -> u64 {
        FaultOp::ALL.iter().map(|&op| self.injected(op)).sum()
    }
}

impl<D: BlockDevice + SimStorage> BlockDevice for FaultDevice<D> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn identity(&self) -> Option<crate::device::DeviceId> {
        self.inner.identity()
    }

    fn logical_block_bytes(&self) -> u32 {
        self.inner.logical_block_bytes()
    }

    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }

    /// A read that would be failed or held is left to `read`, which fails or holds it: a real
    /// page-cache send cannot stall, and one that fails falls back to `read` anyway.
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<crate::device::FileSlice> {
        let range = offset..offset.saturating_add(len as u64);
        if self.shared.hung[FaultOp::Read.index()].load(Ordering::Acquire)
            || in_hung_range(&self.shared, FaultOp::Read, Some(&range))
        {
            return None;
        }
        let v = self.decide(FaultOp::Read, Some(offset..offset.saturating_add(len as u64)));
        if v.fail {
            return None;
        }
        self.inner.zero_copy_source(offset, len)
    }

    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let range = offset..offset.saturating_add(buf.len() as u64);
        let v = self.decide(FaultOp::Read, Some(range.clone()));
        pause(&v).await;
        hold(&self.shared, FaultOp::Read, Some(range)).await;
        if v.fail {
            return (buf, Err(eio()));
        }
        self.inner.read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        if let Err(e) = self.before_write(offset, &buf, fua).await {
            return (buf, Err(e));
        }
        self.inner.write(offset, buf, fua).await
    }

    /// The same faults as `write`, then the inner device's own shared write, so the model tests
    /// take the path production takes (the mirror writes both devices from one buffer).
    async fn write_shared(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        self.before_write(offset, &data, fua).await?;
        self.inner.write_shared(offset, data, fua).await
    }

    fn drop_cached(&self, offset: u64, len: u64) {
        self.inner.drop_cached(offset, len);
    }
    fn open_files(&self, out: &mut Vec<crate::device::OpenFile>) {
        self.inner.open_files(out)
    }

    async fn flush(&self) -> io::Result<()> {
        let v = self.decide(FaultOp::Flush, None);
        pause(&v).await;
        hold(&self.shared, FaultOp::Flush, None).await;
        if v.fail {
            // Linux marks the pages clean and reports the error once: what they held is gone.
            self.inner.lose_unflushed();
            return Err(eio());
        }
        self.inner.flush().await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let range = offset..offset.saturating_add(len);
        let mut v = self.decide(FaultOp::Write, Some(range.clone()));
        pause(&v).await;
        hold(&self.shared, FaultOp::Write, Some(range)).await;
        if v.fail {
            v.torn_prefix_bytes = v.torn_prefix_bytes.min(len);
            if v.torn_prefix_bytes > 0 {
                let _ = self.inner.write_zeroes(offset, v.torn_prefix_bytes, may_unmap).await;
            }
            return Err(eio());
        }
        self.inner.write_zeroes(offset, len, may_unmap).await
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let range = offset..offset.saturating_add(len);
        let v = self.decide(FaultOp::Read, Some(range.clone()));
        pause(&v).await;
        hold(&self.shared, FaultOp::Read, Some(range)).await;
        if v.fail {
            return Err(eio());
        }
        self.inner.allocation(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::mem::MemDevice;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
    }

    fn filled(len: usize, v: u8) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(len);
        b.fill(v);
        b
    }

    /// Which of `n` reads failed, for a seed and an error rate.
    fn failure_pattern(seed: u64, ppm: u32, n: usize) -> Vec<bool> {
        block_on(async {
            let dev = FaultDevice::new(MemDevice::new(1 << 16), seed);
            dev.handle().set_error_ppm(FaultOp::Read, ppm);
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let (_, r) = dev.read((i as u64 % 16) * 4096, AlignedBuf::zeroed(4096)).await;
                if let Err(e) = &r {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO));
                }
                out.push(r.is_err());
            }
            assert_eq!(dev.handle().ops(FaultOp::Read), n as u64);
            assert_eq!(dev.handle().injected(FaultOp::Read), out.iter().filter(|&&f| f).count() as u64);
            out
        })
    }

    #[test]
    fn errors_come_at_the_configured_rate_and_replay_from_the_seed() {
        let p = failure_pattern(42, 100_000, 10_000);
        let failed = p.iter().filter(|&&f| f).count();
        assert!((800..1200).contains(&failed), "10% of 10000 reads failed {failed} times");
        assert_eq!(p, failure_pattern(42, 100_000, 10_000));
        assert_ne!(p, failure_pattern(43, 100_000, 10_000));
        assert!(failure_pattern(42, 0, 1000).iter().all(|&f| !f));
        assert!(failure_pattern(42, 1_000_000, 1000).iter().all(|&f| f));
    }

    #[test]
    fn faults_target_only_their_operation_and_range() {
        block_on(async {
            let dev = FaultDevice::new(MemDevice::new(1 << 16), 7);
            let h = dev.handle();
            h.fail_range(8192..8193, &[FaultOp::Read]);
            assert!(dev.read(8192, AlignedBuf::zeroed(1)).await.1.is_err());
            assert!(dev.read(4096, AlignedBuf::zeroed(4097)).await.1.is_err(), "overlapping read fails");
            assert!(dev.read(4096, AlignedBuf::zeroed(4096)).await.1.is_ok(), "adjacent read works");
            assert!(dev.write(8192, filled(1, 1), false).await.1.is_ok(), "writes were not targeted");
            h.set_error_ppm(FaultOp::Flush, 1_000_000);
            assert!(dev.flush().await.is_err());
            assert!(dev.write_zeroes(0, 100, false).await.is_ok());
            h.heal();
            assert!(dev.read(8192, AlignedBuf::zeroed(1)).await.1.is_ok());
            assert!(dev.flush().await.is_ok());
            assert_eq!(h.injected(FaultOp::Read), 2);
            assert_eq!(h.injected(FaultOp::Flush), 1);
            assert_eq!(h.injected(FaultOp::Write), 0);
        });
    }

    #[test]
    fn a_vanished_device_fails_everything_until_revived() {
        block_on(async {
            let dev = FaultDevice::new(MemDevice::new(1 << 16), 7);
            let h = dev.handle();
            h.vanish();
            assert!(dev.read(0, AlignedBuf::zeroed(1)).await.1.is_err());
            assert!(dev.write(0, filled(512, 9), true).await.1.is_err());
            assert!(dev.write_zeroes(0, 1, false).await.is_err());
            assert!(dev.flush().await.is_err());
            assert!(dev.allocation(0, 1).await.is_err());
            assert_eq!(dev.inner().contents()[0], 0, "a vanished device writes nothing");
            h.revive();
            assert!(dev.write(0, filled(512, 9), true).await.1.is_ok());
            assert_eq!(dev.inner().contents()[0], 9);
        });
    }

    #[test]
    fn a_failed_write_leaves_old_data_or_a_sector_aligned_prefix() {
        let mut torn = 0;
        for seed in 0..64 {
            block_on(async {
                let dev = FaultDevice::new(MemDevice::new(1 << 16), seed);
                let h = dev.handle();
                h.set_torn_failed_writes(true);
                h.set_error_ppm(FaultOp::Write, 1_000_000);
                assert!(dev.write(1000, filled(3000, 5), false).await.1.is_err());
                let img = dev.inner().contents();
                let new = img[1000..4000].iter().take_while(|&&b| b == 5).count();
                assert!(img[1000 + new..4000].iter().all(|&b| b == 0), "only a prefix is written");
                assert!(new == 0 || (1000 + new) % 512 == 0, "cut at a sector boundary, got {new}");
                assert!(new < 3000, "a failed write is never complete");
                torn += usize::from(new > 0);
            });
        }
        assert!(torn > 0 && torn < 64, "torn {torn} of 64");
    }

    #[test]
    fn latency_delays_the_operation() {
        block_on(async {
            let dev = FaultDevice::new(MemDevice::new(4096), 1);
            // A zero timeout polls the operation once: without latency it completes at once.
            let quick = tokio::time::timeout(Duration::ZERO, dev.read(0, AlignedBuf::zeroed(1))).await;
            assert!(quick.is_ok());
            dev.handle().set_latency(Duration::from_secs(60), Duration::from_secs(61));
            let slow = tokio::time::timeout(Duration::ZERO, dev.read(0, AlignedBuf::zeroed(1))).await;
            assert!(slow.is_err(), "the read must wait for its injected latency");
            dev.handle().set_latency(Duration::from_micros(1), Duration::from_micros(50));
            assert!(dev.read(0, AlignedBuf::zeroed(1)).await.1.is_ok());
        });
    }

    #[test]
    fn a_hung_operation_waits_and_lands_after_resume() {
        block_on(async {
            let dev = Arc::new(FaultDevice::new(MemDevice::new(4096), 1));
            let h = dev.handle();
            h.hang(&[FaultOp::Write]);
            let d = dev.clone();
            let write = tokio::spawn(async move { d.write(0, filled(1, 7), false).await.1 });
            while h.held() == 0 {
                tokio::task::yield_now().await;
            }
            let (b, r) = dev.read(0, AlignedBuf::zeroed(1)).await;
            r.unwrap();
            assert_eq!(b[0], 0, "reads were not hung, and the write has not landed");
            assert!(!write.is_finished());
            h.resume();
            write.await.unwrap().unwrap();
            assert_eq!(dev.inner().contents()[0], 7, "the held write landed after the resume");
            assert_eq!(h.held(), 0);
        });
    }

    #[test]
    fn yields_reorder_concurrent_operations_by_seed() {
        // Two tasks race to write the same byte; which lands last depends only on the seed.
        let winner = |seed| {
            block_on(async {
                let dev = Arc::new(FaultDevice::new(MemDevice::new(4096), seed));
                dev.handle().set_max_yields(8);
                let mut tasks = tokio::task::JoinSet::new();
                for v in 1..=2u8 {
                    let dev = dev.clone();
                    tasks.spawn(async move { dev.write(0, filled(1, v), false).await.1.unwrap() });
                }
                while tasks.join_next().await.is_some() {}
                dev.inner().contents()[0]
            })
        };
        let winners: Vec<u8> = (0..32).map(winner).collect();
        assert_eq!(winners, (0..32).map(winner).collect::<Vec<_>>(), "same seed, same order");
        assert!(winners.contains(&1) && winners.contains(&2), "{winners:?}");
    }
}

//! A time limit for the cache devices: a local SSD that stops answering (firmware hang, a dying
//! controller, a path that went away without an error) is given up on, so the mirror can detach it
//! and serve from the backing instead of letting requests wait for it without end.
//!
//! ```text
//!   mirror ──► Timed<C> ── first poll answers? ──► done (page-cache hits: no timer, no task)
//!                 │ no
//!                 ├── answers within cache_timeout ────────────────► done
//!                 ├── cache_timeout passes ── trip the set's wire ─┐
//!                 └── the set's wire tripped (another op, or the   │
//!                     mirror failed the set) ──────────────────────┤
//!                                                                  ▼
//!             the caller gets an error now; the operation moves to a task and stays counted
//!             against its device until the device really answers
//! ```
//!
//! # Why a timeout fails the whole set, not one request
//! A cache device that took longer than `cache_timeout_ms` for one request is not healthy, and the
//! mirror has a complete copy on the backing: detaching costs a resync later, waiting costs every
//! client request that touches the device. Every member of a set shares one [`Tripwire`], so once
//! one operation times out the others waiting on the set give up at once instead of each serving
//! out its own timeout.
//!
//! # Why a given-up operation is still counted
//! It is not cancelled: it may sit in the kernel and reach the device minutes later. A write that
//! lands after the same device was re-attached and resynced would put old bytes under a region
//! marked valid. So the operation stays counted against its device ([`DeviceId`]) until the device
//! answers, and the mirror refuses to attach a device with operations still outstanding.

use crate::device::{AlignedBuf, BlockDevice, DeviceId, Extent};
use crate::telemetry::{DeviceLatency, LatencySum, SMALL_OP_BYTES};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

/// A flush waits for every write queued before it (on a buffered cache file, the write-back of
/// all its dirty pages), so it gets this many times the limit of a single read or write.
pub const FLUSH_TIMEOUT_FACTOR: u32 = 6;

/// The limit and the bookkeeping shared by every cache device of one mirror.
#[derive(Debug, Default)]
pub struct CacheTimeouts {
    /// 0: no limit (a tripped wire still releases waiters).
    timeout_ms: AtomicU64,
    /// Operations that ran past the limit.
    pub timed_out: AtomicU64,
    /// Operations given up on (timed out, or their set tripped) that the device has not answered.
    pub abandoned_now: AtomicU64,
    /// The same, per device.
    outstanding: Mutex<HashMap<Option<DeviceId>, u64>>,
}

impl CacheTimeouts {
    pub fn new(timeout: Duration) -> Self {
        let t = CacheTimeouts::default();
        t.set_timeout(timeout);
        t
    }

    /// Changes the limit for operations that start from now on (SIGHUP).
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(timeout.as_millis().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Given-up operations the device `id` has not answered yet. A device whose identity is
    /// unknown (`None`) shares one count with every other such device.
    pub fn outstanding(&self, id: Option<DeviceId>) -> u64 {
        self.outstanding.lock().expect("timeout table poisoned").get(&id).copied().unwrap_or(0)
    }

    /// Given-up operations not yet answered, on every device.
    pub fn outstanding_total(&self) -> u64 {
        self.outstanding.lock().expect("timeout table poisoned").values().sum()
    }

    /// [`Self::outstanding`] after waiting up to `within` for it to reach zero: operations given
    /// up only because their set was failed (not hung) finish within milliseconds, and an
    /// operator re-adding the device right away should not be refused for those.
    pub async fn outstanding_after(&self, id: Option<DeviceId>, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let n = self.outstanding(id);
            if n == 0 || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn hold(&self, id: Option<DeviceId>) {
        *self.outstanding.lock().expect("timeout table poisoned").entry(id).or_insert(0) += 1;
        self.abandoned_now.fetch_add(1, Ordering::Relaxed);
    }

    fn release(&self, id: Option<DeviceId>) {
        let mut t = self.outstanding.lock().expect("timeout table poisoned");
        if let Some(n) = t.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                t.remove(&id);
            }
        }
        self.abandoned_now.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Shared by the members of one cache set: once tripped, every operation on the set that is still
/// waiting gives up, and new ones fail at once.
#[derive(Default)]
pub struct Tripwire {
    tripped: AtomicBool,
    notify: tokio::sync::Notify,
    /// Run once, on the first trip (the mirror detaches the set).
    on_trip: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Tripwire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tripwire").field("tripped", &self.is_tripped()).finish()
    }
}

impl Tripwire {
    pub fn is_tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }

    /// What to do on the first trip. Set once; later calls are ignored.
    pub fn on_trip(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_trip.set(Box::new(f));
    }

    /// Gives up on the set: waiters are released, the callback runs (once).
    pub fn trip(&self) {
        if !self.tripped.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
            if let Some(f) = self.on_trip.get() {
                f();
            }
        }
    }

    async fn tripped(&self) {
        let n = self.notify.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if self.is_tripped() {
            return;
        }
        n.await;
    }
}

/// Marks the error a timed-out or tripped cache operation returns.
#[derive(Debug)]
pub struct CacheGaveUp {
    pub timed_out_after: Option<Duration>,
}

impl std::fmt::Display for CacheGaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.timed_out_after {
            Some(d) => write!(f, "cache device did not answer within {} ms (cache_timeout_ms)", d.as_millis()),
            None => write!(f, "cache set was given up on while this operation waited"),
        }
    }
}

impl std::error::Error for CacheGaveUp {}

/// Whether `e` is a cache operation given up on by [`Timed`].
pub fn is_gave_up(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<CacheGaveUp>())
}

fn gave_up(timed_out_after: Option<Duration>) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, CacheGaveUp { timed_out_after })
}

/// What an operation returns when it was given up on.
trait GiveUp: Send + 'static {
    fn given_up(len: usize, e: io::Error) -> Self;
}

impl GiveUp for (AlignedBuf, io::Result<()>) {
    fn given_up(len: usize, e: io::Error) -> Self {
        // The caller's buffer stays with the operation (the kernel may still write into it); the
        // caller gets one of the same length that holds nothing from any other request.
        (AlignedBuf::zeroed(len), Err(e))
    }
}

impl<T: Send + 'static> GiveUp for io::Result<T> {
    fn given_up(_len: usize, e: io::Error) -> Self {
        Err(e)
    }
}

/// Holds a pending operation; if dropped with it still there, lets it finish in a task.
struct FinishOnDrop<T: Send + 'static>(Option<Pin<Box<dyn Future<Output = T> + Send>>>);

impl<T: Send + 'static> Drop for FinishOnDrop<T> {
    fn drop(&mut self) {
        if let (Some(fut), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = fut.await;
            });
        }
    }
}

/// A cache device with a time limit (see the module docs).
pub struct Timed<D> {
    inner: Arc<D>,
    id: Option<DeviceId>,
    shared: Arc<CacheTimeouts>,
    wire: Arc<Tripwire>,
    /// Small reads' and writes' latency to completion (`mirror::slow` compares it with the
    /// backing's). Taken inside the operation, so one the caller stopped waiting for (a hedged
    /// read the backing won) still counts its whole time.
    latency: Arc<DeviceLatency>,
}

impl<D: BlockDevice> Timed<D> {
    pub fn new(inner: D, shared: Arc<CacheTimeouts>, wire: Arc<Tripwire>) -> Self {
        let id = inner.identity();
        Timed { inner: Arc::new(inner), id, shared, wire, latency: Arc::default() }
    }

    pub fn latency(&self) -> &DeviceLatency {
        &self.latency
    }

    /// `fut`, timed into `sum` from inside when small enough to compare.
    fn timed_op<T: Send + 'static>(
        &self,
        len: usize,
        pick: fn(&DeviceLatency) -> &LatencySum,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> impl Future<Output = T> + Send + 'static {
        let latency = (len <= SMALL_OP_BYTES).then(|| self.latency.clone());
        async move {
            let started = Instant::now();
            let out = fut.await;
            if let Some(l) = latency {
                pick(&l).record(started.elapsed());
            }
            out
        }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    pub fn wire(&self) -> &Arc<Tripwire> {
        &self.wire
    }

    async fn run<T: GiveUp>(&self, len: usize, factor: u32, fut: impl Future<Output = T> + Send + 'static) -> T {
        if self.wire.is_tripped() {
            return T::given_up(len, gave_up(None));
        }
        let limit = self.shared.timeout() * factor;
        let started = Instant::now();
        let mut fut: Pin<Box<dyn Future<Output = T> + Send>> = Box::pin(fut);
        // Page-cache hits and fast devices answer at the first poll: no clock, no timer.
        if let Poll::Ready(v) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
            return v;
        }
        let timer = async {
            if limit.is_zero() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep_until((started + limit).into()).await;
        };
        // Dropped while pending (the caller stopped waiting: a hedged read the backing won), the
        // operation finishes in a task of its own, as the engine would run it on anyway: its
        // latency is then still counted in full.
        let mut guard = FinishOnDrop(Some(fut));
        let fut = guard.0.as_mut().expect("operation present");
        let timed_out = tokio::select! {
            biased;
            v = fut => {
                guard.0 = None;
                return v;
            }
            _ = self.wire.tripped() => false,
            _ = timer => true,
        };
        self.abandon(guard.0.take().expect("operation present"));
        if timed_out {
            self.shared.timed_out.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                timeout_ms = limit.as_millis() as u64,
                "cache device did not answer in time; giving up on the cache set"
            );
            self.wire.trip();
            T::given_up(len, gave_up(Some(limit)))
        } else {
            T::given_up(len, gave_up(None))
        }
    }

    /// Lets the operation finish on its own, counted against this device until it does.
    fn abandon<T: Send + 'static>(&self, fut: Pin<Box<dyn Future<Output = T> + Send>>) {
        let (shared, id) = (self.shared.clone(), self.id);
        shared.hold(id);
        tokio::spawn(async move {
            let _ = fut.await;
            shared.release(id);
        });
    }
}

impl<D: BlockDevice> BlockDevice for Timed<D> {
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
        self.id
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        if !self.wire.is_tripped() {
            self.inner.drop_cached(offset, len)
        }
    }
    fn open_files(&self, out: &mut Vec<crate::device::OpenFile>) {
        self.inner.open_files(out)
    }
    /// Page-cache bytes cannot hang, so no time limit applies; a set already given up on is
    /// not read at all.
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<crate::device::FileSlice> {
        if self.wire.is_tripped() {
            return None;
        }
        self.inner.zero_copy_source(offset, len)
    }
    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let (d, len) = (self.inner.clone(), buf.len());
        self.run(len, 1, self.timed_op(len, |l| &l.read, async move { d.read(offset, buf).await })).await
    }
    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        let (d, len) = (self.inner.clone(), buf.len());
        self.run(len, 1, self.timed_op(len, |l| &l.write, async move { d.write(offset, buf, fua).await })).await
    }
    async fn write_shared(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        let (d, len) = (self.inner.clone(), data.len());
        self.run(0, 1, self.timed_op(len, |l| &l.write, async move { d.write_shared(offset, data, fua).await })).await
    }
    async fn flush(&self) -> io::Result<()> {
        let d = self.inner.clone();
        self.run(0, FLUSH_TIMEOUT_FACTOR, async move { d.flush().await }).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let d = self.inner.clone();
        self.run(0, 1, async move { d.write_zeroes(offset, len, may_unmap).await }).await
    }
    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let d = self.inner.clone();
        self.run(0, 1, async move { d.allocation(offset, len).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::fault::{FaultDevice, FaultOp};
    use crate::device::sim::mem::MemDevice;

    fn timed(ms: u64) -> (Timed<FaultDevice<MemDevice>>, FaultDevice<MemDevice>, Arc<CacheTimeouts>) {
        let dev = FaultDevice::new(MemDevice::new(1 << 20), 7);
        let shared = Arc::new(CacheTimeouts::new(Duration::from_millis(ms)));
        (Timed::new(dev.clone(), shared.clone(), Arc::new(Tripwire::default())), dev, shared)
    }

    #[tokio::test]
    async fn answers_in_time_pass_through() {
        let (t, _, shared) = timed(1000);
        let (_, r) = t.write(0, AlignedBuf::zeroed(4096), false).await;
        r.unwrap();
        let (_, r) = t.read(0, AlignedBuf::zeroed(4096)).await;
        r.unwrap();
        t.flush().await.unwrap();
        assert_eq!(shared.timed_out.load(Ordering::Relaxed), 0);
        assert!(!t.wire().is_tripped());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_device_times_out_trips_the_set_and_stays_counted_until_it_answers() {
        let (t, dev, shared) = timed(200);
        let tripped = Arc::new(AtomicBool::new(false));
        let seen = tripped.clone();
        t.wire().on_trip(move || seen.store(true, Ordering::Relaxed));
        dev.handle().hang(&[FaultOp::Write]);
        let started = tokio::time::Instant::now();
        let (b, r) = t.write(0, AlignedBuf::zeroed(8192), false).await;
        let e = r.unwrap_err();
        assert!(is_gave_up(&e), "{e}");
        assert!(e.to_string().contains("cache_timeout_ms"), "{e}");
        assert_eq!(b.len(), 8192);
        // Paused clock: only the fault device's own polling steps add to the limit.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_millis(250), "{waited:?}");
        assert!(t.wire().is_tripped() && tripped.load(Ordering::Relaxed));
        assert_eq!(shared.timed_out.load(Ordering::Relaxed), 1);
        assert_eq!(shared.outstanding(dev.identity()), 1);
        // Once tripped, nothing new reaches the device.
        let before = dev.handle().ops(FaultOp::Read);
        let (_, r) = t.read(0, AlignedBuf::zeroed(4096)).await;
        assert!(is_gave_up(&r.unwrap_err()));
        assert_eq!(dev.handle().ops(FaultOp::Read), before);
        // The device answers at last: the given-up write lands and is no longer counted.
        dev.handle().resume();
        for _ in 0..100 {
            if shared.outstanding(dev.identity()) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(shared.outstanding(dev.identity()), 0);
        assert_eq!(shared.abandoned_now.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trip_releases_every_waiter_at_once() {
        let (t, dev, shared) = timed(0);
        let t = Arc::new(t);
        dev.handle().hang(&[FaultOp::Read]);
        let waiters: Vec<_> = (0..4)
            .map(|i| {
                let t = t.clone();
                tokio::spawn(async move { t.read(i * 4096, AlignedBuf::zeroed(4096)).await.1 })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()), "no limit: reads wait");
        t.wire().trip();
        for w in waiters {
            assert!(is_gave_up(&w.await.unwrap().unwrap_err()));
        }
        assert_eq!(shared.timed_out.load(Ordering::Relaxed), 0);
        assert_eq!(shared.outstanding(dev.identity()), 4);
        dev.handle().resume();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(shared.outstanding(dev.identity()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn flush_gets_a_longer_limit() {
        let (t, dev, _) = timed(100);
        dev.handle().hang(&[FaultOp::Flush]);
        let started = tokio::time::Instant::now();
        assert!(t.flush().await.is_err());
        let waited = started.elapsed();
        let limit = Duration::from_millis(100) * FLUSH_TIMEOUT_FACTOR;
        assert!(waited >= limit && waited < limit + Duration::from_millis(50), "{waited:?}");
    }
}

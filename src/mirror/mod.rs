//! The mirror engine: a [`Volume`] that keeps a full copy of the exported disk on one or more
//! local cache devices (SSDs) and writes through to the durable backing device, like md RAID1
//! with the backing marked write-mostly.
//!
//! ```text
//!   front end ──► MirrorVolume
//!                   │ read:  Valid regions ──► cache (Striped<C>) ─ error ─► backing + rewrite cache
//!                   │        other regions ──► backing              (read repair; budget → degraded)
//!                   │ write: range lock ─► intent bit durable (group commit, Journal)
//!                   │        ─► backing ∥ cache ─► reply after both (backing error = client error)
//!                   │ background: rebuild (Invalid → Copying → Valid, hot-first, rate-limited)
//!                   │             cleaner (flush both, persist valid bitmap, clear idle intent bits)
//!   backing B: [ exported disk | intent ×2 | changed ×2 | SB A | SB B ]
//!   cache C*:  [ stripe data   | valid ×2  | (unused)   | SB A | SB B ]   (see docs/FORMAT.md)
//! ```
//!
//! # What keeps the invariants
//! * **No stale read**: a region is read from the cache only while its state is Valid
//!   ([`region`]). Writes hold a range lock over both device writes, so overlapping writes reach
//!   both devices in the same order; a failed cache or backing write invalidates its regions
//!   before the lock is released.
//! * **Across crashes**: for every region the cache's persisted valid bit is set only if the copies
//!   are equal, *or* the backing's write-intent bit is set (a write was in flight), *or* the cache's
//!   epoch is behind the backing's and the changed-regions bit is set (written while the cache was
//!   away). Start-up invalidates intent (and, for a stale set, changed) regions before anything
//!   else. Intent bits clear only after both devices were flushed and the valid bitmap persisted.
//! * **Disposable cache**: every cache error is absorbed (the backing has every acknowledged
//!   write); past the error budget the set is dropped and the engine runs degraded.
//! * **A stalled backing** (`device::guard`): every backing operation has an attempt timeout and a
//!   deadline; each client request runs under one request deadline that also bounds its waits for
//!   range locks and the write-intent commit, so a write fails with EIO by then and is never
//!   acknowledged without the backing. A backing write given up at its deadline stays fenced in
//!   the guard until the device really answers: no later write to those bytes is issued before it
//!   lands, and backing reads of them (client reads of invalid regions, rebuild copies, repairs,
//!   verify) wait for it, so the region the failed write invalidated is only made valid again
//!   from what the backing finally holds. Reads of valid regions never touch the backing.

mod cacheset;
pub mod hedge;
mod journal;
mod rebuild;
pub mod region;

mod util;
mod verify;

#[cfg(test)]
mod durability_tests;
#[cfg(test)]
mod tests;

pub use crate::device::layer::striped::Striped;
pub use hedge::{HedgePolicy, HedgeStats};
pub use verify::{verify_offline, verify_offline_report, VerifyReport};

use crate::device::layer::backing_guard::{self as guard, BackingIoStats, DurabilityLoss, Guarded, IoPolicy};
use crate::device::layer::cache_time_limit::{CacheTimeouts, Timed, Tripwire};
use crate::device::{AlignedBuf, BlockDevice, DeviceId, Extent, FileSlice, RangeLocks};
use crate::meta::store::{check_backing, read_superblock};
use crate::meta::superblock::{FLAG_FLUSH_FAILED, FLAG_OPEN};
use crate::meta::{Bits, Superblock};
use crate::volume::Volume;
use cacheset::{classify, CacheSet, Found};
use journal::Journal;
use region::RegionState;
use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use util::region_span;

/// A cache set as the engine holds it: every member behind its time limit.
pub(crate) type Set<C> = CacheSet<Timed<C>>;

/// md leaves a hung member to the SCSI/NVMe layer's 30 s timeouts and retries; a local SSD that
/// has not answered one request in 10 s is broken, and the backing holds every byte.
pub const DEFAULT_CACHE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long attaching a device waits for operations given up on it to finish before refusing.
const REATTACH_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// Region size for a backing formatted by this process. An existing backing keeps the region
    /// size recorded in its superblock (the bitmaps depend on it).
    pub region_bytes: u32,
    /// Stripe unit when several cache devices are striped (a power of two ≥ 4096).
    pub stripe_bytes: u32,
    /// Cache I/O errors tolerated (each repaired or absorbed) before the cache set is failed and
    /// the engine runs degraded. md ejects a member after 20 corrected read errors.
    pub read_error_budget: u32,
    /// Rebuild rate while clients are doing I/O (md's speed_limit_min); 0 counts as 1 MiB/s so a
    /// busy disk still gets rebuilt.
    pub rebuild_min_bytes_per_s: u64,
    /// Rebuild rate while idle (md's speed_limit_max); u64::MAX for unlimited.
    pub rebuild_max_bytes_per_s: u64,
    /// Format cache devices that belong to another superdisk or hold unknown data.
    pub take_over_foreign_cache: bool,
    /// Period of the metadata cleaner: idle write-intent bits clear after one to two periods, and
    /// the valid bitmap is persisted at least this often while it changes.
    pub metadata_interval_ms: u64,
    /// Timeouts, read retries and the request deadline for backing I/O (`backing_*` config keys).
    pub backing_io: IoPolicy,
    /// When a slow cache read is also sent to the backing (`hedge_*` config keys).
    pub hedge: HedgePolicy,
    /// How long a cache device may take to answer one read or write (a flush gets
    /// [`crate::device::layer::cache_time_limit::FLUSH_TIMEOUT_FACTOR`] times as long) before the whole set is given up on
    /// (`cache_timeout_ms`); zero for no limit.
    pub cache_timeout: Duration,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            region_bytes: crate::meta::DEFAULT_REGION_BYTES,
            stripe_bytes: 512 << 10,
            read_error_budget: 20,
            rebuild_min_bytes_per_s: 100 << 20,
            rebuild_max_bytes_per_s: u64::MAX,
            take_over_foreign_cache: false,
            metadata_interval_ms: 5000,
            backing_io: IoPolicy::default(),
            hedge: HedgePolicy::default(),
            cache_timeout: DEFAULT_CACHE_TIMEOUT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A cache set is attached and every region is valid in it.
    Healthy,
    /// No cache set: every read and write goes to the backing only.
    Degraded,
    /// A cache set is attached and some regions are still being copied to it.
    Rebuilding,
}

/// Every counter of the engine, in one place (the metrics endpoint reads these).
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Read requests (or parts of them) served by the cache, and by the backing.
    pub reads_cache: AtomicU64,
    pub reads_backing: AtomicU64,
    pub read_bytes_cache: AtomicU64,
    pub read_bytes_backing: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Cache ranges rewritten from the backing after a cache read error.
    pub repairs: AtomicU64,
    /// Cache read and write errors (each absorbed: the client never sees them).
    pub cache_errors: AtomicU64,
    /// Backing errors (these reach the client).
    pub backing_errors: AtomicU64,
    /// Times a cache set was dropped (error budget, metadata failure, operator).
    pub cache_failures: AtomicU64,
    /// Bytes of regions copied by the rebuild, and bytes it had to copy, since the set was attached.
    pub rebuild_done_bytes: AtomicU64,
    pub rebuild_total_bytes: AtomicU64,
    /// Recent rebuild copy rate.
    pub rebuild_rate_bytes_per_s: AtomicU64,
    /// Regions not valid in the attached cache set (0 when degraded).
    pub invalid_regions: AtomicU64,
    /// Write-intent/changed bitmap commits (each is one or more 4 KiB FUA writes).
    pub intent_commits: AtomicU64,
    /// Mismatches found by verify.
    pub verify_mismatches: AtomicU64,
    /// 1 while a verify runs; its progress in regions.
    pub verify_running: AtomicU64,
    pub verify_done_regions: AtomicU64,
    pub verify_total_regions: AtomicU64,
    /// Backing stalls: attempts past `backing_timeout_ms`, read retries, requests failed at
    /// `backing_io_deadline_ms`, outages, and the stalled-operation and in-outage gauges.
    pub backing_io: Arc<BackingIoStats>,
    /// Hedged cache reads ([`hedge`]).
    pub hedge: Arc<HedgeStats>,
    /// The cache devices' time limit, timeouts, and given-up operations not yet answered.
    pub cache_io: Arc<CacheTimeouts>,
}

/// Who answered a hedged read: the cache (its result, possibly an error to repair) or the backing.
enum Hedged {
    Cache(AlignedBuf, io::Result<()>),
    Backing(AlignedBuf),
}

/// Bounds the hot-first queue: beyond this, reads of invalid regions just wait for the scan.
const HOT_QUEUE_MAX: usize = 1024;

#[derive(Default)]
struct HotQueue {
    order: VecDeque<u64>,
    queued: HashSet<u64>,
}

pub(crate) struct Inner<B: BlockDevice, C: BlockDevice> {
    me: Weak<Inner<B, C>>,
    /// Every backing operation goes through the guard: timeouts, read retries, fencing.
    backing: Guarded<B>,
    data_bytes: u64,
    region_bytes: u64,
    regions: u64,
    opts: MirrorOptions,
    stats: Arc<MirrorStats>,
    journal: Journal,
    /// The attached cache set. Lock order: journal state, then this.
    cache: RwLock<Option<Arc<Set<C>>>>,
    /// Serialises overlapping writes, read repairs, rebuild copies and verify on both devices.
    locks: RangeLocks,
    /// Serialises attach, detach completion, cleaner passes and shutdown.
    transition: tokio::sync::Mutex<()>,
    /// A set was detached and the backing epoch not yet bumped for it.
    degrade_pending: AtomicBool,
    hot: Mutex<HotQueue>,
    /// Wakes the rebuild task.
    work: tokio::sync::Notify,
    /// Wakes [`MirrorVolume::wait_rebuilt`].
    settled: tokio::sync::Notify,
    rebuild_idle: AtomicBool,
    /// The operator froze the rebuild (md's sync_action=frozen).
    rebuild_paused: AtomicBool,
    /// Live copies of the options an operator can change while serving (SIGHUP, admin socket).
    rebuild_min_bytes_per_s: AtomicU64,
    rebuild_max_bytes_per_s: AtomicU64,
    read_error_budget: AtomicU64,
    hedger: hedge::Hedger,
    /// Foreground requests, for the rebuild's rate adaptation.
    fg_ops: AtomicU64,
    closed: AtomicBool,
    /// The backing's durability loss is recorded on its superblock (`FLAG_FLUSH_FAILED`).
    loss_persisted: AtomicBool,
}

pub struct MirrorVolume<B: BlockDevice, C: BlockDevice> {
    inner: Arc<Inner<B, C>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Why a cache set could not be attached: refused (the operator must act) or an I/O error (the
/// engine degrades and serves).
enum AttachError {
    Refused(io::Error),
    Io(io::Error),
}

impl From<AttachError> for io::Error {
    fn from(e: AttachError) -> io::Error {
        match e {
            AttachError::Refused(e) | AttachError::Io(e) => e,
        }
    }
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

fn out_of_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_none_or(|end| end > size)
}

impl<B: BlockDevice, C: BlockDevice> MirrorVolume<B, C> {
    /// Opens a backing device prepared by `superdisk create` with the cache devices `caches` (in
    /// any order; empty = start degraded). Tells the start-up cases apart:
    /// 1. the paired set, clean restart: valid as persisted;
    /// 2. the paired set after a crash: regions with write-intent bits are resynced;
    /// 3. the paired set, but the backing moved on without it: only the changed regions are
    ///    resynced (a full rebuild if that record is missing);
    /// 4. blank devices: formatted, full rebuild;
    /// 5. another superdisk's cache (or unknown data): refused unless `take_over_foreign_cache`;
    /// 6. no cache (or its devices fail): degraded, serving from the backing.
    pub async fn open(backing: B, caches: Vec<C>, opts: MirrorOptions) -> io::Result<Self> {
        let stats = Arc::new(MirrorStats::default());
        stats.cache_io.set_timeout(opts.cache_timeout);
        let backing = Guarded::new(backing, opts.backing_io.clone(), stats.backing_io.clone(), "backing");
        let sb = read_superblock(&backing).await?.map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{e}: not prepared for superdisk (run `superdisk create --backing …` first)"),
            )
        })?;
        check_backing(&sb, backing.size_bytes())?;
        if sb.region_bytes != opts.region_bytes {
            tracing::info!(recorded = sb.region_bytes, "using the region size recorded on the backing");
        }
        let (journal, info) = Journal::open(&backing, sb.clone(), stats.clone()).await?;
        if info.crashed {
            tracing::warn!(
                intent_regions = info.intent_regions,
                "the previous run did not stop cleanly; regions with write-intent bits will be resynced"
            );
        }
        let (rebuild_min, rebuild_max, error_budget) =
            (opts.rebuild_min_bytes_per_s, opts.rebuild_max_bytes_per_s, opts.read_error_budget);
        let hedger = hedge::Hedger::new(opts.hedge, stats.hedge.clone());
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            data_bytes: sb.data_size_bytes,
            region_bytes: u64::from(sb.region_bytes),
            regions: crate::meta::regions(sb.data_size_bytes, sb.region_bytes),
            backing,
            opts,
            stats,
            journal,
            cache: RwLock::new(None),
            locks: RangeLocks::default(),
            transition: tokio::sync::Mutex::new(()),
            degrade_pending: AtomicBool::new(false),
            hot: Mutex::new(HotQueue::default()),
            work: tokio::sync::Notify::new(),
            settled: tokio::sync::Notify::new(),
            rebuild_idle: AtomicBool::new(false),
            rebuild_paused: AtomicBool::new(false),
            rebuild_min_bytes_per_s: AtomicU64::new(rebuild_min),
            rebuild_max_bytes_per_s: AtomicU64::new(rebuild_max),
            read_error_budget: AtomicU64::new(u64::from(error_budget)),
            hedger,
            fg_ops: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            loss_persisted: AtomicBool::new(false),
        });
        inner.recall_durability_loss(&sb);
        if caches.is_empty() {
            tracing::warn!("no cache device: serving degraded from the backing");
            inner.start_degraded().await?;
        } else {
            match inner.attach(caches, inner.opts.take_over_foreign_cache).await {
                Ok(()) => {}
                Err(AttachError::Refused(e)) => return Err(e),
                Err(AttachError::Io(e)) => {
                    tracing::error!(error = %e, "cannot use the cache device(s); serving degraded from the backing");
                    inner.start_degraded().await?;
                }
            }
        }
        let tasks = vec![
            tokio::spawn(rebuild::rebuild_loop(inner.clone())),
            tokio::spawn(cleaner_loop(inner.clone())),
            tokio::spawn(durability_watch(inner.clone())),
        ];
        Ok(MirrorVolume { inner, tasks: Mutex::new(tasks) })
    }

    pub fn stats(&self) -> Arc<MirrorStats> {
        self.inner.stats.clone()
    }

    pub fn mode(&self) -> Mode {
        self.inner.mode()
    }

    /// Resolves when nothing is left to rebuild: every region valid in the attached set and its
    /// valid bitmap persisted, or no set attached (degraded: nothing can be rebuilt).
    pub async fn wait_rebuilt(&self) {
        loop {
            let notified = self.inner.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.is_settled() {
                return;
            }
            notified.await;
        }
    }

    /// Drops the cache set (operator or test) and runs degraded.
    pub async fn fail_cache(&self) {
        if let Some(set) = self.inner.cache_now() {
            self.inner.detach(&set, "failed by request");
        }
        let _t = self.inner.transition.lock().await;
        if let Err(e) = self.inner.complete_degrade().await {
            tracing::error!(error = %e, "cannot record degraded operation on the backing; will retry");
        }
    }

    /// Attaches `caches` as the cache set (replacing the current one, if any): the same set comes
    /// back with only what it missed resynced; a blank or unknown one is formatted and rebuilt.
    pub async fn replace_cache(&self, caches: Vec<C>) -> io::Result<()> {
        self.replace_cache_with(caches, self.inner.opts.take_over_foreign_cache).await
    }

    /// [`Self::replace_cache`], saying whether a foreign or unknown set may be formatted (an
    /// operator's explicit `--take-over` on the admin socket).
    pub async fn replace_cache_with(&self, caches: Vec<C>, take_over: bool) -> io::Result<()> {
        if caches.is_empty() {
            self.fail_cache().await;
            return Ok(());
        }
        self.inner.attach(caches, take_over).await.map_err(io::Error::from)
    }

    /// Takes the cache set out of service on purpose (before pulling an SSD): its progress is made
    /// durable first, so bringing the same set back later resyncs only what changed meanwhile.
    /// Unlike [`Self::fail_cache`] it does not count as a cache failure. False if none was attached.
    pub async fn remove_cache(&self) -> bool {
        let Some(set) = self.inner.cache_now() else {
            return false;
        };
        let saved = async {
            set.dev.flush().await?;
            set.persist_valid().await
        }
        .await;
        if let Err(e) = saved {
            tracing::warn!(error = %e, "cannot save the cache set's progress before removing it; it will need a fuller resync");
        }
        let removed = self.inner.detach_for(&set, "removed by the operator", false);
        let _t = self.inner.transition.lock().await;
        if let Err(e) = self.inner.complete_degrade().await {
            tracing::error!(error = %e, "cannot record degraded operation on the backing; will retry");
        }
        removed
    }

    /// Changes the rebuild's rate limits while serving (SIGHUP or the admin socket).
    pub fn set_rebuild_rates(&self, min_bytes_per_s: u64, max_bytes_per_s: u64) {
        self.inner.rebuild_min_bytes_per_s.store(min_bytes_per_s, Ordering::Relaxed);
        self.inner.rebuild_max_bytes_per_s.store(max_bytes_per_s, Ordering::Relaxed);
        self.inner.work.notify_one();
    }

    /// (min, max) rebuild rate in bytes/s.
    pub fn rebuild_rates(&self) -> (u64, u64) {
        (
            self.inner.rebuild_min_bytes_per_s.load(Ordering::Relaxed),
            self.inner.rebuild_max_bytes_per_s.load(Ordering::Relaxed),
        )
    }

    pub fn rebuild_paused(&self) -> bool {
        self.inner.rebuild_paused.load(Ordering::Acquire)
    }

    pub fn set_read_error_budget(&self, budget: u32) {
        self.inner.read_error_budget.store(u64::from(budget), Ordering::Relaxed);
    }

    /// Applies new `hedge_*` settings to reads that start from now on.
    /// Changes the cache devices' time limit for operations that start from now on.
    pub fn set_cache_timeout(&self, timeout: Duration) {
        self.inner.stats.cache_io.set_timeout(timeout);
    }

    pub fn cache_timeout(&self) -> Duration {
        self.inner.stats.cache_io.timeout()
    }

    /// Operations on device `id` that were given up on (timed out) and that it has not answered
    /// yet: while any is, the device cannot be attached again (see [`crate::device::timeout`]).
    pub async fn cache_outstanding(&self, id: Option<DeviceId>) -> u64 {
        self.inner.stats.cache_io.outstanding_after(id, REATTACH_GRACE).await
    }

    pub fn set_hedge_policy(&self, policy: HedgePolicy) {
        self.inner.hedger.set_policy(policy);
    }

    #[cfg(test)]
    pub(crate) fn set_hedge_refresh(&self, every: Duration) {
        self.inner.hedger.set_refresh(every);
    }

    pub fn hedge_policy(&self) -> HedgePolicy {
        self.inner.hedger.policy()
    }

    pub fn read_error_budget(&self) -> u32 {
        self.inner.read_error_budget.load(Ordering::Relaxed) as u32
    }

    /// Size of one region (the unit of the bitmaps) and how many the disk has.
    pub fn regions(&self) -> u64 {
        self.inner.regions
    }

    /// Compares the cache with the backing for every valid region; returns the mismatching
    /// (offset, length) ranges of the exported disk, and with `repair` rewrites them from the
    /// backing.
    pub async fn verify(&self, repair: bool) -> io::Result<Vec<(u64, u64)>> {
        self.inner.verify_online(repair).await
    }

    /// Freezes (or resumes) the background rebuild, like md's `sync_action=frozen`: regions stay
    /// invalid and are read from the backing until it resumes. `wait_rebuilt` waits meanwhile.
    pub fn set_rebuild_paused(&self, paused: bool) {
        self.inner.rebuild_paused.store(paused, Ordering::Release);
        self.inner.work.notify_one();
    }

    /// Runs one metadata cleaner pass now (tests; the background task runs it periodically).
    pub async fn clean_metadata(&self) -> io::Result<()> {
        self.inner.clean_pass().await
    }

    /// Regions with a write-intent bit set (in memory), and regions in the changed record.
    pub fn dirty_regions(&self) -> (u64, u64) {
        (self.inner.journal.intent_count(), self.inner.journal.changed_count())
    }

    /// The backing superblock as last written.
    pub fn backing_superblock(&self) -> Superblock {
        self.inner.journal.sb()
    }

    pub fn region_bytes(&self) -> u64 {
        self.inner.region_bytes
    }

    pub fn backing(&self) -> &B {
        self.inner.backing.inner()
    }

    /// Why the backing can no longer be trusted with what it acknowledged, if it cannot (a flush
    /// or FUA write failed, in this run or an earlier one): every client FLUSH and FUA write fails
    /// meanwhile (see `device::guard::Durability`).
    pub fn durability_lost(&self) -> Option<DurabilityLoss> {
        self.inner.backing.durability().loss()
    }

    /// The operator's `clear-flush-error`, once the clients have dealt with the error (the
    /// filesystem unmounted and repaired, say). Makes the copies consistent with what the backing
    /// really holds first: its page cache is dropped (pages whose write-back failed may still be
    /// there, clean) and every region with a write-intent bit, which is every region that was
    /// written since the last good flush, is invalidated in the cache and copied again.
    pub async fn clear_durability_loss(&self) -> io::Result<()> {
        self.inner.clear_durability_loss().await
    }

    /// Whether a backing operation is stalled right now (an outage is under way).
    pub fn backing_stalled(&self) -> bool {
        self.inner.backing.in_outage()
    }

    fn stop_tasks(&self) -> Vec<JoinHandle<()>> {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks poisoned"));
        for t in &tasks {
            t.abort();
        }
        tasks
    }
}

impl<B: BlockDevice, C: BlockDevice> Drop for MirrorVolume<B, C> {
    fn drop(&mut self) {
        // Without shutdown this is a crash as far as the devices are concerned; the background
        // tasks must not outlive the volume.
        self.inner.closed.store(true, Ordering::Release);
        self.stop_tasks();
    }
}

async fn cleaner_loop<B: BlockDevice, C: BlockDevice>(inner: Arc<Inner<B, C>>) {
    let period = Duration::from_millis(inner.opts.metadata_interval_ms.max(1));
    loop {
        tokio::time::sleep(period).await;
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = inner.clean_pass().await {
            // While the backing is stalled the outage was logged once; a failure every period would
            // only repeat it.
            if inner.backing.in_outage() || guard::is_deadline_error(&e) {
                tracing::debug!(error = %e, "metadata cleaner pass failed during a backing stall; will retry");
            } else {
                tracing::warn!(error = %e, "metadata cleaner pass failed; will retry");
            }
        }
    }
}

/// Records a durability loss on the backing's superblock as soon as the guard sees one (a cleaner
/// flush, a rebuild flush or a metadata write may be first), so that a crash before any client
/// hears of it cannot turn it into a silent loss: the next start fails FLUSH as this one does.
async fn durability_watch<B: BlockDevice, C: BlockDevice>(inner: Arc<Inner<B, C>>) {
    loop {
        let changed = inner.backing.durability().changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        inner.persist_loss().await;
        changed.await;
    }
}

impl<B: BlockDevice, C: BlockDevice> Inner<B, C> {
    /// At open: a loss recorded by an earlier run stays in force. The backing's page cache may
    /// still hold pages whose write-back failed (clean, so nothing will write them again): drop
    /// it, so every read from now on sees what the media holds.
    fn recall_durability_loss(&self, sb: &Superblock) {
        if sb.flags & FLAG_FLUSH_FAILED == 0 {
            return;
        }
        self.backing.durability().record("recorded on the backing by an earlier run".into(), false);
        self.loss_persisted.store(true, Ordering::Release);
        self.backing.drop_cached(0, self.backing.size_bytes());
        tracing::error!(
            "a flush or FUA write of the backing failed in an earlier run: data acknowledged before it may be \
             lost; every FLUSH and FUA write fails until the operator runs `superdisk clear-flush-error`"
        );
    }

    /// Writes `FLAG_FLUSH_FAILED` once durability is lost (once per loss).
    async fn persist_loss(&self) {
        if !self.backing.durability().is_lost() || self.loss_persisted.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.journal.update_sb(&self.backing, |sb| sb.flags |= FLAG_FLUSH_FAILED).await {
            self.loss_persisted.store(false, Ordering::Release);
            tracing::error!(error = %e, "cannot record the backing's lost durability on its superblock; will retry");
        }
    }

    /// Ok while the backing is trusted; else the error a client's FLUSH or FUA write gets, once
    /// the loss is on the superblock.
    async fn check_durable(&self) -> io::Result<()> {
        if let Err(e) = self.backing.durability().check() {
            self.persist_loss().await;
            return Err(e);
        }
        Ok(())
    }

    /// A client's FLUSH: the backing's (the cache is flushed by the cleaner, which is what the
    /// valid bitmap depends on). Never Ok once a flush or FUA write failed, here or elsewhere.
    async fn client_flush(&self) -> io::Result<()> {
        self.check_durable().await?;
        let r = self.backing.flush().await;
        // A failure this flush (or a sync beside it) just saw wins over its own answer.
        self.check_durable().await?;
        r
    }

    async fn clear_durability_loss(&self) -> io::Result<()> {
        let _t = self.transition.lock().await;
        let Some(loss) = self.backing.durability().loss() else {
            return Ok(());
        };
        self.backing.drop_cached(0, self.backing.size_bytes());
        let intent = self.journal.intent_regions();
        if let Some(set) = self.cache_now() {
            for &r in &intent {
                self.invalidate(&set, r..r + 1);
            }
        }
        self.backing.flush().await?;
        self.backing.durability().clear();
        self.journal.update_sb(&self.backing, |sb| sb.flags &= !FLAG_FLUSH_FAILED).await?;
        self.loss_persisted.store(false, Ordering::Release);
        tracing::warn!(
            cause = %loss.cause,
            resynced_regions = intent.len(),
            "the operator cleared the backing's flush error: FLUSH and FUA writes succeed again; regions written \
             since the last good flush are copied to the cache again from what the backing holds"
        );
        Ok(())
    }

    fn cache_now(&self) -> Option<Arc<Set<C>>> {
        self.cache.read().expect("cache pointer poisoned").clone()
    }

    fn mode(&self) -> Mode {
        match self.cache_now() {
            None => Mode::Degraded,
            Some(s) if s.table.not_valid() > 0 => Mode::Rebuilding,
            Some(_) => Mode::Healthy,
        }
    }

    fn is_settled(&self) -> bool {
        match self.cache_now() {
            None => true,
            Some(s) => s.table.not_valid() == 0 && self.rebuild_idle.load(Ordering::Acquire),
        }
    }

    fn region_bounds(&self, r: u64) -> (u64, u64) {
        let start = r * self.region_bytes;
        (start, self.region_bytes.min(self.data_bytes - start))
    }

    fn update_invalid_gauge(&self) {
        let n = self.cache_now().map_or(0, |s| s.table.not_valid());
        self.stats.invalid_regions.store(n, Ordering::Relaxed);
    }

    /// Invalidates regions `rs` of `set` and wakes the rebuild for them.
    fn invalidate(&self, set: &Set<C>, rs: std::ops::Range<u64>) {
        let mut n = 0;
        for r in rs {
            if set.table.invalidate(r) {
                n += 1;
            }
        }
        if n > 0 {
            self.stats.rebuild_total_bytes.fetch_add(n * self.region_bytes, Ordering::Relaxed);
            self.update_invalid_gauge();
            self.work.notify_one();
        }
    }

    /// Invalidates regions whose cache copy is known to be bad (a failed repair write, a verify
    /// mismatch) so that it survives a crash and a re-attach as well: the regions' write-intent
    /// bits go on the backing, and every attach subtracts those from the persisted valid bitmap.
    /// (A failed client write needs nothing more: its intent bit is set already.)
    async fn invalidate_durably(&self, set: &Arc<Set<C>>, rs: std::ops::Range<u64>) {
        self.invalidate(set, rs.clone());
        if let Err(e) = self.journal.mark(&self.backing, rs, |_| ()).await {
            tracing::warn!(error = %e, "cannot record an invalidation on the backing; saving the cache's valid bitmap");
            if let Err(e) = set.persist_valid().await {
                self.cache_meta_failed(set, &e);
            }
        }
    }

    /// Counts a cache error against the set's budget; true if the set is (now) failed.
    fn cache_error(&self, set: &Arc<Set<C>>) -> bool {
        if set.is_failed() {
            return true;
        }
        self.stats.cache_errors.fetch_add(1, Ordering::Relaxed);
        if set.wire.is_tripped() {
            // A member stopped answering: waiting for it costs every request that touches it.
            self.fail_set(set, "a cache device did not answer within cache_timeout_ms");
            return true;
        }
        let n = set.errors.fetch_add(1, Ordering::AcqRel) + 1;
        if n > self.read_error_budget.load(Ordering::Relaxed) {
            self.fail_set(set, "cache error budget exceeded");
            return true;
        }
        false
    }

    /// Detaches a failing set and records the degraded period on the backing in the background.
    fn fail_set(&self, set: &Arc<Set<C>>, why: &str) {
        if self.detach(set, why) {
            if let Some(me) = self.me.upgrade() {
                tokio::spawn(async move {
                    let _t = me.transition.lock().await;
                    if let Err(e) = me.complete_degrade().await {
                        tracing::error!(error = %e, "cannot record degraded operation on the backing; will retry");
                    }
                });
            }
        }
    }

    /// Takes `set` out of service if it is the attached one. From here on no request uses it, and
    /// every region written (or possibly in flight) joins the changed record. The backing epoch
    /// is bumped by [`Inner::complete_degrade`]; until then no intent bit is cleared.
    fn detach(&self, set: &Arc<Set<C>>, why: &str) -> bool {
        self.detach_for(set, why, true)
    }

    /// [`Inner::detach`]; `failure` says whether it counts as a cache failure (not when the
    /// operator removes the set on purpose).
    fn detach_for(&self, set: &Arc<Set<C>>, why: &str, failure: bool) -> bool {
        let detached = self.journal.start_recording_if(|| {
            let mut cur = self.cache.write().expect("cache pointer poisoned");
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, set)) {
                *cur = None;
                set.failed.store(true, Ordering::Release);
                // Under the journal lock, so the cleaner cannot clear intent bits between the
                // detach and this mark.
                self.degrade_pending.store(true, Ordering::Release);
                true
            } else {
                false
            }
        });
        if detached {
            tracing::warn!(reason = why, "cache set detached; serving degraded from the backing");
            if failure {
                self.stats.cache_failures.fetch_add(1, Ordering::Relaxed);
                // Requests still waiting on a failed set give up now instead of at their limit.
                // Outside the journal lock: the trip callback detaches (a no-op by now).
                set.wire.trip();
            }
            self.update_invalid_gauge();
            self.settled.notify_waiters();
        }
        detached
    }

    /// Makes a detach durable: bump the backing epoch (so the detached set is known to be stale)
    /// and commit the changed record. Caller holds `transition`.
    async fn complete_degrade(&self) -> io::Result<()> {
        if !self.degrade_pending.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let r = async {
            self.journal.update_sb(&self.backing, |sb| sb.epoch += 1).await?;
            self.journal.commit(&self.backing).await
        }
        .await;
        if r.is_err() {
            self.degrade_pending.store(true, Ordering::Release);
        }
        r
    }

    /// Start-up without a usable cache: record changes from now on, under a new epoch.
    async fn start_degraded(&self) -> io::Result<()> {
        self.journal.start_recording_if(|| true);
        let _t = self.transition.lock().await;
        self.journal.update_sb(&self.backing, |sb| sb.epoch += 1).await?;
        self.journal.commit(&self.backing).await
    }

    async fn attach(&self, members: Vec<C>, take_over: bool) -> Result<(), AttachError> {
        let _t = self.transition.lock().await;
        // A write given up on a device that hung may still land on it; attached and resynced
        // before that, the late write would put old bytes under a region marked valid.
        for m in &members {
            let n = self.stats.cache_io.outstanding_after(m.identity(), REATTACH_GRACE).await;
            if n > 0 {
                return Err(AttachError::Refused(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "{n} operation(s) given up on this device when it stopped answering are still outstanding; \
                         it can be attached again once it has answered them"
                    ),
                )));
            }
        }
        let wire = Arc::new(Tripwire::default());
        let members: Vec<Timed<C>> =
            members.into_iter().map(|m| Timed::new(m, self.stats.cache_io.clone(), wire.clone())).collect();
        self.complete_degrade().await.map_err(AttachError::Io)?;
        // Look at the new devices before letting go of the attached set: a refused or unreadable
        // replacement leaves the old set serving.
        let found = classify(members, &self.journal.sb(), take_over).await.map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                AttachError::Refused(e)
            } else {
                AttachError::Io(e)
            }
        })?;
        if let Some(cur) = self.cache_now() {
            self.detach(&cur, "replaced");
            self.complete_degrade().await.map_err(AttachError::Io)?;
        }
        // After the detach: the epoch it bumped is what the new set is judged against.
        let bsb = self.journal.sb();
        let (members, generations, reason) = match found {
            Found::Existing { members, sbs, bitmaps, valid } => {
                let set_uuid = sbs[0].cache_set_uuid;
                let set_epoch = sbs[0].epoch;
                let generations: Vec<u64> = sbs.iter().map(|s| s.generation).collect();
                let mut parts = Some((members, sbs, bitmaps, valid));
                let installed = self.journal.stop_recording_if(|intent, changed, recording| {
                    let (_, _, _, persisted) = parts.as_ref().expect("parts present");
                    let trusted = reusable_valid(&bsb, set_uuid, set_epoch, persisted, intent, changed, recording)?;
                    let (members, sbs, bitmaps, persisted) = parts.take().expect("parts present");
                    let set = Arc::new(CacheSet::existing(members, sbs, bitmaps, persisted, &trusted, wire.clone()));
                    *self.cache.write().expect("cache pointer poisoned") = Some(set.clone());
                    Some(set)
                });
                if let Some(set) = installed {
                    // Outside the journal lock: a wire tripped already fails the set at once, and
                    // failing detaches, which takes that lock. A trip in between is seen here.
                    self.arm_wire(&set);
                    return self.finish_reattach(set, &bsb, set_epoch).await.map_err(AttachError::Io);
                }
                let (members, _, _, _) = parts.take().expect("parts present");
                let why = if bsb.cache_set_uuid == [0; 16] {
                    "the backing has no cache set paired with it yet (first use, or it was served without its cache)"
                } else if set_uuid != bsb.cache_set_uuid {
                    "the cache set is not the one paired with this backing"
                } else {
                    "the cache set missed writes and the record of them is gone"
                };
                (members, generations, why.to_string())
            }
            Found::Format { members, generations, reason } => (members, generations, reason),
        };
        tracing::info!(reason = %reason, "formatting the cache set; full rebuild");
        let set = CacheSet::format(members, &generations, &bsb, self.opts.stripe_bytes, bsb.epoch, wire)
            .await
            .map_err(|e| {
                if e.kind() == io::ErrorKind::InvalidInput {
                    AttachError::Refused(e)
                } else {
                    AttachError::Io(e)
                }
            })?;
        let set = Arc::new(set);
        self.arm_wire(&set);
        // Pair the backing with the new set; the changed record now starts from this epoch. Any
        // other set (a different uuid) is no longer paired and will be rebuilt in full.
        let pair = async {
            self.journal
                .update_sb(&self.backing, |sb| {
                    sb.cache_set_uuid = set.uuid;
                    sb.changed_since_epoch = sb.epoch;
                })
                .await?;
            self.journal.reset_changed();
            self.journal.commit(&self.backing).await
        };
        pair.await.map_err(AttachError::Io)?;
        self.journal.stop_recording_if(|_, _, _| {
            *self.cache.write().expect("cache pointer poisoned") = Some(set.clone());
            Some(())
        });
        self.started_rebuild(&set);
        Ok(())
    }

    /// Persists what re-attaching the paired set invalidated, then marks it in sync with the
    /// backing epoch, then drops the changed record it no longer needs — in that order, so a crash
    /// in between leaves either the old epoch (the record still applies) or the new one with the
    /// invalidations durable.
    async fn finish_reattach(&self, set: Arc<Set<C>>, bsb: &Superblock, set_epoch: u64) -> io::Result<()> {
        let invalid = set.table.not_valid();
        tracing::info!(
            invalid_regions = invalid,
            in_sync = set_epoch == bsb.epoch,
            "cache set re-attached; resyncing only the regions it may have missed"
        );
        let r = async {
            set.persist_valid().await?;
            set.set_epoch(bsb.epoch).await
        }
        .await;
        if let Err(e) = r {
            self.detach(&set, "cannot write its metadata");
            self.complete_degrade().await?;
            return Err(e);
        }
        if self.journal.changed_count() > 0 || bsb.changed_since_epoch != bsb.epoch {
            self.journal.update_sb(&self.backing, |sb| sb.changed_since_epoch = sb.epoch).await?;
            self.journal.reset_changed();
            self.journal.commit(&self.backing).await?;
        }
        self.started_rebuild(&set);
        Ok(())
    }

    /// A member that times out fails the set at once, whatever request was waiting on it.
    fn arm_wire(&self, set: &Arc<Set<C>>) {
        let (me, weak_set) = (self.me.clone(), Arc::downgrade(set));
        set.wire.on_trip(move || {
            if let (Some(me), Some(set)) = (me.upgrade(), weak_set.upgrade()) {
                me.fail_set(&set, "a cache device did not answer within cache_timeout_ms");
            }
        });
        if set.wire.is_tripped() {
            self.fail_set(set, "a cache device did not answer within cache_timeout_ms");
        }
    }

    fn started_rebuild(&self, set: &Set<C>) {
        self.stats.rebuild_total_bytes.store(set.table.not_valid() * self.region_bytes, Ordering::Relaxed);
        self.stats.rebuild_done_bytes.store(0, Ordering::Relaxed);
        self.rebuild_idle.store(false, Ordering::Release);
        self.update_invalid_gauge();
        self.work.notify_one();
    }

    /// One pass of the metadata cleaner: persist the valid bitmap, and clear the write-intent bits
    /// of regions idle since the previous pass once both devices were flushed after their writes.
    async fn clean_pass(&self) -> io::Result<()> {
        let _t = self.transition.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.complete_degrade().await?;
        let set = self.cache_now();
        // A write given up on may still land in a candidate: a flush now would not cover it.
        // (One that lands before the next pass takes its candidates is covered by that pass's.)
        let cands: Vec<u64> = self
            .journal
            .clean_candidates()
            .into_iter()
            .filter(|&r| {
                let (start, len) = self.region_bounds(r);
                !self.backing.write_outstanding(start, start + len)
            })
            .collect();
        // After a failed flush no flush says anything about the writes before it: keep every bit.
        let clearing = !cands.is_empty() && !self.backing.durability().is_lost();
        let backing_flush = async {
            match clearing {
                true => self.backing.flush().await,
                false => Ok(()),
            }
        };
        let cache_flush = async {
            match (&set, clearing) {
                (Some(s), true) => s.dev.flush().await,
                _ => Ok(()),
            }
        };
        let (rb, rc) = tokio::join!(backing_flush, cache_flush);
        if let Err(e) = rb {
            self.persist_loss().await;
            return Err(e);
        }
        if let Some(set) = &set {
            if let Err(e) = rc {
                self.cache_meta_failed(set, &e);
                return Ok(());
            }
            if let Err(e) = set.persist_valid().await {
                self.cache_meta_failed(set, &e);
                return Ok(());
            }
        }
        if !clearing || self.degrade_pending.load(Ordering::Acquire) || self.backing.durability().is_lost() {
            // Nothing to clear, durability lost meanwhile, or a set was detached during the pass
            // (recorded first, next pass).
            return Ok(());
        }
        self.journal.clear_idle(&self.backing, &cands).await?;
        Ok(())
    }

    fn cache_meta_failed(&self, set: &Arc<Set<C>>, e: &io::Error) {
        if !set.is_failed() {
            tracing::error!(error = %e, "cache flush or metadata write failed");
            self.stats.cache_errors.fetch_add(1, Ordering::Relaxed);
            self.fail_set(set, "cache metadata could not be written");
        }
    }

    fn push_hot(&self, r: u64) {
        let mut hot = self.hot.lock().expect("hot queue poisoned");
        if hot.order.len() < HOT_QUEUE_MAX && hot.queued.insert(r) {
            hot.order.push_back(r);
            drop(hot);
            self.work.notify_one();
        }
    }

    fn pop_hot(&self) -> Option<u64> {
        let mut hot = self.hot.lock().expect("hot queue poisoned");
        let r = hot.order.pop_front()?;
        hot.queued.remove(&r);
        Some(r)
    }

    // ---- data path ----

    async fn read(&self, offset: u64, mut buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        if len == 0 {
            return (buf, Ok(()));
        }
        if out_of_range(offset, len, self.data_bytes) {
            return (buf, Err(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        self.fg_ops.fetch_add(1, Ordering::Relaxed);
        let Some(set) = self.cache_now() else {
            return self.read_backing(offset, buf).await;
        };
        // Runs of consecutive regions with the same source: (start, end, from_cache).
        let end = offset + len;
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for r in region_span(offset, len, self.region_bytes) {
            let state = set.table.get(r);
            if state == RegionState::Invalid {
                self.push_hot(r);
            }
            let cached = state == RegionState::Valid;
            let s = offset.max(r * self.region_bytes);
            let e = end.min((r + 1) * self.region_bytes);
            match runs.last_mut() {
                Some(last) if last.2 == cached => last.1 = e,
                _ => runs.push((s, e, cached)),
            }
        }
        if let [(_, _, cached)] = runs[..] {
            return if cached {
                self.read_cache(&set, offset, buf).await
            } else {
                self.read_backing(offset, buf).await
            };
        }
        let futs: Vec<_> = runs
            .iter()
            .map(|&(s, e, cached)| {
                let b = AlignedBuf::uninit_for_fill((e - s) as usize);
                let set = &set;
                async move {
                    if cached {
                        self.read_cache(set, s, b).await
                    } else {
                        self.read_backing(s, b).await
                    }
                }
            })
            .collect();
        let mut result = Ok(());
        for (&(s, _, _), (b, r)) in runs.iter().zip(crate::device::join::join_all(futs).await) {
            match r {
                Ok(()) => {
                    let at = (s - offset) as usize;
                    buf[at..at + b.len()].copy_from_slice(&b);
                }
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        (buf, result)
    }

    /// The same choice of source as `read`, for a range whose bytes one device's page cache holds
    /// whole: the cache when every region is valid there, the backing when there is no cache.
    /// A range that mixes sources, or is not all in memory, is left to `read`.
    fn read_zero_copy(&self, offset: u64, len: u64) -> Option<FileSlice> {
        if len == 0 || out_of_range(offset, len, self.data_bytes) {
            return None;
        }
        let len_usize = usize::try_from(len).ok()?;
        let Some(set) = self.cache_now() else {
            let slice = self.backing.zero_copy_source(offset, len_usize)?;
            self.fg_ops.fetch_add(1, Ordering::Relaxed);
            self.stats.reads_backing.fetch_add(1, Ordering::Relaxed);
            self.stats.read_bytes_backing.fetch_add(len, Ordering::Relaxed);
            return Some(slice);
        };
        if region_span(offset, len, self.region_bytes).any(|r| set.table.get(r) != RegionState::Valid) {
            return None;
        }
        let slice = set.dev.zero_copy_source(offset, len_usize)?;
        self.fg_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.reads_cache.fetch_add(1, Ordering::Relaxed);
        self.stats.read_bytes_cache.fetch_add(len, Ordering::Relaxed);
        Some(slice)
    }

    async fn read_backing(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        let (buf, r) = self.backing.read(offset, buf).await;
        self.stats.reads_backing.fetch_add(1, Ordering::Relaxed);
        self.stats.read_bytes_backing.fetch_add(len, Ordering::Relaxed);
        if r.is_err() {
            self.stats.backing_errors.fetch_add(1, Ordering::Relaxed);
        }
        (buf, r)
    }

    /// Reads from the cache; on error, serves from the backing and rewrites the cache range.
    async fn read_cache(&self, set: &Arc<Set<C>>, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        let (buf, r) = if self.hedger.eligible(buf.len()) {
            match self.read_cache_hedged(set, offset, buf).await {
                Hedged::Cache(buf, r) => (buf, r),
                Hedged::Backing(buf) => return (buf, Ok(())),
            }
        } else {
            set.dev.read(offset, buf).await
        };
        match r {
            Ok(()) => {
                self.stats.reads_cache.fetch_add(1, Ordering::Relaxed);
                self.stats.read_bytes_cache.fetch_add(len, Ordering::Relaxed);
                (buf, Ok(()))
            }
            Err(e) => self.read_repair(set, offset, buf, e).await,
        }
    }

    /// A cache read that, once slower than the hedging threshold, races a backing read.
    async fn read_cache_hedged(&self, set: &Arc<Set<C>>, offset: u64, buf: AlignedBuf) -> Hedged {
        let started = Instant::now();
        let hedge_at = self.hedger.start(started);
        let out = self.cache_or_backing(set, offset, buf, hedge_at).await;
        // When the backing won, the cache's time so far is a lower bound of its latency: recorded
        // as such, so a stalling cache's p99 never looks better than it is.
        self.hedger.finish(started.elapsed());
        out
    }

    async fn cache_or_backing(&self, set: &Arc<Set<C>>, offset: u64, buf: AlignedBuf, hedge_at: Instant) -> Hedged {
        let len = buf.len();
        let mut cache = std::pin::pin!(set.dev.read(offset, buf));
        // Most reads finish at their first poll (page cache) or before the threshold: only those
        // still pending pay for a timer.
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(cache.as_mut(), cx))).await;
        if let std::task::Poll::Ready((buf, r)) = first {
            return Hedged::Cache(buf, r);
        }
        tokio::select! {
            biased;
            (buf, r) = &mut cache => return Hedged::Cache(buf, r),
            _ = tokio::time::sleep_until(hedge_at.into()) => {}
        }
        if !self.hedger.try_hedge() {
            let (buf, r) = cache.await;
            return Hedged::Cache(buf, r);
        }
        // The backing has every acknowledged write, so its copy is never older than the cache's.
        let mut backing = std::pin::pin!(self.read_backing(offset, AlignedBuf::uninit_for_fill(len)));
        tokio::select! {
            biased;
            (buf, r) = &mut cache => Hedged::Cache(buf, r),
            (b, rb) = &mut backing => match rb {
                // The cache read is abandoned; its engine keeps the buffer until the device answers.
                Ok(()) => {
                    self.hedger.backing_won();
                    Hedged::Backing(b)
                }
                // A failing backing does not fail a read the cache can still answer.
                Err(_) => {
                    let (buf, r) = cache.await;
                    Hedged::Cache(buf, r)
                }
            },
        }
    }

    async fn read_repair(
        &self,
        set: &Arc<Set<C>>,
        offset: u64,
        buf: AlignedBuf,
        e: io::Error,
    ) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        tracing::warn!(offset, len, error = %e, "cache read error; serving from the backing and rewriting the cache");
        let failed = self.cache_error(set);
        // Under the range lock, so a client write cannot land between our backing read and the
        // cache rewrite (which would put the old data back on the cache).
        let _g = self.locks.lock(offset, offset + len).await;
        let (buf, r) = self.read_backing(offset, buf).await;
        if r.is_err() || failed || set.is_failed() {
            return (buf, r);
        }
        let mut copy = AlignedBuf::uninit_for_fill(len as usize);
        copy.copy_from_slice(&buf);
        let (_, w) = set.dev.write(offset, copy, false).await;
        match w {
            Ok(()) => {
                self.stats.repairs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(offset, len, error = %e, "read repair failed; region invalidated");
                self.invalidate_durably(set, region_span(offset, len, self.region_bytes)).await;
                self.cache_error(set);
            }
        }
        (buf, Ok(()))
    }

    /// The common start of every mutation (write, write-zeroes, trim), called with the range
    /// lock held (so overlapping mutations reach both devices in one order): make the regions'
    /// intent bits durable and pick the cache set the mutation goes to.
    async fn begin(&self, offset: u64, len: u64) -> io::Result<Mutation<'_, B, C>> {
        self.fg_ops.fetch_add(1, Ordering::Relaxed);
        let rs = region_span(offset, len, self.region_bytes);
        // A stalled backing fails the commit by the request deadline; nothing was written to
        // either device yet, so the region's state stays what it was.
        let (mark, set) =
            self.journal.mark(&self.backing, rs.clone(), |_| self.cache_now()).await.inspect_err(|_| {
                self.stats.backing_errors.fetch_add(1, Ordering::Relaxed);
            })?;
        Ok(Mutation { inner: self, offset, len, rs, set, armed: false, _mark: mark })
    }

    /// Awaits `f` (a lock), but not past the request's deadline.
    async fn bounded<F: std::future::Future>(&self, f: F) -> io::Result<F::Output> {
        guard::bounded(f).await.inspect_err(|_| {
            self.stats.backing_io.deadline_errors.fetch_add(1, Ordering::Relaxed);
            self.stats.backing_errors.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// The deadline for a client request that starts now (`backing_io_deadline_ms`).
    fn request_deadline(&self) -> Instant {
        Instant::now() + self.backing.policy().deadline
    }

    /// Settles the regions' cache state from both results, before the range lock is released.
    fn finish(&self, mut m: Mutation<'_, B, C>, rb: &io::Result<()>, rc: Option<io::Result<()>>) {
        m.armed = false;
        if rb.is_err() {
            self.stats.backing_errors.fetch_add(1, Ordering::Relaxed);
        }
        let (Some(set), Some(rc)) = (&m.set, rc) else { return };
        let (offset, len) = (m.offset, m.len);
        if set.is_failed() {
            // Detached meanwhile: its state no longer matters (the changed record covers us).
        } else if let Err(e) = rb {
            // A timed-out backing write may still land later (the guard keeps its range fenced
            // until it does): the backing's bytes are unspecified until then, so the cache copy
            // must not be read; the rebuild copies the region back once the backing answers.
            if guard::is_deadline_error(e) {
                tracing::debug!(offset, len, error = %e, "backing write timed out; the client gets EIO");
            } else {
                tracing::warn!(offset, len, error = %e, "backing write failed; the client gets the error");
            }
            self.invalidate(set, m.rs.clone());
        } else if let Err(e) = rc {
            tracing::warn!(offset, len, error = %e, "cache write failed; region invalidated, client unaffected");
            self.invalidate(set, m.rs.clone());
            self.cache_error(set);
        } else {
            // Regions this request overwrote entirely now hold the same bytes on both devices.
            for r in m.rs.clone() {
                let (s, l) = self.region_bounds(r);
                if s >= offset
                    && s + l <= offset + len
                    && set.table.transition(r, RegionState::Invalid, RegionState::Valid)
                {
                    self.stats.rebuild_done_bytes.fetch_add(l, Ordering::Relaxed);
                    self.update_invalid_gauge();
                }
            }
        }
    }

    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        if len == 0 {
            return (buf, Ok(()));
        }
        if out_of_range(offset, len, self.data_bytes) {
            return (buf, Err(enospc()));
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.write_bytes.fetch_add(len, Ordering::Relaxed);
        if fua {
            if let Err(e) = self.check_durable().await {
                return (buf, Err(e));
            }
        }
        // Bounded: the holder may be a write waiting out a stalled backing.
        let _lock = match self.bounded(self.locks.lock(offset, offset + len)).await {
            Ok(g) => g,
            Err(e) => return (buf, Err(e)),
        };
        let mut m = match self.begin(offset, len).await {
            Ok(m) => m,
            Err(e) => return (buf, Err(e)),
        };
        let Some(set) = m.set.clone() else {
            let (buf, r) = self.backing.write(offset, buf, fua).await;
            self.finish(m, &r, None);
            return (buf, r);
        };
        // Both devices write from the one buffer, at once. The cache write needs no FUA: the
        // valid bitmap is only persisted after a cache flush.
        let data = Arc::new(buf);
        m.armed = true;
        let (rb, rc) = tokio::join!(
            self.backing.write_shared(offset, data.clone(), fua),
            set.dev.write_shared(offset, data.clone(), false)
        );
        self.finish(m, &rb, Some(rc));
        // Still shared only when a write was given up on and is still in flight (a stalled
        // device): the caller gets a buffer of the same length, holding nothing of anyone else's.
        let buf = Arc::try_unwrap(data).unwrap_or_else(|d| AlignedBuf::zeroed(d.len()));
        (buf, rb)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool, errno: i32) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if out_of_range(offset, len, self.data_bytes) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        let _lock = self.bounded(self.locks.lock(offset, offset + len)).await?;
        let mut m = self.begin(offset, len).await?;
        let rb = match m.set.clone() {
            None => {
                let rb = self.backing.write_zeroes(offset, len, may_unmap).await;
                self.finish(m, &rb, None);
                rb
            }
            Some(set) => {
                // Both copies are zeroed, so they stay identical whatever each device does with
                // the unmap hint.
                m.armed = true;
                let (rb, rc) = tokio::join!(
                    self.backing.write_zeroes(offset, len, may_unmap),
                    set.dev.write_zeroes(offset, len, true)
                );
                self.finish(m, &rb, Some(rc));
                rb
            }
        };
        rb?;
        if fua {
            self.client_flush().await?;
        }
        Ok(())
    }
}

/// A mutation in progress (its caller holds the range lock): holds its intent registration.
/// Dropped while `armed`
/// (its future was cancelled after the devices were asked to write), it invalidates its regions:
/// the two copies may differ.
struct Mutation<'a, B: BlockDevice, C: BlockDevice> {
    inner: &'a Inner<B, C>,
    offset: u64,
    len: u64,
    rs: std::ops::Range<u64>,
    set: Option<Arc<Set<C>>>,
    armed: bool,
    // Released after `drop` settled the state, so the cleaner never sees the region idle first.
    _mark: journal::MarkGuard<'a>,
}

impl<B: BlockDevice, C: BlockDevice> Drop for Mutation<'_, B, C> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(set) = &self.set {
                self.inner.invalidate(set, self.rs.clone());
            }
        }
    }
}

/// The regions of an existing cache set that can be trusted at attach, or None if none can (the
/// set must be formatted and rebuilt):
/// * not the set the backing is paired with → None;
/// * in sync with the backing epoch → its persisted valid regions minus write-intent regions (and
///   minus changed regions if changes were being recorded in this process);
/// * behind, but no earlier than the start of the changed record → also minus changed regions;
/// * otherwise (behind the record, or ahead of the backing: restored backing?) → None.
pub(crate) fn reusable_valid(
    bsb: &Superblock,
    set_uuid: [u8; 16],
    set_epoch: u64,
    persisted: &Bits,
    intent: &Bits,
    changed: &Bits,
    recording: bool,
) -> Option<Bits> {
    if bsb.cache_set_uuid == [0; 16] || set_uuid != bsb.cache_set_uuid {
        return None;
    }
    let since = bsb.changed_since_epoch;
    let use_changed = if set_epoch == bsb.epoch {
        recording
    } else if since != 0 && since <= set_epoch && set_epoch < bsb.epoch {
        true
    } else {
        return None;
    };
    let mut v = persisted.clone();
    v.and_not(intent);
    if use_changed {
        v.and_not(changed);
    }
    Some(v)
}

impl<B: BlockDevice, C: BlockDevice> Volume for MirrorVolume<B, C> {
    fn size_bytes(&self) -> u64 {
        self.inner.data_bytes
    }

    fn fast_zero(&self) -> bool {
        self.inner.backing.fast_zero()
    }

    // Every client request runs under one deadline (`guard::with_deadline`): its backing I/O,
    // lock waits and write-intent commit all end by then, so a stalled backing turns into EIO for
    // the client after `backing_io_deadline_ms`, never into an acknowledgement.

    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        guard::with_deadline(self.inner.request_deadline(), self.inner.read(offset, buf)).await
    }

    fn read_zero_copy(&self, offset: u64, len: u64) -> Option<FileSlice> {
        self.inner.read_zero_copy(offset, len)
    }

    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        guard::with_deadline(self.inner.request_deadline(), self.inner.write(offset, buf, fua)).await
    }

    async fn flush(&self) -> io::Result<()> {
        // A flush that times out fails here and its late completion is reported to nobody (the
        // guard never re-issues a flush; a late failure is recorded as a durability loss).
        guard::with_deadline(self.inner.request_deadline(), self.inner.client_flush()).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let inner = &self.inner;
        guard::with_deadline(inner.request_deadline(), inner.write_zeroes(offset, len, true, fua, libc::EINVAL)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> io::Result<()> {
        let inner = &self.inner;
        let zero = inner.write_zeroes(offset, len, may_unmap, fua, libc::ENOSPC);
        guard::with_deadline(inner.request_deadline(), zero).await
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let inner = &self.inner;
        if len == 0 || out_of_range(offset, len, inner.data_bytes) {
            return Ok(());
        }
        if let Some(set) = inner.cache_now() {
            for r in region_span(offset, len, inner.region_bytes) {
                if set.table.get(r) == RegionState::Invalid {
                    inner.push_hot(r);
                }
            }
        }
        Ok(())
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let len = len.min(self.inner.data_bytes.saturating_sub(offset));
        guard::with_deadline(self.inner.request_deadline(), self.inner.backing.allocation(offset, len)).await
    }

    async fn shutdown(&self) -> io::Result<()> {
        for t in self.stop_tasks() {
            let _ = t.await;
        }
        let inner = &self.inner;
        let _t = inner.transition.lock().await;
        inner.closed.store(true, Ordering::Release);
        inner.complete_degrade().await?;
        let rb = inner.backing.flush().await;
        if let Some(set) = inner.cache_now() {
            let r = async {
                set.dev.flush().await?;
                set.persist_valid().await
            }
            .await;
            if let Err(e) = r {
                inner.detach(&set, "cannot write its metadata at shutdown");
                tracing::error!(error = %e, "cache metadata not written at shutdown");
                inner.complete_degrade().await?;
            }
        }
        // With durability lost the stop is not clean: FLAG_OPEN stays and every intent bit with
        // it, so the next start resyncs every region written since the last good flush.
        inner.check_durable().await?;
        rb?;
        let keep = |r: u64| {
            let (start, len) = inner.region_bounds(r);
            inner.backing.write_outstanding(start, start + len)
        };
        inner.journal.clear_all_idle(&inner.backing, keep).await?;
        inner.journal.update_sb(&inner.backing, |sb| sb.flags &= !FLAG_OPEN).await?;
        Ok(())
    }
}

/// Checks, without writing anything, that `caches` could become the cache set of the backing
/// described by `backing_sb`: big enough, and not another superdisk's or holding unknown data
/// (unless `take_over_foreign_cache`). `create` runs it before touching the backing, so a wrong
/// cache path is refused with every device unchanged.
pub async fn preflight_cache<C: BlockDevice + Clone>(
    backing_sb: &Superblock,
    caches: &[C],
    opts: &MirrorOptions,
) -> io::Result<()> {
    if caches.is_empty() {
        return Ok(());
    }
    cacheset::check_capacity(caches, backing_sb, opts.stripe_bytes)?;
    classify(caches.to_vec(), backing_sb, opts.take_over_foreign_cache).await.map(|_| ())
}

/// Formats `caches` as a new cache set for the backing described by `backing_sb` (for `superdisk
/// create --cache`). Devices that already form this backing's set are left alone; a cache of
/// another superdisk or a device with unknown data is refused unless `take_over_foreign_cache`.
pub async fn create_cache<C: BlockDevice + Clone>(
    backing_sb: &Superblock,
    caches: &[C],
    opts: &MirrorOptions,
) -> io::Result<()> {
    if caches.is_empty() {
        return Ok(());
    }
    match classify(caches.to_vec(), backing_sb, opts.take_over_foreign_cache).await? {
        Found::Existing { sbs, .. } if sbs[0].cache_set_uuid == backing_sb.cache_set_uuid => Ok(()),
        Found::Existing { members, sbs, .. } => {
            let generations: Vec<u64> = sbs.iter().map(|s| s.generation).collect();
            CacheSet::format(members, &generations, backing_sb, opts.stripe_bytes, backing_sb.epoch, Arc::default())
                .await
                .map(|_| ())
        }
        Found::Format { members, generations, .. } => {
            CacheSet::format(members, &generations, backing_sb, opts.stripe_bytes, backing_sb.epoch, Arc::default())
                .await
                .map(|_| ())
        }
    }
}

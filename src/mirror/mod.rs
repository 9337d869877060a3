//! The mirror engine: a [`Volume`] that keeps a full copy of the exported disk on one or more
//! local cache devices (SSDs) and writes through to the durable backing device, like md RAID1
//! with the backing marked write-mostly.
//!
//! ```text
//!   front end ──► MirrorVolume
//!                   │ read:  Valid regions ──► cache (Striped<C>) ─ error ─► backing + rewrite cache
//!                   │        other regions ──► backing              (read repair; budget → degraded)
//!                   │ write: range lock ─► intent bit durable (group commit, IntentStore)
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
//! * **A stalled backing** (`device::layer::backing_guard`): every backing operation has an attempt timeout and a
//!   deadline; each client request runs under one request deadline that also bounds its waits for
//!   range locks and the write-intent commit, so a write fails with EIO by then and is never
//!   acknowledged without the backing. A backing write given up at its deadline stays fenced in
//!   the guard until the device really answers: no later write to those bytes is issued before it
//!   lands, and backing reads of them (client reads of invalid regions, rebuild copies, repairs,
//!   verify) wait for it, so the region the failed write invalidated is only made valid again
//!   from what the backing finally holds. Reads of valid regions never touch the backing.

mod attach;
mod cacheset;
mod cleaner;
pub mod hedge;
mod intent;
mod read;
mod rebuild;
pub mod region;
pub mod slow;

mod tunables;
mod util;
mod verify;
mod write;

#[cfg(test)]
mod durability_tests;
#[cfg(test)]
mod tests;

pub use crate::device::layer::striped::Striped;
pub(crate) use attach::reusable_valid;
use attach::AttachError;
pub use attach::{create_cache, preflight_cache};
use cacheset::CacheSet;
use cleaner::{cleaner_loop, durability_watch};
pub use hedge::{HedgePolicy, HedgeStats};
use read::HotQueue;
pub(crate) use read::HOT_QUEUE_MAX;
pub use tunables::{Rejected, Tunables, DEFAULT_CACHE_TIMEOUT};
pub use verify::{verify_offline, verify_offline_report, VerifyReport};

use crate::device::layer::backing_guard::{self as guard, BackingIoStats, DurabilityLoss, Guarded, IoPolicy};
use crate::device::layer::cache_time_limit::{CacheTimeouts, Timed};
use crate::device::{AlignedBuf, BlockDevice, DeviceId, Extent, FileSlice, RangeLocks};
use crate::meta::store::{check_backing, read_superblock};
use crate::meta::superblock::FLAG_OPEN;
use crate::meta::Superblock;
use crate::volume::Volume;
use intent::IntentStore;
use region::RegionState;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;
use tokio::task::JoinHandle;
use util::region_span;

/// A cache set as the engine holds it: every member behind its time limit.
pub(crate) type Set<C> = CacheSet<Timed<C>>;

/// How long attaching a device waits for operations given up on it to finish before refusing.
const REATTACH_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// Region size for a backing formatted by this process. An existing backing keeps the region
    /// size recorded in its superblock (the bitmaps depend on it).
    pub region_bytes: u32,
    /// Stripe unit when several cache devices are striped (a power of two ≥ 4096).
    pub stripe_bytes: u32,
    /// Format cache devices that belong to another superdisk or hold unknown data.
    pub take_over_foreign_cache: bool,
    /// Period of the metadata cleaner: idle write-intent bits clear after one to two periods, and
    /// the valid bitmap is persisted at least this often while it changes.
    pub metadata_interval_ms: u64,
    /// Timeouts, read retries and the request deadline for backing I/O (`backing_*` config keys).
    pub backing_io: IoPolicy,
    /// What the operator may change while serving (rebuild rates, error budget, hedging, the
    /// cache time limit).
    pub tunables: Tunables,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            region_bytes: crate::meta::DEFAULT_REGION_BYTES,
            stripe_bytes: 512 << 10,
            take_over_foreign_cache: false,
            metadata_interval_ms: 5000,
            backing_io: IoPolicy::default(),
            tunables: Tunables::default(),
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
    /// What the last attach decided about the cache set, and why (status shows it).
    pub attach_decision: Mutex<String>,
    /// Each cache member's latency against the backing's, and its state ([`slow`]).
    pub slow: slow::SlowStats,
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
    intents: IntentStore,
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
    /// What the operator can change while serving (SIGHUP, admin socket); see [`Tunables`].
    tunables: RwLock<Tunables>,
    hedger: hedge::Hedger,
    /// Foreground requests, for the rebuild's rate adaptation.
    fg_ops: AtomicU64,
    closed: AtomicBool,
    /// The backing's durability loss is recorded on its superblock (`FLAG_FLUSH_FAILED`).
    loss_persisted: AtomicBool,
    /// Client writes counted at the cleaner's last generation record (`cleaner::heartbeat`).
    heartbeat_writes: AtomicU64,
    /// The slow-member watch's memory between ticks ([`slow`]).
    slow_watch: Mutex<slow::Watch>,
}

pub struct MirrorVolume<B: BlockDevice, C: BlockDevice> {
    inner: Arc<Inner<B, C>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

pub(super) fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

pub(super) fn out_of_range(offset: u64, len: u64, size: u64) -> bool {
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
        stats.cache_io.set_timeout(opts.tunables.cache_timeout);
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
        let (journal, info) = IntentStore::open(&backing, sb.clone(), stats.clone()).await?;
        if info.crashed {
            tracing::warn!(
                intent_regions = info.intent_regions,
                "the previous run did not stop cleanly; regions with write-intent bits will be resynced"
            );
        }
        let hedger = hedge::Hedger::new(opts.tunables.hedge, stats.hedge.clone());
        let tunables = RwLock::new(opts.tunables.clone());
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            data_bytes: sb.data_size_bytes,
            region_bytes: u64::from(sb.region_bytes),
            regions: crate::meta::regions(sb.data_size_bytes, sb.region_bytes),
            backing,
            opts,
            stats,
            intents: journal,
            cache: RwLock::new(None),
            locks: RangeLocks::default(),
            transition: tokio::sync::Mutex::new(()),
            degrade_pending: AtomicBool::new(false),
            hot: Mutex::new(HotQueue::default()),
            work: tokio::sync::Notify::new(),
            settled: tokio::sync::Notify::new(),
            rebuild_idle: AtomicBool::new(false),
            rebuild_paused: AtomicBool::new(false),
            tunables,
            hedger,
            fg_ops: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            loss_persisted: AtomicBool::new(false),
            heartbeat_writes: AtomicU64::new(0),
            slow_watch: Mutex::new(slow::Watch::default()),
        });
        inner.recall_durability_loss(&sb);
        if caches.is_empty() {
            tracing::warn!("no cache device: serving degraded from the backing");
            inner.start_degraded().await?;
        } else {
            match inner.attach(caches, inner.opts.take_over_foreign_cache, Some(sb.generation)).await {
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
            tokio::spawn(slow::watch_loop(inner.clone())),
        ];
        Ok(MirrorVolume { inner, tasks: Mutex::new(tasks) })
    }

    pub fn stats(&self) -> Arc<MirrorStats> {
        self.inner.stats.clone()
    }

    /// Marks a member of the attached set slow (its reads go to the backing) or normal, as the
    /// slow-member watch would, so the model tests can put the state anywhere in a sequence.
    /// False when no set is attached or it has no such member.
    #[cfg(feature = "sim")]
    pub fn set_member_slow(&self, member: usize, slow: bool) -> bool {
        let Some(set) = self.inner.cache_now() else { return false };
        if member >= set.dev.members().len() {
            return false;
        }
        if slow {
            set.slow_members.fetch_or(1 << member, Ordering::Relaxed);
        } else {
            set.slow_members.fetch_and(!(1 << member), Ordering::Relaxed);
        }
        true
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
        self.inner.attach(caches, take_over, None).await.map_err(io::Error::from)
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

    /// What the operator can change while serving.
    pub fn tunables(&self) -> Tunables {
        self.inner.tunables()
    }

    /// Applies new live settings (validated by the caller, [`Tunables::validate`]): rebuild
    /// rates, the error budget and the cache time limit from now on, the hedging policy to reads
    /// that start from now on.
    pub fn set_tunables(&self, t: Tunables) {
        debug_assert_eq!(t.validate(), Ok(()));
        self.inner.hedger.set_policy(t.hedge);
        self.inner.stats.cache_io.set_timeout(t.cache_timeout);
        *self.inner.tunables.write().expect("tunables poisoned") = t;
        self.inner.work.notify_one();
    }

    pub fn rebuild_paused(&self) -> bool {
        self.inner.rebuild_paused.load(Ordering::Acquire)
    }

    /// Operations on device `id` that were given up on (timed out) and that it has not answered
    /// yet: while any is, the device cannot be attached again (see [`crate::device::layer::cache_time_limit`]).
    pub async fn cache_outstanding(&self, id: Option<DeviceId>) -> u64 {
        self.inner.stats.cache_io.outstanding_after(id, REATTACH_GRACE).await
    }

    #[cfg(test)]
    pub(crate) fn set_hedge_refresh(&self, every: Duration) {
        self.inner.hedger.set_refresh(every);
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
        (self.inner.intents.intent_count(), self.inner.intents.changed_count())
    }

    /// The backing superblock as last written.
    pub fn backing_superblock(&self) -> Superblock {
        self.inner.intents.sb()
    }

    pub fn region_bytes(&self) -> u64 {
        self.inner.region_bytes
    }

    pub fn backing(&self) -> &B {
        self.inner.backing.inner()
    }

    /// Why the backing can no longer be trusted with what it acknowledged, if it cannot (a flush
    /// or FUA write failed, in this run or an earlier one): every client FLUSH and FUA write fails
    /// meanwhile (see `device::layer::backing_guard::Durability`).
    pub fn durability_lost(&self) -> Option<DurabilityLoss> {
        self.inner.backing.durability().loss()
    }

    /// Device operations still in flight that nobody waits for (a stalled backing, a cache given
    /// up on): a handover to another process must wait until there are none.
    pub fn device_ops_in_doubt(&self) -> u64 {
        self.inner.backing.ops_in_doubt() + self.inner.stats.cache_io.outstanding_total()
    }

    /// Writes back what both devices hold dirty, while clients still run: a handover's final
    /// flush, with every client paused, then has little left to write (a buffered file under
    /// random writes can otherwise hold seconds of write-back).
    pub async fn write_back(&self) -> io::Result<()> {
        let backing = self.inner.backing.flush().await;
        if let Some(set) = self.inner.cache_now() {
            set.dev.flush().await?;
        }
        backing
    }

    /// The attached cache set's files, with duplicates of their descriptors; `Some(empty)` when
    /// no set is attached (for an in-place upgrade).
    pub fn cache_files(&self) -> Vec<crate::device::OpenFile> {
        let mut out = Vec::new();
        if let Some(set) = self.inner.cache_now() {
            set.dev.open_files(&mut out);
        }
        out
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

impl<B: BlockDevice, C: BlockDevice> Inner<B, C> {
    fn tunables(&self) -> Tunables {
        self.tunables.read().expect("tunables poisoned").clone()
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
        if let Err(e) = self.intents.mark(&self.backing, rs, |_| ()).await {
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
        if n > u64::from(self.tunables().read_error_budget) {
            self.fail_set(set, "cache error budget exceeded");
            return true;
        }
        false
    }

    // ---- data path ----
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
        // The cache first: its metadata needs nothing from the backing, so a stop while the
        // backing does not answer still leaves the set's valid bitmap current. (A region persisted
        // as valid before the backing was flushed keeps its write-intent bit, which only the
        // clean end below clears.)
        if let Some(set) = inner.cache_now() {
            let r = async {
                set.dev.flush().await?;
                set.persist_valid().await
            }
            .await;
            if let Err(e) = r {
                inner.detach(&set, "cannot write its metadata at shutdown");
                tracing::error!(error = %e, "cache metadata not written at shutdown");
            }
        }
        inner.complete_degrade().await?;
        let rb = inner.backing.flush().await;
        // With durability lost the stop is not clean: FLAG_OPEN stays and every intent bit with
        // it, so the next start resyncs every region written since the last good flush.
        inner.check_durable().await?;
        rb?;
        let keep = |r: u64| {
            let (start, len) = inner.region_bounds(r);
            inner.backing.write_outstanding(start, start + len)
        };
        inner.intents.clear_all_idle(&inner.backing, keep).await?;
        inner.intents.update_sb(&inner.backing, |sb| sb.flags &= !FLAG_OPEN).await?;
        // The clean stop's generation is past every write of this run: the set records it, so a
        // backing restored from any earlier snapshot is recognised as older at the next start.
        if let Some(set) = inner.cache_now() {
            if let Err(e) = set.record_backing_generation(inner.intents.sb().generation).await {
                tracing::warn!(error = %e, "cannot record the backing generation on the cache set at shutdown");
            }
        }
        Ok(())
    }
}

//! Model-based test of the mirror engine: a backing and a cache set on `MemDevice`s (which lose
//! unflushed writes at a crash), each behind a `FaultDevice` (which reorders concurrent requests
//! and, on the caches, injects EIO, torn failed writes and vanishing devices).
//!
//! Each seed drives a random sequence of client requests (reads, writes, some FUA, flushes, trims,
//! write-zeroes, concurrent batches) mixed with the events the mirror exists to survive: Crash
//! (both devices lose power), Restart (clean shutdown and start), LoseCache (a blank cache, or
//! none, while stopped), FailCache (the cache fails while running: EIO, a bad patch, or it
//! vanishes) and ReplaceCache (a blank cache attached while running). Some crashes hit a batch
//! with requests, a metadata cleaner pass and the rebuild still in flight. A `ShadowDisk` knows
//! what every byte may legally read as. After every step:
//! * no client request failed (a cache fault never reaches a client);
//! * every read returned a legal value: no acknowledged-and-flushed write lost, no stale data;
//! * `verify(false)` finds no valid cache region that differs from the backing, mid-rebuild too;
//! * at check points the rebuild finishes with the mirror Healthy, and after a clean shutdown
//!   the offline verify agrees.
//!
//! BackingErrors steps make the backing fail some writes and flushes: those errors reach the
//! client, a failed write may have landed in part, and the copies must agree on what it left. A
//! failed flush or FUA write loses the backing's unflushed writes as Linux does (errseq: the pages
//! are marked clean, reads see them until they are evicted, the next flush succeeds): from then on
//! no FLUSH may succeed until the operator clears the error, which the step then does (in place
//! or after a restart), and the model treats the unflushed writes as a crash would.
//!
//! LateWrite steps hang one backing write in place; its client gives up (the request is dropped,
//! as at a deadline), the cleaner may run, then the write lands, late: no region may be valid
//! over bytes the backing can still lose.
//!
//! Each device is byte-granular or a 512 B or 4 KiB block device (the simulated device then
//! refuses anything else, and byte-granular requests go through the same alignment layer as on a
//! real block device), chosen per seed, so the backing and the caches often differ.
//!
//! A failure names its seed; `SUPERDISK_SEED=N cargo test --test mirror_model` replays it (add
//! `SUPERDISK_LOG=debug` for the engine's log), and `SUPERDISK_SEEDS=N` runs N seeds instead of
//! the default.

mod model;

use model::{apply, buf_of, pattern, random_range, seeds, send, Reads, Req, SeedGuard};
use std::sync::Arc;
use std::time::Duration;

use superdisk::device::sim::fault::{FaultDevice, FaultHandle, FaultOp, SimRng};
use superdisk::device::sim::mem::{CrashReport, MemDevice};
use superdisk::device::sim::shadow::ShadowDisk;
use superdisk::device::{AlignedBuf, BlockDevice};
use superdisk::meta::{meta_bytes, store};
use superdisk::mirror::slow::{SlowCachePolicy, SlowPolicy};
use superdisk::mirror::{create_cache, verify_offline, MirrorOptions, MirrorStats, MirrorVolume, Mode, Tunables};
use superdisk::volume::Volume;

/// Exported size: small, so that requests collide often and regions are few.
const DATA_BYTES: u64 = 256 << 10;
const STEPS_PER_SEED: usize = 120;
const DEFAULT_SEEDS: u64 = 24;
const HISTORY_STEPS: usize = 24;
const RECENT_WRITES: usize = 16;
/// Only a hang detector (a deadlocked engine fails the test instead of stalling CI); no test
/// outcome depends on how long anything takes.
const STEP_LIMIT: Duration = Duration::from_secs(60);

type Dev = FaultDevice<MemDevice>;
type Mirror = MirrorVolume<Dev, Dev>;

/// Sends one request; a read returns its data. Any error fails the test: with a healthy backing
/// no client request may fail, whatever the cache does. Every other 4 KiB-aligned read goes the
/// zero-copy way when it can (see `model::Reads`).
async fn submit<V: Volume>(vol: &V, req: &Req, may_unmap: bool) -> Result<Option<Vec<u8>>, String> {
    match send(vol, req, may_unmap, Reads::SomeZeroCopy).await {
        Ok((data, zero_copy)) => {
            if zero_copy {
                ZERO_COPY_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(data)
        }
        Err(e) => Err(format!("client saw an error: {} failed: {e}", req.describe())),
    }
}

/// The cache set's devices as the test holds them: the storage, and the fault switches of the
/// wrappers the running volume uses.
struct Caches {
    mems: Vec<MemDevice>,
    faults: Vec<FaultHandle>,
}

/// What the seeds exercised, summed: a run in which the cache never served a read or no cache
/// error was ever absorbed would pass without testing what it claims to.
#[derive(Debug, Default)]
struct Coverage {
    reads_cache: u64,
    reads_backing: u64,
    repairs: u64,
    cache_errors: u64,
    cache_failures: u64,
    rebuild_done_bytes: u64,
    /// Crashes that lost or tore an unflushed write on either device.
    lossy_crashes: u64,
    /// Bytes left undecided by crashes (so reads after a crash had a choice to get wrong).
    undecided_after_crash: u64,
    /// Crashes that hit a batch with requests still in flight.
    crashes_in_flight: u64,
    /// Client writes that failed on the backing and left bytes uncertain.
    failed_backing_writes: u64,
    /// Cache operations given up at cache_timeout (a hung SSD).
    cache_timeouts: u64,
    /// Reads answered from a zero-copy source (all seeds; see `submit`).
    zero_copy_reads: u64,
    /// Backing durability losses (a failed flush or FUA write) recovered from by the operator.
    durability_losses: u64,
    /// Backing writes that landed after their client gave up.
    late_writes: u64,
    /// Seeds whose backing and caches had different logical block sizes.
    mixed_block_sizes: u64,
    /// Backings put back to an older copy under their cache set.
    rollbacks: u64,
    /// Reads answered by the backing because a member was slow.
    routed_reads: u64,
}

static ZERO_COPY_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Coverage {
    fn absorb(&mut self, stats: &MirrorStats) {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        self.reads_cache += get(&stats.reads_cache);
        self.reads_backing += get(&stats.reads_backing);
        self.repairs += get(&stats.repairs);
        self.cache_errors += get(&stats.cache_errors);
        self.cache_failures += get(&stats.cache_failures);
        self.rebuild_done_bytes += get(&stats.rebuild_done_bytes);
        self.cache_timeouts += get(&stats.cache_io.timed_out);
        self.routed_reads += get(&stats.slow.routed_reads);
    }
}

struct World {
    rng: SimRng,
    coverage: Coverage,
    opts: MirrorOptions,
    /// Logical block size of new cache devices (1: byte-granular).
    cache_block_bytes: u32,
    backing: MemDevice,
    /// Switches of the running volume's backing wrapper (errors only in the BackingErrors step).
    backing_faults: FaultHandle,
    caches: Caches,
    /// Faults are switched on in the running cache set (or the engine was told to fail it), so
    /// the mirror may be degraded and verify has nothing meaningful to say.
    cache_faulty: bool,
    /// The cache set's devices stopped answering (and may answer at the next restart).
    cache_hung: bool,
    vol: Arc<Mirror>,
    model: ShadowDisk,
    size: u64,
    next_write_id: u64,
    /// Ranges of the last few writes, which reads favour.
    recent: std::collections::VecDeque<(u64, u64)>,
    history: Vec<String>,
    /// A copy of the backing taken while stopped, and the model as it was then: restored later
    /// under the same cache set (a disk restored from a snapshot).
    snapshot: Option<(Vec<u8>, ShadowDisk)>,
}

/// A fresh wrapper (no faults) around `dev`.
fn wrap(rng: &mut SimRng, dev: &MemDevice) -> Dev {
    let d = FaultDevice::new(dev.clone(), rng.next_u64());
    // Reorder concurrent device requests (the engine's own and the clients') by seed.
    d.handle().set_max_yields(3);
    d
}

impl Caches {
    /// Fresh wrappers (no faults) around the set's devices; their switches replace the old ones.
    fn wrap(&mut self, rng: &mut SimRng) -> Vec<Dev> {
        let devs: Vec<Dev> = self.mems.iter().map(|m| wrap(rng, m)).collect();
        self.faults = devs.iter().map(Dev::handle).collect();
        devs
    }
}

/// Opens the engine on fresh wrappers; returns it with the backing's fault switches.
async fn open_mirror(
    rng: &mut SimRng,
    backing: &MemDevice,
    caches: &mut Caches,
    opts: &MirrorOptions,
) -> Result<(Mirror, FaultHandle), String> {
    let backing = wrap(rng, backing);
    let backing_faults = backing.handle();
    let devs = caches.wrap(rng);
    let vol =
        MirrorVolume::open(backing, devs, opts.clone()).await.map_err(|e| format!("MirrorVolume::open failed: {e}"))?;
    if vol.size_bytes() != DATA_BYTES {
        return Err(format!("the mirror exports {} bytes, the backing holds {DATA_BYTES}", vol.size_bytes()));
    }
    let mode = vol.mode();
    if caches.mems.is_empty() && mode != Mode::Degraded {
        return Err(format!("started without a cache but mode is {mode:?}"));
    }
    Ok((vol, backing_faults))
}

/// A simulated device of `size` bytes with `block_bytes` logical blocks (1: byte-granular).
fn mem_device(size: u64, block_bytes: u32) -> MemDevice {
    let d = MemDevice::new(size);
    if block_bytes > 1 {
        d.with_logical_block_bytes(block_bytes)
    } else {
        d
    }
}

fn random_block_bytes(rng: &mut SimRng) -> u32 {
    [1u32, 512, 4096][rng.below(3) as usize]
}

/// Each member's size for a set of `n` holding the export, with a little slack.
fn cache_member_bytes(n: u64, opts: &MirrorOptions, slack: u64) -> u64 {
    let data = DATA_BYTES.div_ceil(n).div_ceil(u64::from(opts.stripe_bytes)) * u64::from(opts.stripe_bytes);
    data + meta_bytes(DATA_BYTES, opts.region_bytes) + slack
}

impl World {
    async fn new(seed: u64) -> Result<World, String> {
        let mut rng = SimRng::new(seed);
        let region_bytes = [4096u32, 16384, 65536][rng.below(3) as usize];
        let opts = MirrorOptions {
            region_bytes,
            stripe_bytes: [4096u32, 16384][rng.below(2) as usize],
            // Rebuild as fast as it can: the test wants interleavings, not pacing. Long enough a
            // cache time limit that a busy test machine never trips it by accident (a timeout only
            // fails the set, which is safe, but the checks below expect a fresh set to stay).
            tunables: Tunables {
                read_error_budget: rng.in_range(1..6) as u32,
                rebuild_min_bytes_per_s: 1 << 40,
                rebuild_max_bytes_per_s: 1 << 40,
                cache_timeout: Duration::from_millis(300),
                // Slow members are put in place by the Slow and Recover steps, not by wall-clock
                // latency, so a seed replays exactly.
                slow: SlowPolicy { mode: SlowCachePolicy::Off, ..SlowPolicy::default() },
                ..Tunables::default()
            },
            // The background cleaner would run on the wall clock; the Clean step runs a pass at
            // seeded moments instead, so a seed replays exactly.
            metadata_interval_ms: 3_600_000,
            ..MirrorOptions::default()
        };
        // Random initial contents, so that a trimmed or lost range is told apart from zeroes.
        let mut image = vec![0u8; (DATA_BYTES + meta_bytes(DATA_BYTES, region_bytes)) as usize];
        rng.fill(&mut image[..DATA_BYTES as usize]);
        let backing_block_bytes = random_block_bytes(&mut rng);
        let cache_block_bytes = random_block_bytes(&mut rng);
        let backing = match MemDevice::from_image(image.clone()) {
            d if backing_block_bytes > 1 => d.with_logical_block_bytes(backing_block_bytes),
            d => d,
        };
        let backing_sb = store::new_backing_superblock(backing.size_bytes(), region_bytes).unwrap();
        assert_eq!(backing_sb.data_size_bytes, DATA_BYTES, "test layout: the export must be DATA_BYTES");
        store::write_superblock(&backing, &backing_sb).await.unwrap();
        image.truncate(DATA_BYTES as usize);
        let n = rng.in_range(1..3);
        let slack = rng.below(3) * 4096;
        let mems: Vec<MemDevice> =
            (0..n).map(|_| mem_device(cache_member_bytes(n, &opts, slack), cache_block_bytes)).collect();
        let mut caches = Caches { mems, faults: Vec::new() };
        let mut history = vec![format!(
            "{n} cache device(s), blocks: backing {backing_block_bytes} B, caches {cache_block_bytes} B, {opts:?}"
        )];
        let coverage =
            Coverage { mixed_block_sizes: u64::from(backing_block_bytes != cache_block_bytes), ..Default::default() };
        // Half the seeds format the cache ahead (`superdisk create --cache`), half let the engine
        // find it blank at start-up.
        if rng.below(2) == 0 {
            let devs = caches.wrap(&mut rng);
            create_cache(&backing_sb, &devs, &opts).await.map_err(|e| format!("create_cache failed: {e}"))?;
            history.push("create_cache".into());
        }
        let (vol, backing_faults) = open_mirror(&mut rng, &backing, &mut caches, &opts).await?;
        Ok(World {
            rng,
            coverage,
            opts,
            cache_block_bytes,
            backing,
            backing_faults,
            caches,
            cache_faulty: false,
            cache_hung: false,
            vol: Arc::new(vol),
            model: ShadowDisk::new(image),
            size: DATA_BYTES,
            next_write_id: 1,
            recent: Default::default(),
            history,
            snapshot: None,
        })
    }

    fn log(&mut self, step: String) {
        if self.history.len() == HISTORY_STEPS {
            self.history.remove(0);
        }
        self.history.push(step);
    }

    async fn open(&mut self) -> Result<(), String> {
        let (vol, backing_faults) = open_mirror(&mut self.rng, &self.backing, &mut self.caches, &self.opts).await?;
        self.backing_faults = backing_faults;
        self.cache_faulty = false;
        self.coverage.absorb(&self.vol.stats());
        self.vol = Arc::new(vol);
        Ok(())
    }

    /// Every existing device handle dies (as the old process's would) and a new one is made.
    fn revoke_all(&mut self) {
        self.backing.revoke_handles();
        self.backing = self.backing.reopen();
        for m in &mut self.caches.mems {
            m.revoke_handles();
            *m = m.reopen();
        }
    }

    /// A read range: half the time around a recent write, where stale or lost data would be.
    fn read_range(&mut self) -> (u64, u64) {
        if self.recent.is_empty() || self.rng.below(2) == 0 {
            return random_range(&mut self.rng, self.size);
        }
        let (off, len) = self.recent[self.rng.below(self.recent.len() as u64) as usize];
        let start = off.saturating_sub(self.rng.below(1024));
        let end = (off + len + self.rng.below(1024)).min(self.size);
        (start, end - start)
    }

    fn random_req(&mut self, in_batch: bool) -> Req {
        // FUA inside a batch would make the racing-writes model ambiguous; alone it is exact.
        let fua = !in_batch && self.rng.below(4) == 0;
        let kind = self.rng.below(if in_batch { 9 } else { 10 });
        if kind <= 3 {
            let (off, len) = self.read_range();
            return Req::Read { off, len };
        }
        let (off, len) = random_range(&mut self.rng, self.size);
        if (4..=7).contains(&kind) {
            if self.recent.len() == RECENT_WRITES {
                self.recent.pop_front();
            }
            self.recent.push_back((off, len));
        }
        match kind {
            4..=6 => {
                let id = self.next_write_id;
                self.next_write_id += 1;
                Req::Write { off, data: pattern(id, off, len as usize), fua }
            }
            7 => Req::Zero { off, len, fua, trim: self.rng.below(2) == 0 },
            _ => Req::Flush,
        }
    }

    async fn single(&mut self) -> Result<(), String> {
        let req = self.random_req(false);
        self.log(req.describe());
        let may_unmap = self.rng.below(2) == 0;
        let read = submit(&*self.vol, &req, may_unmap).await?;
        apply(&mut self.model, &req, read)
    }

    /// Requests in flight together. Reads never overlap a write of the same batch (the result
    /// would be either); writes may overlap each other, and the winner is read back at once,
    /// which is where two copies that took different winners would show.
    async fn batch(&mut self) -> Result<(), String> {
        let n = self.rng.in_range(2..7);
        let mut reqs: Vec<Req> = Vec::new();
        while reqs.len() < n as usize {
            let req = self.random_req(true);
            let overlaps = |a: (u64, u64), b: (u64, u64)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
            let clash = match &req {
                Req::Read { off, len } => reqs.iter().filter_map(Req::write_range).any(|w| overlaps(w, (*off, *len))),
                _ => req.write_range().is_some_and(|w| {
                    reqs.iter().any(|r| matches!(r, Req::Read { off, len } if overlaps(w, (*off, *len))))
                }),
            };
            if !clash {
                reqs.push(req);
            }
        }
        // Sometimes a metadata cleaner pass runs among the requests: intent bits must not be
        // cleared for a write that lands while the pass flushes.
        let cleaner_at = (self.rng.below(3) == 0).then(|| self.rng.below(reqs.len() as u64 + 1) as usize);
        let mut desc: Vec<String> = reqs.iter().map(Req::describe).collect();
        if let Some(at) = cleaner_at {
            desc.insert(at, "cleaner pass".into());
        }
        self.log(format!("batch [{}]", desc.join(", ")));
        let reqs = Arc::new(reqs);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..=reqs.len() {
            if cleaner_at == Some(i) {
                let vol = self.vol.clone();
                tasks.spawn(async move {
                    let r = vol.clean_metadata().await.map(|()| None).map_err(|e| format!("cleaner pass failed: {e}"));
                    (usize::MAX, r)
                });
            }
            if i == reqs.len() {
                break;
            }
            let (vol, reqs, may_unmap) = (self.vol.clone(), reqs.clone(), self.rng.below(2) == 0);
            tasks.spawn(async move { (i, submit(&*vol, &reqs[i], may_unmap).await) });
        }
        // Sometimes the power fails while the batch is in flight, after a seeded number of
        // scheduling rounds: the crash then hits requests, cleaner and rebuild mid-way.
        if self.rng.below(4) == 0 {
            let rounds = self.rng.below(40);
            for _ in 0..rounds {
                tokio::task::yield_now().await;
            }
            let mut acked: Vec<Option<Option<Vec<u8>>>> = vec![None; reqs.len()];
            while let Some(joined) = tasks.try_join_next() {
                let (i, r) = joined.map_err(|e| format!("request task panicked: {e}"))?;
                let r = r?;
                if i != usize::MAX {
                    acked[i] = Some(r);
                }
            }
            let (backing, caches) = self.crash_devices();
            tasks.abort_all();
            self.coverage.crashes_in_flight += u64::from(acked.iter().any(Option::is_none));
            self.log(format!(
                "crash after {rounds} rounds, {} of {} requests acknowledged (backing {backing:?}, caches {caches:?})",
                acked.iter().filter(|a| a.is_some()).count(),
                reqs.len()
            ));
            return self.crash_mid_batch(&reqs, acked).await;
        }
        let mut results: Vec<Option<Vec<u8>>> = vec![None; reqs.len()];
        while let Some(joined) = tasks.join_next().await {
            let (i, r) = joined.map_err(|e| format!("request task panicked: {e}"))?;
            let r = r?;
            if i != usize::MAX {
                results[i] = r;
            }
        }
        // A flush in the batch covers only what completed before it was sent, i.e. nothing of
        // this batch: apply it first and the batch's writes as unflushed.
        if reqs.iter().any(|r| matches!(r, Req::Flush)) {
            self.model.flush();
        }
        for (req, data) in reqs.iter().zip(results.iter_mut()) {
            if let Req::Read { .. } = req {
                apply(&mut self.model, req, data.take())?;
            }
        }
        let writes: Vec<(u64, Vec<u8>)> = reqs
            .iter()
            .filter_map(|r| match r {
                Req::Write { off, data, .. } => Some((*off, data.clone())),
                Req::Zero { off, len, .. } => Some((*off, vec![0; *len as usize])),
                _ => None,
            })
            .collect();
        let refs: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        for r in self.model.write_racing(&refs) {
            // Read twice: once may come from either copy; a second read of a region that the
            // rebuild or a repair touched in between must agree with the first.
            for _ in 0..2 {
                let req = Req::Read { off: r.start, len: r.end - r.start };
                let data = submit(&*self.vol, &req, false).await?;
                apply(&mut self.model, &req, data).map_err(|e| format!("racing writes disagree: {e}"))?;
            }
        }
        Ok(())
    }

    /// Both devices lose power at once; the engine starts over from what survived.
    /// Power loss on every device (the model is told separately).
    fn crash_devices(&mut self) -> (CrashReport, Vec<CrashReport>) {
        let backing = self.backing.crash(&mut self.rng);
        let caches: Vec<_> = self.caches.mems.iter().map(|m| m.crash(&mut self.rng)).collect();
        self.release_hung();
        let lossy = |r: &CrashReport| r.dropped + r.torn > 0;
        self.coverage.lossy_crashes += u64::from(lossy(&backing) || caches.iter().any(lossy));
        (backing, caches)
    }

    /// The model's crash and the engine's restart on what survived.
    async fn recover(&mut self) -> Result<(), String> {
        self.model.crash();
        self.coverage.undecided_after_crash += self.model.undecided_bytes() as u64;
        self.backing = self.backing.reopen();
        for m in &mut self.caches.mems {
            *m = m.reopen();
        }
        self.open().await
    }

    /// Both devices lose power at once; the engine starts over from what survived.
    async fn crash(&mut self) -> Result<(), String> {
        let (backing, caches) = self.crash_devices();
        self.log(format!("crash (backing {backing:?}, caches {caches:?})"));
        self.recover().await
    }

    /// The power failed with `reqs` in flight; `acked[i]` holds what request i returned if it
    /// completed. A write that was not acknowledged may or may not have landed, which is what
    /// an unflushed write is to the model; a flush that was acknowledged covers what completed
    /// before this batch.
    async fn crash_mid_batch(&mut self, reqs: &[Req], mut acked: Vec<Option<Option<Vec<u8>>>>) -> Result<(), String> {
        if reqs.iter().zip(&acked).any(|(r, a)| matches!(r, Req::Flush) && a.is_some()) {
            self.model.flush();
        }
        for (req, a) in reqs.iter().zip(acked.iter_mut()) {
            if let (Req::Read { .. }, Some(data)) = (req, a.take()) {
                apply(&mut self.model, req, data)?;
            }
        }
        for req in reqs {
            match req {
                Req::Write { off, data, .. } => self.model.write(*off, data, false),
                Req::Zero { off, len, .. } => self.model.write_zeroes(*off, *len, false),
                _ => {}
            }
        }
        self.recover().await
    }

    async fn shutdown(&mut self) -> Result<(), String> {
        self.vol.shutdown().await.map_err(|e| format!("shutdown failed: {e}"))?;
        self.model.flush();
        self.revoke_all();
        Ok(())
    }

    /// A clean stop and start. Sometimes the power goes right after the stop (nothing may be
    /// lost), and sometimes the stopped devices are checked with the offline verify.
    async fn restart(&mut self) -> Result<(), String> {
        if std::mem::take(&mut self.cache_hung) && self.rng.below(2) == 0 {
            // The hung SSD answers before the process exits: writes given up on land on it now,
            // after newer data reached the backing; the restart must resync over them.
            self.log("the hung cache answers: held operations land".into());
            for f in &self.caches.faults {
                f.resume();
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while self.vol.stats().cache_io.abandoned_now.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                if std::time::Instant::now() > deadline {
                    return Err("given-up cache operations never finished after the device answered".into());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let faulty = self.cache_faulty;
        self.shutdown().await?;
        self.release_hung();
        let power_loss = self.rng.below(3) == 0;
        let offline_verify = !faulty && !self.caches.mems.is_empty() && self.rng.below(2) == 0;
        self.log(format!("clean restart (power lost after it: {power_loss}, offline verify: {offline_verify})"));
        if self.snapshot.is_none() && self.rng.below(2) == 0 {
            self.log("snapshot of the stopped backing taken".into());
            self.snapshot = Some((self.backing.durable_contents(), self.model.clone()));
        }
        if offline_verify {
            let backing = wrap(&mut self.rng, &self.backing);
            let caches = self.caches.wrap(&mut self.rng);
            let bad =
                verify_offline(backing, caches, false).await.map_err(|e| format!("offline verify failed: {e}"))?;
            if !bad.is_empty() {
                return Err(format!("offline verify after a clean shutdown found mismatches: {bad:?}"));
            }
            self.revoke_all();
        }
        if power_loss {
            self.backing.crash(&mut self.rng);
            for m in &self.caches.mems {
                m.crash(&mut self.rng);
            }
            self.model.crash();
            self.revoke_all();
        }
        self.open().await
    }

    /// While stopped, the cache set is replaced by blank devices (a migrated VM's new SSDs), or
    /// is missing altogether (the engine must start degraded and serve).
    async fn lose_cache(&mut self) -> Result<(), String> {
        self.shutdown().await?;
        self.release_hung();
        let n = self.rng.below(3);
        self.log(format!("lose cache while stopped: {n} blank device(s) now"));
        let slack = self.rng.below(3) * 4096;
        let bb = self.cache_block_bytes;
        self.caches.mems = (0..n).map(|_| mem_device(cache_member_bytes(n, &self.opts, slack), bb)).collect();
        self.open().await?;
        let mode = self.vol.mode();
        if n > 0 && mode == Mode::Degraded {
            return Err("started with a blank cache but stays degraded (no rebuild)".into());
        }
        Ok(())
    }

    /// The running cache set goes bad. No client may notice.
    async fn fail_cache(&mut self) -> Result<(), String> {
        if self.caches.mems.is_empty() {
            self.log("fail cache: none attached".into());
            return Ok(());
        }
        // Mostly a cache that still half works: that is where a missed invalidation shows as a
        // stale read, while a dead cache is simply dropped.
        match self.rng.below(24) {
            20..=23 => {
                // A firmware hang, not an error: the engine must give up on the set at
                // cache_timeout and answer from the backing; the held operations may land later.
                let ops: Vec<FaultOp> = [FaultOp::Read, FaultOp::Write, FaultOp::Flush]
                    .into_iter()
                    .filter(|_| self.rng.below(2) != 0)
                    .collect();
                let ops = if ops.is_empty() { vec![FaultOp::Write] } else { ops };
                self.log(format!("fail cache: it stops answering {ops:?}"));
                for f in &self.caches.faults {
                    f.hang(&ops);
                }
                self.cache_hung = true;
            }
            0..=2 => {
                self.log("fail cache: the operator fails it (fail_cache)".into());
                self.vol.fail_cache().await;
                if self.vol.mode() != Mode::Degraded {
                    return Err(format!("after fail_cache the mode is {:?}, not Degraded", self.vol.mode()));
                }
            }
            3..=5 => {
                self.log("fail cache: it vanishes".into());
                for f in &self.caches.faults {
                    f.vanish();
                }
            }
            6..=15 => {
                let ppm = [20_000u32, 100_000, 300_000, 1_000_000][self.rng.below(4) as usize];
                let ops: Vec<FaultOp> = [FaultOp::Read, FaultOp::Write, FaultOp::Flush]
                    .into_iter()
                    .filter(|_| self.rng.below(3) != 0)
                    .collect();
                self.log(format!("fail cache: EIO on {ops:?} at {ppm} ppm, torn failed writes"));
                for f in &self.caches.faults {
                    for &op in &ops {
                        f.set_error_ppm(op, ppm);
                    }
                    f.set_torn_failed_writes(true);
                }
            }
            _ => {
                let m = self.rng.below(self.caches.mems.len() as u64) as usize;
                let (off, len) = random_range(&mut self.rng, DATA_BYTES / self.caches.mems.len() as u64);
                let ops: &[FaultOp] =
                    if self.rng.below(2) == 0 { &[FaultOp::Read] } else { &[FaultOp::Read, FaultOp::Write] };
                self.log(format!("fail cache: member {m} has a bad patch [{off}, +{len}) for {ops:?}"));
                self.caches.faults[m].fail_range(off..off + len, ops);
            }
        }
        self.cache_faulty = true;
        Ok(())
    }

    /// Lets operations held by a hung cache go on, after the handles they use were revoked (the
    /// process stopped or the devices were pulled): they fail instead of landing.
    fn release_hung(&mut self) {
        if std::mem::take(&mut self.cache_hung) {
            for f in &self.caches.faults {
                f.resume();
            }
        }
    }

    /// Blank devices attached while running; the rebuild starts in the background.
    async fn replace_cache(&mut self) -> Result<(), String> {
        let n = self.rng.in_range(1..3);
        self.log(format!("replace cache while running: {n} blank device(s)"));
        let slack = self.rng.below(3) * 4096;
        // The old set's devices are gone with it (pulled out): its leftover requests must fail.
        for m in &self.caches.mems {
            m.revoke_handles();
        }
        self.release_hung();
        let bb = self.cache_block_bytes;
        self.caches.mems = (0..n).map(|_| mem_device(cache_member_bytes(n, &self.opts, slack), bb)).collect();
        let devs = self.caches.wrap(&mut self.rng);
        self.vol.replace_cache(devs).await.map_err(|e| format!("replace_cache failed: {e}"))?;
        self.cache_faulty = false;
        if self.vol.mode() == Mode::Degraded {
            return Err("a blank cache was attached but the mirror stays degraded".into());
        }
        Ok(())
    }

    /// A member of the attached set becomes slow (its reads go to the backing; it keeps taking
    /// writes) or recovers (serves reads again, with no rebuild): the reads that follow must be
    /// right either way, and a recovered member must hold every write it missed no read of.
    async fn slow_member(&mut self) -> Result<(), String> {
        let member = self.rng.below(self.caches.mems.len().max(1) as u64) as usize;
        let slow = self.rng.below(3) != 0;
        let applied = self.vol.set_member_slow(member, slow);
        self.log(format!("member {member} {} (applied: {applied})", if slow { "slow" } else { "recovers" }));
        // Reads right away, around recent writes: routed ones while slow, and the member's own
        // copy (no rebuild in between) once it recovers.
        for _ in 0..3 {
            let (off, len) = self.read_range();
            let req = Req::Read { off, len };
            let data = submit(&*self.vol, &req, false).await?;
            apply(&mut self.model, &req, data)?;
        }
        Ok(())
    }

    /// The backing is put back to a copy taken while stopped, under the same cache set (which
    /// holds newer data): the engine must notice and serve only the restored disk.
    async fn roll_back_backing(&mut self) -> Result<(), String> {
        let Some((image, model)) = self.snapshot.take() else { return Ok(()) };
        self.shutdown().await?;
        self.release_hung();
        self.log("roll back backing: the snapshot is restored under the same cache".into());
        let bb = self.backing.logical_block_bytes();
        self.backing = match MemDevice::from_image(image) {
            d if bb > 1 => d.with_logical_block_bytes(bb),
            d => d,
        };
        self.model = model;
        self.recent.clear();
        self.open().await?;
        self.coverage.rollbacks += 1;
        self.check_all().await
    }

    /// Once the rebuild is done, every region the cache calls valid must equal the backing.
    async fn check_mirror(&mut self) -> Result<(), String> {
        if self.cache_faulty || self.caches.mems.is_empty() {
            self.log("check mirror: skipped (no healthy cache)".into());
            return Ok(());
        }
        self.log("check mirror: wait_rebuilt + verify(false)".into());
        self.vol.wait_rebuilt().await;
        let mode = self.vol.mode();
        if mode != Mode::Healthy {
            return Err(format!("rebuild finished with healthy cache devices but mode is {mode:?}"));
        }
        let bad = self.vol.verify(false).await.map_err(|e| format!("verify failed: {e}"))?;
        if !bad.is_empty() {
            return Err(format!("valid cache regions differ from the backing at {bad:?}"));
        }
        Ok(())
    }

    /// The backing fails some writes and flushes for a few requests. The client sees those
    /// errors (the backing is the durable copy), a failed write may have landed in part, and the
    /// two copies must still agree on whatever it left: the region is invalid in the cache.
    async fn backing_errors(&mut self) -> Result<(), String> {
        let ppm = [300_000u32, 700_000][self.rng.below(2) as usize];
        let n = self.rng.in_range(1..6);
        self.log(format!("backing fails writes and flushes at {ppm} ppm for {n} requests"));
        self.backing_faults.set_error_ppm(FaultOp::Write, ppm);
        self.backing_faults.set_error_ppm(FaultOp::Flush, ppm);
        self.backing_faults.set_torn_failed_writes(true);
        let r = self.failing_backing_requests(n).await;
        self.backing_faults.heal();
        r?;
        // The engine's own backing I/O (the rebuild's flush before it marks regions valid) may
        // have been decided to fail while the errors were on; on this single-threaded runtime a
        // few rounds let it finish, so a loss it causes is seen here and not by a later step.
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        self.recover_durability().await
    }

    /// After a failed flush or FUA write the backing's unflushed writes may be gone: no FLUSH may
    /// succeed until the operator clears the error. The operator does, in place or after a
    /// restart (whose shutdown must refuse to call itself clean); the backing's page cache is
    /// dropped then, so for the model the unflushed writes are as after a crash.
    async fn recover_durability(&mut self) -> Result<(), String> {
        if self.vol.durability_lost().is_none() {
            return Ok(());
        }
        if self.vol.flush().await.is_ok() {
            return Err("a FLUSH succeeded after a backing flush or FUA write had failed".into());
        }
        let (_, fua) = self.vol.write(0, AlignedBuf::zeroed(1), true).await;
        if fua.is_ok() {
            return Err("a FUA write succeeded after a backing flush or FUA write had failed".into());
        }
        self.coverage.durability_losses += 1;
        let restart = self.rng.below(2) == 0;
        self.log(format!(
            "durability lost: the operator clears it ({})",
            if restart { "after a restart" } else { "in place" }
        ));
        if restart {
            if self.vol.shutdown().await.is_ok() {
                return Err("shutdown recorded a clean stop after the backing lost durability".into());
            }
            self.revoke_all();
            self.open().await?;
            if self.vol.durability_lost().is_none() {
                return Err("the restarted engine forgot that the backing lost durability".into());
            }
        }
        self.vol.clear_durability_loss().await.map_err(|e| format!("clear_durability_loss failed: {e}"))?;
        self.model.crash();
        self.vol.flush().await.map_err(|e| format!("FLUSH failed after the operator cleared the error: {e}"))?;
        self.model.flush();
        Ok(())
    }

    /// One backing write hangs in place; its client gives up (the request is dropped, as at its
    /// deadline) while the write is still in flight, so it stays fenced and registered as
    /// abandoned. The cleaner runs a seeded number of passes before and after the write lands.
    async fn late_write(&mut self) -> Result<(), String> {
        let (off, len) = random_range(&mut self.rng, self.size);
        let id = self.next_write_id;
        self.next_write_id += 1;
        let data = pattern(id, off, len as usize);
        let (before, after) = (self.rng.below(3), self.rng.below(3));
        self.log(format!("late write [{off}, +{len}): cleaner {before}× while in flight, {after}× after it lands"));
        self.backing_faults.hang_range(off..off + len, &[FaultOp::Write]);
        let (vol, buf) = (self.vol.clone(), buf_of(&data));
        let task = tokio::spawn(async move { vol.write(off, buf, false).await.1 });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.backing_faults.held() == 0 && !task.is_finished() {
            if std::time::Instant::now() > deadline {
                return Err("the hung backing write never reached the device".into());
            }
            tokio::task::yield_now().await;
        }
        task.abort();
        let _ = task.await;
        let uncertain = self.model.write_failed(off, &data);
        for _ in 0..before {
            self.vol.clean_metadata().await.map_err(|e| format!("cleaner pass failed: {e}"))?;
        }
        self.backing_faults.resume();
        self.coverage.late_writes += 1;
        for _ in 0..after {
            self.vol.clean_metadata().await.map_err(|e| format!("cleaner pass failed: {e}"))?;
        }
        for r in uncertain {
            for _ in 0..2 {
                let read = Req::Read { off: r.start, len: r.end - r.start };
                let got = submit(&*self.vol, &read, false).await?;
                apply(&mut self.model, &read, got).map_err(|e| format!("after a late write: {e}"))?;
            }
        }
        Ok(())
    }

    async fn failing_backing_requests(&mut self, n: u64) -> Result<(), String> {
        for _ in 0..n {
            let req = loop {
                let req = self.random_req(false);
                if !matches!(req, Req::Read { .. }) {
                    break req;
                }
            };
            let may_unmap = self.rng.below(2) == 0;
            match submit(&*self.vol, &req, may_unmap).await {
                Ok(read) => {
                    self.log(format!("  {} ok", req.describe()));
                    apply(&mut self.model, &req, read)?;
                }
                Err(e) => {
                    self.log(format!("  {} failed ({e})", req.describe()));
                    let uncertain = match &req {
                        Req::Write { off, data, .. } => self.model.write_failed(*off, data),
                        Req::Zero { off, len, .. } => self.model.write_failed(*off, &vec![0; *len as usize]),
                        // A failed flush guarantees nothing, which is what the model assumes.
                        _ => Vec::new(),
                    };
                    self.coverage.failed_backing_writes += u64::from(!uncertain.is_empty());
                    // Read what the failed write left, twice: one read may come from either copy;
                    // both must tell the same story.
                    for r in uncertain {
                        for _ in 0..2 {
                            let read = Req::Read { off: r.start, len: r.end - r.start };
                            let data = submit(&*self.vol, &read, false).await?;
                            apply(&mut self.model, &read, data)
                                .map_err(|e| format!("after a failed backing write: {e}"))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// After every step, without waiting for the rebuild: a region the cache calls valid equals
    /// the backing at every moment, not only once the mirror has settled.
    async fn verify_now(&mut self) -> Result<(), String> {
        if self.cache_faulty || self.caches.mems.is_empty() {
            return Ok(());
        }
        let bad = self.vol.verify(false).await.map_err(|e| format!("verify failed: {e}"))?;
        if !bad.is_empty() {
            return Err(format!("valid cache regions differ from the backing at {bad:?}"));
        }
        Ok(())
    }

    /// Reads the whole disk: after a crash this is where lost flushed data shows.
    async fn check_all(&mut self) -> Result<(), String> {
        let chunk = 64 << 10;
        let mut off = 0;
        while off < self.size {
            let req = Req::Read { off, len: chunk.min(self.size - off) };
            let data = submit(&*self.vol, &req, false).await?;
            apply(&mut self.model, &req, data)?;
            off += chunk;
        }
        Ok(())
    }

    async fn hint(&mut self) -> Result<(), String> {
        let (off, len) = random_range(&mut self.rng, self.size);
        self.log(format!("cache hint + allocation [{off}, +{len})"));
        self.vol.cache(off, len).await.map_err(|e| format!("cache hint failed: {e}"))?;
        let extents = self.vol.allocation(off, len).await.map_err(|e| format!("allocation failed: {e}"))?;
        let total: u64 = extents.iter().map(|e| e.length_bytes).sum();
        if extents.is_empty() || total == 0 || total > len {
            return Err(format!("allocation of [{off}, +{len}) answered {extents:?}"));
        }
        Ok(())
    }

    async fn step(&mut self) -> Result<(), String> {
        self.step_inner().await?;
        self.verify_now().await
    }

    async fn step_inner(&mut self) -> Result<(), String> {
        // Soon after the snapshot, mostly: later, a lost or replaced cache set usually makes the
        // old one unpaired anyway, and the generation check is what is under test.
        if self.snapshot.is_some() && self.rng.below(12) == 0 {
            return self.roll_back_backing().await;
        }
        match self.rng.below(100) {
            0..=46 => self.single().await,
            47..=61 => self.batch().await,
            62..=67 => {
                self.crash().await?;
                // Often check everything at once; otherwise leave bytes undecided, so that
                // writes and further crashes over them are exercised too.
                if self.rng.below(2) == 0 {
                    self.check_all().await?;
                }
                Ok(())
            }
            68..=71 => self.restart().await,
            72..=74 => self.lose_cache().await,
            75..=81 => self.fail_cache().await,
            82..=85 => self.replace_cache().await,
            86..=89 => self.check_mirror().await,
            90..=92 => self.backing_errors().await,
            93 => self.late_write().await,
            94 => self.slow_member().await,
            95 => {
                self.log("metadata cleaner pass".into());
                self.vol.clean_metadata().await.map_err(|e| format!("cleaner pass failed: {e}"))
            }
            _ => self.hint().await,
        }
    }

    /// The end state: a healthy cache, fully rebuilt and verified, and every byte legal before
    /// and after one last power loss.
    async fn finish(&mut self) -> Result<(), String> {
        if self.cache_faulty || self.caches.mems.is_empty() {
            self.replace_cache().await?;
        }
        self.check_mirror().await?;
        self.check_all().await?;
        self.crash().await?;
        self.check_all().await?;
        self.check_mirror().await
    }
}

async fn run_seed(seed: u64, coverage: &mut Coverage) -> Result<(), String> {
    let mut w = match tokio::time::timeout(STEP_LIMIT, World::new(seed)).await {
        Ok(w) => w?,
        Err(_) => return Err("setup hung".into()),
    };
    for step in 0..STEPS_PER_SEED {
        let r = match tokio::time::timeout(STEP_LIMIT, w.step()).await {
            Ok(Ok(())) if panicked() => Err("a task of the engine panicked (see the message above)".into()),
            Ok(r) => r,
            Err(_) => Err(format!("step hung for {STEP_LIMIT:?}")),
        };
        if let Err(e) = r {
            return Err(format!("step {step}: {e}\nlast steps:\n  {}", w.history.join("\n  ")));
        }
    }
    let r = match tokio::time::timeout(STEP_LIMIT, w.finish()).await {
        Ok(Ok(())) if panicked() => Err("a task of the engine panicked (see the message above)".into()),
        Ok(r) => r,
        Err(_) => Err("final check hung".into()),
    };
    r.map_err(|e| format!("final check: {e}\nlast steps:\n  {}", w.history.join("\n  ")))?;
    w.coverage.absorb(&w.vol.stats());
    let c = &w.coverage;
    coverage.reads_cache += c.reads_cache;
    coverage.reads_backing += c.reads_backing;
    coverage.repairs += c.repairs;
    coverage.cache_errors += c.cache_errors;
    coverage.cache_failures += c.cache_failures;
    coverage.rebuild_done_bytes += c.rebuild_done_bytes;
    coverage.lossy_crashes += c.lossy_crashes;
    coverage.undecided_after_crash += c.undecided_after_crash;
    coverage.crashes_in_flight += c.crashes_in_flight;
    coverage.failed_backing_writes += c.failed_backing_writes;
    coverage.cache_timeouts += c.cache_timeouts;
    coverage.durability_losses += c.durability_losses;
    coverage.late_writes += c.late_writes;
    coverage.mixed_block_sizes += c.mixed_block_sizes;
    coverage.rollbacks += c.rollbacks;
    coverage.routed_reads += c.routed_reads;
    Ok(())
}

/// Set by the panic hook: a panic in an engine task (which tokio would swallow) fails the test.
static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn catch_task_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
        default(info);
    }));
}

fn panicked() -> bool {
    PANICKED.load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn mirror_survives_crashes_and_cache_loss_without_losing_or_staling_data() {
    catch_task_panics();
    // SUPERDISK_LOG=debug (an env-filter) shows the engine's log, to follow a replayed seed.
    if std::env::var("SUPERDISK_LOG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("SUPERDISK_LOG"))
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let seeds = seeds(DEFAULT_SEEDS);
    let mut coverage = Coverage::default();
    for &seed in &seeds {
        let _guard = SeedGuard { seed, test: "mirror_model" };
        if let Err(e) = rt.block_on(run_seed(seed, &mut coverage)) {
            panic!("seed {seed} failed: {e}\nreplay: SUPERDISK_SEED={seed} cargo test --test mirror_model");
        }
    }
    coverage.zero_copy_reads = ZERO_COPY_READS.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{} seed(s) passed; exercised: {coverage:?}", seeds.len());
    if seeds.len() >= 8 {
        let c = &coverage;
        let all = [
            c.reads_cache,
            c.reads_backing,
            c.repairs,
            c.cache_errors,
            c.cache_failures,
            c.rebuild_done_bytes,
            c.lossy_crashes,
            c.undecided_after_crash,
            c.crashes_in_flight,
            c.failed_backing_writes,
            c.cache_timeouts,
            c.zero_copy_reads,
            c.durability_losses,
            c.late_writes,
            c.mixed_block_sizes,
            c.rollbacks,
            c.routed_reads,
        ];
        assert!(all.iter().all(|&n| n > 0), "the seeds left part of the mirror unexercised: {c:?}");
    }
}

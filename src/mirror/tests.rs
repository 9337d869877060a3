//! Unit tests of the mirror engine against in-memory devices (crash semantics from
//! `device::sim::mem`, faults from `device::sim::fault`). The randomized, model-based tests live in
//! tests/mirror_model.rs; these pin down each start-up case and each error path.

use super::*;
use crate::device::sim::fault::{FaultDevice, FaultOp, SimRng};
use crate::device::sim::mem::MemDevice;
use crate::device::IoPolicy;
use crate::meta::store::{new_backing_superblock, update_superblock, write_superblock};
use crate::meta::{meta_bytes, BitmapKind, DiskBitmap, MetaLayout};
use std::time::Instant;

pub(super) const REGION: u32 = 64 << 10;
pub(super) const DATA: u64 = 4 << 20; // 64 regions
const REGIONS: u64 = DATA / REGION as u64;

pub(super) fn opts() -> MirrorOptions {
    MirrorOptions {
        region_bytes: REGION,
        stripe_bytes: 16 << 10,
        // Tests run the cleaner by hand (clean_metadata), so its timing never matters.
        metadata_interval_ms: 3_600_000,
        ..MirrorOptions::default()
    }
}

pub(super) async fn new_backing() -> MemDevice {
    let size = DATA + meta_bytes(DATA, REGION);
    let dev = MemDevice::new(size);
    let sb = new_backing_superblock(size, REGION).unwrap();
    assert_eq!(sb.data_size_bytes, DATA);
    write_superblock(&dev, &sb).await.unwrap();
    dev
}

pub(super) fn new_cache() -> MemDevice {
    MemDevice::new(DATA + meta_bytes(DATA, REGION))
}

type Vol = MirrorVolume<MemDevice, MemDevice>;
type FVol = MirrorVolume<MemDevice, FaultDevice<MemDevice>>;

pub(super) fn pattern(seed: u64, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    SimRng::new(seed).fill(&mut b);
    b
}

async fn write<V: Volume>(v: &V, model: &mut [u8], offset: u64, seed: u64, len: usize) {
    let b = pattern(seed, len);
    model[offset as usize..offset as usize + len].copy_from_slice(&b);
    let (_, r) = v.write(offset, b, false).await;
    r.unwrap();
}

async fn read_all<V: Volume>(v: &V) -> Vec<u8> {
    let (b, r) = v.read(0, AlignedBuf::zeroed(DATA as usize)).await;
    r.unwrap();
    b.to_vec()
}

async fn assert_reads<V: Volume>(v: &V, model: &[u8]) {
    let got = read_all(v).await;
    if got[..] != model[..] {
        let i = got.iter().zip(model).position(|(a, b)| a != b).unwrap_or(0);
        panic!("exported disk differs from the model at byte {i} (region {})", i as u64 / u64::from(REGION));
    }
}

fn invalid(v: &Vol) -> u64 {
    v.inner.cache_now().map_or(u64::MAX, |s| s.table.not_valid())
}

/// Restarts cleanly: shutdown, then new handles (old ones dead, as after a process exit).
async fn restart(v: Vol, backing: &MemDevice, caches: &[MemDevice]) -> Vol {
    v.shutdown().await.unwrap();
    drop(v);
    backing.revoke_handles();
    Vol::open(backing.reopen(), caches.iter().map(|c| c.reopen()).collect(), opts()).await.unwrap()
}

#[tokio::test]
async fn blank_cache_is_formatted_rebuilt_and_then_trusted_across_a_clean_restart() {
    let backing = new_backing().await;
    let cache = new_cache();
    let mut model = vec![0u8; DATA as usize];
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    assert_eq!(v.mode(), Mode::Rebuilding);
    write(&v, &mut model, 12345, 1, 100_000).await;
    v.wait_rebuilt().await;
    assert_eq!(v.mode(), Mode::Healthy);
    assert_eq!(v.verify(false).await.unwrap(), vec![]);

    // Case 1: clean restart — nothing to rebuild, reads come from the cache.
    let v = restart(v, &backing, std::slice::from_ref(&cache)).await;
    assert_eq!(v.mode(), Mode::Healthy);
    assert_eq!(invalid(&v), 0);
    let before = v.stats().reads_cache.load(Ordering::Relaxed);
    assert_reads(&v, &model).await;
    assert!(v.stats().reads_cache.load(Ordering::Relaxed) > before, "reads must be served by the cache");
    assert_eq!(v.stats().reads_backing.load(Ordering::Relaxed), 0);
    v.shutdown().await.unwrap();
    assert_eq!(verify_offline(backing.reopen(), vec![cache.reopen()], false).await.unwrap(), vec![]);
}

#[tokio::test]
async fn crash_resyncs_only_regions_with_intent_bits() {
    let backing = new_backing().await;
    let cache = new_cache();
    let mut model = vec![0u8; DATA as usize];
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    let v = restart(v, &backing, std::slice::from_ref(&cache)).await;
    // Two writes into regions 3 and 40, flushed on the backing (so they must survive), then the
    // power goes.
    write(&v, &mut model, 3 * u64::from(REGION) + 10, 2, 5000).await;
    write(&v, &mut model, 40 * u64::from(REGION), 3, 4096).await;
    v.flush().await.unwrap();
    assert_eq!(v.dirty_regions().0, 2);
    let mut rng = SimRng::new(9);
    backing.crash(&mut rng);
    cache.crash(&mut rng);
    drop(v);
    // Case 2: exactly the two intent regions are resynced.
    let v = Vol::open(backing.reopen(), vec![cache.reopen()], opts()).await.unwrap();
    assert_eq!(invalid(&v), 2);
    assert_reads(&v, &model).await;
    v.wait_rebuilt().await;
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
    assert_reads(&v, &model).await;
}

#[tokio::test]
async fn idle_intent_bits_clear_after_both_devices_are_flushed() {
    let backing = new_backing().await;
    let cache = new_cache();
    let mut model = vec![0u8; DATA as usize];
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    write(&v, &mut model, 0, 4, 3 * REGION as usize).await;
    assert_eq!(v.dirty_regions().0, 3);
    // First pass: the regions were touched since the last pass, so they stay.
    v.clean_metadata().await.unwrap();
    assert_eq!(v.dirty_regions().0, 3);
    // Second pass: idle for a whole pass → flushed, cleared.
    v.clean_metadata().await.unwrap();
    assert_eq!(v.dirty_regions().0, 0);
    // A crash now costs no resync at all.
    let mut rng = SimRng::new(1);
    backing.crash(&mut rng);
    cache.crash(&mut rng);
    drop(v);
    let v = Vol::open(backing.reopen(), vec![cache.reopen()], opts()).await.unwrap();
    assert_eq!(v.mode(), Mode::Healthy);
    assert_reads(&v, &model).await;
}

#[tokio::test]
async fn concurrent_first_writes_share_intent_commits() {
    let backing = FaultDevice::new(new_backing().await, 5);
    let v = MirrorVolume::<FaultDevice<MemDevice>, MemDevice>::open(backing.clone(), vec![new_cache()], opts())
        .await
        .unwrap();
    v.wait_rebuilt().await;
    backing.handle().set_latency(Duration::from_millis(2), Duration::from_millis(3));
    let before = v.stats().intent_commits.load(Ordering::Relaxed);
    let v = Arc::new(v);
    let writers: Vec<_> = (0..32u64)
        .map(|i| {
            let v = v.clone();
            tokio::spawn(async move {
                let (_, r) = v.write(i * u64::from(REGION), pattern(i, 4096), false).await;
                r.unwrap();
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let commits = v.stats().intent_commits.load(Ordering::Relaxed) - before;
    assert!(commits <= 3, "32 concurrent first writes took {commits} intent commits; they should share them");
    // The 32 written, plus at most one run marked ahead of what looked like a sequential writer.
    let dirty = v.dirty_regions().0;
    assert!((32..=32 + INTENT_AHEAD).contains(&dirty), "{dirty} dirty regions");
}

#[tokio::test]
async fn stale_cache_resyncs_only_what_was_written_while_it_was_away() {
    let backing = new_backing().await;
    let cache = new_cache();
    let mut model = vec![0u8; DATA as usize];
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    write(&v, &mut model, 0, 5, DATA as usize).await;
    v.wait_rebuilt().await;
    v.shutdown().await.unwrap();
    drop(v);
    // Case 6: the cache is missing — serve degraded.
    backing.revoke_handles();
    let v = Vol::open(backing.reopen(), vec![], opts()).await.unwrap();
    assert_eq!(v.mode(), Mode::Degraded);
    write(&v, &mut model, 5 * u64::from(REGION) + 7, 6, 1000).await;
    write(&v, &mut model, 20 * u64::from(REGION), 7, 2 * REGION as usize).await;
    assert_eq!(v.dirty_regions().1, 3, "three regions recorded as changed");
    v.shutdown().await.unwrap();
    drop(v);
    // Case 3: the same cache comes back; only the 3 changed regions are resynced.
    backing.revoke_handles();
    let v = Vol::open(backing.reopen(), vec![cache.reopen()], opts()).await.unwrap();
    assert_eq!(invalid(&v), 3);
    assert_reads(&v, &model).await;
    v.wait_rebuilt().await;
    assert_eq!(v.dirty_regions().1, 0, "the changed record is dropped once the set caught up");
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
    // And after another restart it is healthy at once.
    let v = restart(v, &backing, std::slice::from_ref(&cache)).await;
    assert_eq!(v.mode(), Mode::Healthy);
    assert_reads(&v, &model).await;
}

#[tokio::test]
async fn a_backing_written_without_the_mirror_engine_forces_a_full_rebuild() {
    let backing = new_backing().await;
    let cache = new_cache();
    let mut model = vec![0u8; DATA as usize];
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    v.shutdown().await.unwrap();
    drop(v);
    // Something else (the plain volume) opened the backing and wrote it, recording nothing.
    backing.revoke_handles();
    let b = backing.reopen();
    let mut sb = read_superblock(&b).await.unwrap().unwrap();
    sb.flags |= FLAG_OPEN;
    update_superblock(&b, &mut sb).await.unwrap();
    let (_, r) = b.write(9 * u64::from(REGION), pattern(8, 4096), false).await;
    r.unwrap();
    model[9 * REGION as usize..9 * REGION as usize + 4096].copy_from_slice(&pattern(8, 4096));
    sb.flags &= !FLAG_OPEN;
    update_superblock(&b, &mut sb).await.unwrap();
    drop(b);
    backing.revoke_handles();
    let v = Vol::open(backing.reopen(), vec![cache.reopen()], opts()).await.unwrap();
    assert_eq!(invalid(&v), REGIONS, "nothing the cache holds can be trusted");
    assert_reads(&v, &model).await;
    v.wait_rebuilt().await;
    assert_reads(&v, &model).await;
}

#[tokio::test]
async fn lost_changed_record_forces_a_full_rebuild_of_a_stale_cache() {
    let backing = new_backing().await;
    let cache = new_cache();
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    v.shutdown().await.unwrap();
    drop(v);
    backing.revoke_handles();
    let v = Vol::open(backing.reopen(), vec![], opts()).await.unwrap();
    let mut model = read_all(&v).await;
    write(&v, &mut model, 0, 9, 100).await;
    v.shutdown().await.unwrap();
    let sb = v.backing_superblock();
    drop(v);
    // Destroy both copies of the changed-regions page.
    backing.revoke_handles();
    let b = backing.reopen();
    let layout = MetaLayout::new(b.size_bytes(), DATA, REGION);
    for slot in 0..2 {
        b.write_zeroes(layout.page_offset(BitmapKind::Changed.area(), slot, 0), 4096, false).await.unwrap();
    }
    b.flush().await.unwrap();
    assert!(!DiskBitmap::load(&b, layout, BitmapKind::Changed, sb.device_uuid, REGIONS)
        .await
        .unwrap()
        .missing_pages
        .is_empty());
    drop(b);
    backing.revoke_handles();
    let v = Vol::open(backing.reopen(), vec![cache.reopen()], opts()).await.unwrap();
    assert_eq!(invalid(&v), REGIONS);
    assert_reads(&v, &model).await;
}

#[tokio::test]
async fn foreign_cache_is_refused_unless_taken_over() {
    let backing_a = new_backing().await;
    let cache = new_cache();
    let v = Vol::open(backing_a.clone(), vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    v.shutdown().await.unwrap();
    drop(v);
    let backing_b = new_backing().await;
    let err = Vol::open(backing_b.clone(), vec![cache.reopen()], opts()).await.err().expect("must refuse");
    assert!(err.to_string().contains("another superdisk"), "{err}");
    let mut take = opts();
    take.take_over_foreign_cache = true;
    backing_b.revoke_handles();
    let v = Vol::open(backing_b.reopen(), vec![cache.reopen()], take).await.unwrap();
    assert_eq!(invalid(&v), REGIONS, "a taken-over cache is rebuilt in full");
    v.wait_rebuilt().await;
    v.shutdown().await.unwrap();
    drop(v);
    // And now it is B's: A refuses it.
    backing_a.revoke_handles();
    assert!(Vol::open(backing_a.reopen(), vec![cache.reopen()], opts()).await.is_err());
}

#[tokio::test]
async fn device_with_unknown_data_or_a_backing_is_not_used_as_cache() {
    let backing = new_backing().await;
    let junk = new_cache();
    let (_, r) = junk.write(junk.size_bytes() - 100_000, pattern(1, 4096), false).await;
    r.unwrap();
    let err = Vol::open(backing.clone(), vec![junk.clone()], opts()).await.err().expect("must refuse");
    assert!(err.to_string().contains("not blank"), "{err}");
    backing.revoke_handles();
    let other_backing = new_backing().await;
    let err = Vol::open(backing.reopen(), vec![other_backing], opts()).await.err().expect("must refuse");
    assert!(err.to_string().contains("backing device"), "{err}");
}

#[tokio::test]
async fn caches_too_small_are_refused_with_a_clear_error() {
    let backing = new_backing().await;
    let small = MemDevice::new(DATA / 2 + meta_bytes(DATA, REGION));
    let err = Vol::open(backing.clone(), vec![small], opts()).await.err().expect("must refuse");
    assert!(err.to_string().contains("too small"), "{err}");
    // Two halves striped are enough.
    backing.revoke_handles();
    let halves =
        vec![MemDevice::new(DATA / 2 + meta_bytes(DATA, REGION)), MemDevice::new(DATA / 2 + meta_bytes(DATA, REGION))];
    let v = Vol::open(backing.reopen(), halves, opts()).await.unwrap();
    v.wait_rebuilt().await;
    assert_eq!(v.mode(), Mode::Healthy);
}

#[tokio::test]
async fn striped_members_are_recognised_in_any_order() {
    let backing = new_backing().await;
    let caches: Vec<MemDevice> =
        (0..3).map(|_| MemDevice::new(DATA / 3 + (64 << 10) + meta_bytes(DATA, REGION))).collect();
    let mut model = vec![0u8; DATA as usize];
    let v = Vol::open(backing.clone(), caches.clone(), opts()).await.unwrap();
    for i in 0..20 {
        write(&v, &mut model, i * 199_999, 100 + i, 50_000).await;
    }
    v.wait_rebuilt().await;
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
    v.shutdown().await.unwrap();
    drop(v);
    backing.revoke_handles();
    let shuffled = vec![caches[2].reopen(), caches[0].reopen(), caches[1].reopen()];
    let v = Vol::open(backing.reopen(), shuffled, opts()).await.unwrap();
    assert_eq!(v.mode(), Mode::Healthy);
    assert_reads(&v, &model).await;
    assert_eq!(v.stats().reads_backing.load(Ordering::Relaxed), 0);
    // A member missing: the other two are not a set any more, and too small to be one.
    v.shutdown().await.unwrap();
    drop(v);
    backing.revoke_handles();
    let v = Vol::open(backing.reopen(), vec![caches[0].reopen(), caches[1].reopen()], opts()).await;
    assert!(v.err().expect("must refuse").to_string().contains("too small"));
}

#[tokio::test]
async fn cache_write_error_is_absorbed_and_invalidates_the_region() {
    let backing = new_backing().await;
    let cache = FaultDevice::new(new_cache(), 3);
    let mut model = vec![0u8; DATA as usize];
    let v = FVol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    let r7 = 7 * u64::from(REGION);
    cache.handle().fail_range(r7..r7 + 1, &[FaultOp::Write]);
    write(&v, &mut model, r7, 11, 4096).await; // succeeds for the client
    assert_eq!(v.stats().cache_errors.load(Ordering::Relaxed), 1);
    assert_eq!(v.inner.cache_now().unwrap().table.get(7), RegionState::Invalid);
    assert_reads(&v, &model).await;
    cache.handle().clear_ranges();
    v.wait_rebuilt().await;
    assert_eq!(v.mode(), Mode::Healthy);
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
}

/// The cleaner may clear a region's intent bit only after the cache's valid bitmap recorded what
/// happened to it: here a cache write fails, the cleaner runs, the power goes — and the region must
/// not come back as valid with the cache's old bytes.
#[tokio::test]
async fn intent_bits_clear_only_after_an_invalidation_is_persisted() {
    let backing = new_backing().await;
    let cache_mem = new_cache();
    let cache = FaultDevice::new(cache_mem.clone(), 8);
    let mut model = vec![0u8; DATA as usize];
    let v = FVol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    // Only the cleaner may persist the valid bitmap from here on.
    v.set_rebuild_paused(true);
    let rb = u64::from(REGION);
    // Other regions are written between the passes, so every pass has intent bits to clear.
    write(&v, &mut model, rb, 20, 100).await;
    v.clean_metadata().await.unwrap();
    cache.handle().fail_range(7 * rb..7 * rb + 1, &[FaultOp::Write]);
    write(&v, &mut model, 7 * rb, 21, 4096).await;
    write(&v, &mut model, 2 * rb, 22, 100).await;
    v.clean_metadata().await.unwrap();
    write(&v, &mut model, 3 * rb, 23, 100).await;
    v.clean_metadata().await.unwrap();
    assert_eq!(v.dirty_regions().0, 1, "only the last-written region keeps its intent bit");
    let mut rng = SimRng::new(2);
    backing.crash(&mut rng);
    cache_mem.crash(&mut rng);
    drop(v);
    let v = FVol::open(backing.reopen(), vec![FaultDevice::new(cache_mem.reopen(), 9)], opts()).await.unwrap();
    assert_eq!(v.inner.cache_now().unwrap().table.get(7), RegionState::Invalid);
    assert_reads(&v, &model).await;
}

#[tokio::test]
async fn backing_write_error_reaches_the_client_and_invalidates_the_region() {
    let backing = FaultDevice::new(new_backing().await, 4);
    let v = MirrorVolume::<FaultDevice<MemDevice>, MemDevice>::open(backing.clone(), vec![new_cache()], opts())
        .await
        .unwrap();
    v.wait_rebuilt().await;
    let r2 = 2 * u64::from(REGION);
    backing.handle().fail_range(r2..r2 + 1, &[FaultOp::Write]);
    let (_, r) = v.write(r2, pattern(1, 4096), false).await;
    assert!(r.is_err());
    assert_eq!(v.inner.cache_now().unwrap().table.get(2), RegionState::Invalid);
    assert_eq!(v.stats().backing_errors.load(Ordering::Relaxed), 1);
    backing.handle().clear_ranges();
    v.wait_rebuilt().await;
    assert_eq!(v.verify(false).await.unwrap(), vec![], "cache equals whatever the backing holds");
}

#[tokio::test]
async fn cache_read_errors_are_repaired_and_past_the_budget_the_cache_is_failed() {
    let backing = new_backing().await;
    let cache = FaultDevice::new(new_cache(), 6);
    let mut model = vec![0u8; DATA as usize];
    let mut o = opts();
    o.tunables.read_error_budget = 3;
    let v = FVol::open(backing.clone(), vec![cache.clone()], o).await.unwrap();
    write(&v, &mut model, 0, 12, DATA as usize).await;
    v.wait_rebuilt().await;
    // A bad sector: the read is answered from the backing and the sector rewritten.
    let bad = 10 * u64::from(REGION) + 4096;
    cache.handle().fail_range(bad..bad + 512, &[FaultOp::Read]);
    let (b, r) = v.read(bad, AlignedBuf::zeroed(4096)).await;
    r.unwrap();
    assert_eq!(&b[..], &model[bad as usize..bad as usize + 4096]);
    assert_eq!(v.stats().repairs.load(Ordering::Relaxed), 1);
    assert_eq!(v.stats().cache_errors.load(Ordering::Relaxed), 1);
    assert_eq!(v.mode(), Mode::Healthy);
    // The cache goes bad everywhere: clients see no error, and past the budget it is dropped.
    cache.handle().set_error_ppm(FaultOp::Read, 1_000_000);
    for i in 0..10u64 {
        let (b, r) = v.read(i * 4096, AlignedBuf::zeroed(4096)).await;
        r.unwrap();
        assert_eq!(&b[..], &model[(i * 4096) as usize..((i + 1) * 4096) as usize]);
    }
    assert_eq!(v.mode(), Mode::Degraded);
    assert_eq!(v.stats().cache_failures.load(Ordering::Relaxed), 1);
    assert_reads(&v, &model).await;
    // A replacement cache is rebuilt.
    v.replace_cache(vec![FaultDevice::new(new_cache(), 7)]).await.unwrap();
    assert_eq!(v.mode(), Mode::Rebuilding);
    v.wait_rebuilt().await;
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
    assert_reads(&v, &model).await;
}

#[tokio::test]
async fn failed_cache_re_added_resyncs_only_what_changed_meanwhile() {
    let backing = new_backing().await;
    let cache = new_cache();
    let mut model = vec![0u8; DATA as usize];
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    v.clean_metadata().await.unwrap();
    v.fail_cache().await;
    assert_eq!(v.mode(), Mode::Degraded);
    write(&v, &mut model, 33 * u64::from(REGION), 13, 100).await;
    v.replace_cache(vec![cache.clone()]).await.unwrap();
    assert_eq!(invalid(&v), 1);
    v.wait_rebuilt().await;
    assert_reads(&v, &model).await;
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
}

#[tokio::test]
async fn trim_and_write_zeroes_leave_both_copies_identical() {
    let backing = new_backing().await;
    let cache = new_cache();
    let mut model = vec![0u8; DATA as usize];
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    write(&v, &mut model, 0, 14, DATA as usize).await;
    v.wait_rebuilt().await;
    v.trim(100_000, 300_000, false).await.unwrap();
    model[100_000..400_000].fill(0);
    v.write_zeroes(1_000_003, 5, false, true).await.unwrap();
    model[1_000_003..1_000_008].fill(0);
    assert_reads(&v, &model).await;
    assert_eq!(v.mode(), Mode::Healthy);
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
    assert!(v.trim(DATA - 1, 2, false).await.is_err(), "out of range");
}

#[tokio::test]
async fn verify_reports_and_repairs_a_corrupted_cache() {
    let backing = new_backing().await;
    let cache = new_cache();
    let mut model = vec![0u8; DATA as usize];
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    write(&v, &mut model, 0, 15, DATA as usize).await;
    v.wait_rebuilt().await;
    v.shutdown().await.unwrap();
    drop(v);
    // Silent corruption of the cache's copy of bytes [8192, 12288) (region 0).
    cache.revoke_handles();
    let c = cache.reopen();
    let (_, r) = c.write(8192 + 100, pattern(99, 10), false).await;
    r.unwrap();
    drop(c);
    backing.revoke_handles();
    cache.revoke_handles();
    let found = verify_offline(backing.reopen(), vec![cache.reopen()], false).await.unwrap();
    assert_eq!(found, vec![(8192, 4096)]);
    let fixed = verify_offline(backing.reopen(), vec![cache.reopen()], true).await.unwrap();
    assert_eq!(fixed, vec![(8192, 4096)]);
    assert_eq!(verify_offline(backing.reopen(), vec![cache.reopen()], false).await.unwrap(), vec![]);
    // Online too.
    let c = cache.reopen();
    let (_, r) = c.write(3 * u64::from(REGION), pattern(98, 10), false).await;
    r.unwrap();
    let v = Vol::open(backing.reopen(), vec![cache.reopen()], opts()).await.unwrap();
    assert_eq!(v.verify(true).await.unwrap(), vec![(3 * u64::from(REGION), 4096)]);
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
    assert_reads(&v, &model).await;
}

#[tokio::test]
async fn reads_spanning_valid_and_invalid_regions_are_split() {
    let backing = new_backing().await;
    let cache = FaultDevice::new(new_cache(), 1);
    let mut model = vec![0u8; DATA as usize];
    let mut o = opts();
    o.tunables.rebuild_min_bytes_per_s = 1 << 20;
    o.tunables.rebuild_max_bytes_per_s = 1 << 20;
    let v = FVol::open(backing.clone(), vec![cache.clone()], o).await.unwrap();
    // Regions 1 and 3 become valid by full-region writes; 0, 2, 4 stay invalid (the rebuild is
    // slow and the cache refuses its copies into them).
    let rb = u64::from(REGION);
    cache.handle().fail_range(0..rb, &[FaultOp::Write]);
    cache.handle().fail_range(2 * rb..3 * rb, &[FaultOp::Write]);
    cache.handle().fail_range(4 * rb..5 * rb, &[FaultOp::Write]);
    write(&v, &mut model, rb, 16, REGION as usize).await;
    write(&v, &mut model, 3 * rb, 17, REGION as usize).await;
    let set = v.inner.cache_now().unwrap();
    assert_eq!(set.table.get(1), RegionState::Valid);
    assert_eq!(set.table.get(3), RegionState::Valid);
    let (b, r) = v.read(rb / 2, AlignedBuf::zeroed(4 * REGION as usize)).await;
    r.unwrap();
    assert_eq!(&b[..], &model[(rb / 2) as usize..(rb / 2 + 4 * rb) as usize]);
    assert_eq!(v.stats().reads_cache.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn hot_regions_are_rebuilt_first() {
    let backing = new_backing().await;
    let v = Vol::open(backing.clone(), vec![new_cache()], opts()).await.unwrap();
    let set = v.inner.cache_now().unwrap();
    // A client reads regions 50 and 60 while they are invalid.
    let inner = &v.inner;
    inner.push_hot(60);
    inner.push_hot(50);
    inner.push_hot(60);
    let mut cursor = 0;
    let batch = rebuild::pick(inner, &set, &mut cursor, 4);
    assert_eq!(batch[..2], [60, 50]);
    assert!(batch[2..].iter().all(|&r| r < 50));
}

#[tokio::test]
async fn operations_out_of_range_are_refused() {
    let backing = new_backing().await;
    let v = Vol::open(backing, vec![new_cache()], opts()).await.unwrap();
    let (_, r) = v.read(DATA - 1, AlignedBuf::zeroed(2)).await;
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
    let (_, r) = v.write(DATA, AlignedBuf::zeroed(1), false).await;
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    let (_, r) = v.read(u64::MAX, AlignedBuf::zeroed(2)).await;
    assert!(r.is_err());
}

/// Random writes, flushes and crashes (unflushed writes kept, dropped or torn on both devices)
/// with restarts: every flushed write survives, reads match, and no valid cache region differs
/// from the backing. A failure names its seed.
#[tokio::test]
async fn random_crashes_lose_no_flushed_write_and_never_leave_a_stale_valid_region() {
    for seed in 0..12u64 {
        let mut rng = SimRng::new(seed);
        let backing = new_backing().await;
        let cache = new_cache();
        // `durable` is what must survive a crash except in `unflushed` (ranges written since the
        // last flush); `current` is what reads must return while running.
        let mut current = vec![0u8; DATA as usize];
        let mut durable = current.clone();
        let mut unflushed: Vec<std::ops::Range<usize>> = Vec::new();
        let mut v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
        for step in 0..40 {
            match rng.below(10) {
                0..=5 => {
                    let off = rng.below(DATA - 1);
                    let len = 1 + rng.below((DATA - off).min(3 * u64::from(REGION)));
                    let fua = rng.below(4) == 0;
                    let b = pattern(rng.next_u64(), len as usize);
                    let range = off as usize..(off + len) as usize;
                    current[range.clone()].copy_from_slice(&b);
                    let (_, r) = v.write(off, b, fua).await;
                    r.unwrap();
                    if fua {
                        durable[range.clone()].copy_from_slice(&current[range]);
                    } else {
                        unflushed.push(range);
                    }
                }
                6 => {
                    v.flush().await.unwrap();
                    durable.clone_from(&current);
                    unflushed.clear();
                }
                7 => v.clean_metadata().await.unwrap(),
                8 => {
                    // Let the rebuild run a little.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                _ => {
                    let mut crash_rng = SimRng::new(rng.next_u64());
                    backing.crash(&mut crash_rng);
                    cache.crash(&mut crash_rng);
                    drop(v);
                    let image = backing.contents()[..DATA as usize].to_vec();
                    let mut masked = image.clone();
                    for r in unflushed.drain(..) {
                        masked[r.clone()].copy_from_slice(&durable[r]);
                    }
                    if masked != durable {
                        let i = masked.iter().zip(&durable).position(|(a, b)| a != b).unwrap_or(0);
                        panic!("seed {seed} step {step}: flushed byte {i} lost");
                    }
                    current = image;
                    durable.clone_from(&current);
                    let found = verify_offline(backing.reopen(), vec![cache.reopen()], false).await.unwrap();
                    assert_eq!(found, vec![], "seed {seed} step {step}: a region the cache calls valid differs");
                    v = Vol::open(backing.reopen(), vec![cache.reopen()], opts()).await.unwrap();
                }
            }
            let got = read_all(&v).await;
            assert!(got == current, "seed {seed} step {step}: stale or wrong read");
        }
        v.wait_rebuilt().await;
        assert_eq!(v.verify(false).await.unwrap(), vec![], "seed {seed}");
    }
}

// ------------------------------------------------------------------------------------------------
// A stalled backing (device::layer::backing_guard): the device stops answering, then answers again, and what it
// was asked to write while stalled lands late.

type HVol = MirrorVolume<FaultDevice<MemDevice>, MemDevice>;

/// Short backing timeouts, so a stall turns into errors within milliseconds.
fn stall_opts() -> MirrorOptions {
    MirrorOptions {
        backing_io: IoPolicy {
            attempt_timeout: Duration::from_millis(5),
            read_retries: 2,
            retry_backoff: Duration::from_millis(1),
            deadline: Duration::from_millis(25),
        },
        ..opts()
    }
}

/// Fails the test instead of hanging it when something is not bounded.
async fn within_limit<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f).await.expect("hung: some wait is not bounded by the deadline")
}

fn state(v: &HVol, r: u64) -> RegionState {
    v.inner.cache_now().expect("cache attached").table.get(r)
}

#[tokio::test]
async fn a_stalled_backing_serves_valid_regions_from_the_cache_and_fails_writes_cleanly() {
    within_limit(async {
        let backing = FaultDevice::new(new_backing().await, 11);
        let faults = backing.handle();
        let v = HVol::open(backing.clone(), vec![new_cache()], stall_opts()).await.unwrap();
        let rb = u64::from(REGION);
        let mut model = vec![0u8; DATA as usize];
        write(&v, &mut model, 0, 1, DATA as usize).await;
        v.wait_rebuilt().await;
        // Two cleaner passes clear every idle intent bit: a first write into a region needs a commit.
        v.clean_metadata().await.unwrap();
        v.clean_metadata().await.unwrap();
        write(&v, &mut model, 3 * rb, 2, 4096).await;
        assert_eq!(v.dirty_regions().0, 1, "region 3 keeps its intent bit; the others are clean");

        faults.hang(&[FaultOp::Read, FaultOp::Write, FaultOp::Flush]);
        let backing_reads = faults.ops(FaultOp::Read);

        // Valid regions: served from the cache, without touching the backing.
        assert_reads(&v, &model).await;
        assert_eq!(faults.ops(FaultOp::Read), backing_reads, "a read of valid regions went to the backing");

        // A write into region 3 (intent bit durable): the backing write never answers; the client
        // gets EIO and the region can no longer be read from the cache.
        let (_, r) = v.write(3 * rb + 100, pattern(3, 5000), false).await;
        let e = r.expect_err("a write the backing never acknowledged must fail");
        assert!(guard::is_deadline_error(&e), "{e}");
        assert_eq!(state(&v, 3), RegionState::Invalid);
        // A second write to the same bytes waits behind the first (which may still land) and is
        // never issued.
        let writes = faults.ops(FaultOp::Write);
        let (_, r) = v.write(3 * rb, pattern(4, 8192), false).await;
        assert!(r.is_err());
        assert_eq!(faults.ops(FaultOp::Write), writes, "a write was issued over one that may still land");

        // A first write into region 5: its write-intent commit never answers, so nothing is
        // written anywhere and the region stays valid with its old bytes.
        let (_, r) = v.write(5 * rb, pattern(5, 4096), false).await;
        assert!(r.is_err(), "a write whose intent commit failed must fail");
        assert_eq!(state(&v, 5), RegionState::Valid);
        // A flush fails too, and reads of an invalid region wait for the backing and then fail.
        assert!(v.flush().await.is_err());
        let (_, r) = v.read(3 * rb, AlignedBuf::zeroed(4096)).await;
        assert!(r.is_err());
        // Everything else still reads from the cache, as it was.
        let (b, r) = v.read(5 * rb, AlignedBuf::zeroed(rb as usize)).await;
        r.unwrap();
        assert_eq!(&b[..], &model[5 * rb as usize..6 * rb as usize]);
        let (b, r) = v.read(0, AlignedBuf::zeroed(3 * rb as usize)).await;
        r.unwrap();
        assert_eq!(&b[..], &model[..3 * rb as usize]);
        let st = v.stats();
        assert!(v.backing_stalled());
        assert_eq!(st.backing_io.outages.load(Ordering::Relaxed), 1);
        // The write and the commit timed out; the flush waited behind the commit (a FUA write,
        // which a flush never overlaps) and failed at its deadline without being issued.
        assert!(st.backing_io.timeouts.load(Ordering::Relaxed) >= 2);
        assert!(st.backing_io.deadline_errors.load(Ordering::Relaxed) >= 4);

        // The backing answers again: the stalled writes land (late), the rebuild copies region 3
        // back from what the backing now holds, and every acknowledged write is intact.
        faults.resume();
        v.wait_rebuilt().await;
        assert!(!v.backing_stalled());
        assert_eq!(st.backing_io.in_outage.load(Ordering::Relaxed), 0);
        // The first failed write landed; the second was never issued.
        let b = pattern(3, 5000);
        model[3 * rb as usize + 100..3 * rb as usize + 5100].copy_from_slice(&b);
        assert_reads(&v, &model).await;
        assert_eq!(v.verify(false).await.unwrap(), vec![], "the cache agrees with the backing");
        v.flush().await.unwrap();
        write(&v, &mut model, 3 * rb, 6, 8192).await;
        write(&v, &mut model, 5 * rb, 7, 4096).await;
        assert_reads(&v, &model).await;
        v.wait_rebuilt().await;
        assert_eq!(v.verify(false).await.unwrap(), vec![]);
        assert_eq!(
            &backing.inner().contents()[..DATA as usize],
            &model[..],
            "the backing holds every acknowledged write"
        );
    })
    .await;
}

/// Random writes, reads, flushes and cleaner passes while the backing stalls and recovers at
/// random moments. A write that failed leaves each of its bytes old or new (it may land late);
/// once a read has returned such a byte, it must read the same until the next write (no flapping
/// between the copies, no stale cache), and every acknowledged write reads back.
#[tokio::test]
async fn random_backing_stalls_lose_no_acknowledged_write_and_serve_no_stale_data() {
    within_limit(async {
        for seed in 0..3u64 {
            let mut rng = SimRng::new(seed);
            let backing = FaultDevice::new(new_backing().await, seed);
            let faults = backing.handle();
            let v = HVol::open(backing.clone(), vec![new_cache()], stall_opts()).await.unwrap();
            // Per byte: the values it may hold. One value: known.
            let mut model: Vec<Vec<u8>> = vec![vec![0]; DATA as usize];
            let mut history: Vec<String> = Vec::new();
            let mut hung = false;
            // A few hot spots, so that writes often overlap ones that failed and may land late.
            let hot: Vec<u64> = (0..4).map(|_| rng.below(DATA - u64::from(REGION))).collect();
            for step in 0..100 {
                let off =
                    if rng.below(4) == 0 { rng.below(DATA - 1) } else { hot[rng.below(4) as usize] + rng.below(8192) };
                // Mostly small, sometimes across a region boundary.
                let len = rng.in_range(1..(u64::from(REGION) / 2).min(DATA - off) + 1);
                let what = rng.below(12);
                history.push(format!("{step}: op {what} [{off}, +{len}) hung={hung}"));
                let fail = |msg: String| -> ! {
                    panic!("seed {seed} step {step}: {msg}\nhistory:\n  {}", history.join("\n  "))
                };
                match what {
                    0..=4 => {
                        let seed_data = rng.next_u64();
                        let data = pattern(seed_data, len as usize);
                        let (_, r) = v.write(off, pattern(seed_data, len as usize), false).await;
                        for (i, &b) in data.iter().enumerate() {
                            let m = &mut model[off as usize + i];
                            match r {
                                Ok(()) => *m = vec![b],
                                Err(_) if !m.contains(&b) => m.push(b),
                                Err(_) => {}
                            }
                        }
                    }
                    5..=7 => {
                        let (b, r) = v.read(off, AlignedBuf::zeroed(len as usize)).await;
                        match r {
                            Ok(()) => {
                                for (i, &x) in b.iter().enumerate() {
                                    let m = &mut model[off as usize + i];
                                    if !m.contains(&x) {
                                        fail(format!("byte {} read {x}, may only be one of {m:?}", off as usize + i));
                                    }
                                    *m = vec![x];
                                }
                            }
                            Err(e) if !hung && !v.backing_stalled() => {
                                fail(format!("read failed with the backing answering: {e}"))
                            }
                            Err(_) => {}
                        }
                    }
                    8 => {
                        let _ = v.flush().await;
                    }
                    9 => {
                        let _ = v.clean_metadata().await;
                    }
                    10 => {
                        if hung {
                            faults.resume();
                        } else {
                            // Writes alone stalling while reads answer is what would let a
                            // rebuild copy bytes that a given-up write then overwrites.
                            let kinds: [&[FaultOp]; 5] = [
                                &[FaultOp::Write],
                                &[FaultOp::Write, FaultOp::Flush],
                                &[FaultOp::Read, FaultOp::Write, FaultOp::Flush],
                                &[FaultOp::Read],
                                &[FaultOp::Flush],
                            ];
                            faults.hang(kinds[rng.below(5) as usize]);
                        }
                        hung = !hung;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(2)).await,
                }
                if !hung && rng.below(8) == 0 {
                    // The stall is over and everything it held has landed: the copies agree.
                    v.wait_rebuilt().await;
                    if v.backing_stalled() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    let bad = v.verify(false).await.unwrap_or_else(|e| fail(format!("verify: {e}")));
                    if !bad.is_empty() {
                        fail(format!("valid cache regions differ from the backing at {bad:?}"));
                    }
                }
            }
            faults.resume();
            v.wait_rebuilt().await;
            let (b, r) = v.read(0, AlignedBuf::zeroed(DATA as usize)).await;
            r.unwrap();
            for (i, &x) in b.iter().enumerate() {
                assert!(model[i].contains(&x), "seed {seed}: byte {i} reads {x}, may only be one of {:?}", model[i]);
            }
            assert_eq!(v.verify(false).await.unwrap(), vec![], "seed {seed}");
            assert!(v.stats().backing_io.deadline_errors.load(Ordering::Relaxed) > 0, "seed {seed}: no stall hit");
        }
    })
    .await;
}

/// intent::INTENT_AHEAD_REGIONS.
const INTENT_AHEAD: u64 = 16;

fn hedging(min_us: u64, max_percent: u32) -> MirrorOptions {
    let o = opts();
    MirrorOptions {
        tunables: Tunables {
            hedge: HedgePolicy {
                enabled: true,
                min: Duration::from_micros(min_us),
                max: Duration::from_micros(min_us),
                max_percent,
            },
            ..o.tunables.clone()
        },
        ..o
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_cache_reads_are_answered_by_the_backing_within_the_hedge_budget() {
    let backing = new_backing().await;
    let cache = FaultDevice::new(new_cache(), 21);
    let mut model = vec![0u8; DATA as usize];
    let v = Arc::new(FVol::open(backing, vec![cache.clone()], hedging(1000, 5)).await.unwrap());
    v.set_hedge_refresh(Duration::from_secs(3600));
    write(&*v, &mut model, 0, 22, DATA as usize).await;
    v.wait_rebuilt().await;
    let stats = v.stats();
    let hedged = || stats.hedge.hedged.load(Ordering::Relaxed);
    assert_eq!(hedged(), 0, "the rebuild and writes do not hedge");
    // The SSD stops answering reads (a long GC pause): every read is answered by the backing,
    // up to the budget (5 % of recent reads plus a burst of 32).
    cache.handle().hang(&[FaultOp::Read]);
    let model = Arc::new(model);
    let spawn_read = |i: u64| {
        let (v, model) = (v.clone(), model.clone());
        tokio::spawn(async move {
            let off = (i * 7919 * 4096) % DATA;
            let (b, r) = v.read(off, AlignedBuf::zeroed(4096)).await;
            r.unwrap();
            assert_eq!(&b[..], &model[off as usize..off as usize + 4096], "read at {off}");
        })
    };
    for i in 0..10 {
        tokio::time::timeout(Duration::from_secs(10), spawn_read(i)).await.expect("a hedged read hung").unwrap();
    }
    assert_eq!(hedged(), 10);
    assert_eq!(stats.hedge.backing_won.load(Ordering::Relaxed), 10);
    let rest: Vec<_> = (10..60).map(spawn_read).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    // 60 reads: 60 × 5 % + 32 = 35 hedges; the other 25 wait.
    while stats.hedge.over_budget.load(Ordering::Relaxed) < 25 {
        assert!(Instant::now() < deadline, "over_budget {}", stats.hedge.over_budget.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(hedged(), 35, "hedges past the budget while every read stalls");
    // The reads over budget wait for the cache, which answers once it recovers.
    cache.handle().resume();
    for t in rest {
        tokio::time::timeout(Duration::from_secs(10), t).await.expect("a read stayed hung").unwrap();
    }
    assert_eq!(v.mode(), Mode::Healthy, "a stall is not an error");
    assert_eq!(stats.cache_errors.load(Ordering::Relaxed), 0);
    // Switched off live: a stalled read waits for the cache.
    let mut t = v.tunables();
    t.hedge.enabled = false;
    v.set_tunables(t);
    cache.handle().hang(&[FaultOp::Read]);
    let t = spawn_read(99);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!t.is_finished(), "hedging is off: the read must wait for the cache");
    cache.handle().resume();
    t.await.unwrap();
    assert_eq!(hedged(), 35);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_reads_never_return_data_older_than_an_acknowledged_write() {
    let backing = FaultDevice::new(new_backing().await, 23);
    let cache = FaultDevice::new(new_cache(), 24);
    let v = Arc::new(MirrorVolume::open(backing.clone(), vec![cache.clone()], hedging(100, 100)).await.unwrap());
    v.wait_rebuilt().await;
    // Both devices jitter, so either may answer a hedged read first.
    cache.handle().set_latency(Duration::ZERO, Duration::from_micros(1500));
    backing.handle().set_latency(Duration::ZERO, Duration::from_micros(400));
    let acked = Arc::new(AtomicU64::new(0));
    const BLOCKS: u64 = 4;
    let writer = {
        let (v, acked) = (v.clone(), acked.clone());
        tokio::spawn(async move {
            for version in 1..=300u64 {
                // Version stamped in every 8 bytes of four blocks that straddle a region boundary.
                let off = u64::from(REGION) - 2 * 4096;
                let mut b = AlignedBuf::zeroed((BLOCKS * 4096) as usize);
                for w in b.chunks_mut(8) {
                    w.copy_from_slice(&version.to_le_bytes());
                }
                let (_, r) = v.write(off, b, false).await;
                r.unwrap();
                acked.store(version, Ordering::SeqCst);
            }
        })
    };
    let mut readers = Vec::new();
    for seed in 0..3u64 {
        let (v, acked) = (v.clone(), acked.clone());
        readers.push(tokio::spawn(async move {
            let mut rng = SimRng::new(seed);
            let mut reads = 0u64;
            while acked.load(Ordering::SeqCst) < 300 {
                let floor = acked.load(Ordering::SeqCst);
                let block = rng.below(BLOCKS);
                let off = u64::from(REGION) - 2 * 4096 + block * 4096;
                let (b, r) = v.read(off, AlignedBuf::zeroed(4096)).await;
                r.unwrap();
                let got = u64::from_le_bytes(b[..8].try_into().unwrap());
                assert!(got >= floor, "read version {got} after version {floor} was acknowledged");
                assert!(b.chunks(8).all(|w| w == got.to_le_bytes()), "a torn 4 KiB read");
                reads += 1;
            }
            reads
        }));
    }
    writer.await.unwrap();
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
    let s = v.stats();
    assert!(s.hedge.hedged.load(Ordering::Relaxed) > 0, "no read was hedged: the test tests nothing");
    assert!(s.hedge.backing_won.load(Ordering::Relaxed) > 0, "the backing never won a race");
    assert!(s.reads_cache.load(Ordering::Relaxed) > 0, "the cache never won a race");
    // A backing read that lost its race is dropped, not stalled: no outage was reported.
    assert_eq!(s.backing_io.outages.load(Ordering::Relaxed), 0, "a lost hedge counted as a backing outage");
    assert_eq!(s.backing_io.timeouts.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_sequential_writer_shares_intent_commits_with_the_regions_ahead() {
    let backing = new_backing().await;
    let v = Vol::open(backing, vec![new_cache()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    let mut model = vec![0u8; DATA as usize];
    let before = v.stats().intent_commits.load(Ordering::Relaxed);
    // One region per write, front to back, as a file being written out or an sstable flushed.
    for r in 0..REGIONS {
        write(&v, &mut model, r * u64::from(REGION), 40 + r, REGION as usize).await;
    }
    let commits = v.stats().intent_commits.load(Ordering::Relaxed) - before;
    // Without marking ahead this is one commit per region (64).
    assert!(commits <= 2 + REGIONS / 16, "{commits} intent commits for {REGIONS} sequential regions");
    // The regions marked ahead but never written clear like any idle region.
    v.clean_metadata().await.unwrap();
    v.clean_metadata().await.unwrap();
    assert_reads(&v, &model).await;
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
}

fn time_limited(ms: u64) -> MirrorOptions {
    let o = opts();
    MirrorOptions {
        tunables: Tunables {
            cache_timeout: Duration::from_millis(ms),
            hedge: HedgePolicy { enabled: false, ..HedgePolicy::default() },
            ..o.tunables.clone()
        },
        ..o
    }
}

/// Polls `cond` for up to 10 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_cache_write_fails_the_set_and_the_device_comes_back_only_after_it_answered() {
    let backing = new_backing().await;
    let cache = FaultDevice::new(new_cache(), 31);
    let mut model = vec![0u8; DATA as usize];
    let v = FVol::open(backing, vec![cache.clone()], time_limited(300)).await.unwrap();
    write(&v, &mut model, 0, 32, DATA as usize).await;
    v.wait_rebuilt().await;
    v.clean_metadata().await.unwrap();
    let stats = v.stats();
    // The SSD stops answering writes: the client's write is acknowledged once the backing has
    // it, at the limit, and the set is given up on.
    cache.handle().hang(&[FaultOp::Write]);
    let started = Instant::now();
    write(&v, &mut model, 5 * REGION as u64, 33, 4096).await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(v.mode(), Mode::Degraded);
    assert_eq!(stats.cache_io.timed_out.load(Ordering::Relaxed), 1);
    assert_eq!(stats.cache_failures.load(Ordering::Relaxed), 1);
    assert_eq!(v.cache_outstanding(cache.identity()).await, 1);
    // Degraded: the same region is written again (backing only), and reads are right.
    write(&v, &mut model, 5 * REGION as u64, 34, 4096).await;
    assert_reads(&v, &model).await;
    // The same device offered again while its given-up write may still land: refused, and the
    // engine keeps serving degraded.
    let e = v.replace_cache(vec![cache.clone()]).await.unwrap_err();
    assert!(e.to_string().contains("still outstanding"), "{e}");
    assert_eq!(v.mode(), Mode::Degraded);
    // The device answers at last: the old write lands on it (older than what the backing has).
    cache.handle().resume();
    eventually("the given-up write is answered", || v.stats().cache_io.outstanding(cache.identity()) == 0).await;
    // Now it comes back; the region it missed (and got a stale write for) is resynced.
    v.replace_cache(vec![cache.clone()]).await.unwrap();
    v.wait_rebuilt().await;
    assert_eq!(v.mode(), Mode::Healthy);
    assert_reads(&v, &model).await;
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_cache_read_is_served_from_the_backing_at_the_limit() {
    let backing = new_backing().await;
    let cache = FaultDevice::new(new_cache(), 41);
    let mut model = vec![0u8; DATA as usize];
    let v = Arc::new(FVol::open(backing, vec![cache.clone()], time_limited(200)).await.unwrap());
    write(&*v, &mut model, 0, 42, DATA as usize).await;
    v.wait_rebuilt().await;
    cache.handle().hang(&[FaultOp::Read]);
    // Several readers wait on the hung device; the first to reach the limit fails the set and the
    // others give up with it, each answered by the backing.
    let model = Arc::new(model);
    let readers: Vec<_> = (0..8u64)
        .map(|i| {
            let (v, model) = (v.clone(), model.clone());
            tokio::spawn(async move {
                let off = i * 3 * REGION as u64 + 4096;
                let (b, r) = v.read(off, AlignedBuf::zeroed(8192)).await;
                r.unwrap();
                assert_eq!(&b[..], &model[off as usize..off as usize + 8192]);
            })
        })
        .collect();
    let started = Instant::now();
    for r in readers {
        tokio::time::timeout(Duration::from_secs(5), r).await.expect("a read outlived the limit").unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(v.mode(), Mode::Degraded);
    // One timeout trips the set and the readers still waiting give up with it; a reader whose
    // timer fires on the other worker before the trip is seen timed out too (seen under load).
    let timed_out = v.stats().cache_io.timed_out.load(Ordering::Relaxed);
    assert!((1..=8).contains(&timed_out), "{timed_out} timeouts");
    cache.handle().resume();
    assert_reads(&*v, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_limit_failing_the_cache_releases_requests_waiting_on_it() {
    let backing = new_backing().await;
    let cache = FaultDevice::new(new_cache(), 51);
    let mut model = vec![0u8; DATA as usize];
    let v = Arc::new(FVol::open(backing, vec![cache.clone()], time_limited(0)).await.unwrap());
    write(&*v, &mut model, 0, 52, DATA as usize).await;
    v.wait_rebuilt().await;
    cache.handle().hang(&[FaultOp::Write]);
    let b = pattern(53, 4096);
    model[8192..8192 + 4096].copy_from_slice(&b);
    let w = {
        let v = v.clone();
        tokio::spawn(async move { v.write(8192, b, false).await.1 })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w.is_finished(), "no limit: the write waits for the cache");
    // The operator fails the hung SSD: the waiting write is acknowledged from the backing.
    v.fail_cache().await;
    tokio::time::timeout(Duration::from_secs(5), w).await.expect("still waiting").unwrap().unwrap();
    assert_eq!(v.stats().cache_io.timed_out.load(Ordering::Relaxed), 0);
    assert_reads(&*v, &model).await;
    // The SSD answers; put straight back, the attach waits out its last operations instead of
    // refusing, and resyncs what it missed.
    cache.handle().resume();
    v.replace_cache(vec![cache.clone()]).await.unwrap();
    v.wait_rebuilt().await;
    assert_eq!(v.mode(), Mode::Healthy);
    assert_reads(&*v, &model).await;
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
}

fn slice_bytes(slice: &FileSlice) -> Vec<u8> {
    let mut out = vec![0u8; slice.len];
    let file = std::fs::File::from(slice.file.fd().try_clone_to_owned().unwrap());
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut out, slice.offset).unwrap();
    out
}

/// A read sent straight from a device file is offered from the cache only where every region it
/// touches is valid there, from the backing when there is no cache, and so never from a cache
/// region that missed a write.
#[tokio::test]
async fn zero_copy_reads_come_only_from_a_current_copy() {
    let backing = new_backing().await;
    let cache_mem = new_cache();
    let cache = FaultDevice::new(cache_mem.clone(), 3);
    let mut model = vec![0u8; DATA as usize];
    let v = FVol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    v.set_rebuild_paused(true);
    let rb = u64::from(REGION);
    write(&v, &mut model, 6 * rb, 30, 2 * rb as usize).await;
    cache.handle().fail_range(7 * rb..7 * rb + 1, &[FaultOp::Write]);
    write(&v, &mut model, 7 * rb, 31, 4096).await;
    // The cache's copy of region 7 is now stale: that is what must never be sent.
    assert_ne!(cache_mem.contents()[7 * rb as usize..][..4096], model[7 * rb as usize..][..4096]);
    let stats = v.stats();
    let from_cache = stats.reads_cache.load(Ordering::Relaxed);
    assert!(v.read_zero_copy(7 * rb, 4096).is_none());
    assert!(v.read_zero_copy(6 * rb, 2 * rb).is_none(), "a range touching the stale region");
    let slice = v.read_zero_copy(6 * rb + 100, rb - 100).expect("a valid region is offered");
    assert_eq!(slice_bytes(&slice), model[(6 * rb + 100) as usize..(7 * rb) as usize]);
    assert_eq!(stats.reads_cache.load(Ordering::Relaxed), from_cache + 1);
    // Out of range or empty: nothing.
    assert!(v.read_zero_copy(DATA - 4096, 8192).is_none());
    assert!(v.read_zero_copy(0, 0).is_none());
    // Without a cache the backing, which has every acknowledged write, is the source.
    v.fail_cache().await;
    let from_backing = stats.reads_backing.load(Ordering::Relaxed);
    let slice = v.read_zero_copy(7 * rb, 4096).expect("the backing is offered");
    assert_eq!(slice_bytes(&slice), model[(7 * rb) as usize..(7 * rb + 4096) as usize]);
    assert_eq!(stats.reads_backing.load(Ordering::Relaxed), from_backing + 1);
}

/// An SSD whose cache flush hangs (its reads and writes still answer) holds up only the metadata
/// cleaner, which gives the set up at the flush's longer limit: client writes, FLUSHes and reads go
/// on at full speed meanwhile, since a client FLUSH is the backing's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_cache_flush_holds_up_only_the_cleaner() {
    let limit = Duration::from_millis(300);
    let backing = new_backing().await;
    let cache = FaultDevice::new(new_cache(), 61);
    let mut model = vec![0u8; DATA as usize];
    let v = Arc::new(FVol::open(backing, vec![cache.clone()], time_limited(300)).await.unwrap());
    write(&*v, &mut model, 0, 62, DATA as usize).await;
    v.wait_rebuilt().await;
    v.clean_metadata().await.unwrap();
    cache.handle().hang(&[FaultOp::Flush]);
    // An intent bit for the cleaner to clear, so its pass flushes the cache.
    write(&*v, &mut model, 2 * REGION as u64, 63, 4096).await;
    let started = Instant::now();
    let cleaner = {
        let v = v.clone();
        tokio::spawn(async move { v.clean_metadata().await })
    };
    eventually("the cleaner is stuck in the cache flush", || cache.handle().held() == 1).await;
    for i in 0..4u64 {
        let t = Instant::now();
        write(&*v, &mut model, (7 + i) * REGION as u64, 64 + i, 4096).await;
        v.flush().await.unwrap();
        let (b, r) = v.read((7 + i) * REGION as u64, AlignedBuf::zeroed(4096)).await;
        r.unwrap();
        let off = ((7 + i) * REGION as u64) as usize;
        assert_eq!(&b[..], &model[off..off + 4096]);
        assert!(t.elapsed() < limit, "a client request waited {:?} on the cleaner's flush", t.elapsed());
    }
    assert_eq!(v.mode(), Mode::Healthy, "reads and writes still answer: the set stays in service");
    cleaner.await.unwrap().unwrap();
    assert!(
        started.elapsed() >= limit * crate::device::layer::cache_time_limit::FLUSH_TIMEOUT_FACTOR,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(v.mode(), Mode::Degraded);
    cache.handle().resume();
    assert_reads(&*v, &model).await;
}

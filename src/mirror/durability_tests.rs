//! Tests of what the mirror promises about durability when devices misbehave in the ways Linux
//! lets them: a write-back error reported once (errseq), a backing write that lands after its
//! caller gave up, and invalidations that must survive a crash or a re-attach (issue 15).

use super::tests::{new_backing, new_cache, opts, pattern, DATA as DATA_BYTES, REGION};
use super::*;
use crate::device::sim::fault::{FaultDevice, FaultOp, SimRng};
use crate::device::sim::mem::MemDevice;
use crate::device::IoPolicy;

type BVol = MirrorVolume<FaultDevice<MemDevice>, MemDevice>;
type CVol = MirrorVolume<MemDevice, FaultDevice<MemDevice>>;

fn region(r: u64) -> u64 {
    r * u64::from(REGION)
}

async fn read_at<V: Volume>(v: &V, offset: u64, len: usize) -> Vec<u8> {
    let (b, r) = v.read(offset, AlignedBuf::zeroed(len)).await;
    r.unwrap();
    b.to_vec()
}

/// The chain of issue 15 #1: an acknowledged write, a cleaner flush that takes the write-back
/// error, and then nothing may ever report that write durable, nor may the cache keep a valid
/// copy of bytes the backing lost.
#[tokio::test]
async fn a_failed_backing_flush_is_sticky_and_never_validates_lost_writes() {
    let backing_mem = new_backing().await;
    let cache = new_cache();
    let backing = FaultDevice::new(backing_mem.clone(), 1);
    let faults = backing.handle();
    let v = BVol::open(backing, vec![cache.clone()], opts()).await.unwrap();
    v.wait_rebuilt().await;
    let old = read_at(&v, region(3), 4096).await;
    let (_, r) = v.write(region(3), pattern(77, 4096), false).await;
    r.unwrap();

    // The cleaner's first flush after the write (its generation record, or the one before it
    // clears the region's intent bit) takes the error: Linux drops the dirty pages and reports
    // EIO once.
    faults.set_error_ppm(FaultOp::Flush, 1_000_000);
    for _ in 0..2 {
        let _ = v.clean_metadata().await;
    }
    faults.heal();
    assert!(v.durability_lost().is_some(), "the failure is remembered");

    // Every later FLUSH and FUA write fails: the write is not durable and never will be.
    let e = v.flush().await.expect_err("a FLUSH after a failed backing flush must not succeed");
    assert_eq!(e.raw_os_error().or(Some(libc::EIO)), Some(libc::EIO), "{e}");
    let (_, r) = v.write(region(9), pattern(78, 4096), true).await;
    assert!(r.is_err(), "a FUA write after a failed backing flush must not succeed");
    assert!(v.write_zeroes(region(10), 4096, false, true).await.is_err(), "FUA write_zeroes too");

    // Intent bits stay, however many passes run.
    for _ in 0..3 {
        let _ = v.clean_metadata().await;
    }
    assert!(v.dirty_regions().0 >= 1, "intent bits must never clear after a failed flush");
    // The shutdown cannot record a clean stop.
    assert!(v.shutdown().await.is_err(), "a clean shutdown over lost writes is a lie");
    drop(v);

    // Power lost: the backing does not have W (it was dropped by the failed write-back).
    let mut rng = SimRng::new(3);
    backing_mem.crash(&mut rng);
    cache.crash(&mut rng);
    assert!(backing_mem.contents()[region(3) as usize..region(3) as usize + 4096] == old[..]);

    // The next start remembers the failure and resyncs the region from what the backing holds.
    let backing = FaultDevice::new(backing_mem.reopen(), 2);
    let v = BVol::open(backing, vec![cache.reopen()], opts()).await.unwrap();
    assert!(v.durability_lost().is_some(), "the failure survives a restart until the operator clears it");
    assert!(v.flush().await.is_err());
    assert!(read_at(&v, region(3), 4096).await == old, "the cache must not serve what the backing lost");
    v.wait_rebuilt().await;
    assert_eq!(v.verify(false).await.unwrap(), vec![]);

    // The operator clears it: flushes work again, and nothing stale is served.
    v.clear_durability_loss().await.unwrap();
    assert!(v.durability_lost().is_none());
    v.flush().await.unwrap();
    v.wait_rebuilt().await;
    assert!(read_at(&v, region(3), 4096).await == old, "stale read after the error was cleared");
    assert_eq!(v.verify(false).await.unwrap(), vec![]);
    v.shutdown().await.unwrap();
}

/// A FLUSH on one connection takes the error; another connection's FLUSH must not then report
/// its writes durable (CAN_MULTI_CONN promises one flush covers every connection's writes).
#[tokio::test]
async fn a_flush_error_seen_by_one_client_fails_every_later_flush() {
    let backing_mem = new_backing().await;
    let backing = FaultDevice::new(backing_mem.clone(), 4);
    let faults = backing.handle();
    let v = Arc::new(BVol::open(backing, vec![new_cache()], opts()).await.unwrap());
    v.wait_rebuilt().await;
    let (_, r) = v.write(region(5), pattern(5, 8192), false).await;
    r.unwrap();
    faults.set_error_ppm(FaultOp::Flush, 1_000_000);
    assert!(v.flush().await.is_err());
    faults.heal();
    assert!(v.flush().await.is_err(), "connection B's FLUSH succeeded over writes the backing lost");
    assert!(v.stats().backing_io.durability.failures() >= 1);
}

/// The plain volume shares the hole: with several connections one FLUSH error is not enough.
#[tokio::test]
async fn the_plain_volume_keeps_a_flush_failure_sticky() {
    let backing_mem = new_backing().await;
    let backing = FaultDevice::new(backing_mem.clone(), 6);
    let faults = backing.handle();
    let v = crate::volume::PlainVolume::open(backing, false).await.unwrap();
    let (_, r) = v.write(0, pattern(1, 4096), false).await;
    r.unwrap();
    faults.set_error_ppm(FaultOp::Flush, 1_000_000);
    assert!(v.flush().await.is_err());
    faults.heal();
    assert!(v.flush().await.is_err(), "a second FLUSH reported durable a write the first one lost");
    let (_, r) = v.write(0, pattern(2, 4096), true).await;
    assert!(r.is_err(), "a FUA write after a lost write-back");
    assert!(v.shutdown().await.is_err(), "shutdown must not record a clean stop");
}

fn deadline_opts() -> MirrorOptions {
    MirrorOptions {
        backing_io: IoPolicy {
            attempt_timeout: Duration::from_millis(20),
            read_retries: 1,
            retry_backoff: Duration::from_millis(5),
            deadline: Duration::from_millis(100),
        },
        ..opts()
    }
}

/// Issue 15 #3: a write given up at its deadline lands later; the rebuild copies what landed.
/// Unless the backing is flushed before the region becomes valid (or the intent bit outlives the
/// late write), a power loss leaves the cache valid over bytes the backing dropped.
#[tokio::test]
async fn a_late_landing_backing_write_never_leaves_a_valid_region_the_backing_can_lose() {
    for seed in 0..16u64 {
        let backing_mem = new_backing().await;
        let cache = new_cache();
        let backing = FaultDevice::new(backing_mem.clone(), seed);
        let faults = backing.handle();
        let v = BVol::open(backing, vec![cache.clone()], deadline_opts()).await.unwrap();
        v.wait_rebuilt().await;
        // The region's intent bit is durable already, so the next write needs no commit and only
        // its data write hangs (on the backing, in the region alone).
        let (_, r) = v.write(region(7), pattern(seed + 100, 4096), false).await;
        r.unwrap();
        v.flush().await.unwrap();
        faults.hang_range(region(7)..region(7) + 4096, &[FaultOp::Write]);
        let (_, r) = v.write(region(7), pattern(seed, 4096), false).await;
        assert!(r.is_err(), "the write hangs past its deadline");
        let mut rng = SimRng::new(seed);
        // The cleaner runs (at a seeded moment relative to the landing), the write lands, the
        // rebuild copies the region back.
        let cleaner_first = rng.below(2) == 0;
        if cleaner_first {
            let _ = v.clean_metadata().await;
            let _ = v.clean_metadata().await;
        }
        faults.resume();
        v.inner.backing.wait_answering(Duration::from_secs(10)).await;
        if !cleaner_first {
            let _ = v.clean_metadata().await;
            let _ = v.clean_metadata().await;
        }
        v.wait_rebuilt().await;
        let _ = v.clean_metadata().await;
        let _ = v.clean_metadata().await;
        drop(v);
        // Power lost: unflushed backing writes (the late one among them) may be dropped.
        backing_mem.crash(&mut rng);
        cache.crash(&mut rng);
        let v = BVol::open(FaultDevice::new(backing_mem.reopen(), seed), vec![cache.reopen()], deadline_opts())
            .await
            .unwrap();
        let bad = v.verify(false).await.unwrap();
        assert!(bad.is_empty(), "seed {seed}: valid cache regions differ from the backing after the crash: {bad:?}");
        v.shutdown().await.unwrap();
    }
}

/// Issue 15, smaller: a mismatch found by verify without repair makes the region Invalid (as the
/// docs say), so it is no longer served from the cache.
#[tokio::test]
async fn verify_without_repair_stops_serving_a_mismatching_region() {
    let backing = new_backing().await;
    let cache = new_cache();
    let v = Vol::open(backing.clone(), vec![cache.clone()], opts()).await.unwrap();
    let (_, r) = v.write(region(2), pattern(9, REGION as usize), false).await;
    r.unwrap();
    v.wait_rebuilt().await;
    let good = read_at(&v, region(2), 4096).await;
    // Corrupt the cache copy behind the engine's back.
    let (_, r) = cache.write(region(2), pattern(10, 4096), false).await;
    r.unwrap();
    let bad = v.verify(false).await.unwrap();
    assert_eq!(bad, vec![(region(2), 4096)]);
    assert!(read_at(&v, region(2), 4096).await == good, "a mismatching region must not be read from the cache");
    v.wait_rebuilt().await;
    assert_eq!(v.verify(false).await.unwrap(), vec![], "the rebuild recopied it");
}

type Vol = MirrorVolume<MemDevice, MemDevice>;

/// Issue 15, smaller: a verify repair whose cache write fails invalidates the region only in
/// memory; a crash (or a fail and re-add of the set) must not bring the stale valid bit back.
#[tokio::test]
async fn an_invalidation_without_an_intent_bit_survives_a_crash_and_a_re_add() {
    for crash in [true, false] {
        let backing = new_backing().await;
        let cache_mem = new_cache();
        let cache = FaultDevice::new(cache_mem.clone(), 8);
        let faults = cache.handle();
        let v = CVol::open(backing.clone(), vec![cache], opts()).await.unwrap();
        let (_, r) = v.write(region(4), pattern(11, REGION as usize), false).await;
        r.unwrap();
        v.wait_rebuilt().await;
        v.clean_metadata().await.unwrap();
        v.clean_metadata().await.unwrap();
        assert_eq!(v.dirty_regions().0, 0);
        let good = read_at(&v, region(4), 4096).await;
        // The cache copy goes bad, and the repair write fails.
        let (_, r) = cache_mem.write(region(4), pattern(12, 4096), false).await;
        r.unwrap();
        cache_mem.flush().await.unwrap();
        faults.fail_range(region(4)..region(4) + 1, &[FaultOp::Write]);
        let bad = v.verify(true).await.unwrap();
        assert_eq!(bad, vec![(region(4), 4096)]);
        faults.clear_ranges();
        if crash {
            drop(v);
            let mut rng = SimRng::new(1);
            backing.crash(&mut rng);
            cache_mem.crash(&mut rng);
            let v = CVol::open(backing.reopen(), vec![FaultDevice::new(cache_mem.reopen(), 9)], opts()).await.unwrap();
            assert!(read_at(&v, region(4), 4096).await == good, "after a crash the stale copy was valid again");
            assert_eq!(v.verify(false).await.unwrap(), vec![]);
        } else {
            v.fail_cache().await;
            v.replace_cache(vec![FaultDevice::new(cache_mem.clone(), 10)]).await.unwrap();
            assert!(read_at(&v, region(4), 4096).await == good, "after a re-add the stale copy was valid again");
            assert_eq!(v.verify(false).await.unwrap(), vec![]);
        }
    }
}

/// Issue 15 #2 through the mirror: a file backing (byte-granular zeroing) and a cache on a 4 KiB
/// block device. Zeroing fewer bytes than a block at a block boundary once left the cache copy
/// untouched while the region stayed valid: a stale read, which verify then reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroing_less_than_a_block_zeroes_the_block_device_copy_too() {
    use crate::device::{EngineKind, FileDevice, OpenOptions};
    let data = 4u64 << 20;
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let backing_path = dir.path().join("backing.img");
    let backing_bytes = data + crate::meta::meta_bytes(data, REGION);
    std::fs::File::create(&backing_path).unwrap().set_len(backing_bytes).unwrap();
    let cache =
        crate::device::file::tests::LoopDevice::new(4096, data + crate::meta::meta_bytes(data, REGION) + (1 << 20));
    let open = |p: &std::path::Path| {
        FileDevice::open(p, &OpenOptions { read_only: false, direct: None, engine: EngineKind::Uring }).unwrap()
    };
    let backing = open(&backing_path);
    let sb = crate::meta::store::new_backing_superblock(backing.size_bytes(), REGION).unwrap();
    crate::meta::store::write_superblock(&backing, &sb).await.unwrap();
    let cache_dev = open(std::path::Path::new(&cache.path));
    assert!(cache_dev.is_direct() && cache_dev.logical_block_bytes() == 4096);
    let v = MirrorVolume::open(backing, vec![cache_dev], opts()).await.unwrap();
    v.wait_rebuilt().await;
    let mut aa = AlignedBuf::zeroed(2 * REGION as usize);
    aa.fill(0xaa);
    v.write(0, aa, false).await.1.unwrap();
    v.write_zeroes(0, 100, false, false).await.unwrap();
    v.trim(8192, 10, false).await.unwrap();
    let got = read_at(&v, 0, 12288).await;
    for (i, &b) in got.iter().enumerate() {
        let zero = i < 100 || (8192..8202).contains(&i);
        assert_eq!(b, if zero { 0 } else { 0xaa }, "byte {i}");
    }
    assert_eq!(v.verify(false).await.unwrap(), vec![], "the two copies differ after a short zeroing");
    v.shutdown().await.unwrap();
}

/// Issue 15, smaller: a mutation is registered once, however many regions it spans (a client's
/// 4 GiB TRIMs once cost one entry per region each).
#[tokio::test]
async fn a_mutation_is_registered_once_whatever_its_length() {
    let backing = FaultDevice::new(new_backing().await, 12);
    let faults = backing.handle();
    let v = Arc::new(BVol::open(backing, vec![new_cache()], opts()).await.unwrap());
    v.wait_rebuilt().await;
    // Every region's intent bit durable first, so the TRIMs below need no commit.
    let (_, r) = v.write(0, pattern(1, DATA_BYTES as usize), false).await;
    r.unwrap();
    faults.hang(&[FaultOp::Write]);
    let trims: Vec<_> = (0..10)
        .map(|_| {
            let v = v.clone();
            tokio::spawn(async move { v.trim(0, DATA_BYTES, false).await })
        })
        .collect();
    while faults.held() < 1 {
        tokio::task::yield_now().await;
    }
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    let registered = v.inner.intents.registrations();
    assert!((1..=10).contains(&registered), "{registered} registrations for 10 TRIMs of {} regions", v.regions());
    faults.resume();
    for t in trims {
        t.await.unwrap().unwrap();
    }
    assert_eq!(v.inner.intents.registrations(), 0);
}

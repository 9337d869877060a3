//! One conformance suite for every engine and mode: the same checks run against io_uring and
//! psync, buffered and O_DIRECT; only the constructor differs.

use super::*;
use rand::{Rng, SeedableRng};

const SIZE_BYTES: u64 = 8 << 20;

fn open(engine: EngineKind, direct: bool) -> (tempfile::TempDir, FileDevice) {
    // /tmp may be tmpfs, which refuses O_DIRECT; /var/tmp is on a real filesystem by convention.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("dev.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE_BYTES).unwrap();
    let dev = FileDevice::open(&path, &OpenOptions { read_only: false, direct: Some(direct), engine }).unwrap();
    (dir, dev)
}

fn variants() -> Vec<(EngineKind, bool)> {
    let mut v = Vec::new();
    for e in [EngineKind::Uring, EngineKind::UringThread, EngineKind::Psync] {
        v.extend([(e, false), (e, true)]);
    }
    v
}

async fn read(dev: &FileDevice, offset: u64, len: usize) -> Vec<u8> {
    let (buf, r) = dev.read(offset, AlignedBuf::zeroed(len)).await;
    r.unwrap_or_else(|e| panic!("read {offset}+{len}: {e}"));
    buf.to_vec()
}

async fn write(dev: &FileDevice, offset: u64, data: &[u8], fua: bool) {
    let mut buf = AlignedBuf::zeroed(data.len());
    buf.copy_from_slice(data);
    let (_, r) = dev.write(offset, buf, fua).await;
    r.unwrap_or_else(|e| panic!("write {offset}+{}: {e}", data.len()));
}

async fn write_shared(dev: &FileDevice, offset: u64, data: &[u8], fua: bool) {
    let mut buf = AlignedBuf::zeroed(data.len());
    buf.copy_from_slice(data);
    let shared = Arc::new(buf);
    dev.write_shared(offset, shared.clone(), fua)
        .await
        .unwrap_or_else(|e| panic!("write_shared {offset}+{}: {e}", data.len()));
    assert_eq!(Arc::strong_count(&shared), 1, "the device kept a reference after answering");
}

async fn random_round_trips(dev: &FileDevice, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE_BYTES as usize];
    for i in 0..200 {
        // Mix aligned and byte-granular requests: O_DIRECT must handle both.
        let aligned = rng.gen_bool(0.5);
        let len = if aligned { 4096 * rng.gen_range(1..=32) } else { rng.gen_range(1..=20000) };
        let mut offset = rng.gen_range(0..SIZE_BYTES - len as u64);
        if aligned {
            offset = offset / 4096 * 4096;
        }
        // Word-at-a-time fill: per-byte RNG calls dominate a debug build's run time.
        let mut data = vec![0u8; len];
        for chunk in data.chunks_mut(8) {
            let w = rng.gen::<u64>().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
        // Half the writes from a shared buffer (the mirror's path), half from an owned one.
        if i % 2 == 0 {
            write(dev, offset, &data, i % 7 == 0).await;
        } else {
            write_shared(dev, offset, &data, i % 7 == 0).await;
        }
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        let (ro, rl) = (rng.gen_range(0..SIZE_BYTES - 1), rng.gen_range(1..=70000u64));
        let rl = rl.min(SIZE_BYTES - ro) as usize;
        assert_eq!(read(dev, ro, rl).await, &model[ro as usize..ro as usize + rl], "seed {seed} step {i}");
    }
    dev.flush().await.unwrap();
    // Dropping cached pages (the rebuild does, for buffered cache files) never changes a read.
    dev.drop_cached(0, SIZE_BYTES / 2);
    assert_eq!(read(dev, 0, SIZE_BYTES as usize).await, model, "seed {seed}: after drop_cached");
}

#[test]
fn conformance_all_engines() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for (engine, direct) in variants() {
        rt.block_on(async {
            let (_dir, dev) = open(engine, direct);
            assert_eq!(dev.size_bytes(), SIZE_BYTES);
            assert_eq!(dev.is_direct(), direct);
            if engine == EngineKind::Psync {
                assert_eq!(dev.engine_name(), "psync");
            }
            random_round_trips(&dev, 42).await;
            crate::device::conformance::check_data(&dev, 43, &format!("FileDevice {engine:?} direct={direct}")).await;

            // write_zeroes with and without unmapping, over unaligned edges.
            write(&dev, 0, &vec![0xaa; 1 << 20], false).await;
            dev.write_zeroes(1000, 300_000, true).await.unwrap();
            dev.write_zeroes(500_000, 5000, false).await.unwrap();
            let back = read(&dev, 0, 1 << 20).await;
            for (i, &b) in back.iter().enumerate() {
                let zero = (1000..301_000).contains(&i) || (500_000..505_000).contains(&i);
                assert_eq!(b, if zero { 0 } else { 0xaa }, "{engine:?} direct={direct} byte {i}");
            }

            // Allocation: a punched hole shows up as a hole; data as data.
            dev.write_zeroes(4 << 20, 1 << 20, true).await.unwrap();
            let ext = dev.allocation(4 << 20, 1 << 20).await.unwrap();
            assert!(ext.iter().all(|e| e.hole), "{ext:?}");
            let ext = dev.allocation(0, 4096).await.unwrap();
            assert!(!ext[0].hole);

            // Zero-length I/O is a no-op, not an error.
            let (_, r) = dev.read(0, AlignedBuf::zeroed(0)).await;
            r.unwrap();
        });
    }
}

/// Two in-flight unaligned writes that share a 4 KiB block but no byte: read-modify-write must
/// not let one write back the other's block with stale bytes.
#[test]
fn concurrent_unaligned_writes_sharing_a_block() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for (engine, direct) in variants() {
        rt.block_on(async {
            let (_dir, dev) = open(engine, direct);
            let dev = Arc::new(dev);
            for round in 0..20u8 {
                let mut tasks = Vec::new();
                for k in 0..8u64 {
                    let dev = dev.clone();
                    tasks.push(tokio::spawn(async move {
                        write(&dev, k * 512 + 1, &[round.wrapping_add(k as u8); 510], false).await;
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                let back = read(&dev, 0, 4096).await;
                for k in 0..8usize {
                    assert!(
                        back[k * 512 + 1..k * 512 + 511].iter().all(|&b| b == round.wrapping_add(k as u8)),
                        "{engine:?} direct={direct} round {round} piece {k}"
                    );
                }
            }
        });
    }
}

#[test]
fn refuses_what_is_not_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions { read_only: false, direct: None, engine: EngineKind::Psync };
    let e = FileDevice::open(dir.path(), &opts).err().expect("a directory is not a device");
    assert!(e.to_string().contains("not a regular file or a block device"), "{e}");
    let e = FileDevice::open(&dir.path().join("missing"), &opts).err().expect("missing");
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn second_opener_is_refused() {
    let (dir, _dev) = open(EngineKind::Psync, false);
    let opts = OpenOptions { read_only: false, direct: None, engine: EngineKind::Psync };
    let e = FileDevice::open(&dir.path().join("dev.img"), &opts).err().expect("locked");
    assert!(e.to_string().contains("already in use"), "{e}");
}

/// Many callers each waiting for one operation at a time: the ring thread parks and is woken over
/// and over, the case where a lost wake-up would leave an operation waiting forever; and the same
/// on the workers' own rings, whose futures move between threads while their operations fly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uring_engine_loses_no_wake_up_and_uses_its_registered_file() {
    for engine in [EngineKind::UringThread, EngineKind::Uring] {
        no_lost_wake_up(engine).await;
    }
}

async fn no_lost_wake_up(kind: EngineKind) {
    let (_dir, dev) = open(kind, true);
    let Engine::Uring(engine) = &dev.engine else { panic!("io_uring unavailable here") };
    assert!(engine.fixed_file(), "the device's descriptor should be registered with the ring");
    let dev = Arc::new(dev);
    const TASKS: u64 = 4;
    const OPS: u64 = 1500;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let dev = dev.clone();
            tokio::spawn(async move {
                for i in 0..OPS {
                    let off = ((t * OPS + i) * 4096) % SIZE_BYTES;
                    if i % 3 == 0 {
                        let (_, r) = dev.write(off, AlignedBuf::zeroed(4096), false).await;
                        r.unwrap();
                    } else {
                        let (_, r) = dev.read(off, AlignedBuf::zeroed(4096)).await;
                        r.unwrap();
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(120), t)
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: an operation was never woken"))
            .unwrap();
    }
    let Engine::Uring(engine) = &dev.engine else { unreachable!() };
    // Not a bound (timing decides how often the thread parks), just a sanity check of the count.
    assert!(engine.pokes() <= TASKS * OPS, "{} wake-ups for {} operations", engine.pokes(), TASKS * OPS);
    eprintln!("{} wake-ups for {} operations", engine.pokes(), TASKS * OPS);
}

/// O_DIRECT through the ring from registered buffers (the arena) and ordinary ones (larger than
/// its classes), interleaved: the bytes are right either way, and exactly the arena's buffers go
/// as fixed-buffer operations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_uses_registered_buffers_for_arena_memory() {
    let (_dir, dev) = open(EngineKind::Uring, true);
    let Engine::Uring(engine) = &dev.engine else { panic!("io_uring unavailable here") };
    assert!(engine.fixed_buffers(), "the arena should be registered with the ring (root here)");
    let arena = crate::device::buf::Arena::get().expect("the engine created the arena");
    let mut model = vec![0u8; SIZE_BYTES as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let mut expect_fixed = 0u64;
    for i in 0..200 {
        let len = 4096 << rng.gen_range(0..10usize); // 4 KiB ..= 2 MiB
        let offset = rng.gen_range(0..(SIZE_BYTES - len as u64) / 4096) * 4096;
        let mut buf = AlignedBuf::uninit_for_fill(len);
        rng.fill(&mut buf[..]);
        model[offset as usize..offset as usize + len].copy_from_slice(&buf);
        expect_fixed += u64::from(arena.contains(buf.as_ptr()));
        let r = if i % 3 == 0 {
            dev.write_shared(offset, Arc::new(buf), i % 2 == 0).await
        } else {
            dev.write(offset, buf, i % 2 == 0).await.1
        };
        r.unwrap();
        let len = 4096 << rng.gen_range(0..10usize);
        let offset = rng.gen_range(0..(SIZE_BYTES - len as u64) / 4096) * 4096;
        let (buf, r) = dev.read(offset, AlignedBuf::uninit_for_fill(len)).await;
        r.unwrap();
        expect_fixed += u64::from(arena.contains(buf.as_ptr()));
        assert!(buf[..] == model[offset as usize..offset as usize + len], "read {offset}+{len}");
    }
    assert!(expect_fixed > 100, "{expect_fixed} of 400 operations had arena buffers");
    assert_eq!(engine.fixed_buffer_ops(), expect_fixed);
}

/// The mirror's write: two devices (here every engine and mode) write one buffer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_write_one_shared_buffer_at_once() {
    let devs: Vec<_> = variants().into_iter().map(|(e, d)| open(e, d)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for _ in 0..50 {
        let len = 4096 * rng.gen_range(1..=256usize);
        let offset = rng.gen_range(0..(SIZE_BYTES - len as u64) / 4096) * 4096;
        let mut buf = AlignedBuf::zeroed(len);
        for chunk in buf.chunks_mut(8) {
            chunk.copy_from_slice(&rng.gen::<u64>().to_le_bytes());
        }
        let data = Arc::new(buf);
        let writes: Vec<_> = devs.iter().map(|(_, dev)| dev.write_shared(offset, data.clone(), false)).collect();
        for r in crate::device::join::join_all(writes).await {
            r.unwrap();
        }
        let data = Arc::try_unwrap(data).unwrap_or_else(|_| panic!("a device kept the shared buffer"));
        for (_, d) in &devs {
            assert_eq!(read(d, offset, len).await, &data[..]);
        }
    }
}

/// A buffered file offers its bytes for `sendfile` exactly while the page cache holds the whole
/// range, and what it offers is what a read returns; O_DIRECT never offers any.
#[test]
fn zero_copy_source_only_for_resident_buffered_ranges() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for (engine, direct) in variants() {
        rt.block_on(async {
            let (_dir, dev) = open(engine, direct);
            let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            write(&dev, 1 << 20, &data, false).await;
            dev.flush().await.unwrap();
            let offered = dev.zero_copy_source((1 << 20) + 4097, 1 << 20);
            if direct {
                assert!(offered.is_none(), "{engine:?}: O_DIRECT offered a page-cache source");
                return;
            }
            if !page_cache_visible() {
                assert!(offered.is_none());
                eprintln!("kernel without cachestat (before 6.5): large reads are copied");
                return;
            }
            let slice = offered.unwrap_or_else(|| panic!("{engine:?}: just-written pages not offered"));
            assert_eq!((slice.offset, slice.len), ((1 << 20) + 4097, 1 << 20));
            let mut got = vec![0u8; slice.len];
            let file = std::fs::File::from(slice.file.fd().try_clone_to_owned().unwrap());
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, slice.offset).unwrap();
            assert!(got == data[4097..4097 + (1 << 20)], "{engine:?}: the offered bytes differ");
            // Past the end, or not in memory: read instead.
            assert!(dev.zero_copy_source(SIZE_BYTES - 4096, 8192).is_none());
            dev.drop_cached(0, SIZE_BYTES);
            assert!(dev.zero_copy_source(1 << 20, 65536).is_none(), "{engine:?}: evicted pages offered");
            assert_eq!(read(&dev, 1 << 20, 65536).await, &data[..65536]);
        });
    }
}

/// A loop device over a file in /var/tmp with the given logical block size, detached on drop.
pub(crate) struct LoopDevice {
    pub path: String,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    pub fn new(sector_bytes: u32, size_bytes: u64) -> LoopDevice {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = dir.path().join("loop.img");
        std::fs::File::create(&file).unwrap().set_len(size_bytes).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector_bytes.to_string()])
            .arg(&file)
            .output()
            .expect("losetup (util-linux) must be installed; scripts/install-test-deps.sh does it");
        assert!(
            out.status.success(),
            "losetup failed (these tests need root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice { path: String::from_utf8(out.stdout).unwrap().trim().to_owned(), _dir: dir }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["-d", &self.path]).status();
    }
}

/// Zeroing on a block device for every class of (offset mod logical block, length): heads and
/// tails shorter than a block, ranges inside one block, aligned starts with short lengths (which
/// once did nothing at all), whole blocks and ranges spanning several, with and without unmap,
/// on 512 B and 4 KiB logical blocks, both engines, buffered and O_DIRECT.
#[test]
fn zeroing_block_devices_covers_every_offset_and_length_class() {
    const LOOP_BYTES: u64 = 1 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for sector in [512u32, 4096] {
        let lo = LoopDevice::new(sector, LOOP_BYTES);
        for (engine, direct) in variants() {
            rt.block_on(async {
                let opts = OpenOptions { read_only: false, direct: Some(direct), engine };
                let dev = FileDevice::open(std::path::Path::new(&lo.path), &opts).unwrap();
                assert!(dev.is_block_device());
                assert_eq!(dev.logical_block_bytes(), sector, "losetup --sector-size");
                let a = u64::from(sector);
                let offsets = [0, 1, a / 2, a - 1, a, 3 * a + 5];
                let lens = [1, 7, a / 2, a - 1, a, a + 1, 2 * a, 3 * a + 7];
                for base in offsets {
                    for len in lens {
                        for may_unmap in [false, true] {
                            let start = 64 * a + base;
                            let span = (start - a)..(start + len + a);
                            write(&dev, span.start, &vec![0xaa; (span.end - span.start) as usize], false).await;
                            dev.write_zeroes(start, len, may_unmap).await.unwrap();
                            let back = read(&dev, span.start, (span.end - span.start) as usize).await;
                            for (i, &b) in back.iter().enumerate() {
                                let at = span.start + i as u64;
                                let want = if (start..start + len).contains(&at) { 0 } else { 0xaa };
                                assert_eq!(
                                    b, want,
                                    "sector {sector} {engine:?} direct={direct} unmap={may_unmap}: zeroing \
                                     [{start}, +{len}) left byte {at} = {b:#x}"
                                );
                            }
                        }
                    }
                }
            });
        }
    }
}

//! Region bitmaps (src/meta/bitmap.rs) and the region table the data path consults
//! (src/mirror/region.rs): single-bit operations on a large bitmap, whole-bitmap scans, and the
//! cost of turning a bitmap page into its checksummed on-disk record and back.
//!
//! The large bitmap is a 16 TiB export at the default 1 MiB region: 16 Mi bits (2 MiB), 521 pages.
//!
//! Run: `cargo bench --bench bitmap`. Results and their meaning: docs/PERFORMANCE.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::time::{Duration, Instant};
use superdisk::device::sim::mem::MemDevice;
use superdisk::meta::bitmap::{page_of, pages_for, BITS_PER_PAGE};
use superdisk::meta::{meta_bytes, BitmapKind, Bits, DiskBitmap, MetaLayout, DEFAULT_REGION_BYTES};
use superdisk::mirror::region::{RegionState, RegionTable};

const EXPORT_BYTES: u64 = 16 << 40;
const BITS: u64 = EXPORT_BYTES / DEFAULT_REGION_BYTES as u64;
const OWNER: [u8; 16] = *b"superdisk-bench!";

/// Random bit indices, cycled through so every iteration touches a different word (as requests at
/// random offsets do) without the generator's cost in the measurement.
fn random_indices(n: usize, below: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(6);
    (0..n).map(|_| rng.gen_range(0..below)).collect()
}

/// A bitmap with about one bit in `one_in` set, at random.
fn sparse(one_in: u64) -> Bits {
    let mut b = Bits::new(BITS);
    for i in random_indices((BITS / one_in) as usize, BITS) {
        b.set(i);
    }
    b
}

fn single_bits(c: &mut Criterion) {
    let idx = random_indices(1 << 16, BITS);
    let mut g = c.benchmark_group("bits_16Mi");
    let mut bits = sparse(2);
    let mut k = 0usize;
    g.bench_function("set_random", |b| {
        b.iter(|| {
            k = (k + 1) & (idx.len() - 1);
            bits.set(black_box(idx[k]));
        })
    });
    g.bench_function("get_random", |b| {
        b.iter(|| {
            k = (k + 1) & (idx.len() - 1);
            bits.get(black_box(idx[k]))
        })
    });
    let sparse_bits = sparse(1000);
    g.bench_function("next_one_sparse_0.1pct", |b| {
        b.iter(|| {
            k = (k + 1) & (idx.len() - 1);
            sparse_bits.next_one(black_box(idx[k]))
        })
    });
    // What every read does on a mirrored volume: one atomic load per region it covers.
    let table = RegionTable::new(&sparse(2));
    g.bench_function("region_table_get_random", |b| {
        b.iter(|| {
            k = (k + 1) & (idx.len() - 1);
            table.get(black_box(idx[k])) == RegionState::Valid
        })
    });
    g.finish();
}

fn scans(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan_16Mi");
    g.throughput(Throughput::Elements(BITS));
    let half = sparse(2);
    g.bench_function("count_ones", |b| b.iter(|| black_box(&half).count_ones()));
    let thin = sparse(1000);
    g.bench_function("iter_ones_sparse_0.1pct", |b| b.iter(|| black_box(&thin).iter_ones().count()));
    g.bench_function("iter_ones_half_set", |b| b.iter(|| black_box(&half).iter_ones().count()));
    // The cleaner snapshots the region table into a bitmap before persisting it.
    let table = RegionTable::new(&half);
    g.bench_function("region_table_valid_bits", |b| b.iter(|| black_box(&table).valid_bits()));
    g.finish();
}

fn pages(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let bits = sparse(2);
    let layout = MetaLayout::new(meta_bytes(EXPORT_BYTES, DEFAULT_REGION_BYTES), EXPORT_BYTES, DEFAULT_REGION_BYTES);
    assert_eq!(layout.pages, pages_for(BITS));
    let dev = MemDevice::new(layout.device_bytes);
    let mut disk = rt
        .block_on(DiskBitmap::format(&dev, layout, BitmapKind::Valid, OWNER, &bits))
        .expect("format the bitmap on a memory device");
    let mut g = c.benchmark_group("page");
    g.throughput(Throughput::Bytes(4096));
    // The checksum over one page record (4092 bytes): paid once to encode, once per slot to decode.
    let record = vec![0x5au8; 4092];
    g.bench_function("crc32c_4092_bytes", |b| b.iter(|| crc32c::crc32c(black_box(&record))));
    let page = page_of(BITS / 2);
    // The snapshot of one page's bits (4028 bytes) taken under the journal lock before writing it.
    g.bench_function("page_payload_vec", |b| b.iter(|| black_box(&bits).page_payload_vec(black_box(page))));
    // Encode (header, payload copy, CRC) plus a 4 KiB write into the memory device; the memory
    // device's own cost (a mutex and a copy) is small next to the encoding.
    let payload = bits.page_payload_vec(page);
    g.bench_function("store_payload_mem_device", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    disk.store_payload(&dev, page, black_box(&payload)).await.expect("store");
                }
                t.elapsed()
            })
        })
    });
    g.finish();

    // Loading reads both slots of every page and checks each record: what start-up pays per
    // bitmap. Reported per page so it compares with the encode above.
    let mut g = c.benchmark_group("load");
    g.throughput(Throughput::Elements(layout.pages));
    g.sample_size(10);
    g.bench_function("load_16TiB_bitmap_521_pages", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let l = DiskBitmap::load(&dev, layout, BitmapKind::Valid, OWNER, BITS).await.expect("load");
                    assert!(l.missing_pages.is_empty());
                    black_box(l.bits);
                }
                t.elapsed()
            })
        })
    });
    g.finish();
    assert_eq!(BITS_PER_PAGE, 32224);
}

fn config() -> Criterion {
    // Short runs: the whole `cargo bench` should finish in minutes on a 2-CPU machine.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = single_bits, scans, pages }
criterion_main!(benches);

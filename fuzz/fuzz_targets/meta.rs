//! The on-disk metadata parsers (docs/FORMAT.md) on arbitrary bytes: they must never panic, and
//! whatever they accept must survive being written back and read again unchanged.
//!
//! Byte 0 picks the mode, byte 1 holds fix-up flags; the rest is the on-disk image. CRC32C is
//! beyond a mutator's reach, so the harness can recompute the checksums the way a writer would
//! (flag bit 0); seeds are real metadata taken from `superdisk create`/`serve` (fuzz/make_corpus.py),
//! so mutations start from valid records.
//!   mode 0  one superblock slot: decode; if accepted, encode(decode(x)) equals x in every field
//!           and decodes to the same superblock.
//!   mode 1  a bitmap area of 1..=4 pages per slot: `DiskBitmap::load`, then store every page
//!           again and load: the same bits, no page missing.
//!   mode 2  the metadata tails of a backing and a cache device: `MirrorVolume::open` must return
//!           (Ok or Err, never panic or hang); an opened volume must serve a write and read it back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use superdisk::device::sim::mem::MemDevice;
use superdisk::device::AlignedBuf;
use superdisk::meta::bitmap::{pages_for, BitmapKind, DiskBitmap, MetaLayout, BITS_PER_PAGE, PAGE_BYTES, PAGE_MAGIC};
use superdisk::meta::superblock::{Superblock, MAGIC, SUPERBLOCK_BYTES, VERSION};
use superdisk::mirror::{MirrorOptions, MirrorVolume};
use superdisk::volume::Volume;

const CRC_AT: usize = 4092;
const FIELDS_BYTES: usize = 156;
/// Every path here is bounded work on small in-memory devices; anything slower is a hang.
const RUN_LIMIT: Duration = Duration::from_secs(10);

fn fix_crc(rec: &mut [u8]) {
    let crc = crc32c::crc32c(&rec[..CRC_AT]);
    rec[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn superblock(flags: u8, raw: &[u8]) {
    let mut b = vec![0u8; SUPERBLOCK_BYTES];
    let n = raw.len().min(SUPERBLOCK_BYTES);
    b[..n].copy_from_slice(&raw[..n]);
    if flags & 2 != 0 {
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    }
    if flags & 1 != 0 {
        fix_crc(&mut b);
    }
    // Short buffers must be refused, not indexed past their end.
    let _ = Superblock::decode(&b[..n]);
    let Ok(sb) = Superblock::decode(&b) else { return };
    let e = sb.encode();
    assert_eq!(&e[..FIELDS_BYTES], &b[..FIELDS_BYTES], "encode(decode(x)) changed a field");
    assert!(e[FIELDS_BYTES..CRC_AT].iter().all(|&x| x == 0), "reserved bytes must be written as zeroes");
    assert_eq!(Superblock::decode(&e).as_ref(), Ok(&sb), "decode(encode(sb)) != sb");
    // Whichever slot holds it, the pick is the newest valid one.
    let mut older = sb.clone();
    older.generation = sb.generation.wrapping_sub(1);
    if sb.generation > 0 {
        assert_eq!(Superblock::pick(Ok(older.clone()), Ok(sb.clone())).unwrap().generation, sb.generation);
        assert_eq!(Superblock::pick(Ok(sb.clone()), Ok(older)).unwrap().generation, sb.generation);
    }
}

const OWNER: [u8; 16] = *b"fuzz-owner-uuid!";

fn bitmap(flags: u8, raw: &[u8]) {
    let [shape, a, b, rest @ ..] = raw else { return };
    let pages = u64::from(shape & 3) + 1;
    let kind = [BitmapKind::Intent, BitmapKind::Changed, BitmapKind::Valid][usize::from(shape >> 2) % 3];
    // Any bit count whose pages_for is `pages`: the last page partly used, as in real bitmaps.
    let tail_bits = u64::from(u16::from_le_bytes([*a, *b])) % BITS_PER_PAGE + 1;
    let total_bits = (pages - 1) * BITS_PER_PAGE + tail_bits;
    assert_eq!(pages_for(total_bits), pages);
    let region_bytes = 4096u32;
    let area_bytes = pages * PAGE_BYTES as u64;
    let device_bytes = 4 * area_bytes + 2 * SUPERBLOCK_BYTES as u64;
    // The layout only needs the metadata tail, so the device is that tail alone.
    let layout = MetaLayout::new(device_bytes, total_bits * u64::from(region_bytes), region_bytes);
    assert_eq!(layout.pages, pages);
    let mut image = vec![0u8; device_bytes as usize];
    let n = rest.len().min(image.len());
    image[..n].copy_from_slice(&rest[..n]);
    let start = layout.start() as usize;
    for rec in image[start..start + 4 * area_bytes as usize].chunks_exact_mut(PAGE_BYTES) {
        if flags & 2 != 0 {
            // A header that names this bitmap, so the fuzzer spends its time on generations,
            // slots and payloads rather than on guessing uuids.
            rec[..8].copy_from_slice(&PAGE_MAGIC);
            rec[8..12].copy_from_slice(&(kind as u32).to_le_bytes());
            rec[24..40].copy_from_slice(&OWNER);
            rec[40..48].copy_from_slice(&total_bits.to_le_bytes());
        }
        if flags & 1 != 0 && rec[..8] == PAGE_MAGIC {
            fix_crc(rec);
        }
    }
    if flags & 4 != 0 {
        // Page indexes as a writer would put them (slot-relative).
        for (i, rec) in image[start..start + 4 * area_bytes as usize].chunks_exact_mut(PAGE_BYTES).enumerate() {
            let page = (i as u64 % pages) as u32;
            rec[12..16].copy_from_slice(&page.to_le_bytes());
            if flags & 1 != 0 && rec[..8] == PAGE_MAGIC {
                fix_crc(rec);
            }
        }
    }
    let dev = MemDevice::from_image(image);
    runtime().block_on(async {
        let loaded = DiskBitmap::load(&dev, layout, kind, OWNER, total_bits).await.expect("memory reads cannot fail");
        assert_eq!(loaded.bits.len(), total_bits);
        assert!(loaded.bits.count_ones() <= total_bits, "bits past the end of the bitmap");
        assert!(loaded.missing_pages.windows(2).all(|w| w[0] < w[1]), "missing pages not ascending");
        assert!(loaded.missing_pages.iter().all(|&p| p < pages), "missing page out of range");
        for &p in &loaded.missing_pages {
            let first = p * BITS_PER_PAGE;
            let last = ((p + 1) * BITS_PER_PAGE).min(total_bits);
            assert!((first..last).all(|i| !loaded.bits.get(i)), "a missing page contributed bits");
        }
        // Writing it back goes to the slot not holding the newest copy, so reading it again must
        // give exactly these bits, whatever generations the image held.
        let mut disk = loaded.disk;
        let all: Vec<u64> = (0..pages).collect();
        disk.store(&dev, &all, &loaded.bits).await.expect("store");
        let again = DiskBitmap::load(&dev, layout, kind, OWNER, total_bits).await.expect("load");
        assert!(again.missing_pages.is_empty(), "pages just stored are missing: {:?}", again.missing_pages);
        assert_eq!(again.bits, loaded.bits, "bitmap changed across store + load");
    });
}

/// Exported size of the mode-2 devices; their metadata areas are what the input replaces.
const DATA_BYTES: u64 = 1 << 20;

fn overwrite_tail(dev_bytes: u64, tail: &[u8], flags: u8) -> MemDevice {
    let mut image = vec![0u8; dev_bytes as usize];
    let n = tail.len().min(image.len());
    let len = image.len();
    image[len - n..].copy_from_slice(&tail[tail.len() - n..]);
    if flags & 1 != 0 {
        // Every superblock slot and bitmap page sits on a 4 KiB boundary counted from the end.
        let mut end = len;
        while end >= PAGE_BYTES && end > len - n {
            let rec = &mut image[end - PAGE_BYTES..end];
            if rec[..8] == MAGIC || rec[..8] == PAGE_MAGIC {
                fix_crc(rec);
            }
            end -= PAGE_BYTES;
        }
    }
    MemDevice::from_image(image)
}

fn open(flags: u8, raw: &[u8]) {
    let opts = MirrorOptions {
        region_bytes: 1 << 20,
        tunables: superdisk::mirror::Tunables {
            rebuild_min_bytes_per_s: 1 << 40,
            rebuild_max_bytes_per_s: 1 << 40,
            ..Default::default()
        },
        metadata_interval_ms: 3_600_000,
        take_over_foreign_cache: flags & 2 != 0,
        ..MirrorOptions::default()
    };
    let meta = superdisk::meta::meta_bytes(DATA_BYTES, opts.region_bytes);
    let (backing_tail, cache_tail) = raw.split_at(raw.len() / 2);
    let backing = overwrite_tail(DATA_BYTES + meta, backing_tail, flags);
    let cache = overwrite_tail(DATA_BYTES + meta, cache_tail, flags);
    let caches = if flags & 4 != 0 { Vec::new() } else { vec![cache] };
    let rt = runtime();
    rt.block_on(async {
        tokio::time::timeout(RUN_LIMIT, async {
            let Ok(vol) = MirrorVolume::open(backing, caches, opts).await else { return };
            let size = vol.size_bytes();
            assert!(size <= DATA_BYTES, "export of {size} bytes on a device holding {DATA_BYTES}");
            // A superblock may carry FLAG_FLUSH_FAILED: then every FUA write and FLUSH fails until
            // the operator clears it, and the stop is not recorded as clean (issue 15), by design.
            let durable = vol.durability_lost().is_none();
            if size >= 4096 {
                let mut buf = AlignedBuf::zeroed(4096);
                buf.fill(0x5a);
                let (_, r) = vol.write(size - 4096, buf, durable).await;
                r.expect("write to an opened volume");
                let (buf, r) = vol.read(size - 4096, AlignedBuf::zeroed(4096)).await;
                r.expect("read from an opened volume");
                assert!(buf.iter().all(|&x| x == 0x5a), "read did not return the write");
            }
            let stopped = vol.shutdown().await;
            assert!(stopped.is_ok() == durable, "shutdown with durability lost = {}: {stopped:?}", !durable);
        })
        .await
        .expect("MirrorVolume::open + I/O did not finish in time");
    });
}

fuzz_target!(|data: &[u8]| {
    let [mode, flags, raw @ ..] = data else { return };
    match mode % 3 {
        0 => superblock(*flags, raw),
        1 => bitmap(*flags, raw),
        _ => open(*flags, raw),
    }
});

//! Region bitmaps, in memory ([`Bits`]) and on disk ([`DiskBitmap`]).
//!
//! On disk a bitmap is a run of 4 KiB pages, each a self-contained record:
//!
//! ```text
//!   0    magic "SDBITMAP"        8
//!   8    kind (1 intent, 2 changed, 3 valid)       u32
//!   12   page index              u32
//!   16   generation              u64   bumped by every write of this page
//!   24   owner device uuid       16    the superblock's device_uuid: pages left over from an
//!                                      earlier format of the same device are not ours
//!   40   total bits of the bitmap u64
//!   48   reserved (zero)         16
//!   64   payload: bit i of the page = byte i/8, bit i%8 (LSB first)   4028
//!   4092 CRC32C of bytes 0..4092 u32
//! ```
//!
//! Every page has two slots (two copies of the whole bitmap area). A write of page generation `g`
//! goes to slot `g % 2`, with FUA, so it never overwrites the newest durable copy; a torn write
//! fails the CRC and the reader falls back to the other slot, which holds the previous generation.
//! The reader takes, per page, the valid slot with the higher generation. Pages are independent,
//! so updating one bit costs one 4 KiB FUA write and no superblock update.

use super::SUPERBLOCK_BYTES;
use crate::device::{AlignedBuf, BlockDevice};
use std::io;

pub const PAGE_BYTES: usize = 4096;
const PAGE_HEADER_BYTES: usize = 64;
const PAGE_CRC_OFFSET: usize = PAGE_BYTES - 4;
const PAGE_PAYLOAD_BYTES: usize = PAGE_CRC_OFFSET - PAGE_HEADER_BYTES;
/// Region bits carried by one page (32224: a 1 MiB-region bitmap page covers ~31 GiB).
pub const BITS_PER_PAGE: u64 = (PAGE_PAYLOAD_BYTES * 8) as u64;
pub const PAGE_MAGIC: [u8; 8] = *b"SDBITMAP";

/// Pages needed for a bitmap of `bits` bits (at least one, so even an empty bitmap has a record).
pub fn pages_for(bits: u64) -> u64 {
    bits.div_ceil(BITS_PER_PAGE).max(1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum BitmapKind {
    /// Backing: regions that may have a write in flight (set before the write, cleared lazily).
    Intent = 1,
    /// Backing: regions written while the paired cache set was away.
    Changed = 2,
    /// Cache: regions whose cache copy equals the backing.
    Valid = 3,
}

impl BitmapKind {
    /// Which of the two bitmap areas of the metadata region holds this kind. The backing uses both
    /// (intent, changed); a cache uses the first for its valid bitmap and leaves the second unused.
    pub fn area(self) -> usize {
        match self {
            BitmapKind::Intent | BitmapKind::Valid => 0,
            BitmapKind::Changed => 1,
        }
    }
}

/// Where the bitmaps live in a device's metadata area:
///
/// ```text
///   … data … │ area 0 slot 0 │ area 0 slot 1 │ area 1 slot 0 │ area 1 slot 1 │ SB A │ SB B │ end
/// ```
/// Each slot is `bitmap_bytes` long. Positions are taken from the device's end, like the
/// superblock slots, so they depend only on the device size and the export geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaLayout {
    pub device_bytes: u64,
    pub pages: u64,
    pub bitmap_bytes: u64,
}

impl MetaLayout {
    pub fn new(device_bytes: u64, export_bytes: u64, region_bytes: u32) -> Self {
        let pages = pages_for(super::regions(export_bytes, region_bytes));
        MetaLayout { device_bytes, pages, bitmap_bytes: pages * PAGE_BYTES as u64 }
    }

    /// First byte of the bitmap areas.
    pub fn start(&self) -> u64 {
        self.device_bytes - 2 * SUPERBLOCK_BYTES as u64 - 4 * self.bitmap_bytes
    }

    pub fn page_offset(&self, area: usize, slot: usize, page: u64) -> u64 {
        debug_assert!(area < 2 && slot < 2 && page < self.pages);
        self.start() + (2 * area + slot) as u64 * self.bitmap_bytes + page * PAGE_BYTES as u64
    }
}

/// A fixed-length bitset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    pub fn new(len: u64) -> Self {
        Bits { words: vec![0; usize::try_from(len.div_ceil(64)).expect("bitmap fits in memory")], len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        self.words[(i / 64) as usize] >> (i % 64) & 1 != 0
    }

    pub fn set(&mut self, i: u64) {
        debug_assert!(i < self.len);
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }

    pub fn clear(&mut self, i: u64) {
        debug_assert!(i < self.len);
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }

    pub fn assign(&mut self, i: u64, v: bool) {
        if v {
            self.set(i)
        } else {
            self.clear(i)
        }
    }

    pub fn set_all(&mut self) {
        self.words.fill(u64::MAX);
        self.trim_tail();
    }

    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn any(&self) -> bool {
        self.words.iter().any(|&w| w != 0)
    }

    /// Indices of the set bits, ascending.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }

    /// The first set bit at or after `from`.
    pub fn next_one(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                return Some(wi as u64 * 64 + u64::from(w.trailing_zeros()));
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }

    pub fn or_with(&mut self, other: &Bits) {
        assert_eq!(self.len, other.len);
        self.words.iter_mut().zip(&other.words).for_each(|(a, b)| *a |= b);
    }

    pub fn and_with(&mut self, other: &Bits) {
        assert_eq!(self.len, other.len);
        self.words.iter_mut().zip(&other.words).for_each(|(a, b)| *a &= b);
    }

    pub fn and_not(&mut self, other: &Bits) {
        assert_eq!(self.len, other.len);
        self.words.iter_mut().zip(&other.words).for_each(|(a, b)| *a &= !b);
    }

    fn trim_tail(&mut self) {
        if self.len % 64 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (self.len % 64)) - 1;
            }
        }
    }

    /// Byte `i` of the little-endian byte image (bits 8i .. 8i+7, LSB first).
    pub fn byte(&self, i: u64) -> u8 {
        self.words.get(super::to_usize(i / 8)).map_or(0, |w| w.to_le_bytes()[super::to_usize(i % 8)])
    }

    pub fn set_byte(&mut self, i: u64, v: u8) {
        let w = &mut self.words[(i / 8) as usize];
        let shift = 8 * (i % 8);
        *w = (*w & !(0xffu64 << shift)) | (u64::from(v) << shift);
    }

    /// The bits page `page` covers, as its on-disk payload.
    pub fn page_payload_vec(&self, page: u64) -> Vec<u8> {
        let mut v = vec![0; PAGE_PAYLOAD_BYTES];
        self.page_payload(page, &mut v);
        v
    }

    /// First byte index (of [`Bits::byte`]) that page `page` covers.
    pub fn page_first_byte(page: u64) -> u64 {
        page * PAGE_PAYLOAD_BYTES as u64
    }

    /// Copies the bits of page `page` into `out` (PAGE_PAYLOAD_BYTES long).
    fn page_payload(&self, page: u64, out: &mut [u8]) {
        let first_byte = page * PAGE_PAYLOAD_BYTES as u64;
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.byte(first_byte + k as u64);
        }
    }

    fn load_page_payload(&mut self, page: u64, payload: &[u8]) {
        let first_byte = page * PAGE_PAYLOAD_BYTES as u64;
        let total_bytes = self.len.div_ceil(8);
        for (k, &v) in payload.iter().enumerate() {
            let i = first_byte + k as u64;
            if i >= total_bytes {
                break;
            }
            self.set_byte(i, v);
        }
        self.trim_tail();
    }

    /// Sets every bit that page `page` covers.
    pub fn set_page(&mut self, page: u64) {
        let start = page * BITS_PER_PAGE;
        let end = (start + BITS_PER_PAGE).min(self.len);
        for i in start..end {
            self.set(i);
        }
    }
}

/// The page that holds region bit `bit`.
pub fn page_of(bit: u64) -> u64 {
    bit / BITS_PER_PAGE
}

fn encode_page(kind: BitmapKind, owner: &[u8; 16], page: u64, generation: u64, bits: &Bits) -> AlignedBuf {
    let mut payload = vec![0; PAGE_PAYLOAD_BYTES];
    bits.page_payload(page, &mut payload);
    encode_page_payload(kind, owner, page, generation, bits.len(), &payload)
}

fn encode_page_payload(
    kind: BitmapKind,
    owner: &[u8; 16],
    page: u64,
    generation: u64,
    total_bits: u64,
    payload: &[u8],
) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(PAGE_BYTES);
    b[0..8].copy_from_slice(&PAGE_MAGIC);
    b[8..12].copy_from_slice(&(kind as u32).to_le_bytes());
    b[12..16].copy_from_slice(&u32::try_from(page).expect("page index fits u32").to_le_bytes());
    b[16..24].copy_from_slice(&generation.to_le_bytes());
    b[24..40].copy_from_slice(owner);
    b[40..48].copy_from_slice(&total_bits.to_le_bytes());
    b[PAGE_HEADER_BYTES..PAGE_CRC_OFFSET].copy_from_slice(payload);
    let crc = crc32c::crc32c(&b[..PAGE_CRC_OFFSET]);
    b[PAGE_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Counters on disk (generations, epochs) at or above this are corruption, never history.
pub const MAX_COUNTER: u64 = 1 << 63;

/// The generation of a valid page record for (kind, owner, page, total bits), or None.
fn decode_page_header(b: &[u8], kind: BitmapKind, owner: &[u8; 16], page: u64, total_bits: u64) -> Option<u64> {
    if b.len() < PAGE_BYTES || b[0..8] != PAGE_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[PAGE_CRC_OFFSET..PAGE_BYTES].try_into().ok()?);
    if crc32c::crc32c(&b[..PAGE_CRC_OFFSET]) != crc {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    // A generation this far up cannot come from counting writes (2^63 of them); only corruption
    // or a crafted device gets there, and believing it would overflow the next write's generation.
    let ok = u32_at(8) == kind as u32
        && u64::from(u32_at(12)) == page
        && &b[24..40] == owner
        && u64_at(40) == total_bits
        && u64_at(16) < MAX_COUNTER;
    ok.then(|| u64_at(16))
}

/// The on-disk side of one bitmap on one device: where its pages are and the generation of each
/// page's newest durable copy (so the next write goes to the other slot).
#[derive(Clone, Debug)]
pub struct DiskBitmap {
    kind: BitmapKind,
    owner: [u8; 16],
    layout: MetaLayout,
    total_bits: u64,
    generations: Vec<u64>,
}

/// What [`DiskBitmap::load`] found.
pub struct Loaded {
    pub disk: DiskBitmap,
    pub bits: Bits,
    /// Pages with no valid copy in either slot (never written, or both copies destroyed).
    pub missing_pages: Vec<u64>,
}

impl DiskBitmap {
    fn blank(kind: BitmapKind, owner: [u8; 16], layout: MetaLayout, total_bits: u64) -> Self {
        assert_eq!(pages_for(total_bits), layout.pages, "bitmap size disagrees with the metadata layout");
        DiskBitmap { kind, owner, layout, total_bits, generations: vec![0; super::to_usize(layout.pages)] }
    }

    pub fn kind(&self) -> BitmapKind {
        self.kind
    }

    pub async fn load<D: BlockDevice>(
        dev: &D,
        layout: MetaLayout,
        kind: BitmapKind,
        owner: [u8; 16],
        total_bits: u64,
    ) -> io::Result<Loaded> {
        let mut disk = Self::blank(kind, owner, layout, total_bits);
        let mut bits = Bits::new(total_bits);
        let mut missing_pages = Vec::new();
        let area = kind.area();
        // Both slots are adjacent: one read covers the whole bitmap.
        let len = 2 * layout.bitmap_bytes;
        let (buf, r) = dev.read(layout.page_offset(area, 0, 0), AlignedBuf::zeroed(super::to_usize(len))).await;
        r?;
        for page in 0..layout.pages {
            let at = |slot: u64| super::to_usize(slot * layout.bitmap_bytes + page * PAGE_BYTES as u64);
            let copies = [0u64, 1].map(|slot| {
                let b = &buf[at(slot)..at(slot) + PAGE_BYTES];
                // A copy is only believed in the slot its generation selects, so a misdirected or
                // stale write cannot masquerade as the newest.
                decode_page_header(b, kind, &owner, page, total_bits).filter(|g| g % 2 == slot)
            });
            let best = match copies {
                [Some(a), Some(b)] => Some(if b > a { (1, b) } else { (0, a) }),
                [Some(a), None] => Some((0, a)),
                [None, Some(b)] => Some((1, b)),
                [None, None] => None,
            };
            match best {
                Some((slot, generation)) => {
                    let o = at(slot);
                    bits.load_page_payload(page, &buf[o + PAGE_HEADER_BYTES..o + PAGE_CRC_OFFSET]);
                    disk.generations[super::to_usize(page)] = generation;
                }
                None => missing_pages.push(page),
            }
        }
        Ok(Loaded { disk, bits, missing_pages })
    }

    /// Writes every page of `bits` as generation 1 and destroys the other slot's copy, so the
    /// bitmap reads back as `bits` whatever the area held before.
    pub async fn format<D: BlockDevice>(
        dev: &D,
        layout: MetaLayout,
        kind: BitmapKind,
        owner: [u8; 16],
        bits: &Bits,
    ) -> io::Result<DiskBitmap> {
        let mut disk = Self::blank(kind, owner, layout, bits.len());
        let area = kind.area();
        dev.write_zeroes(layout.page_offset(area, 0, 0), layout.bitmap_bytes, false).await?;
        dev.flush().await?;
        let pages: Vec<u64> = (0..layout.pages).collect();
        disk.store(dev, &pages, bits).await?;
        Ok(disk)
    }

    /// Writes the next generation of each page in `pages` from `bits`, each with FUA into the slot
    /// not holding the current copy. Returns once all are durable; on error, pages that were
    /// written keep their new generation and the failed one keeps its old (its slot may hold a
    /// torn copy, which the reader rejects; the next attempt targets the same slot again).
    pub async fn store<D: BlockDevice>(&mut self, dev: &D, pages: &[u64], bits: &Bits) -> io::Result<()> {
        assert_eq!(bits.len(), self.total_bits);
        for &page in pages {
            let generation = self.generations[super::to_usize(page)] + 1;
            let buf = encode_page(self.kind, &self.owner, page, generation, bits);
            self.write_page(dev, page, generation, buf).await?;
        }
        Ok(())
    }

    /// Like [`DiskBitmap::store`] for one page whose payload was snapshotted earlier (by
    /// [`Bits::page_payload_vec`]), so the caller need not hold the bitmap during the I/O.
    pub async fn store_payload<D: BlockDevice>(&mut self, dev: &D, page: u64, payload: &[u8]) -> io::Result<()> {
        assert_eq!(payload.len(), PAGE_PAYLOAD_BYTES);
        let generation = self.generations[super::to_usize(page)] + 1;
        let buf = encode_page_payload(self.kind, &self.owner, page, generation, self.total_bits, payload);
        self.write_page(dev, page, generation, buf).await
    }

    async fn write_page<D: BlockDevice>(
        &mut self,
        dev: &D,
        page: u64,
        generation: u64,
        buf: AlignedBuf,
    ) -> io::Result<()> {
        let slot = (generation % 2) as usize;
        let (_, r) = dev.write(self.layout.page_offset(self.kind.area(), slot, page), buf, true).await;
        r?;
        self.generations[super::to_usize(page)] = generation;
        Ok(())
    }

    pub fn pages(&self) -> u64 {
        self.layout.pages
    }
}

#[cfg(test)]
// Tests build small, known values; a lossy cast there is not a wire or disk bug.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;
    use crate::device::sim::mem::MemDevice;

    #[test]
    fn bits_basics() {
        let mut b = Bits::new(130);
        assert!(!b.any());
        b.set(0);
        b.set(64);
        b.set(129);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert_eq!(b.next_one(1), Some(64));
        assert_eq!(b.next_one(65), Some(129));
        assert_eq!(b.next_one(130), None);
        b.clear(64);
        assert_eq!(b.count_ones(), 2);
        b.set_all();
        assert_eq!(b.count_ones(), 130);
        let mut c = Bits::new(130);
        c.set(5);
        b.and_not(&c);
        assert!(!b.get(5) && b.get(6));
    }

    fn layout_for(regions: u64) -> (MemDevice, MetaLayout) {
        let export = regions * 4096;
        let meta = crate::meta::meta_bytes(export, 4096);
        let dev = MemDevice::new(export + meta);
        (dev, MetaLayout::new(export + meta, export, 4096))
    }

    #[tokio::test]
    async fn store_and_load_round_trip_across_pages() {
        let regions = 2 * BITS_PER_PAGE + 17;
        let (dev, layout) = layout_for(regions);
        assert_eq!(layout.pages, 3);
        let owner = [7; 16];
        let mut bits = Bits::new(regions);
        let mut disk = DiskBitmap::format(&dev, layout, BitmapKind::Intent, owner, &bits).await.unwrap();
        for i in [0, 1, BITS_PER_PAGE - 1, BITS_PER_PAGE, 2 * BITS_PER_PAGE + 16] {
            bits.set(i);
        }
        disk.store(&dev, &[0, 1, 2], &bits).await.unwrap();
        let l = DiskBitmap::load(&dev, layout, BitmapKind::Intent, owner, regions).await.unwrap();
        assert!(l.missing_pages.is_empty());
        assert_eq!(l.bits, bits);
        // Another kind or owner does not read these pages as its own.
        let l = DiskBitmap::load(&dev, layout, BitmapKind::Intent, [8; 16], regions).await.unwrap();
        assert_eq!(l.missing_pages, vec![0, 1, 2]);
        let l = DiskBitmap::load(&dev, layout, BitmapKind::Changed, owner, regions).await.unwrap();
        assert_eq!(l.missing_pages, vec![0, 1, 2]);
    }

    /// A torn (here: garbled) newest copy falls back to the previous generation in the other slot.
    #[tokio::test]
    async fn torn_page_falls_back_to_previous_generation() {
        let regions = 100;
        let (dev, layout) = layout_for(regions);
        let owner = [1; 16];
        let mut bits = Bits::new(regions);
        bits.set(3);
        let mut disk = DiskBitmap::format(&dev, layout, BitmapKind::Valid, owner, &bits).await.unwrap();
        let before = bits.clone();
        bits.set(4);
        disk.store(&dev, &[0], &bits).await.unwrap();
        // Generation 2 went to slot 0; tear it.
        let at = layout.page_offset(0, 0, 0) + 2000;
        let mut junk = AlignedBuf::zeroed(512);
        junk.fill(0xa5);
        let (_, r) = dev.write(at, junk, false).await;
        r.unwrap();
        let l = DiskBitmap::load(&dev, layout, BitmapKind::Valid, owner, regions).await.unwrap();
        assert_eq!(l.bits, before);
        // The next store goes to the torn slot again (its generation did not advance on disk).
        let mut disk = l.disk;
        disk.store(&dev, &[0], &bits).await.unwrap();
        let l = DiskBitmap::load(&dev, layout, BitmapKind::Valid, owner, regions).await.unwrap();
        assert_eq!(l.bits, bits);
    }
}

//! On-disk metadata. superdisk keeps its metadata at the *tail* of the backing device (like md's
//! 1.0 format), so the exported disk is the device's first `data_size_bytes`, byte for byte, and the
//! backing device stays a plain image that can be mounted without superdisk. See docs/FORMAT.md.
//!
//! ```text
//!   backing device
//!   ┌──────────────────────────────────────────────┬─────────────────────────────────────┐
//!   │ exported disk: offset 0 .. data_size_bytes    │ metadata area (meta_bytes, 1 MiB-   │
//!   │ (unmodified client data)                      │ aligned): bitmaps …  │ SB A │ SB B │
//!   └──────────────────────────────────────────────┴─────────────────────────────────────┘
//! ```
//! The two superblock slots are written alternately (slot = generation % 2), so a torn write of
//! one leaves the other intact; the reader takes the valid slot with the higher generation.

#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod bitmap;
pub mod store;
pub mod superblock;

pub use bitmap::{BitmapKind, Bits, DiskBitmap, MetaLayout, BITS_PER_PAGE};
pub use superblock::{Superblock, SuperblockError, SUPERBLOCK_BYTES};

/// An in-memory index or length from an on-disk count. Metadata sizes are bounded by the device
/// (and checked when decoded), and superdisk runs on 64-bit targets only, where this never fails.
pub(crate) fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("metadata sizes fit in memory")
}

/// Alignment and granularity of the metadata area.
pub const META_ALIGN_BYTES: u64 = 1 << 20;
/// Default region: the unit of the valid and write-intent bitmaps.
pub const DEFAULT_REGION_BYTES: u32 = 1 << 20;

/// Bytes of one copy of a bitmap with a bit per region: whole 4 KiB pages, each carrying its own
/// header and checksum (see [`bitmap`]), so each page can be written and survive tearing alone.
pub fn bitmap_bytes(data_size_bytes: u64, region_bytes: u32) -> u64 {
    bitmap::pages_for(regions(data_size_bytes, region_bytes)) * bitmap::PAGE_BYTES as u64
}

/// Number of regions (bits of every bitmap) of an export.
pub fn regions(data_size_bytes: u64, region_bytes: u32) -> u64 {
    data_size_bytes.div_ceil(u64::from(region_bytes))
}

/// Size of the metadata area for an export of `data_size_bytes`: room for four bitmaps (two
/// kinds, each double-buffered) and the two superblock slots, rounded up to 1 MiB.
pub fn meta_bytes(data_size_bytes: u64, region_bytes: u32) -> u64 {
    let raw = 4 * bitmap_bytes(data_size_bytes, region_bytes) + 2 * SUPERBLOCK_BYTES as u64;
    raw.div_ceil(META_ALIGN_BYTES) * META_ALIGN_BYTES
}

/// The largest export that fits on a device of `device_bytes` together with its metadata, or None
/// if the device is too small to hold even the metadata.
pub fn data_size_for_device(device_bytes: u64, region_bytes: u32) -> Option<u64> {
    // meta_bytes grows with the data size, so compute it for the whole device (an upper bound) and
    // shrink the data to the next 4 KiB boundary.
    let meta = meta_bytes(device_bytes, region_bytes);
    let data = device_bytes.checked_sub(meta)? / 4096 * 4096;
    (data > 0).then_some(data)
}

#[cfg(test)]
// Tests build small, known values; a lossy cast there is not a wire or disk bug.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_and_is_aligned() {
        for dev in [3u64 << 20, 1 << 30, (1 << 40) + 12345, 375 << 30] {
            let data = data_size_for_device(dev, DEFAULT_REGION_BYTES).unwrap();
            assert_eq!(data % 4096, 0);
            assert!(data + meta_bytes(data, DEFAULT_REGION_BYTES) <= dev);
        }
        assert_eq!(data_size_for_device(1 << 20, DEFAULT_REGION_BYTES), None);
    }
}

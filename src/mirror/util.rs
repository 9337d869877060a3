//! Small helpers shared by the mirror engine.

use std::ops::Range;

/// Regions touched by the byte range `[offset, offset + len)` (len > 0).
pub(crate) fn region_span(offset: u64, len: u64, region_bytes: u64) -> Range<u64> {
    debug_assert!(len > 0);
    offset / region_bytes..(offset + len).div_ceil(region_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(region_span(0, 1, 4096), 0..1);
        assert_eq!(region_span(4095, 2, 4096), 0..2);
        assert_eq!(region_span(4096, 4096, 4096), 1..2);
    }
}

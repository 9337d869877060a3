//! Verify (scrub): compare the cache with the backing for every region the cache calls valid.

use super::cacheset::{classify, Found};
use super::intent::{effective_pairing, load_bitmaps};
use super::region::RegionState;
use super::{reusable_valid, Inner, MirrorStats};
use crate::device::layer::striped::Striped;
use crate::device::{AlignedBuf, BlockDevice};
use crate::meta::store::{check_backing, read_superblock};
use crate::meta::Bits;
use std::io;
use std::sync::atomic::Ordering;

/// Granularity of reported mismatches.
const COMPARE_BYTES: usize = 4096;

/// Appends the mismatching ranges of `a` against `b` (both starting at `offset`), merged.
fn diff_ranges(offset: u64, a: &[u8], b: &[u8], out: &mut Vec<(u64, u64)>) {
    for (i, (x, y)) in a.chunks(COMPARE_BYTES).zip(b.chunks(COMPARE_BYTES)).enumerate() {
        if x != y {
            push_merged(out, offset + (i * COMPARE_BYTES) as u64, x.len() as u64);
        }
    }
}

fn push_merged(out: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    match out.last_mut() {
        Some((s, l)) if *s + *l == start => *l += len,
        _ => out.push((start, len)),
    }
}

enum Outcome {
    Same,
    Differs(Vec<(u64, u64)>),
}

/// Compares one range; with `repair`, rewrites the cache range from the backing where it differs.
/// Err only for a backing error; a cache read error counts as the whole range differing.
async fn compare_range<B: BlockDevice, C: BlockDevice>(
    backing: &B,
    cache: &C,
    start: u64,
    len: u64,
    repair: bool,
) -> io::Result<(Outcome, io::Result<()>)> {
    let (rb, rc) = tokio::join!(
        backing.read(start, AlignedBuf::uninit_for_fill(len as usize)),
        cache.read(start, AlignedBuf::uninit_for_fill(len as usize))
    );
    let (bbuf, r) = rb;
    r?;
    let mut diffs = Vec::new();
    match rc {
        (cbuf, Ok(())) => diff_ranges(start, &bbuf, &cbuf, &mut diffs),
        (_, Err(_)) => diffs.push((start, len)),
    }
    if diffs.is_empty() {
        return Ok((Outcome::Same, Ok(())));
    }
    let mut write_result = Ok(());
    if repair {
        let (_, w) = cache.write(start, bbuf, false).await;
        write_result = w;
    }
    Ok((Outcome::Differs(diffs), write_result))
}

impl<B: BlockDevice, C: BlockDevice> Inner<B, C> {
    pub(crate) async fn verify_online(&self, repair: bool) -> io::Result<Vec<(u64, u64)>> {
        let Some(set) = self.cache_now() else {
            return Ok(Vec::new());
        };
        // One at a time: two would only slow each other and double the load on the backing.
        if self.stats.verify_running.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(io::Error::new(io::ErrorKind::ResourceBusy, "a verify is already running"));
        }
        struct Running<'a>(&'a MirrorStats);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.verify_running.store(0, Ordering::Release);
            }
        }
        let _running = Running(&self.stats);
        self.stats.verify_done_regions.store(0, Ordering::Relaxed);
        self.stats.verify_total_regions.store(self.regions - set.table.not_valid(), Ordering::Relaxed);
        let mut out = Vec::new();
        let mut repaired = false;
        for r in 0..self.regions {
            if set.table.get(r) != RegionState::Valid {
                continue;
            }
            self.stats.verify_done_regions.fetch_add(1, Ordering::Relaxed);
            let (start, len) = self.region_bounds(r);
            // Under the range lock, no write is between the two devices while we compare.
            let _g = self.locks.lock(start, start + len).await;
            if set.is_failed() {
                break;
            }
            if set.table.get(r) != RegionState::Valid {
                continue;
            }
            let (outcome, written) = compare_range(&self.backing, &set.dev, start, len, repair).await?;
            if let Outcome::Differs(d) = outcome {
                tracing::error!(offset = d[0].0, region = r, repair, "verify: cache differs from the backing");
                self.stats.verify_mismatches.fetch_add(d.len() as u64, Ordering::Relaxed);
                for (s, l) in d {
                    push_merged(&mut out, s, l);
                }
                match (repair, written) {
                    (true, Ok(())) => repaired = true,
                    (true, Err(e)) => {
                        tracing::warn!(region = r, error = %e, "verify: repair write failed; region invalidated");
                        self.invalidate_durably(&set, r..r + 1).await;
                        self.cache_error(&set);
                    }
                    // Reported, and no longer served: the rebuild copies it again from the backing.
                    (false, _) => self.invalidate_durably(&set, r..r + 1).await,
                }
            }
        }
        if repaired {
            if let Err(e) = set.dev.flush().await {
                self.cache_meta_failed(&set, &e);
            }
        }
        Ok(out)
    }
}

/// Verify without a daemon: opens the backing and the cache devices read-only in spirit (only
/// `repair` writes, and only cache data), works out which regions the cache may call valid — as
/// start-up would: persisted valid bits, minus write-intent regions, minus changed regions for a
/// stale set; nothing for a set that is not paired or cannot be trusted — and compares those.
/// Returns the mismatching (offset, length) ranges of the exported disk.
pub async fn verify_offline<B: BlockDevice, C: BlockDevice>(
    backing: B,
    caches: Vec<C>,
    repair: bool,
) -> io::Result<Vec<(u64, u64)>> {
    Ok(verify_offline_report(backing, caches, repair).await?.mismatches)
}

/// What an offline verify compared and found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Regions the cache may call valid, each compared byte for byte with the backing.
    pub regions_checked: u64,
    pub mismatches: Vec<(u64, u64)>,
}

/// [`verify_offline`], also saying how many regions were compared (0 when the cache holds
/// nothing it could serve).
pub async fn verify_offline_report<B: BlockDevice, C: BlockDevice>(
    backing: B,
    caches: Vec<C>,
    repair: bool,
) -> io::Result<VerifyReport> {
    let mut bsb = read_superblock(&backing)
        .await?
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("backing: {e}: not prepared for superdisk")))?;
    check_backing(&bsb, backing.size_bytes())?;
    let Some(bitmaps) = load_bitmaps(&backing, &bsb).await? else {
        tracing::info!("the backing was never served with a cache; nothing to verify");
        return Ok(VerifyReport::default());
    };
    effective_pairing(&mut bsb, bitmaps.changed_complete);
    if caches.is_empty() {
        return Ok(VerifyReport::default());
    }
    let (members, sbs, valid) = match classify(caches, &bsb, false).await? {
        Found::Format { reason, .. } => {
            tracing::info!(reason = %reason, "the cache holds no valid regions; nothing to verify");
            return Ok(VerifyReport::default());
        }
        Found::Existing { members, sbs, valid, .. } => (members, sbs, valid),
    };
    let trusted: Bits = match reusable_valid(
        &bsb,
        sbs[0].cache_set_uuid,
        sbs[0].epoch,
        &valid,
        &bitmaps.intent,
        &bitmaps.changed,
        false,
    ) {
        Some(v) => v,
        None => {
            tracing::info!("the cache set is not in sync with this backing; nothing it holds counts as valid");
            return Ok(VerifyReport::default());
        }
    };
    let stripe = if members.len() > 1 { sbs[0].stripe_bytes } else { 4096 };
    let dev = Striped::new(members, sbs[0].data_size_bytes, stripe);
    let region = u64::from(bsb.region_bytes);
    let mut out = Vec::new();
    let mut repaired = false;
    let mut regions_checked = 0u64;
    for r in trusted.iter_ones() {
        regions_checked += 1;
        let start = r * region;
        let len = region.min(bsb.data_size_bytes - start);
        let (outcome, written) = compare_range(&backing, &dev, start, len, repair).await?;
        if let Outcome::Differs(d) = outcome {
            for (s, l) in d {
                push_merged(&mut out, s, l);
            }
            if repair {
                written?;
                repaired = true;
            }
        }
    }
    if repaired {
        dev.flush().await?;
    }
    Ok(VerifyReport { regions_checked, mismatches: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_are_merged_per_page() {
        let a = vec![0u8; 4 * COMPARE_BYTES];
        let mut b = a.clone();
        b[10] = 1;
        b[COMPARE_BYTES + 5] = 1;
        b[3 * COMPARE_BYTES] = 1;
        let mut out = Vec::new();
        diff_ranges(1 << 20, &a, &b, &mut out);
        assert_eq!(
            out,
            vec![(1 << 20, 2 * COMPARE_BYTES as u64), ((1 << 20) + 3 * COMPARE_BYTES as u64, COMPARE_BYTES as u64)]
        );
    }
}

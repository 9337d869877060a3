//! The write-intent and changed-regions store: the backing device's metadata as the mirror
//! engine keeps it: its superblock, the write-intent
//! bitmap and the changed-regions bitmap, with group commit.
//!
//! * **Write intent**: before the first write into a region its bit is durable on the backing;
//!   it clears lazily, once the region has been idle for a whole cleaner interval and both devices
//!   were flushed (and the cache's valid bitmap persisted) after its last write. At start-up every
//!   region with the bit set may differ between the copies and is resynced.
//! * **Changed regions** (md's bitmap re-add): while no cache set is attached ("recording"), every
//!   written region is also marked here, durably before the write. When the paired cache set comes
//!   back it resyncs only those regions.
//!
//! Group commit: writers set bits in memory under a short lock and then wait for a commit that
//! started after their change; one commit writes every dirty page (one 4 KiB FUA write each), so
//! concurrent first-writes share the metadata I/O. Changed pages are written before intent pages,
//! so the changed record is never behind a cleared intent bit on disk.

use super::MirrorStats;
use crate::device::{layer::backing_guard as guard, BlockDevice};
use crate::meta::bitmap::page_of;
use crate::meta::store::write_superblock;
use crate::meta::superblock::{FLAG_BITMAPS, FLAG_OPEN};
use crate::meta::{BitmapKind, Bits, DiskBitmap, MetaLayout, Superblock, BITS_PER_PAGE};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Regions marked ahead of a sequential writer in one intent commit (with 1 MiB regions, one
/// commit per 16 MiB written instead of one per MiB).
const INTENT_AHEAD_REGIONS: u64 = 16;

struct JState {
    /// In memory: set means the region may have a write in flight or not yet flushed on both.
    intent: Bits,
    /// The bit is set on disk and no clear of it is pending: a writer may proceed without a commit.
    intent_durable: Bits,
    /// A write into the region started since the last cleaner pass.
    touched: Bits,
    changed: Bits,
    changed_durable: Bits,
    /// Mutations in flight: one entry per request, however many regions it spans, so a client's
    /// multi-GiB TRIMs cost a few bytes each, not one entry per region.
    inflight: BTreeMap<u64, Range<u64>>,
    next_mark: u64,
    /// No cache set attached: writes mark changed regions too.
    recording: bool,
    dirty_intent: BTreeSet<u64>,
    dirty_changed: BTreeSet<u64>,
    /// Bumped by every change that needs a commit; a commit makes everything up to the value it
    /// saw durable.
    seq: u64,
}

struct JournalIo {
    intent: DiskBitmap,
    changed: DiskBitmap,
}

pub(crate) struct IntentStore {
    st: Mutex<JState>,
    io: tokio::sync::Mutex<JournalIo>,
    durable_seq: AtomicU64,
    sb: Mutex<Superblock>,
    stats: Arc<MirrorStats>,
}

/// What the backing's metadata said at open.
pub(crate) struct OpenInfo {
    /// The previous run did not shut down cleanly.
    pub crashed: bool,
    pub intent_regions: u64,
}

/// The bitmaps as found on disk, for the start-up decision and for offline verify.
pub(crate) struct LoadedBitmaps {
    pub intent: Bits,
    pub changed: Bits,
    /// Whether every changed-regions page was readable (otherwise the record is lost).
    pub changed_complete: bool,
    intent_disk: DiskBitmap,
    changed_disk: DiskBitmap,
}

pub(crate) fn backing_layout<B: BlockDevice>(dev: &B, sb: &Superblock) -> MetaLayout {
    MetaLayout::new(dev.size_bytes(), sb.data_size_bytes, sb.region_bytes)
}

/// Adjusts a backing superblock read from disk to what its pairing can be trusted for: if
/// something other than the mirror engine rewrote the superblock since (the plain volume, an older
/// tool), it may have written the disk without recording changed regions, so no cache set can be
/// trusted; if the changed-regions record is incomplete, only an in-sync set can.
pub(crate) fn effective_pairing(sb: &mut Superblock, changed_complete: bool) {
    if sb.mirror_generation != sb.generation && sb.cache_set_uuid != [0; 16] {
        tracing::warn!("the backing was served without the mirror engine since its cache was last attached; the cache will be fully rebuilt");
        sb.cache_set_uuid = [0; 16];
        sb.changed_since_epoch = 0;
    }
    if !changed_complete {
        sb.changed_since_epoch = 0;
    }
}

/// Reads the intent and changed bitmaps; None if they were never formatted.
pub(crate) async fn load_bitmaps<B: BlockDevice>(dev: &B, sb: &Superblock) -> io::Result<Option<LoadedBitmaps>> {
    if sb.flags & FLAG_BITMAPS == 0 {
        return Ok(None);
    }
    let layout = backing_layout(dev, sb);
    let regions = crate::meta::regions(sb.data_size_bytes, sb.region_bytes);
    let mut li = DiskBitmap::load(dev, layout, BitmapKind::Intent, sb.device_uuid, regions).await?;
    // A lost intent page could hide writes in flight at a crash: treat its regions as dirty.
    for &p in &li.missing_pages {
        tracing::warn!(page = p, "write-intent bitmap page unreadable; resyncing the regions it covers");
        li.bits.set_page(p);
    }
    let lc = DiskBitmap::load(dev, layout, BitmapKind::Changed, sb.device_uuid, regions).await?;
    if !lc.missing_pages.is_empty() {
        tracing::warn!(pages = ?lc.missing_pages, "changed-regions bitmap pages unreadable; a stale cache will be fully rebuilt");
    }
    Ok(Some(LoadedBitmaps {
        intent: li.bits,
        changed: lc.bits,
        changed_complete: lc.missing_pages.is_empty(),
        intent_disk: li.disk,
        changed_disk: lc.disk,
    }))
}

impl IntentStore {
    /// Loads (or on first use formats) the bitmaps and marks the backing open. `sb` is the
    /// backing's current superblock.
    pub async fn open<B: BlockDevice>(
        dev: &B,
        mut sb: Superblock,
        stats: Arc<MirrorStats>,
    ) -> io::Result<(IntentStore, OpenInfo)> {
        let regions = crate::meta::regions(sb.data_size_bytes, sb.region_bytes);
        let crashed = sb.flags & FLAG_OPEN != 0;
        let loaded = match load_bitmaps(dev, &sb).await? {
            Some(l) => {
                effective_pairing(&mut sb, l.changed_complete);
                l
            }
            None => {
                let layout = backing_layout(dev, &sb);
                let zero = Bits::new(regions);
                let intent_disk = DiskBitmap::format(dev, layout, BitmapKind::Intent, sb.device_uuid, &zero).await?;
                let changed_disk = DiskBitmap::format(dev, layout, BitmapKind::Changed, sb.device_uuid, &zero).await?;
                sb.flags |= FLAG_BITMAPS;
                sb.changed_since_epoch = 0;
                LoadedBitmaps { intent: zero.clone(), changed: zero, changed_complete: true, intent_disk, changed_disk }
            }
        };
        let info = OpenInfo { crashed, intent_regions: loaded.intent.count_ones() };
        let store = IntentStore {
            st: Mutex::new(JState {
                intent_durable: loaded.intent.clone(),
                intent: loaded.intent,
                touched: Bits::new(regions),
                changed_durable: loaded.changed.clone(),
                changed: loaded.changed,
                inflight: BTreeMap::new(),
                next_mark: 0,
                recording: false,
                dirty_intent: BTreeSet::new(),
                dirty_changed: BTreeSet::new(),
                seq: 0,
            }),
            io: tokio::sync::Mutex::new(JournalIo { intent: loaded.intent_disk, changed: loaded.changed_disk }),
            durable_seq: AtomicU64::new(0),
            sb: Mutex::new(sb),
            stats,
        };
        // Mark the backing open (and the bitmaps formatted) before anything is written to it.
        store.update_sb(dev, |sb| sb.flags |= FLAG_OPEN | FLAG_BITMAPS).await?;
        Ok((store, info))
    }

    fn state(&self) -> MutexGuard<'_, JState> {
        self.st.lock().expect("intent state poisoned")
    }

    pub fn sb(&self) -> Superblock {
        self.sb.lock().expect("superblock poisoned").clone()
    }

    /// Rewrites the backing superblock with `f` applied (next generation, durable on return).
    pub async fn update_sb<B: BlockDevice>(&self, dev: &B, f: impl FnOnce(&mut Superblock)) -> io::Result<()> {
        let _io = self.io.lock().await;
        let mut sb = self.sb();
        f(&mut sb);
        sb.generation += 1;
        sb.mirror_generation = sb.generation;
        write_superblock(dev, &sb).await?;
        *self.sb.lock().expect("superblock poisoned") = sb;
        Ok(())
    }

    /// Registers a write to regions `rs` and returns once their intent bits (and, while recording,
    /// changed bits) are durable. `under_lock` runs while the journal's state lock is held, with
    /// whether changes are being recorded: the engine uses it to pick the cache set the write goes
    /// to, atomically with the marking (see `attach`). The guard ends the write's registration.
    pub async fn mark<B: BlockDevice, T>(
        &self,
        dev: &B,
        rs: Range<u64>,
        under_lock: impl FnOnce(bool) -> T,
    ) -> io::Result<(MarkGuard<'_>, T)> {
        let (need, t, id) = {
            let mut st = self.state();
            let mut need = false;
            let id = st.next_mark;
            st.next_mark += 1;
            st.inflight.insert(id, rs.clone());
            for r in rs.clone() {
                st.touched.set(r);
                if !st.intent_durable.get(r) {
                    if !st.intent.get(r) {
                        st.intent.set(r);
                        st.dirty_intent.insert(page_of(r));
                    }
                    need = true;
                }
                if st.recording && !st.changed_durable.get(r) {
                    if !st.changed.get(r) {
                        st.changed.set(r);
                        st.dirty_changed.insert(page_of(r));
                    }
                    need = true;
                }
            }
            // A sequential writer (the region before this write is marked too) would otherwise
            // wait for one intent commit per region: mark the next regions in the same commit.
            // Safe: an intent bit only ever costs a resync after a crash, and the cleaner clears
            // the ones no write reached at its next pass.
            if need && rs.start > 0 && st.intent.get(rs.start - 1) {
                let ahead_end = (rs.end + INTENT_AHEAD_REGIONS).min(st.intent.len());
                for r in rs.end..ahead_end {
                    if !st.intent.get(r) {
                        st.intent.set(r);
                        st.dirty_intent.insert(page_of(r));
                    }
                }
            }
            let recording = st.recording;
            let seq = need.then(|| {
                st.seq += 1;
                st.seq
            });
            (seq, under_lock(recording), id)
        };
        // The guard exists before the await, so a failed or cancelled commit unregisters the write.
        let guard = MarkGuard { store: self, id };
        if let Some(seq) = need {
            self.commit_until(dev, seq).await?;
        }
        Ok((guard, t))
    }

    /// Commits everything changed so far.
    pub async fn commit<B: BlockDevice>(&self, dev: &B) -> io::Result<()> {
        let seq = {
            let mut st = self.state();
            st.seq += 1;
            st.seq
        };
        self.commit_until(dev, seq).await
    }

    async fn commit_until<B: BlockDevice>(&self, dev: &B, seq: u64) -> io::Result<()> {
        loop {
            if self.durable_seq.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            // The holder may be a commit waiting out a stalled backing: a client write gives up
            // by its request deadline. Only this wait is cut short; once the pages are taken from
            // the dirty sets below, the commit runs to its end (each page write is bounded by the
            // backing guard, and a failed one puts its pages back).
            let mut io = guard::bounded(self.io.lock()).await.inspect_err(|_| {
                self.stats.backing_io.deadline_errors.fetch_add(1, Ordering::Relaxed);
            })?;
            if self.durable_seq.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            let (snap_seq, changed_pages, intent_pages) = {
                let mut st = self.state();
                let changed: Vec<(u64, Vec<u8>)> = std::mem::take(&mut st.dirty_changed)
                    .into_iter()
                    .map(|p| (p, st.changed.page_payload_vec(p)))
                    .collect();
                let intent: Vec<(u64, Vec<u8>)> = std::mem::take(&mut st.dirty_intent)
                    .into_iter()
                    .map(|p| (p, st.intent.page_payload_vec(p)))
                    .collect();
                (st.seq, changed, intent)
            };
            let written = async {
                // Changed before intent: a cleared intent bit must never be durable while the
                // changed bit that replaces it is not.
                for (p, payload) in &changed_pages {
                    io.changed.store_payload(dev, *p, payload).await?;
                }
                for (p, payload) in &intent_pages {
                    io.intent.store_payload(dev, *p, payload).await?;
                }
                Ok::<(), io::Error>(())
            }
            .await;
            let mut st = self.state();
            match written {
                Ok(()) => {
                    // Durable now: what the snapshot had set and memory still has set (a bit
                    // cleared since will be written as clear by a later commit).
                    let JState { intent, intent_durable, changed, changed_durable, .. } = &mut *st;
                    settle(intent_durable, intent, &intent_pages);
                    settle(changed_durable, changed, &changed_pages);
                    self.durable_seq.fetch_max(snap_seq, Ordering::AcqRel);
                    self.stats.intent_commits.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    st.dirty_changed.extend(changed_pages.iter().map(|(p, _)| *p));
                    st.dirty_intent.extend(intent_pages.iter().map(|(p, _)| *p));
                    return Err(e);
                }
            }
        }
    }

    /// Cleaner, first half: the regions whose intent bit may be cleared if they stay idle until
    /// [`IntentStore::clear_idle`] (set, no write in flight, none started since the last pass). Starts
    /// a new pass: every region counts as untouched from now on.
    pub fn clean_candidates(&self) -> Vec<u64> {
        let mut st = self.state();
        let busy = busy_regions(&st.inflight);
        let cands: Vec<u64> = st.intent.iter_ones().filter(|&r| !st.touched.get(r) && !busy.contains(r)).collect();
        st.touched.clear_all();
        cands
    }

    /// Cleaner, second half (after both devices were flushed and the cache's valid bitmap
    /// persisted): clears the candidates no write touched meanwhile, then commits.
    pub async fn clear_idle<B: BlockDevice>(&self, dev: &B, cands: &[u64]) -> io::Result<u64> {
        let cleared = {
            let mut st = self.state();
            let busy = busy_regions(&st.inflight);
            let mut n = 0;
            for &r in cands {
                if !st.touched.get(r) && !busy.contains(r) && st.intent.get(r) {
                    st.intent.clear(r);
                    st.intent_durable.clear(r);
                    st.dirty_intent.insert(page_of(r));
                    n += 1;
                }
            }
            n
        };
        if cleared > 0 {
            self.commit(dev).await?;
        }
        Ok(cleared)
    }

    /// Shutdown: every region without a write in flight is clean (the caller flushed both devices
    /// and persisted the valid bitmap after the last write), except those `keep` names (a write
    /// given up on that may still land there).
    pub async fn clear_all_idle<B: BlockDevice>(&self, dev: &B, keep: impl Fn(u64) -> bool) -> io::Result<()> {
        let cands: Vec<u64> = {
            let st = self.state();
            let busy = busy_regions(&st.inflight);
            st.intent.iter_ones().filter(|&r| !busy.contains(r) && !keep(r)).collect()
        };
        {
            let mut st = self.state();
            st.touched.clear_all();
        }
        self.clear_idle(dev, &cands).await.map(|_| ())
    }

    /// Starts recording changed regions if `under_lock` (run with the state lock held; the engine
    /// detaches the cache set there) returns true: every region with an intent bit may have been
    /// written without the cache, so it joins the record.
    pub fn start_recording_if(&self, under_lock: impl FnOnce() -> bool) -> bool {
        let mut st = self.state();
        if !under_lock() {
            return false;
        }
        st.recording = true;
        let JState { intent, changed, dirty_changed, seq, .. } = &mut *st;
        for r in intent.iter_ones() {
            if !changed.get(r) {
                changed.set(r);
                dirty_changed.insert(page_of(r));
            }
        }
        *seq += 1;
        true
    }

    /// Runs `under_lock` with the state lock held, passing the current intent and changed bitmaps
    /// and whether changes are being recorded, and stops recording if it returns Some. The engine
    /// computes an attached set's valid regions and installs the set there, so that no write can
    /// slip between the computation and the installation.
    pub fn stop_recording_if<T>(&self, under_lock: impl FnOnce(&Bits, &Bits, bool) -> Option<T>) -> Option<T> {
        let mut st = self.state();
        let t = under_lock(&st.intent, &st.changed, st.recording)?;
        st.recording = false;
        Some(t)
    }

    /// Forgets the changed-regions record (the paired set has caught up); commit to persist.
    pub fn reset_changed(&self) {
        let mut st = self.state();
        if !st.changed.any() {
            return;
        }
        let pages: Vec<u64> = st.changed.iter_ones().map(page_of).collect();
        st.changed.clear_all();
        st.changed_durable.clear_all();
        st.dirty_changed.extend(pages);
        st.seq += 1;
    }

    pub fn intent_count(&self) -> u64 {
        self.state().intent.count_ones()
    }

    /// Regions with a write-intent bit (in memory): those whose copies may differ.
    pub fn intent_regions(&self) -> Vec<u64> {
        self.state().intent.iter_ones().collect()
    }

    /// Mutations registered right now (one per request); for tests of the memory bound.
    #[cfg(test)]
    pub fn registrations(&self) -> usize {
        self.state().inflight.len()
    }

    pub fn changed_count(&self) -> u64 {
        self.state().changed.count_ones()
    }
}

// Pages start on byte boundaries, so they can be settled byte by byte.
const _: () = assert!(BITS_PER_PAGE % 8 == 0);

/// `durable := snapshot ∧ memory` for the bits of each snapshotted page.
fn settle(durable: &mut Bits, mem: &Bits, pages: &[(u64, Vec<u8>)]) {
    let total_bytes = mem.len().div_ceil(8);
    for (p, payload) in pages {
        let first = Bits::page_first_byte(*p);
        for (k, &snap) in payload.iter().enumerate() {
            let i = first + k as u64;
            if i >= total_bytes {
                break;
            }
            durable.set_byte(i, snap & mem.byte(i));
        }
    }
}

/// The regions some registered mutation spans, as sorted disjoint ranges.
struct BusyRegions(Vec<Range<u64>>);

impl BusyRegions {
    fn contains(&self, r: u64) -> bool {
        // The first range that ends after `r` is the only one that can hold it.
        let i = self.0.partition_point(|x| x.end <= r);
        self.0.get(i).is_some_and(|x| x.start <= r)
    }
}

fn busy_regions(inflight: &BTreeMap<u64, Range<u64>>) -> BusyRegions {
    let mut ranges: Vec<Range<u64>> = inflight.values().cloned().collect();
    ranges.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
            _ => merged.push(r),
        }
    }
    BusyRegions(merged)
}

/// Ends a mutation's registration.
pub(crate) struct MarkGuard<'a> {
    store: &'a IntentStore,
    id: u64,
}

impl Drop for MarkGuard<'_> {
    fn drop(&mut self) {
        let removed = self.store.state().inflight.remove(&self.id);
        debug_assert!(removed.is_some(), "mutation {} was not registered", self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_regions_merge_overlapping_registrations() {
        let inflight: BTreeMap<u64, Range<u64>> = [(0, 5..9), (1, 2..4), (2, 8..12), (3, 20..21)].into_iter().collect();
        let busy = busy_regions(&inflight);
        assert_eq!(busy.0, vec![2..4, 5..12, 20..21]);
        let inside: Vec<u64> = (0..25).filter(|&r| busy.contains(r)).collect();
        assert_eq!(inside, vec![2, 3, 5, 6, 7, 8, 9, 10, 11, 20]);
        assert!(!busy_regions(&BTreeMap::new()).contains(0));
    }
}

//! The read path: valid regions from the cache set (a slow read raced against the backing, a
//! failed one served from the backing and repaired), the rest from the backing, which also moves
//! them up the rebuild queue (hot-first).

use super::region::RegionState;
use super::util::region_span;
use super::{out_of_range, Inner, Set};
use crate::device::{AlignedBuf, BlockDevice, FileSlice};
use crate::telemetry::timed;
use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Who answered a hedged read: the cache (its result, possibly an error to repair) or the backing.
pub(super) enum Hedged {
    Cache(AlignedBuf, io::Result<()>),
    Backing(AlignedBuf),
}

/// Bounds the hot-first queue: beyond this, reads of invalid regions just wait for the scan.
pub(crate) const HOT_QUEUE_MAX: usize = 1024;

#[derive(Default)]
pub(crate) struct HotQueue {
    order: VecDeque<u64>,
    queued: HashSet<u64>,
}

impl<B: BlockDevice, C: BlockDevice> Inner<B, C> {
    pub(super) fn push_hot(&self, r: u64) {
        let mut hot = self.hot.lock().expect("hot queue poisoned");
        if hot.order.len() < HOT_QUEUE_MAX && hot.queued.insert(r) {
            hot.order.push_back(r);
            drop(hot);
            self.work.notify_one();
        }
    }

    pub(super) fn pop_hot(&self) -> Option<u64> {
        let mut hot = self.hot.lock().expect("hot queue poisoned");
        let r = hot.order.pop_front()?;
        hot.queued.remove(&r);
        Some(r)
    }

    pub(super) async fn read(&self, offset: u64, mut buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        if len == 0 {
            return (buf, Ok(()));
        }
        if out_of_range(offset, len, self.data_bytes) {
            return (buf, Err(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        self.fg_ops.fetch_add(1, Ordering::Relaxed);
        let Some(set) = self.cache_now() else {
            return self.read_backing(offset, buf).await;
        };
        // Runs of consecutive regions with the same source: (start, end, from_cache).
        let end = offset + len;
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for r in region_span(offset, len, self.region_bytes) {
            let state = set.table.get(r);
            if state == RegionState::Invalid {
                self.push_hot(r);
            }
            let cached = state == RegionState::Valid;
            let s = offset.max(r * self.region_bytes);
            let e = end.min((r + 1) * self.region_bytes);
            match runs.last_mut() {
                Some(last) if last.2 == cached => last.1 = e,
                _ => runs.push((s, e, cached)),
            }
        }
        if let [(_, _, cached)] = runs[..] {
            return if cached {
                self.read_cache(&set, offset, buf).await
            } else {
                self.read_backing(offset, buf).await
            };
        }
        let futs: Vec<_> = runs
            .iter()
            .map(|&(s, e, cached)| {
                let b = AlignedBuf::uninit_for_fill((e - s) as usize);
                let set = &set;
                async move {
                    if cached {
                        self.read_cache(set, s, b).await
                    } else {
                        self.read_backing(s, b).await
                    }
                }
            })
            .collect();
        let mut result = Ok(());
        for (&(s, _, _), (b, r)) in runs.iter().zip(crate::device::join::join_all(futs).await) {
            match r {
                Ok(()) => {
                    let at = (s - offset) as usize;
                    buf[at..at + b.len()].copy_from_slice(&b);
                }
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        (buf, result)
    }

    /// The same choice of source as `read`, for a range whose bytes one device's page cache holds
    /// whole: the cache when every region is valid there, the backing when there is no cache.
    /// A range that mixes sources, or is not all in memory, is left to `read`.
    pub(super) fn read_zero_copy(&self, offset: u64, len: u64) -> Option<FileSlice> {
        if len == 0 || out_of_range(offset, len, self.data_bytes) {
            return None;
        }
        let len_usize = usize::try_from(len).ok()?;
        let Some(set) = self.cache_now() else {
            let slice = self.backing.zero_copy_source(offset, len_usize)?;
            self.fg_ops.fetch_add(1, Ordering::Relaxed);
            self.stats.reads_backing.fetch_add(1, Ordering::Relaxed);
            self.stats.read_bytes_backing.fetch_add(len, Ordering::Relaxed);
            return Some(slice);
        };
        if region_span(offset, len, self.region_bytes).any(|r| set.table.get(r) != RegionState::Valid) {
            return None;
        }
        if set.slow_members.load(Ordering::Relaxed) != 0 {
            return None;
        }
        let slice = set.dev.zero_copy_source(offset, len_usize)?;
        self.fg_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.reads_cache.fetch_add(1, Ordering::Relaxed);
        self.stats.read_bytes_cache.fetch_add(len, Ordering::Relaxed);
        Some(slice)
    }

    pub(super) async fn read_backing(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len();
        timed(&self.stats.slow.backing.read, len, self.read_backing_untimed(offset, buf)).await
    }

    pub(super) async fn read_backing_untimed(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        let (buf, r) = self.backing.read(offset, buf).await;
        self.stats.reads_backing.fetch_add(1, Ordering::Relaxed);
        self.stats.read_bytes_backing.fetch_add(len, Ordering::Relaxed);
        if r.is_err() {
            self.stats.backing_errors.fetch_add(1, Ordering::Relaxed);
        }
        (buf, r)
    }

    /// Reads from the cache; on error, serves from the backing and rewrites the cache range.
    pub(super) async fn read_cache(
        &self,
        set: &Arc<Set<C>>,
        offset: u64,
        buf: AlignedBuf,
    ) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        let slow = set.slow_members.load(Ordering::Relaxed);
        if slow != 0 && set.dev.members_touched(offset, len) & slow != 0 {
            // A member slower than the backing: the backing answers (it has every acknowledged
            // write); the watch keeps measuring the member with probes and writes.
            self.stats.slow.routed_reads.fetch_add(1, Ordering::Relaxed);
            return self.read_backing(offset, buf).await;
        }
        let (buf, r) = if self.hedger.eligible(buf.len()) {
            match self.read_cache_hedged(set, offset, buf).await {
                Hedged::Cache(buf, r) => (buf, r),
                Hedged::Backing(buf) => return (buf, Ok(())),
            }
        } else {
            set.dev.read(offset, buf).await
        };
        match r {
            Ok(()) => {
                self.stats.reads_cache.fetch_add(1, Ordering::Relaxed);
                self.stats.read_bytes_cache.fetch_add(len, Ordering::Relaxed);
                (buf, Ok(()))
            }
            Err(e) => self.read_repair(set, offset, buf, e).await,
        }
    }

    /// A cache read that, once slower than the hedging threshold, races a backing read.
    pub(super) async fn read_cache_hedged(&self, set: &Arc<Set<C>>, offset: u64, buf: AlignedBuf) -> Hedged {
        let started = Instant::now();
        let hedge_at = self.hedger.start(started);
        let out = self.cache_or_backing(set, offset, buf, hedge_at).await;
        // When the backing won, the cache's time so far is a lower bound of its latency: recorded
        // as such, so a stalling cache's p99 never looks better than it is.
        self.hedger.finish(started.elapsed());
        out
    }

    pub(super) async fn cache_or_backing(
        &self,
        set: &Arc<Set<C>>,
        offset: u64,
        buf: AlignedBuf,
        hedge_at: Instant,
    ) -> Hedged {
        let len = buf.len();
        let mut cache = std::pin::pin!(set.dev.read(offset, buf));
        // Most reads finish at their first poll (page cache) or before the threshold: only those
        // still pending pay for a timer.
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(cache.as_mut(), cx))).await;
        if let std::task::Poll::Ready((buf, r)) = first {
            return Hedged::Cache(buf, r);
        }
        tokio::select! {
            biased;
            (buf, r) = &mut cache => return Hedged::Cache(buf, r),
            _ = tokio::time::sleep_until(hedge_at.into()) => {}
        }
        if !self.hedger.try_hedge() {
            let (buf, r) = cache.await;
            return Hedged::Cache(buf, r);
        }
        // The backing has every acknowledged write, so its copy is never older than the cache's.
        // Not timed for the slow-member watch: a race's loser is dropped, and a mean of the
        // winners would make the backing look faster than it is.
        let mut backing = std::pin::pin!(self.read_backing_untimed(offset, AlignedBuf::uninit_for_fill(len)));
        tokio::select! {
            biased;
            (buf, r) = &mut cache => Hedged::Cache(buf, r),
            (b, rb) = &mut backing => match rb {
                // The cache read is abandoned; its engine keeps the buffer until the device answers.
                Ok(()) => {
                    self.hedger.backing_won();
                    Hedged::Backing(b)
                }
                // A failing backing does not fail a read the cache can still answer.
                Err(_) => {
                    let (buf, r) = cache.await;
                    Hedged::Cache(buf, r)
                }
            },
        }
    }

    pub(super) async fn read_repair(
        &self,
        set: &Arc<Set<C>>,
        offset: u64,
        buf: AlignedBuf,
        e: io::Error,
    ) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        tracing::warn!(offset, len, error = %e, "cache read error; serving from the backing and rewriting the cache");
        let failed = self.cache_error(set);
        // Under the range lock, so a client write cannot land between our backing read and the
        // cache rewrite (which would put the old data back on the cache).
        let _g = self.locks.lock(offset, offset + len).await;
        let (buf, r) = self.read_backing(offset, buf).await;
        if r.is_err() || failed || set.is_failed() {
            return (buf, r);
        }
        let mut copy = AlignedBuf::uninit_for_fill(len as usize);
        copy.copy_from_slice(&buf);
        let (_, w) = set.dev.write(offset, copy, false).await;
        match w {
            Ok(()) => {
                self.stats.repairs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(offset, len, error = %e, "read repair failed; region invalidated");
                self.invalidate_durably(set, region_span(offset, len, self.region_bytes)).await;
                self.cache_error(set);
            }
        }
        (buf, Ok(()))
    }
}

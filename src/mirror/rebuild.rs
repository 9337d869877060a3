//! The background rebuild: copies Invalid regions from the backing to the cache set while the
//! engine serves, hot-first, rate-limited like md's speed_limit_min/max, resumable (progress is
//! the persisted valid bitmap).
//!
//! A region goes Invalid → Copying (claimed), is copied under its range lock (no write can land
//! between reading the backing and writing the cache, and writes after the copy go to both
//! devices), then after a flush of both devices Copying → Valid. A write that fails on the cache
//! during the window moves it to Invalid, and the final transition then does not happen.
//!
//! Why the backing is flushed too: what the copy read may not be durable there yet, and a region
//! without a write-intent bit is trusted across a crash. A write given up at its deadline can
//! land on the backing after the cleaner cleared its region's intent bit; copied before any flush
//! covered it, a power loss would leave the backing without it and the cache valid with it.
//!
//! While the backing is stalled or failing the rebuild backs off (exponentially, up to
//! [`MAX_BACKOFF`], resuming as soon as the backing answers every stalled operation again) rather
//! than queueing more reads behind the stall; a failed copy leaves its region Invalid.

use super::region::RegionState;
use super::Set;
use super::{Inner, HOT_QUEUE_MAX};
use crate::device::{layer::backing_guard as guard, AlignedBuf, BlockDevice};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Regions copied concurrently (overlaps the backing read of one with the cache write of another).
const COPY_PARALLEL: usize = 4;
/// Regions copied between cache flushes (and hence between Copying → Valid transitions).
const FLUSH_EVERY_REGIONS: usize = 32;
/// How often rebuild progress is persisted while it runs.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Foreground activity is sampled over windows this long.
const LOAD_WINDOW: Duration = Duration::from_millis(100);
/// The pacer may run this far ahead of its rate (a short burst after an idle spell).
const BURST: Duration = Duration::from_millis(50);
/// First pause after a chunk whose backing reads failed; doubles while they keep failing.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Paces the rebuild: `max` bytes/s while no client request arrived during the last window,
/// `min` while clients are active (md's speed_limit_max / speed_limit_min).
pub(crate) struct RateLimiter {
    min: u64,
    max: u64,
    rate: u64,
    window_start: Instant,
    window_fg: u64,
    next_free: Instant,
}

impl RateLimiter {
    pub fn new(min: u64, max: u64) -> Self {
        let min = min.max(1 << 20);
        let max = max.max(min);
        let now = Instant::now();
        RateLimiter { min, max, rate: max, window_start: now, window_fg: 0, next_free: now }
    }

    /// The rate for the current window, given the foreground request counter.
    pub fn rate(&mut self, fg_ops: u64, now: Instant) -> u64 {
        if now.duration_since(self.window_start) >= LOAD_WINDOW {
            self.rate = if fg_ops != self.window_fg { self.min } else { self.max };
            self.window_fg = fg_ops;
            self.window_start = now;
        }
        self.rate
    }

    /// How long to wait before copying `bytes` more.
    pub fn delay(&mut self, bytes: u64, fg_ops: u64, now: Instant) -> Duration {
        let rate = self.rate(fg_ops, now);
        if rate == u64::MAX {
            return Duration::ZERO;
        }
        let start = self.next_free.max(now.checked_sub(BURST).unwrap_or(now));
        self.next_free = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        self.next_free.saturating_duration_since(now + BURST)
    }
}

enum CopyError {
    Backing(io::Error),
    Cache(io::Error),
}

/// The rebuild task's own state across batches.
struct Rebuild {
    limits: (u64, u64),
    limiter: RateLimiter,
    cursor: u64,
    last_persist: Instant,
    backoff: Duration,
}

/// What one batch of copies did.
struct Batch {
    copied: Vec<u64>,
    attempted: usize,
    backing_failed: bool,
}

pub(crate) async fn rebuild_loop<B: BlockDevice, C: BlockDevice>(inner: Arc<Inner<B, C>>) {
    let t = inner.tunables();
    let limits = (t.rebuild_min_bytes_per_s, t.rebuild_max_bytes_per_s);
    let mut rb = Rebuild {
        limits,
        limiter: RateLimiter::new(limits.0, limits.1),
        cursor: 0,
        last_persist: Instant::now(),
        backoff: MIN_BACKOFF,
    };
    loop {
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let notified = inner.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if inner.rebuild_paused.load(Ordering::Acquire) {
            notified.await;
            continue;
        }
        let set = match inner.cache_now() {
            Some(s) if !s.is_failed() && s.table.not_valid() > 0 => s,
            other => {
                settle(&inner, other).await;
                notified.await;
                continue;
            }
        };
        inner.rebuild_idle.store(false, Ordering::Release);
        rb.follow_limits(&inner);
        let started = Instant::now();
        let mut batch = copy_batch(&inner, &set, &mut rb).await;
        if batch.attempted == 0 {
            // Every not-valid region is being copied already (cannot happen: only this task
            // copies) or the table changed under us; look again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        validate_batch(&inner, &set, &mut batch, started).await;
        if rb.last_persist.elapsed() >= PERSIST_EVERY && !set.is_failed() {
            if let Err(e) = set.persist_valid().await {
                inner.cache_meta_failed(&set, &e);
            }
            rb.last_persist = Instant::now();
        }
        rb.back_off(&inner, batch.backing_failed).await;
    }
}

/// Nothing to copy: make the progress durable and tell the waiters.
async fn settle<B: BlockDevice, C: BlockDevice>(inner: &Inner<B, C>, set: Option<Arc<Set<C>>>) {
    if let Some(s) = set {
        if let Err(e) = s.persist_valid().await {
            inner.cache_meta_failed(&s, &e);
        }
    }
    inner.stats.rebuild_rate_bytes_per_s.store(0, Ordering::Relaxed);
    inner.rebuild_idle.store(true, Ordering::Release);
    inner.settled.notify_waiters();
}

impl Rebuild {
    /// The operator changed the limits (SIGHUP or the admin socket): they apply from now.
    fn follow_limits<B: BlockDevice, C: BlockDevice>(&mut self, inner: &Inner<B, C>) {
        let t = inner.tunables();
        let now = (t.rebuild_min_bytes_per_s, t.rebuild_max_bytes_per_s);
        if now != self.limits {
            self.limits = now;
            self.limiter = RateLimiter::new(now.0, now.1);
        }
    }

    /// Don't spin on a backing that fails or stalls; reads of those regions report its errors. A
    /// stall ends when the guard sees every stalled operation answered: resume then rather than
    /// at the end of the backoff. Otherwise the next chunk is a probe (a single lost request can
    /// keep the guard's stall count up for good).
    async fn back_off<B: BlockDevice, C: BlockDevice>(&mut self, inner: &Inner<B, C>, backing_failed: bool) {
        if !backing_failed {
            self.backoff = MIN_BACKOFF;
            return;
        }
        if inner.backing.in_outage() {
            inner.backing.wait_answering(self.backoff).await;
        } else {
            tokio::time::sleep(self.backoff).await;
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Copies up to [`FLUSH_EVERY_REGIONS`] regions, a few at a time, picked afresh each time, so a
/// region a client starts reading jumps the queue within one chunk.
async fn copy_batch<B: BlockDevice, C: BlockDevice>(inner: &Inner<B, C>, set: &Arc<Set<C>>, rb: &mut Rebuild) -> Batch {
    let mut batch = Batch { copied: Vec::with_capacity(FLUSH_EVERY_REGIONS), attempted: 0, backing_failed: false };
    while batch.attempted < FLUSH_EVERY_REGIONS && !set.is_failed() {
        let chunk = pick(inner, set, &mut rb.cursor, COPY_PARALLEL);
        if chunk.is_empty() {
            break;
        }
        batch.attempted += chunk.len();
        let bytes: u64 = chunk.iter().map(|&r| inner.region_bounds(r).1).sum();
        let wait = rb.limiter.delay(bytes, inner.fg_ops.load(Ordering::Relaxed), Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let results = crate::device::join::join_all(chunk.iter().map(|&r| copy_region(inner, set, r)).collect()).await;
        for (&r, res) in chunk.iter().zip(results) {
            match res {
                Ok(true) => batch.copied.push(r),
                Ok(false) => {}
                Err(CopyError::Backing(e)) => {
                    if guard::is_deadline_error(&e) || inner.backing.in_outage() {
                        // The stall itself is logged once by the guard.
                        tracing::debug!(region = r, error = %e, "rebuild: backing stalled; will retry later");
                    } else {
                        tracing::warn!(region = r, error = %e, "rebuild: backing read failed; will retry later");
                    }
                    batch.backing_failed = true;
                }
                Err(CopyError::Cache(e)) => {
                    tracing::warn!(region = r, error = %e, "rebuild: cache write failed");
                    inner.cache_error(set);
                }
            }
        }
        if batch.backing_failed {
            // The next chunk would only fail the same way: stop and back off.
            break;
        }
    }
    batch
}

/// Valid only once the copies are durable on the cache, and what they were copied from is
/// durable on the backing (see the module docs).
async fn validate_batch<B: BlockDevice, C: BlockDevice>(
    inner: &Inner<B, C>,
    set: &Arc<Set<C>>,
    batch: &mut Batch,
    started: Instant,
) {
    let (rb, rc) = tokio::join!(inner.backing.flush(), set.dev.flush());
    if let Err(e) = &rb {
        tracing::warn!(error = %e, "rebuild: backing flush failed; the copied regions stay invalid");
        for &r in &batch.copied {
            set.table.transition(r, RegionState::Copying, RegionState::Invalid);
        }
        batch.copied.clear();
        batch.backing_failed = true;
    }
    if let Err(e) = rc {
        for &r in &batch.copied {
            set.table.transition(r, RegionState::Copying, RegionState::Invalid);
        }
        inner.cache_meta_failed(set, &e);
        inner.update_invalid_gauge();
        return;
    }
    let mut bytes = 0;
    for &r in &batch.copied {
        if set.table.transition(r, RegionState::Copying, RegionState::Valid) {
            let (start, len) = inner.region_bounds(r);
            bytes += len;
            // Flushed, so clean: a cache file keeps no large folios from the copy (see
            // FileDevice::drop_cached).
            set.dev.drop_cached(start, len);
        }
    }
    inner.stats.rebuild_done_bytes.fetch_add(bytes, Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    inner.stats.rebuild_rate_bytes_per_s.store((bytes as f64 / secs) as u64, Ordering::Relaxed);
    inner.update_invalid_gauge();
}

/// Up to `max` Invalid regions, hot ones (recently read) first, then in address order from the
/// cursor.
pub(crate) fn pick<B: BlockDevice, C: BlockDevice>(
    inner: &Inner<B, C>,
    set: &Set<C>,
    cursor: &mut u64,
    max: usize,
) -> Vec<u64> {
    let mut out = Vec::with_capacity(max);
    for _ in 0..HOT_QUEUE_MAX {
        if out.len() >= max {
            break;
        }
        match inner.pop_hot() {
            Some(r) if r < set.table.len() && set.table.get(r) == RegionState::Invalid && !out.contains(&r) => {
                out.push(r)
            }
            Some(_) => {}
            None => break,
        }
    }
    let mut from = *cursor;
    while out.len() < max {
        match set.table.next_invalid(from) {
            Some(r) if !out.contains(&r) => {
                out.push(r);
                from = r + 1;
                *cursor = from;
            }
            _ => break,
        }
    }
    out
}

/// Copies region `r` from the backing to the cache; Ok(false) if it was no longer Invalid.
async fn copy_region<B: BlockDevice, C: BlockDevice>(
    inner: &Inner<B, C>,
    set: &Set<C>,
    r: u64,
) -> Result<bool, CopyError> {
    if !set.table.transition(r, RegionState::Invalid, RegionState::Copying) {
        return Ok(false);
    }
    let (start, len) = inner.region_bounds(r);
    let res = async {
        let _g = inner.locks.lock(start, start + len).await;
        // One deadline for the copy's backing I/O, so a stalled backing holds the region's range
        // lock (and client writes behind it) no longer than one client request would.
        let deadline = Instant::now() + inner.backing.policy().deadline;
        if set.is_failed() {
            return Ok(());
        }
        guard::with_deadline(deadline, copy_locked(inner, set, start, len)).await
    }
    .await;
    match res {
        Ok(()) if !set.is_failed() => Ok(true),
        Ok(()) => {
            set.table.transition(r, RegionState::Copying, RegionState::Invalid);
            Ok(false)
        }
        Err(e) => {
            set.table.transition(r, RegionState::Copying, RegionState::Invalid);
            Err(e)
        }
    }
}

/// The copy itself, under the region's range lock.
async fn copy_locked<B: BlockDevice, C: BlockDevice>(
    inner: &Inner<B, C>,
    set: &Set<C>,
    start: u64,
    len: u64,
) -> Result<(), CopyError> {
    // A region the backing never allocated reads as zeroes: zero the cache copy instead of
    // moving a megabyte of zeroes.
    let hole = match inner.backing.allocation(start, len).await {
        Ok(ext) => ext.iter().all(|e| e.hole) && ext.iter().map(|e| e.length_bytes).sum::<u64>() >= len,
        Err(_) => false,
    };
    if hole {
        return set.dev.write_zeroes(start, len, true).await.map_err(CopyError::Cache);
    }
    let (buf, rr) = inner.backing.read(start, AlignedBuf::uninit_for_fill(len as usize)).await;
    rr.map_err(CopyError::Backing)?;
    let (_, rw) = set.dev.write(start, buf, false).await;
    rw.map_err(CopyError::Cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_uses_min_under_load_and_max_when_idle() {
        let mut l = RateLimiter::new(10 << 20, 100 << 20);
        let t0 = Instant::now();
        assert_eq!(l.rate(0, t0), 100 << 20);
        // Foreground requests arrived during the window: slow down.
        assert_eq!(l.rate(5, t0 + LOAD_WINDOW), 10 << 20);
        // None in the next window: speed up again.
        assert_eq!(l.rate(5, t0 + 2 * LOAD_WINDOW), 100 << 20);
    }

    #[test]
    fn limiter_paces_to_its_rate() {
        let mut l = RateLimiter::new(1 << 20, 1 << 20);
        let t0 = Instant::now();
        // 10 MiB at 1 MiB/s: the pacer asks for about 10 s of waiting in total (minus the burst).
        let mut waited = Duration::ZERO;
        for _ in 0..10 {
            waited = l.delay(1 << 20, 0, t0);
        }
        assert!(waited >= Duration::from_secs(9) && waited <= Duration::from_secs(10), "{waited:?}");
        let mut unlimited = RateLimiter::new(1 << 20, u64::MAX);
        assert_eq!(unlimited.delay(1 << 30, 0, t0), Duration::ZERO);
    }
}

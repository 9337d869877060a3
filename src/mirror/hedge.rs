//! Hedged cache reads: when a cache read is slower than the cache usually is, also read the
//! same bytes from the backing and answer with whichever copy arrives first.
//!
//! ```text
//!   read_cache ──► cache read ── done at first poll or before the threshold ──► reply (no timer)
//!                     │ threshold passed (clamp(recent p99, hedge_min_us, hedge_max_us))
//!                     ├─ over budget (hedge_max_percent of recent cache reads) ──► keep waiting
//!                     └─ backing read ∥ cache read ──► first good answer ──► reply
//! ```
//!
//! Why it is safe: the backing holds every acknowledged write before it is acknowledged, so it
//! is never older than the cache; a read that overlaps a write in time may return either
//! version, whichever device answers. Why it is bounded: an SSD that stalls on every read would
//! otherwise double the read load on the (slower, metered) network disk exactly when it is
//! needed most; the budget caps hedges at a share of recent cache reads plus a small burst, and
//! a cache that keeps failing is still failed by the error budget, not hidden by hedging.
//!
//! The threshold is learnt from the cache's own latency: a histogram of the eligible reads,
//! whose p99 over the last window (≥ `MIN_SAMPLES` reads, refreshed every second) sets it.
//! Reads larger than [`HEDGE_MAX_BYTES`] are never hedged: their time is dominated by transfer,
//! not by a stall, and doubling them costs real bandwidth.

use crate::telemetry::{HistSnapshot, LatencyHistogram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Reads up to this size are hedged (a database's random reads: 4–128 KiB).
pub const HEDGE_MAX_BYTES: usize = 128 << 10;
/// Hedges allowed beyond the percentage in each budget window, so a short stall on a quiet disk
/// is still covered.
const BURST: u64 = 32;
/// Reads needed before the threshold follows the measured p99 (fewer make p99 the maximum).
const MIN_SAMPLES: u64 = 200;
/// How often the threshold and the budget window move on.
const REFRESH: Duration = Duration::from_secs(1);
/// A quiet disk's samples are dropped after this, so an old stall does not set today's threshold.
const WINDOW_MAX: Duration = Duration::from_secs(10);

/// The `hedge_*` configuration keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HedgePolicy {
    pub enabled: bool,
    /// Never hedge sooner than this: below it a backing read (a network round trip) cannot win.
    pub min: Duration,
    /// Always hedge by this, however slow the cache has been lately: a sick cache's p99 must not
    /// switch hedging off.
    pub max: Duration,
    /// Hedges per 100 eligible cache reads in a window (plus a burst of `BURST`).
    pub max_percent: u32,
}

impl Default for HedgePolicy {
    fn default() -> Self {
        HedgePolicy { enabled: true, min: Duration::from_micros(500), max: Duration::from_millis(20), max_percent: 5 }
    }
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct HedgeStats {
    /// Cache reads that could have been hedged (small enough, hedging on).
    pub eligible_reads: AtomicU64,
    /// Backing reads started because a cache read passed the threshold.
    pub hedged: AtomicU64,
    /// Hedged reads answered by the backing (the cache was slower still).
    pub backing_won: AtomicU64,
    /// Cache reads that passed the threshold but were not hedged: over budget.
    pub over_budget: AtomicU64,
    /// The threshold in force, in microseconds (0 while hedging is off).
    pub threshold_us: AtomicU64,
}

struct Window {
    /// Histogram and counters at the start of the latency window.
    latency_base: HistSnapshot,
    latency_since: Instant,
    /// Counters at the start of the budget window.
    reads_base: u64,
    hedged_base: u64,
}

pub(crate) struct Hedger {
    enabled: AtomicBool,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
    max_percent: AtomicU64,
    threshold_ns: AtomicU64,
    latency: LatencyHistogram,
    stats: std::sync::Arc<HedgeStats>,
    epoch: Instant,
    /// Nanoseconds after `epoch` when the next refresh is due; the reader that moves it refreshes.
    next_refresh_ns: AtomicU64,
    /// [`REFRESH`], but tests that count hedges stretch it so a slow machine cannot roll the
    /// budget window over mid-test.
    refresh_ns: AtomicU64,
    window: Mutex<Window>,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

impl Hedger {
    #[cfg(test)]
    pub(crate) fn policy(&self) -> HedgePolicy {
        HedgePolicy {
            enabled: self.enabled.load(Relaxed),
            min: Duration::from_nanos(self.min_ns.load(Relaxed)),
            max: Duration::from_nanos(self.max_ns.load(Relaxed)),
            max_percent: self.max_percent.load(Relaxed) as u32,
        }
    }

    pub(crate) fn new(policy: HedgePolicy, stats: std::sync::Arc<HedgeStats>) -> Self {
        let now = Instant::now();
        let h = Hedger {
            enabled: AtomicBool::new(false),
            min_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            max_percent: AtomicU64::new(0),
            threshold_ns: AtomicU64::new(0),
            latency: LatencyHistogram::default(),
            stats,
            epoch: now,
            next_refresh_ns: AtomicU64::new(ns(REFRESH)),
            refresh_ns: AtomicU64::new(ns(REFRESH)),
            window: Mutex::new(Window {
                latency_base: HistSnapshot::default(),
                latency_since: now,
                reads_base: 0,
                hedged_base: 0,
            }),
        };
        h.set_policy(policy);
        h
    }

    /// Applies new settings at once (SIGHUP); the learnt latency is kept.
    pub(crate) fn set_policy(&self, p: HedgePolicy) {
        let min_ns = ns(p.min);
        let max_ns = ns(p.max).max(min_ns);
        self.min_ns.store(min_ns, Relaxed);
        self.max_ns.store(max_ns, Relaxed);
        self.max_percent.store(u64::from(p.max_percent.min(100)), Relaxed);
        let t = self.threshold_ns.load(Relaxed).clamp(min_ns, max_ns);
        self.threshold_ns.store(t, Relaxed);
        self.enabled.store(p.enabled, Relaxed);
        self.publish_threshold();
    }

    fn publish_threshold(&self) {
        let us = if self.enabled.load(Relaxed) { self.threshold_ns.load(Relaxed) / 1000 } else { 0 };
        self.stats.threshold_us.store(us, Relaxed);
    }

    /// Whether a cache read of `len_bytes` is hedged.
    pub(crate) fn eligible(&self, len_bytes: usize) -> bool {
        len_bytes <= HEDGE_MAX_BYTES && self.enabled.load(Relaxed)
    }

    /// Called as an eligible cache read starts; returns when to hedge it.
    pub(crate) fn start(&self, now: Instant) -> Instant {
        self.stats.eligible_reads.fetch_add(1, Relaxed);
        let due = self.next_refresh_ns.load(Relaxed);
        let at = ns(now.saturating_duration_since(self.epoch));
        if at >= due
            && self.next_refresh_ns.compare_exchange(due, at + self.refresh_ns.load(Relaxed), Relaxed, Relaxed).is_ok()
        {
            self.refresh(now);
        }
        now + Duration::from_nanos(self.threshold_ns.load(Relaxed))
    }

    /// Records how long the cache took (or, when the backing won, how long it had taken so far:
    /// a lower bound, which keeps a stalling cache's p99 from looking better than it is).
    pub(crate) fn finish(&self, elapsed: Duration) {
        self.latency.record_ns(ns(elapsed));
    }

    /// Takes one hedge from the budget; false (and counted) when the budget is spent.
    pub(crate) fn try_hedge(&self) -> bool {
        let (reads_base, hedged_base) = {
            let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            (w.reads_base, w.hedged_base)
        };
        let reads = self.stats.eligible_reads.load(Relaxed).saturating_sub(reads_base);
        let allowed = reads * self.max_percent.load(Relaxed) / 100 + BURST;
        // fetch_add first, then check: concurrent hedgers cannot both slip under the cap.
        let hedged = self.stats.hedged.fetch_add(1, Relaxed) + 1 - hedged_base;
        if hedged > allowed {
            self.stats.hedged.fetch_sub(1, Relaxed);
            self.stats.over_budget.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    #[cfg(test)]
    pub(crate) fn set_refresh(&self, every: Duration) {
        self.refresh_ns.store(ns(every), Relaxed);
        self.next_refresh_ns.store(ns(self.epoch.elapsed() + every), Relaxed);
    }

    pub(crate) fn backing_won(&self) {
        self.stats.backing_won.fetch_add(1, Relaxed);
    }

    fn refresh(&self, now: Instant) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.reads_base = self.stats.eligible_reads.load(Relaxed);
        w.hedged_base = self.stats.hedged.load(Relaxed);
        let snap = self.latency.snapshot();
        let recent = snap.since(&w.latency_base);
        let n = recent.count();
        let age = now.saturating_duration_since(w.latency_since);
        if n >= MIN_SAMPLES {
            if let Some(p99_us) = recent.quantile_us(0.99) {
                let t = ((p99_us * 1000.0) as u64).clamp(self.min_ns.load(Relaxed), self.max_ns.load(Relaxed));
                self.threshold_ns.store(t, Relaxed);
                self.publish_threshold();
            }
        }
        if n >= MIN_SAMPLES || age >= WINDOW_MAX {
            w.latency_base = snap;
            w.latency_since = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn hedger(p: HedgePolicy) -> (Hedger, Arc<HedgeStats>) {
        let s = Arc::new(HedgeStats::default());
        (Hedger::new(p, s.clone()), s)
    }

    #[test]
    fn threshold_follows_p99_within_the_bounds() {
        let (h, s) = hedger(HedgePolicy::default());
        let t0 = h.epoch;
        assert_eq!(h.start(t0) - t0, Duration::from_micros(500), "starts at the floor");
        // A slow cache: p99 ≈ 3 ms.
        for i in 0..1000u64 {
            h.finish(Duration::from_micros(if i % 100 == 0 { 3000 } else { 800 }));
        }
        let t1 = t0 + REFRESH;
        let at = h.start(t1) - t1;
        // ±12.5 % histogram resolution.
        assert!(at >= Duration::from_micros(700) && at <= Duration::from_micros(3400), "{at:?}");
        assert_eq!(s.threshold_us.load(Relaxed), at.as_micros() as u64);
        // A very sick cache: capped at hedge_max.
        for _ in 0..1000 {
            h.finish(Duration::from_secs(1));
        }
        let t2 = t1 + REFRESH;
        assert_eq!(h.start(t2) - t2, Duration::from_millis(20));
        // A fast cache again: back to the floor.
        for _ in 0..1000 {
            h.finish(Duration::from_micros(5));
        }
        let t3 = t2 + REFRESH;
        assert_eq!(h.start(t3) - t3, Duration::from_micros(500));
    }

    #[test]
    fn too_few_samples_keep_the_threshold() {
        let (h, _) = hedger(HedgePolicy::default());
        for _ in 0..(MIN_SAMPLES - 1) {
            h.finish(Duration::from_millis(5));
        }
        let t = h.epoch + REFRESH;
        assert_eq!(h.start(t) - t, Duration::from_micros(500));
    }

    #[test]
    fn budget_caps_hedges_per_window() {
        let (h, s) = hedger(HedgePolicy { max_percent: 10, ..HedgePolicy::default() });
        let t0 = h.epoch;
        for _ in 0..1000 {
            h.start(t0);
        }
        let granted = (0..1000).filter(|_| h.try_hedge()).count() as u64;
        assert_eq!(granted, 1000 * 10 / 100 + BURST);
        assert_eq!(s.hedged.load(Relaxed), granted);
        assert_eq!(s.over_budget.load(Relaxed), 1000 - granted);
        // The next window starts afresh (only the burst until reads arrive).
        h.start(t0 + REFRESH);
        let next = (0..1000).filter(|_| h.try_hedge()).count() as u64;
        assert_eq!(next, BURST);
    }

    #[test]
    fn off_and_reload() {
        let (h, s) = hedger(HedgePolicy { enabled: false, ..HedgePolicy::default() });
        assert!(!h.eligible(4096));
        assert_eq!(s.threshold_us.load(Relaxed), 0);
        h.set_policy(HedgePolicy { min: Duration::from_millis(2), ..HedgePolicy::default() });
        assert!(h.eligible(4096) && !h.eligible(HEDGE_MAX_BYTES + 1));
        assert_eq!(s.threshold_us.load(Relaxed), 2000);
        assert_eq!(h.policy().min, Duration::from_millis(2));
    }
}

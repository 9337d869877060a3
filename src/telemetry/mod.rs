//! Counters and latency histograms, recorded on the data path with relaxed atomics (a few
//! nanoseconds per I/O) and read by the status command and the metrics endpoint.
//!
//! The histogram is log-linear: four buckets per power of two of nanoseconds, from 1 µs to about
//! 69 s, so a percentile read from it is within 12.5 % of the truth and recording is a couple of
//! bit operations. Prometheus gets the cumulative counts at every power of two (they nest exactly).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Values below 2^MIN_OCTAVE ns (1.024 µs) share bucket 0.
const MIN_OCTAVE: u32 = 10;
/// Values at or above 2^MAX_OCTAVE ns (68.7 s) share the last bucket.
const MAX_OCTAVE: u32 = 36;
const SUB_BITS: u32 = 2;
const SUBS: usize = 1 << SUB_BITS;
pub const BUCKETS: usize = (MAX_OCTAVE - MIN_OCTAVE) as usize * SUBS + 1;

pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_ns: AtomicU64::new(0) }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < 1 << MIN_OCTAVE {
        return 0;
    }
    let octave = 63 - ns.leading_zeros();
    if octave >= MAX_OCTAVE {
        return BUCKETS - 1;
    }
    let sub = ((ns >> (octave - SUB_BITS)) as usize) & (SUBS - 1);
    (octave - MIN_OCTAVE) as usize * SUBS + sub + 1
}

/// Exclusive upper bound of bucket `i` in nanoseconds (u64::MAX for the last).
pub fn bucket_upper_ns(i: usize) -> u64 {
    if i == 0 {
        return 1 << MIN_OCTAVE;
    }
    if i >= BUCKETS - 1 {
        return u64::MAX;
    }
    let octave = MIN_OCTAVE + ((i - 1) / SUBS) as u32;
    let sub = ((i - 1) % SUBS) as u64;
    (1u64 << octave) + (sub + 1) * (1u64 << (octave - SUB_BITS))
}

impl LatencyHistogram {
    pub fn record_ns(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn snapshot(&self) -> HistSnapshot {
        HistSnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_ns: self.sum_ns.load(Relaxed),
        }
    }
}

/// A copy of a histogram's counts; two of them subtract to give the latencies of an interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistSnapshot {
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
}

impl HistSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// What happened between `older` and `self`.
    pub fn since(&self, older: &HistSnapshot) -> HistSnapshot {
        if older.buckets.len() != self.buckets.len() {
            return self.clone();
        }
        HistSnapshot {
            buckets: self.buckets.iter().zip(&older.buckets).map(|(a, b)| a.saturating_sub(*b)).collect(),
            sum_ns: self.sum_ns.saturating_sub(older.sum_ns),
        }
    }

    /// The `q` quantile (0..=1) in microseconds: the midpoint of the bucket holding it; None when
    /// nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let lower = if i == 0 { 0 } else { bucket_upper_ns(i - 1) };
                let upper = if i == BUCKETS - 1 { lower.saturating_mul(2) } else { bucket_upper_ns(i) };
                return Some((lower as f64 + upper as f64) / 2.0 / 1000.0);
            }
        }
        None
    }

    /// Cumulative counts at every power-of-two boundary (in seconds), for a Prometheus histogram:
    /// `(le_seconds, count ≤ le)`, ending before +Inf.
    pub fn cumulative_octaves(&self) -> Vec<(f64, u64)> {
        let mut out = Vec::new();
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate().take(BUCKETS - 1) {
            seen += n;
            // Bucket 0 ends at 2^MIN_OCTAVE; then every SUBS-th bucket ends on a power of two.
            if i % SUBS == 0 {
                out.push((bucket_upper_ns(i) as f64 / 1e9, seen));
            }
        }
        out
    }
}

#[derive(Default)]
pub struct OpStats {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub latency: LatencyHistogram,
}

impl OpStats {
    pub fn record(&self, bytes: u64, ok: bool, started: Instant) {
        self.latency.record_ns(started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64);
        self.ops.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        if !ok {
            self.errors.fetch_add(1, Relaxed);
        }
    }

    pub fn snapshot(&self) -> OpSnapshot {
        OpSnapshot {
            ops: self.ops.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency: self.latency.snapshot(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct OpSnapshot {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: HistSnapshot,
}

impl OpSnapshot {
    pub fn since(&self, older: &OpSnapshot) -> OpSnapshot {
        OpSnapshot {
            ops: self.ops.saturating_sub(older.ops),
            bytes: self.bytes.saturating_sub(older.bytes),
            errors: self.errors.saturating_sub(older.errors),
            latency: self.latency.since(&older.latency),
        }
    }
}

/// Operations up to this size have their latency compared between devices
/// (`mirror::slow`); larger ones are dominated by transfer time.
pub const SMALL_OP_BYTES: usize = 128 << 10;

/// Running totals of one kind of operation's latency; the watch reads them as deltas.
#[derive(Debug, Default)]
pub struct LatencySum {
    total_us: AtomicU64,
    count: AtomicU64,
}

impl LatencySum {
    pub fn record(&self, took: Duration) {
        self.total_us.fetch_add(took.as_micros() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn read(&self) -> (u64, u64) {
        (self.total_us.load(Relaxed), self.count.load(Relaxed))
    }
}

/// Read and write latency of one device.
#[derive(Debug, Default)]
pub struct DeviceLatency {
    pub read: LatencySum,
    pub write: LatencySum,
}

/// Times `f` into `sum` when the operation is small enough to compare. Only completions count:
/// a caller that may drop the future early (a race) must not use this, or the mean would keep
/// only the operations that were fast enough to finish.
pub async fn timed<T>(sum: &LatencySum, len: usize, f: impl std::future::Future<Output = T>) -> T {
    if len > SMALL_OP_BYTES {
        return f.await;
    }
    let t = Instant::now();
    let out = f.await;
    sum.record(t.elapsed());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_are_contiguous_and_increasing() {
        let mut prev = 0;
        for i in 0..BUCKETS - 1 {
            let upper = bucket_upper_ns(i);
            assert!(upper > prev, "bucket {i}");
            prev = upper;
        }
        assert_eq!(bucket_upper_ns(BUCKETS - 1), u64::MAX);
    }

    proptest! {
        #[test]
        fn a_value_lands_in_the_bucket_that_bounds_it(ns in 0u64..(1 << 40)) {
            let i = bucket_of(ns);
            let lower = if i == 0 { 0 } else { bucket_upper_ns(i - 1) };
            prop_assert!(ns >= lower && ns < bucket_upper_ns(i), "ns {} bucket {} [{}, {})", ns, i, lower, bucket_upper_ns(i));
        }

        #[test]
        fn quantiles_are_within_an_eighth(values in proptest::collection::vec(2_000u64..10_000_000_000, 1..200), q in 0.0f64..=1.0) {
            let h = LatencyHistogram::default();
            for v in &values {
                h.record_ns(*v);
            }
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
            let exact_us = sorted[rank - 1] as f64 / 1000.0;
            let got = h.snapshot().quantile_us(q).unwrap();
            prop_assert!((got - exact_us).abs() <= exact_us / 8.0 + 0.001, "q {} exact {} got {}", q, exact_us, got);
        }
    }

    #[test]
    fn cumulative_octaves_nest_and_count_everything_below() {
        let h = LatencyHistogram::default();
        for ns in [500, 1_500, 3_000, 1_000_000, 2_000_000_000] {
            h.record_ns(ns);
        }
        let s = h.snapshot();
        let oct = s.cumulative_octaves();
        assert!(oct.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        let at = |le: f64| oct.iter().find(|(b, _)| (*b - le).abs() < le * 1e-9).map(|(_, n)| *n).unwrap();
        assert_eq!(at(1024e-9), 1);
        assert_eq!(at(2048e-9), 2);
        assert_eq!(at(4096e-9), 3);
        assert_eq!(at(1_048_576e-9), 4);
        assert_eq!(oct.last().unwrap().1, 5);
        assert_eq!(s.count(), 5);
        let later = {
            h.record_ns(3_000);
            h.snapshot()
        };
        assert_eq!(later.since(&s).count(), 1);
    }
}

//! The knobs an operator may turn while the engine serves (SIGHUP, the admin socket): one value,
//! one place that validates it, one setter ([`super::MirrorVolume::set_tunables`]). A new live key
//! is a field here, its default and check in [`Tunables::validate`], and its use in the engine.

use super::hedge::HedgePolicy;
use super::slow::{SlowCachePolicy, SlowPolicy};
use std::time::Duration;

/// md leaves a hung member to the SCSI/NVMe layer's 30 s timeouts and retries; a local SSD that
/// has not answered one request in 10 s is broken, and the backing holds every byte.
pub const DEFAULT_CACHE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunables {
    /// Rebuild rate while clients are doing I/O (md's speed_limit_min).
    pub rebuild_min_bytes_per_s: u64,
    /// Rebuild rate while idle (md's speed_limit_max); u64::MAX for unlimited.
    pub rebuild_max_bytes_per_s: u64,
    /// Cache I/O errors tolerated (each repaired or absorbed) before the cache set is failed and
    /// the engine runs degraded. md ejects a member after 20 corrected read errors.
    pub read_error_budget: u32,
    /// When a slow cache read is also sent to the backing (`hedge_*` config keys).
    pub hedge: HedgePolicy,
    /// How long a cache device may take to answer one read or write (a flush gets
    /// [`crate::device::layer::cache_time_limit::FLUSH_TIMEOUT_FACTOR`] times as long) before the
    /// whole set is given up on (`cache_timeout_ms`); zero for no limit.
    pub cache_timeout: Duration,
    /// When a cache member slower than the backing is routed around or failed
    /// (`slow_cache_*` config keys).
    pub slow: SlowPolicy,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            rebuild_min_bytes_per_s: 100 << 20,
            rebuild_max_bytes_per_s: u64::MAX,
            read_error_budget: 20,
            hedge: HedgePolicy::default(),
            cache_timeout: DEFAULT_CACHE_TIMEOUT,
            slow: SlowPolicy::default(),
        }
    }
}

/// A rejected value: the config key it comes from, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected {
    pub key: &'static str,
    pub reason: String,
}

fn reject(key: &'static str, reason: String) -> Result<(), Rejected> {
    Err(Rejected { key, reason })
}

impl Tunables {
    /// The config keys these knobs are set by (all live: SIGHUP applies them).
    pub const KEYS: [&'static str; 13] = [
        "rebuild_min_bytes_per_s",
        "rebuild_max_bytes_per_s",
        "read_error_budget",
        "hedge_reads",
        "hedge_min_us",
        "hedge_max_us",
        "hedge_max_percent",
        "cache_timeout_ms",
        "slow_cache_policy",
        "slow_cache_factor",
        "slow_cache_min_latency_us",
        "slow_cache_window_ms",
        "slow_cache_fail_after_ms",
    ];

    pub fn validate(&self) -> Result<(), Rejected> {
        let (min, max) = (self.rebuild_min_bytes_per_s, self.rebuild_max_bytes_per_s);
        if min == 0 || min == u64::MAX {
            return reject(
                "rebuild_min_bytes_per_s",
                "must be a positive rate, or a busy disk would never be rebuilt".into(),
            );
        }
        if max < min {
            return reject("rebuild_max_bytes_per_s", format!("{max} is below rebuild_min_bytes_per_s ({min})"));
        }
        let (h_min, h_max) = (self.hedge.min.as_micros(), self.hedge.max.as_micros());
        if !(10..=10_000_000).contains(&h_min) {
            return reject("hedge_min_us", format!("{h_min} is outside 10..=10000000"));
        }
        if !(h_min..=10_000_000).contains(&h_max) {
            return reject("hedge_max_us", format!("{h_max} is outside hedge_min_us ({h_min}) ..= 10000000"));
        }
        if self.hedge.max_percent > 100 {
            return reject("hedge_max_percent", format!("{} is above 100", self.hedge.max_percent));
        }
        let t = self.cache_timeout.as_millis();
        if t != 0 && !(100..=3_600_000).contains(&t) {
            return reject("cache_timeout_ms", format!("{t} is outside 100..=3600000 (or 0 for no limit)"));
        }
        self.validate_slow()
    }

    fn validate_slow(&self) -> Result<(), Rejected> {
        let s = &self.slow;
        if !(2..=1000).contains(&s.factor) {
            return reject("slow_cache_factor", format!("{} is outside 2..=1000", s.factor));
        }
        let floor = s.min_latency.as_micros();
        if !(100..=10_000_000).contains(&floor) {
            return reject("slow_cache_min_latency_us", format!("{floor} is outside 100..=10000000"));
        }
        let w = s.window.as_millis();
        if !(500..=3_600_000).contains(&w) {
            return reject("slow_cache_window_ms", format!("{w} is outside 500..=3600000"));
        }
        let f = s.fail_after.as_millis();
        if s.mode == SlowCachePolicy::Fail && !(w..=86_400_000).contains(&f) {
            return reject(
                "slow_cache_fail_after_ms",
                format!(
                    "{f} is outside slow_cache_window_ms ({w}) ..= 86400000: a member must be slow before it is failed"
                ),
            );
        }
        Ok(())
    }

    /// The keys whose values differ between `self` and `other`.
    pub fn changed_keys(&self, other: &Tunables) -> Vec<&'static str> {
        let (a, b) = (self, other);
        let differs = [
            a.rebuild_min_bytes_per_s != b.rebuild_min_bytes_per_s,
            a.rebuild_max_bytes_per_s != b.rebuild_max_bytes_per_s,
            a.read_error_budget != b.read_error_budget,
            a.hedge.enabled != b.hedge.enabled,
            a.hedge.min != b.hedge.min,
            a.hedge.max != b.hedge.max,
            a.hedge.max_percent != b.hedge.max_percent,
            a.cache_timeout != b.cache_timeout,
            a.slow.mode != b.slow.mode,
            a.slow.factor != b.slow.factor,
            a.slow.min_latency != b.slow.min_latency,
            a.slow.window != b.slow.window,
            a.slow.fail_after != b.slow.fail_after,
        ];
        Self::KEYS.iter().zip(differs).filter(|(_, d)| *d).map(|(k, _)| *k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_check_names_its_key() {
        assert_eq!(Tunables::default().validate(), Ok(()));
        let bad = |f: fn(&mut Tunables)| {
            let mut t = Tunables::default();
            f(&mut t);
            t.validate().unwrap_err().key
        };
        assert_eq!(bad(|t| t.rebuild_min_bytes_per_s = 0), "rebuild_min_bytes_per_s");
        assert_eq!(bad(|t| t.rebuild_max_bytes_per_s = 1), "rebuild_max_bytes_per_s");
        assert_eq!(bad(|t| t.hedge.min = Duration::from_micros(5)), "hedge_min_us");
        assert_eq!(bad(|t| t.hedge.max = Duration::from_micros(20)), "hedge_max_us");
        assert_eq!(bad(|t| t.hedge.max_percent = 101), "hedge_max_percent");
        assert_eq!(bad(|t| t.cache_timeout = Duration::from_millis(50)), "cache_timeout_ms");
        assert_eq!(bad(|t| t.slow.factor = 1), "slow_cache_factor");
        assert_eq!(bad(|t| t.slow.min_latency = Duration::from_micros(10)), "slow_cache_min_latency_us");
        assert_eq!(bad(|t| t.slow.window = Duration::from_millis(10)), "slow_cache_window_ms");
        assert_eq!(bad(|t| t.slow.fail_after = Duration::from_millis(600)), "slow_cache_fail_after_ms");
        let t = Tunables { cache_timeout: Duration::ZERO, ..Tunables::default() };
        assert_eq!(t.validate(), Ok(()));
        assert_eq!(Tunables::default().changed_keys(&t), vec!["cache_timeout_ms"]);
    }
}

//! Gray failure: a cache member that still answers, but slower than the backing it is meant to
//! be faster than. md reacts to errors only, and hedging learns its threshold from the cache's
//! own p99, so an SSD that is uniformly slow would serve every read slowly and nothing would say
//! so. This watch compares each member's latency with the backing's and routes around it.
//!
//! ```text
//!            slower by `factor` (and above `min_latency`) for `window`
//!   normal ─────────────────────────────────────────────────────────► slow ── reads of its stripes
//!     ▲                                                                │ │    go to the backing;
//!     └──────────── not slower for `window` (writes, probes) ──────────┘ │    writes continue
//!                                                                        │ slow for `fail_after`
//!                                                                        ▼ (policy `fail`)
//!                                                            the set is failed (degraded)
//! ```
//!
//! What is compared: the mean latency of small operations (≤ [`SMALL_OP_BYTES`]: a database's
//! reads and writes, not the rebuild's region copies) over each tick, reads with reads and
//! writes with writes, per striped member (counted in [`crate::device::layer::striped`]). A
//! healthy mirror sends no reads to the backing, so when a member looks suspect and the backing
//! has no recent reads, the watch reads a few blocks of the backing itself; and a member whose
//! reads are routed away is probed the same way, so it is seen to recover even when no client
//! writes reach it.
//!
//! Writes: a slow member still receives every write (it stays a valid mirror, so recovering
//! needs no rebuild), and a client write waits for both devices. So a slow member slows writes
//! to its own latency, bounded by `cache_timeout_ms` per operation (past that the whole set is
//! failed); policy `fail` takes a member that stays slow for `fail_after` out of the write path
//! too. Acknowledging before the cache write finished would need the region invalidated durably
//! first, which costs a metadata write on the path it is meant to speed up.

use super::{Inner, Set};
use crate::device::{AlignedBuf, BlockDevice};
pub use crate::telemetry::{DeviceLatency, LatencySum, SMALL_OP_BYTES};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Operations per tick needed on both sides before their means are compared.
const MIN_SAMPLES: u64 = 4;
/// Reads the watch issues to measure a device it has no fresh figure for.
const PROBES: usize = 4;
const PROBE_BYTES: usize = 4096;
/// A backing figure older than this is measured again before it is used.
const REFERENCE_MAX_AGE: Duration = Duration::from_secs(30);

/// `slow_cache_policy`: what a member found slow gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowCachePolicy {
    /// Not watched.
    Off,
    /// Reads routed to the backing while slow; never failed for it.
    Route,
    /// Routed, then the set failed once slow for `fail_after`.
    Fail,
}

impl SlowCachePolicy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Self::Off),
            "route" => Some(Self::Route),
            "fail" => Some(Self::Fail),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Route => "route",
            Self::Fail => "fail",
        }
    }
}

/// The `slow_cache_*` configuration keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlowPolicy {
    pub mode: SlowCachePolicy,
    /// A member is slower when its mean exceeds the backing's by this factor…
    pub factor: u32,
    /// …and is above this: below it a network disk cannot answer faster anyway.
    pub min_latency: Duration,
    /// Slower (or recovered) for this long before the state changes.
    pub window: Duration,
    /// Policy `fail`: slow for this long fails the set.
    pub fail_after: Duration,
}

impl Default for SlowPolicy {
    fn default() -> Self {
        SlowPolicy {
            mode: SlowCachePolicy::Fail,
            factor: 2,
            min_latency: Duration::from_millis(1),
            window: Duration::from_secs(30),
            fail_after: Duration::from_secs(600),
        }
    }
}

impl SlowPolicy {
    /// How often the watch looks: a tenth of the window, within 100 ms – 1 s.
    pub fn tick(&self) -> Duration {
        (self.window / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// A mean from a [`LatencySum`]'s deltas: over the last tick, or over as many ticks as it took
/// to see [`MIN_SAMPLES`] operations (a slow device answers few), up to `max_age`.
#[derive(Debug, Default)]
struct Delta {
    last: (u64, u64),
    since: Option<Instant>,
}

impl Delta {
    fn mean_us(&mut self, sum: &LatencySum, now: Instant, max_age: Duration) -> Option<f64> {
        let cur = sum.read();
        let (us, n) = (cur.0.wrapping_sub(self.last.0), cur.1.wrapping_sub(self.last.1));
        let since = *self.since.get_or_insert(now);
        if n < MIN_SAMPLES && now.duration_since(since) < max_age {
            return None;
        }
        self.last = cur;
        self.since = Some(now);
        (n >= MIN_SAMPLES).then(|| us as f64 / n as f64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Normal,
    Slow,
    Failed,
}

impl MemberState {
    pub const ALL: [MemberState; 3] = [MemberState::Normal, MemberState::Slow, MemberState::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Slow => "slow",
            Self::Failed => "failed",
        }
    }
}

/// What status and metrics show of one member: its state and the last means compared.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemberView {
    pub state: MemberState,
    pub read_latency_us: Option<f64>,
    pub write_latency_us: Option<f64>,
    pub backing_read_latency_us: Option<f64>,
    pub backing_write_latency_us: Option<f64>,
    /// Changes of state (normal → slow, slow → normal, slow → failed) since the daemon started.
    pub transitions_total: u64,
}

/// The watch's output, for status and metrics.
#[derive(Debug, Default)]
pub struct SlowStats {
    pub members: Mutex<Vec<MemberView>>,
    /// The watch's probe reads of the backing (kept apart from the client's: see `Watch`).
    pub backing_probes: LatencySum,
    /// Reads of valid regions sent to the backing because a member they touch is slow.
    pub routed_reads: AtomicU64,
    /// Backing latency, counted by the engine's reads and writes of it.
    pub backing: DeviceLatency,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Slower,
    NotSlower,
    Unknown,
}

/// Member vs backing, reads with reads and writes with writes; slower in either is slower.
fn verdict(member: [Option<f64>; 2], backing: [Option<f64>; 2], p: &SlowPolicy) -> Verdict {
    let mut v = Verdict::Unknown;
    for (m, b) in member.into_iter().zip(backing) {
        let (Some(m), Some(b)) = (m, b) else { continue };
        if m > b * f64::from(p.factor) && m > p.min_latency.as_micros() as f64 {
            return Verdict::Slower;
        }
        v = Verdict::NotSlower;
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transition {
    BecameSlow,
    Recovered,
    Fail,
}

/// One member's state machine, driven by a verdict per tick. Ticks without a verdict neither
/// confirm nor break a run of evidence.
#[derive(Debug, Default)]
struct Tracker {
    slow_since: Option<Instant>,
    /// The start of the current run of evidence for the other state.
    evidence_since: Option<Instant>,
}

impl Tracker {
    fn observe(&mut self, now: Instant, v: Verdict, p: &SlowPolicy) -> Option<Transition> {
        let against = match (self.slow_since.is_some(), v) {
            (_, Verdict::Unknown) => return self.maybe_fail(now, p),
            (false, Verdict::Slower) | (true, Verdict::NotSlower) => true,
            _ => false,
        };
        if !against {
            self.evidence_since = None;
            return self.maybe_fail(now, p);
        }
        let since = *self.evidence_since.get_or_insert(now);
        if now.duration_since(since) < p.window {
            return self.maybe_fail(now, p);
        }
        self.evidence_since = None;
        if self.slow_since.take().is_some() {
            return Some(Transition::Recovered);
        }
        self.slow_since = Some(now);
        Some(Transition::BecameSlow)
    }

    fn maybe_fail(&self, now: Instant, p: &SlowPolicy) -> Option<Transition> {
        let slow_for = now.duration_since(self.slow_since?);
        (p.mode == SlowCachePolicy::Fail && slow_for >= p.fail_after).then_some(Transition::Fail)
    }
}

/// The watch's memory between ticks, for the set it is watching.
#[derive(Default)]
pub(super) struct Watch {
    set_uuid: [u8; 16],
    trackers: Vec<Tracker>,
    member_deltas: Vec<[Delta; 2]>,
    backing_deltas: [Delta; 2],
    /// The backing's last figures and when they were taken, for ticks where it had no operations.
    backing_ref: [Option<(f64, Instant)>; 2],
    /// The backing's reads by the watch's own probes: what a routed member's probes are judged
    /// against, so idle reads are compared with idle reads, not with reads under client load.
    backing_probe_delta: Delta,
    rng: u64,
    /// The policy was on at the last look: turning it off clears what it had routed (once, so
    /// `off` also leaves alone what it never set).
    was_on: bool,
}

impl Watch {
    /// Starts over for a set it has not seen (a new or replaced set: nothing carries over).
    pub(super) fn follow(&mut self, uuid: [u8; 16], members: usize) -> bool {
        if self.set_uuid == uuid && self.trackers.len() == members {
            return false;
        }
        self.set_uuid = uuid;
        self.trackers = (0..members).map(|_| Tracker::default()).collect();
        self.member_deltas = (0..members).map(|_| Default::default()).collect();
        true
    }

    /// The backing's means this tick, falling back to a recent figure.
    pub(super) fn backing_means(&mut self, b: &DeviceLatency, now: Instant, max_age: Duration) -> [Option<f64>; 2] {
        let [r, w] = &mut self.backing_deltas;
        let fresh = [r.mean_us(&b.read, now, max_age), w.mean_us(&b.write, now, max_age)];
        let mut out = [None; 2];
        for i in 0..2 {
            if let Some(m) = fresh[i] {
                self.backing_ref[i] = Some((m, now));
            }
            out[i] = self.backing_ref[i].filter(|(_, at)| now.duration_since(*at) < REFERENCE_MAX_AGE).map(|(m, _)| m);
        }
        out
    }

    /// The mean of the watch's own backing probes since its last figure.
    pub(super) fn backing_probe_mean(&mut self, sum: &LatencySum, now: Instant, max_age: Duration) -> Option<f64> {
        self.backing_probe_delta.mean_us(sum, now, max_age)
    }

    pub(super) fn member_means(
        &mut self,
        i: usize,
        m: &DeviceLatency,
        now: Instant,
        max_age: Duration,
    ) -> [Option<f64>; 2] {
        let [r, w] = &mut self.member_deltas[i];
        [r.mean_us(&m.read, now, max_age), w.mean_us(&m.write, now, max_age)]
    }

    pub(super) fn observe(
        &mut self,
        i: usize,
        now: Instant,
        member: [Option<f64>; 2],
        backing: [Option<f64>; 2],
        p: &SlowPolicy,
    ) -> Option<Transition> {
        self.trackers[i].observe(now, verdict(member, backing, p), p)
    }

    /// Whether the member's reads look slow enough that the backing's figure is worth measuring.
    pub(super) fn suspect(member: [Option<f64>; 2], p: &SlowPolicy) -> bool {
        member.iter().flatten().any(|&m| m > p.min_latency.as_micros() as f64)
    }

    /// A random block-aligned offset below `limit` for a probe read.
    pub(super) fn probe_offset(&mut self, limit: u64) -> u64 {
        // xorshift: probes need spread, not quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        if self.rng == 0 {
            self.rng = 0x9e37_79b9_7f4a_7c15;
        }
        let blocks = (limit / PROBE_BYTES as u64).max(1);
        (self.rng % blocks) * PROBE_BYTES as u64
    }
}

/// Reads [`PROBES`] blocks of `dev` below `limit` at once, recording their latency into `sum`
/// when given. Errors are not this watch's business (the read and error paths see them); they
/// are just not timed.
pub(super) async fn probe<D: BlockDevice>(dev: &D, limit: u64, sum: Option<&LatencySum>, watch: &Mutex<Watch>) {
    if limit < PROBE_BYTES as u64 {
        return;
    }
    let offsets: Vec<u64> = {
        let mut w = watch.lock().expect("watch poisoned");
        (0..PROBES).map(|_| w.probe_offset(limit - PROBE_BYTES as u64 + 1)).collect()
    };
    let reads = offsets.into_iter().map(|at| async move {
        let t = Instant::now();
        let (_, r) = dev.read(at, AlignedBuf::uninit_for_fill(PROBE_BYTES)).await;
        if let (Ok(()), Some(sum)) = (r, sum) {
            sum.record(t.elapsed());
        }
    });
    crate::device::join::join_all(reads.collect()).await;
}

/// Looks at the attached set every [`SlowPolicy::tick`] until the engine closes.
pub(super) async fn watch_loop<B: BlockDevice, C: BlockDevice>(inner: Arc<Inner<B, C>>) {
    loop {
        tokio::time::sleep(inner.tunables().slow.tick()).await;
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        inner.slow_tick(Instant::now()).await;
    }
}

impl<B: BlockDevice, C: BlockDevice> Inner<B, C> {
    /// One look: each member's means against the backing's, state changes applied, then the
    /// probes whose figures the next look needs.
    pub(super) async fn slow_tick(&self, now: Instant) {
        let p = self.tunables().slow;
        let Some(set) = self.cache_now() else { return };
        let Some((members, backing, transitions)) = self.slow_look(&set, &p, now) else { return };
        for (i, t) in transitions.iter().enumerate() {
            if let Some(t) = t {
                self.apply_transition(&set, i, *t, members[i], backing, &p);
            }
        }
        self.update_views(|i, v| {
            v.read_latency_us = members[i][0];
            v.write_latency_us = members[i][1];
            v.backing_read_latency_us = backing[0];
            v.backing_write_latency_us = backing[1];
        });
        self.probe_for_next_tick(&set, &members, backing, &p).await;
    }

    /// The figures of this tick and the transitions they cause; None with the policy off.
    #[allow(clippy::type_complexity)]
    fn slow_look(
        &self,
        set: &Set<C>,
        p: &SlowPolicy,
        now: Instant,
    ) -> Option<(Vec<[Option<f64>; 2]>, [Option<f64>; 2], Vec<Option<Transition>>)> {
        let n = set.dev.members().len();
        let mut watch = self.slow_watch.lock().expect("watch poisoned");
        if watch.follow(set.uuid, n) {
            self.reset_views(n);
        }
        if p.mode == SlowCachePolicy::Off {
            if std::mem::take(&mut watch.was_on) && set.slow_members.swap(0, Ordering::Relaxed) != 0 {
                tracing::info!("slow_cache_policy = off: every cache member serves reads again");
                self.update_views(|_, v| v.state = MemberState::Normal);
            }
            return None;
        }
        watch.was_on = true;
        // Evidence may take a few ticks to gather, but never longer than half a window.
        let max_age = p.window / 2;
        let members: Vec<[Option<f64>; 2]> = set
            .dev
            .members()
            .iter()
            .enumerate()
            .map(|(i, m)| watch.member_means(i, m.latency(), now, max_age))
            .collect();
        let backing = watch.backing_means(&self.stats.slow.backing, now, max_age);
        let probed = watch.backing_probe_mean(&self.stats.slow.backing_probes, now, max_age);
        let routed = set.slow_members.load(Ordering::Relaxed);
        let transitions = (0..n)
            .map(|i| {
                // A routed member is only read by probes: judge them against the backing's probes.
                let reference = match probed {
                    Some(r) if routed & (1 << i) != 0 => [Some(r), backing[1]],
                    _ => backing,
                };
                watch.observe(i, now, members[i], reference, p)
            })
            .collect();
        Some((members, backing, transitions))
    }

    fn apply_transition(
        &self,
        set: &Arc<Set<C>>,
        i: usize,
        t: Transition,
        member: [Option<f64>; 2],
        backing: [Option<f64>; 2],
        p: &SlowPolicy,
    ) {
        let (read_us, write_us, backing_read_us, backing_write_us) = (member[0], member[1], backing[0], backing[1]);
        let state = match t {
            Transition::BecameSlow => {
                set.slow_members.fetch_or(1 << i, Ordering::Relaxed);
                tracing::warn!(
                    member = i,
                    ?read_us,
                    ?write_us,
                    ?backing_read_us,
                    ?backing_write_us,
                    factor = p.factor,
                    window_ms = p.window.as_millis() as u64,
                    "cache member slower than the backing: its reads go to the backing; it keeps every write"
                );
                MemberState::Slow
            }
            Transition::Recovered => {
                set.slow_members.fetch_and(!(1 << i), Ordering::Relaxed);
                tracing::info!(
                    member = i,
                    ?read_us,
                    ?write_us,
                    ?backing_read_us,
                    "cache member is fast again: it serves reads"
                );
                MemberState::Normal
            }
            Transition::Fail => {
                let why = format!(
                    "cache member {i} slower than the backing for {} s (slow_cache_policy = fail)",
                    p.fail_after.as_secs()
                );
                tracing::error!("{why}; failing the cache set");
                self.fail_set(set, &why);
                MemberState::Failed
            }
        };
        self.update_views(|j, v| {
            if j == i {
                v.state = state;
                v.transitions_total += 1;
            }
        });
    }

    /// A routed member gets no client reads, and a healthy mirror sends none to the backing: the
    /// figures the next look needs are read here.
    async fn probe_for_next_tick(
        &self,
        set: &Arc<Set<C>>,
        members: &[[Option<f64>; 2]],
        backing: [Option<f64>; 2],
        p: &SlowPolicy,
    ) {
        let slow = set.slow_members.load(Ordering::Relaxed);
        let suspect = members.iter().any(|m| Watch::suspect(*m, p));
        let outage = self.backing.in_outage();
        if backing[0].is_none() && suspect && !outage {
            probe(&self.backing, self.data_bytes, Some(&self.stats.slow.backing.read), &self.slow_watch).await;
        }
        if slow == 0 {
            return;
        }
        // The routed members and the backing, probed the same way at the same moment. The
        // members' probes are timed into their own figures by their time-limit layer.
        let members = set.dev.members().iter().enumerate().filter(|(i, _)| slow & (1 << i) != 0);
        let member_probes = members.map(|(_, m)| probe(m, set.dev.member_data_bytes(), None, &self.slow_watch));
        let backing_probe = async {
            if !outage {
                probe(&self.backing, self.data_bytes, Some(&self.stats.slow.backing_probes), &self.slow_watch).await;
            }
        };
        tokio::join!(crate::device::join::join_all(member_probes.collect()), backing_probe);
    }

    fn reset_views(&self, n: usize) {
        let mut v = self.stats.slow.members.lock().expect("views poisoned");
        let old = std::mem::take(&mut *v);
        *v = (0..n)
            .map(|i| MemberView {
                state: MemberState::Normal,
                read_latency_us: None,
                write_latency_us: None,
                backing_read_latency_us: None,
                backing_write_latency_us: None,
                transitions_total: old.get(i).map_or(0, |o| o.transitions_total),
            })
            .collect();
    }

    fn update_views(&self, f: impl Fn(usize, &mut MemberView)) {
        for (i, v) in self.stats.slow.members.lock().expect("views poisoned").iter_mut().enumerate() {
            f(i, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SlowPolicy {
        SlowPolicy {
            mode: SlowCachePolicy::Fail,
            factor: 2,
            min_latency: Duration::from_micros(500),
            window: Duration::from_secs(10),
            fail_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn verdict_needs_both_the_factor_and_the_floor() {
        let p = policy();
        assert_eq!(verdict([Some(5000.0), None], [Some(1500.0), None], &p), Verdict::Slower);
        assert_eq!(verdict([Some(2000.0), None], [Some(1500.0), None], &p), Verdict::NotSlower);
        // Both fast: 4× slower, but below the floor.
        assert_eq!(verdict([Some(400.0), None], [Some(100.0), None], &p), Verdict::NotSlower);
        // Slow writes alone count.
        assert_eq!(verdict([Some(10.0), Some(9000.0)], [Some(1000.0), Some(1000.0)], &p), Verdict::Slower);
        assert_eq!(verdict([Some(9000.0), None], [None, Some(1000.0)], &p), Verdict::Unknown);
    }

    #[test]
    fn a_member_is_slow_only_after_a_whole_window_and_recovers_the_same_way() {
        let p = policy();
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut t = Tracker::default();
        assert_eq!(t.observe(s(0), Verdict::Slower, &p), None);
        assert_eq!(t.observe(s(5), Verdict::Slower, &p), None);
        // One good tick breaks the run.
        assert_eq!(t.observe(s(6), Verdict::NotSlower, &p), None);
        assert_eq!(t.observe(s(7), Verdict::Slower, &p), None);
        // Unknown ticks neither confirm nor break.
        assert_eq!(t.observe(s(12), Verdict::Unknown, &p), None);
        assert_eq!(t.observe(s(17), Verdict::Slower, &p), Some(Transition::BecameSlow));
        assert_eq!(t.observe(s(20), Verdict::NotSlower, &p), None);
        assert_eq!(t.observe(s(25), Verdict::Slower, &p), None);
        assert_eq!(t.observe(s(26), Verdict::NotSlower, &p), None);
        assert_eq!(t.observe(s(36), Verdict::NotSlower, &p), Some(Transition::Recovered));
        assert_eq!(t.observe(s(37), Verdict::NotSlower, &p), None);
    }

    #[test]
    fn policy_fail_fails_a_member_slow_past_the_limit_and_route_never_does() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        for (mode, expect) in [(SlowCachePolicy::Fail, Some(Transition::Fail)), (SlowCachePolicy::Route, None)] {
            let p = SlowPolicy { mode, ..policy() };
            let mut t = Tracker::default();
            t.observe(s(0), Verdict::Slower, &p);
            assert_eq!(t.observe(s(10), Verdict::Slower, &p), Some(Transition::BecameSlow));
            assert_eq!(t.observe(s(69), Verdict::Slower, &p), None);
            assert_eq!(t.observe(s(70), Verdict::Unknown, &p), expect);
        }
    }

    #[test]
    fn backing_figures_fall_back_to_a_recent_one() {
        let mut w = Watch::default();
        let b = DeviceLatency::default();
        let now = Instant::now();
        for _ in 0..4 {
            b.read.record(Duration::from_micros(1000));
        }
        let age = Duration::from_secs(5);
        assert_eq!(w.backing_means(&b, now, age), [Some(1000.0), None]);
        assert_eq!(w.backing_means(&b, now + Duration::from_secs(1), age), [Some(1000.0), None]);
        assert_eq!(w.backing_means(&b, now + REFERENCE_MAX_AGE, age), [None, None]);
    }

    #[test]
    fn a_slow_device_s_few_samples_are_gathered_over_several_ticks() {
        let mut d = Delta::default();
        let sum = LatencySum::default();
        let now = Instant::now();
        let age = Duration::from_secs(5);
        assert_eq!(d.mean_us(&sum, now, age), None);
        for i in 1..=4u64 {
            sum.record(Duration::from_millis(100));
            let got = d.mean_us(&sum, now + Duration::from_secs(i), age);
            assert_eq!(got, (i == 4).then_some(100_000.0));
        }
        // Too few within max_age: dropped, and counting starts over.
        sum.record(Duration::from_millis(100));
        assert_eq!(d.mean_us(&sum, now + Duration::from_secs(10), age), None);
        assert_eq!(d.mean_us(&sum, now + Duration::from_secs(11), age), None);
    }
}

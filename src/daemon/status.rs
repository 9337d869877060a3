//! The status report: built by the daemon, sent as JSON over the admin socket, and rendered for
//! people by `superdisk status`. One structure for both, so `--json` and the table never disagree.

use crate::telemetry::{HistSnapshot, OpSnapshot};
use serde::{Deserialize, Serialize};
use std::fmt::Write;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The build identifier (`handover::BuildInfo::build`): which of two builds of one version runs.
    #[serde(default)]
    pub build: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// plain (no cache configured), healthy, rebuilding, degraded, or verifying.
    pub mode: String,
    pub export: ExportStatus,
    /// Rates and latency percentiles cover this many most recent seconds.
    pub window_secs: f64,
    pub devices: Vec<DeviceStatus>,
    pub cache: Option<CacheStatus>,
    pub rebuild: Option<RebuildStatus>,
    pub verify: Option<VerifyStatus>,
    pub connections: ConnectionStatus,
    /// What clients asked for, end to end (the NBD front end).
    pub requests: Vec<OpStatus>,
    pub backing_io: BackingIoStatus,
    /// The ublk device, when `ublk = true`.
    #[serde(default)]
    pub ublk: Option<UblkStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UblkStatus {
    pub path: String,
    pub dev_id: u32,
    /// `UBLK_F_*` flags the kernel gave the device.
    pub flags: u64,
    /// Whether the daemon re-issues in-flight requests after a crash (USER_RECOVERY_REISSUE).
    pub recovery: bool,
    /// This run resumed a device a previous process left (crash or upgrade).
    pub recovered: bool,
    pub queue_depth: u16,
    pub queues: Vec<UblkQueueStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UblkQueueStatus {
    pub queue: u16,
    pub in_flight: u64,
    pub requests_total: u64,
    pub errors_total: u64,
}

/// Stalls of the backing (`backing_*` config keys).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackingIoStatus {
    pub in_outage: bool,
    pub stalled_ops: u64,
    pub outages_total: u64,
    pub timeouts_total: u64,
    pub read_retries_total: u64,
    pub deadline_errors_total: u64,
    /// Flushes and FUA writes the backing failed.
    #[serde(default)]
    pub flush_failures_total: u64,
    /// Set while durability is lost: FLUSH and FUA writes fail until `clear-flush-error`.
    #[serde(default)]
    pub durability_lost: Option<crate::device::layer::backing_guard::DurabilityLoss>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportStatus {
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// `backing`, `cache0`, `cache1`, …
    pub name: String,
    pub role: String,
    pub path: String,
    pub size_bytes: u64,
    /// backing: ok or erroring; cache: in-sync, rebuilding or failed.
    pub health: String,
    pub ops: Vec<OpStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OpStatus {
    pub op: String,
    pub iops: f64,
    pub bytes_per_s: f64,
    pub ops_total: u64,
    pub bytes_total: u64,
    pub errors_total: u64,
    /// Over the window; None when nothing happened in it.
    pub latency_us: Option<Percentiles>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheStatus {
    pub reads_from_cache_total: u64,
    pub reads_from_backing_total: u64,
    /// Share of read bytes served by the cache since start (1.0 when no read has happened yet).
    pub cache_read_share: f64,
    pub repairs_total: u64,
    pub errors_total: u64,
    pub failures_total: u64,
    pub read_error_budget: u32,
    pub hedge: HedgeStatus,
    pub timeout: CacheTimeoutStatus,
    /// What the last attach decided about the cache set, and why (a reuse, or a format and why).
    #[serde(default)]
    pub attach_decision: String,
    /// Each member against the backing (`slow_cache_*`): state and the last means compared.
    #[serde(default)]
    pub members: Vec<crate::mirror::slow::MemberView>,
    #[serde(default)]
    pub slow_policy: String,
    /// Reads of valid regions answered by the backing because a member they touch is slow.
    #[serde(default)]
    pub routed_reads_total: u64,
}

/// The cache devices' time limit (`cache_timeout_ms`) and what it caught.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheTimeoutStatus {
    /// 0: no limit.
    pub timeout_ms: u64,
    /// Cache operations that ran past the limit (each failed the cache set it belonged to).
    pub timed_out_total: u64,
    /// Operations given up on that their device has not answered yet; while any are outstanding
    /// on a device it cannot be attached again.
    pub abandoned_now: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HedgeStatus {
    pub enabled: bool,
    /// The threshold in force (learnt from the cache's recent p99, within hedge_min/max_us).
    pub threshold_us: u64,
    pub hedged_total: u64,
    pub backing_won_total: u64,
    pub over_budget_total: u64,
    pub max_percent: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RebuildStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes_per_s: u64,
    pub eta_secs: Option<u64>,
    pub paused: bool,
    pub min_bytes_per_s: u64,
    /// None: unlimited.
    pub max_bytes_per_s: Option<u64>,
    pub invalid_regions: u64,
    pub region_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyStatus {
    pub running: bool,
    pub done_regions: u64,
    pub total_regions: u64,
    pub last: Option<VerifyOutcome>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyOutcome {
    pub repair: bool,
    pub mismatches: u64,
    pub error: Option<String>,
    pub finished_secs_ago: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub active: u64,
    pub accepted_total: u64,
    pub refused_total: u64,
}

/// Window figures from two snapshots `secs` apart, totals from the newer.
pub fn op_status(op: &str, now: &OpSnapshot, then: &OpSnapshot, secs: f64) -> OpStatus {
    let d = now.since(then);
    let secs = secs.max(1e-3);
    OpStatus {
        op: op.into(),
        iops: d.ops as f64 / secs,
        bytes_per_s: d.bytes as f64 / secs,
        ops_total: now.ops,
        bytes_total: now.bytes,
        errors_total: now.errors,
        latency_us: percentiles(&d.latency),
    }
}

fn percentiles(h: &HistSnapshot) -> Option<Percentiles> {
    Some(Percentiles {
        p50: h.quantile_us(0.5)?,
        p90: h.quantile_us(0.9)?,
        p99: h.quantile_us(0.99)?,
        p999: h.quantile_us(0.999)?,
    })
}

pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 1000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else {
        format!("{us:.0}µs")
    }
}

pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The table `superdisk status` prints.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    render_head(&mut o, s);
    if let Some(r) = &s.rebuild {
        render_rebuild(&mut o, r);
    }
    if let Some(v) = &s.verify {
        render_verify(&mut o, v);
    }
    render_backing(&mut o, &s.backing_io);
    if let Some(u) = &s.ublk {
        render_ublk(&mut o, u);
    }
    if let Some(c) = &s.cache {
        render_cache(&mut o, c);
    }
    render_table(&mut o, s);
    o
}

fn render_head(o: &mut String, s: &Status) {
    let _ = writeln!(
        o,
        "superdisk {} (pid {}, up {}): {}",
        s.version,
        s.pid,
        human_duration(s.uptime_secs),
        s.mode.to_uppercase()
    );
    let _ = writeln!(
        o,
        "export {:?}: {}{}; connections {} active, {} accepted, {} refused",
        s.export.name,
        human_bytes(s.export.size_bytes as f64),
        if s.export.read_only { " read-only" } else { "" },
        s.connections.active,
        s.connections.accepted_total,
        s.connections.refused_total
    );
}

fn render_ublk(o: &mut String, u: &UblkStatus) {
    let in_flight: u64 = u.queues.iter().map(|q| q.in_flight).sum();
    let requests: u64 = u.queues.iter().map(|q| q.requests_total).sum();
    let errors: u64 = u.queues.iter().map(|q| q.errors_total).sum();
    let _ = writeln!(
        o,
        "ublk {}: {} queues x depth {}, {} in flight, {} requests, {} errors; crash recovery {}{}",
        u.path,
        u.queues.len(),
        u.queue_depth,
        in_flight,
        requests,
        errors,
        if u.recovery { "on" } else { "OFF (this kernel cannot re-issue)" },
        if u.recovered { "; resumed from the previous process" } else { "" }
    );
}

fn render_rebuild(o: &mut String, r: &RebuildStatus) {
    if r.total_bytes > 0 && (r.done_bytes < r.total_bytes || r.invalid_regions > 0) {
        let pct = 100.0 * r.done_bytes as f64 / r.total_bytes as f64;
        let _ = writeln!(
            o,
            "rebuild: {:.1}% ({} of {}), {}/s, ETA {}{}",
            pct,
            human_bytes(r.done_bytes as f64),
            human_bytes(r.total_bytes as f64),
            human_bytes(r.rate_bytes_per_s as f64),
            r.eta_secs.map_or("unknown".into(), human_duration),
            if r.paused { " — PAUSED" } else { "" }
        );
    } else if r.paused {
        let _ = writeln!(o, "rebuild: paused (nothing to copy)");
    }
    let _ = writeln!(
        o,
        "rebuild limits: min {}/s, max {}",
        human_bytes(r.min_bytes_per_s as f64),
        r.max_bytes_per_s.map_or("unlimited".into(), |m| format!("{}/s", human_bytes(m as f64)))
    );
}

fn render_verify(o: &mut String, v: &VerifyStatus) {
    if v.running {
        let _ = writeln!(o, "verify: running, {} of {} regions", v.done_regions, v.total_regions);
    }
    if let Some(l) = &v.last {
        let _ = match &l.error {
            Some(e) => writeln!(o, "last verify: failed: {e} ({} ago)", human_duration(l.finished_secs_ago)),
            None => writeln!(
                o,
                "last verify: {} mismatches{} ({} ago)",
                l.mismatches,
                if l.repair { ", repaired" } else { "" },
                human_duration(l.finished_secs_ago)
            ),
        };
    }
}

fn render_backing(o: &mut String, io: &BackingIoStatus) {
    if let Some(l) = &io.durability_lost {
        let _ = writeln!(
            o,
            "BACKING FLUSH FAILED: {} (at unix time {}). Writes acknowledged before it may be lost; every FLUSH and \
             FUA write fails until `superdisk clear-flush-error` (after the filesystem on top was checked)",
            l.cause, l.since_unix_s
        );
    }
    if io.in_outage || io.outages_total > 0 {
        let _ = writeln!(
            o,
            "backing stalls: {}{} outages, {} timeouts, {} read retries, {} requests failed at the deadline",
            if io.in_outage { format!("NOW ({} operations stalled); ", io.stalled_ops) } else { String::new() },
            io.outages_total,
            io.timeouts_total,
            io.read_retries_total,
            io.deadline_errors_total
        );
    }
}

fn render_members(o: &mut String, c: &CacheStatus) {
    let us = |v: Option<f64>| v.map_or("-".to_string(), human_us);
    for (i, m) in c.members.iter().enumerate() {
        let _ = writeln!(
            o,
            "cache member {i}: {}{} (reads {}, writes {}; backing reads {}, writes {}){}",
            m.state.as_str().to_uppercase(),
            if m.state == crate::mirror::slow::MemberState::Slow { ", its reads go to the backing" } else { "" },
            us(m.read_latency_us),
            us(m.write_latency_us),
            us(m.backing_read_latency_us),
            us(m.backing_write_latency_us),
            if m.transitions_total > 0 { format!(", {} state changes", m.transitions_total) } else { String::new() },
        );
    }
    if c.routed_reads_total > 0 || !c.slow_policy.is_empty() {
        let _ =
            writeln!(o, "slow members: policy {}, {} reads routed to the backing", c.slow_policy, c.routed_reads_total);
    }
}

fn render_cache(o: &mut String, c: &CacheStatus) {
    if !c.attach_decision.is_empty() {
        let _ = writeln!(o, "cache set: {}", c.attach_decision);
    }
    render_members(o, c);
    let _ = writeln!(
        o,
        "cache reads: {:.1}% of read bytes from the cache; {} repairs, {} errors (budget {}), {} failures",
        100.0 * c.cache_read_share,
        c.repairs_total,
        c.errors_total,
        c.read_error_budget,
        c.failures_total
    );
    let h = &c.hedge;
    let _ = if h.enabled {
        writeln!(
            o,
            "hedged reads: after {}; {} hedged, {} answered by the backing, {} over budget ({}%)",
            human_us(h.threshold_us as f64),
            h.hedged_total,
            h.backing_won_total,
            h.over_budget_total,
            h.max_percent
        )
    } else {
        writeln!(o, "hedged reads: off")
    };
    let t = &c.timeout;
    let limit = if t.timeout_ms == 0 { "none".to_string() } else { format!("{} ms", t.timeout_ms) };
    let _ = writeln!(
        o,
        "cache time limit: {limit}; {} timed out, {} given up and not yet answered",
        t.timed_out_total, t.abandoned_now
    );
}

/// Rates and latencies per request kind and device, then each device's health.
fn render_table(o: &mut String, s: &Status) {
    let _ = writeln!(o, "\nlast {:.0}s:", s.window_secs);
    let _ = writeln!(
        o,
        "{:<10} {:<7} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8}",
        "device", "op", "IOPS", "throughput", "p50", "p99", "p99.9", "errors"
    );
    let mut line = |name: &str, op: &OpStatus| {
        let (p50, p99, p999) = op
            .latency_us
            .as_ref()
            .map_or(("-".into(), "-".into(), "-".into()), |l| (human_us(l.p50), human_us(l.p99), human_us(l.p999)));
        let _ = writeln!(
            o,
            "{:<10} {:<7} {:>9.0} {:>9}/s {:>8} {:>8} {:>8} {:>8}",
            name,
            op.op,
            op.iops,
            human_bytes(op.bytes_per_s),
            p50,
            p99,
            p999,
            op.errors_total
        );
    };
    for op in &s.requests {
        if op.ops_total > 0 {
            line("clients", op);
        }
    }
    for d in &s.devices {
        for op in &d.ops {
            if op.ops_total > 0 {
                line(&d.name, op);
            }
        }
    }
    let _ = writeln!(o);
    for d in &s.devices {
        let _ = writeln!(o, "{:<10} {:<10} {:>10}  {}", d.name, d.health, human_bytes(d.size_bytes as f64), d.path);
    }
}

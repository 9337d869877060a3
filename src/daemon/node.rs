//! [`Node`]: what the daemon's control paths (admin socket, metrics, SIGHUP, the service
//! manager's status line) share, and what they can do to the running volume.

use super::logging;
use super::status;
use super::{Mirror, Plain, Reloader};
use crate::config::ServeConfig;
use crate::device::layer::instrumented::DeviceStats;
use crate::mirror::Mode;
use crate::server::stats::{ReqOp, ServerStats};
use crate::telemetry::OpSnapshot;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How far back status rates and percentiles look.
pub(super) const WINDOW: Duration = Duration::from_secs(10);
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Sample {
    pub(super) at: Instant,
    /// (device name, path) → its counters then.
    pub(super) devices: Vec<((String, String), [OpSnapshot; 4])>,
    pub(super) requests: Vec<OpSnapshot>,
}

pub(super) struct LastVerify {
    pub(super) outcome: Result<Vec<(u64, u64)>, String>,
    pub(super) repair: bool,
    pub(super) finished: Instant,
}

/// What the daemon's control paths (admin socket, metrics, SIGHUP, mode monitor) share.
pub struct Node {
    pub(super) started: Instant,
    /// The same moment on the wall clock, taken once so the metric never moves.
    pub(super) started_unix: std::time::SystemTime,
    pub(super) cfg: Mutex<ServeConfig>,
    pub(super) export_size_bytes: u64,
    pub backing: Arc<DeviceStats>,
    pub server: Arc<ServerStats>,
    pub mirror: Option<Arc<Mirror>>,
    /// The volume when no cache is configured.
    pub(super) plain: Option<Arc<Plain>>,
    /// Timeouts, retries and outages of backing I/O (the guard around the backing).
    pub backing_io: Arc<crate::device::BackingIoStats>,
    /// The attached (or last failed) cache set's members; emptied by `cache remove`.
    pub(super) caches: Mutex<Vec<Arc<DeviceStats>>>,
    pub(super) samples: Mutex<VecDeque<Sample>>,
    pub(super) verify_task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub(super) last_verify: Mutex<Option<LastVerify>>,
    pub(super) reload: Option<Reloader>,
    /// Where an operator's `upgrade` goes: the serving loop, which runs the handover.
    pub(super) upgrades: Mutex<Option<tokio::sync::mpsc::UnboundedSender<super::handover::UpgradeRequest>>>,
    /// The ublk device while one is served.
    pub ublk: Mutex<Option<Arc<crate::ublk::UblkInfo>>>,
}
/// The volume a node controls.
pub(super) enum VolumeRef {
    Mirror(Arc<Mirror>),
    Plain(Arc<Plain>),
}

/// The counters the daemon made while opening the devices.
pub(super) struct Parts {
    pub backing: Arc<DeviceStats>,
    pub server: Arc<ServerStats>,
    pub caches: Vec<Arc<DeviceStats>>,
}

impl Node {
    pub(super) fn new(
        volume: VolumeRef,
        parts: Parts,
        export_size_bytes: u64,
        cfg: ServeConfig,
        reload: Option<Reloader>,
    ) -> Node {
        let (mirror, plain, backing_io) = match volume {
            VolumeRef::Mirror(m) => {
                let io = m.stats().backing_io.clone();
                (Some(m), None, io)
            }
            VolumeRef::Plain(p) => {
                let io = p.io_stats();
                (None, Some(p), io)
            }
        };
        Node {
            backing_io,
            started: Instant::now(),
            started_unix: std::time::SystemTime::now(),
            cfg: Mutex::new(cfg),
            export_size_bytes,
            backing: parts.backing,
            server: parts.server,
            mirror,
            plain,
            caches: Mutex::new(parts.caches),
            samples: Mutex::new(VecDeque::new()),
            verify_task: tokio::sync::Mutex::new(None),
            last_verify: Mutex::new(None),
            reload,
            upgrades: Mutex::new(None),
            ublk: Mutex::new(None),
        }
    }

    /// Device operations in flight that nobody waits for (see `MirrorVolume::device_ops_in_doubt`).
    pub(super) fn device_ops_in_doubt(&self) -> u64 {
        match (&self.mirror, &self.plain) {
            (Some(m), _) => m.device_ops_in_doubt(),
            (None, Some(p)) => p.device_ops_in_doubt(),
            (None, None) => 0,
        }
    }

    /// Writes back dirty data on every device before a handover pauses the clients.
    pub(super) async fn write_back(&self) -> std::io::Result<()> {
        use crate::volume::Volume;
        match (&self.mirror, &self.plain) {
            (Some(m), _) => m.write_back().await,
            (None, Some(p)) => p.flush().await,
            (None, None) => Ok(()),
        }
    }

    /// The operator's `upgrade BINARY`: answered once the new binary serves, or with why not.
    pub(super) async fn upgrade(&self, binary: std::path::PathBuf) -> Result<String, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let tx = self.upgrades.lock().expect("upgrade channel poisoned").clone();
        let tx = tx.ok_or("this daemon cannot be upgraded in place (it serves one client on stdin/stdout)")?;
        tx.send(super::handover::UpgradeRequest { binary, reply }).map_err(|_| "the daemon is stopping".to_owned())?;
        answer.await.map_err(|_| "the daemon stopped before the upgrade finished".to_owned())?
    }

    pub fn config(&self) -> ServeConfig {
        self.cfg.lock().expect("config poisoned").clone()
    }

    pub fn mode_name(&self) -> &'static str {
        let Some(m) = &self.mirror else {
            return "plain";
        };
        match m.mode() {
            Mode::Healthy if self.verify_running() => "verifying",
            Mode::Healthy => "healthy",
            Mode::Degraded => "degraded",
            Mode::Rebuilding => "rebuilding",
        }
    }

    pub(super) fn verify_running(&self) -> bool {
        self.mirror.as_ref().is_some_and(|m| m.stats().verify_running.load(Relaxed) == 1)
    }

    pub fn cache_members(&self) -> Vec<Arc<DeviceStats>> {
        self.caches.lock().expect("caches poisoned").clone()
    }

    pub(super) fn set_cache_members(&self, members: Vec<Arc<DeviceStats>>) {
        *self.caches.lock().expect("caches poisoned") = members;
    }

    /// Every device, backing first.
    pub fn devices(&self) -> Vec<(Arc<DeviceStats>, &'static str)> {
        let mut out = vec![(self.backing.clone(), "backing")];
        out.extend(self.cache_members().into_iter().map(|d| (d, "cache")));
        out
    }

    pub(super) fn take_sample(&self) -> Sample {
        Sample {
            at: Instant::now(),
            devices: self.devices().iter().map(|(d, _)| ((d.name.clone(), d.path.clone()), d.snapshot())).collect(),
            requests: ReqOp::ALL.iter().map(|op| self.server.request(*op).snapshot()).collect(),
        }
    }

    pub(super) fn record_sample(&self) {
        let s = self.take_sample();
        let mut q = self.samples.lock().expect("samples poisoned");
        q.push_back(s);
        while q.len() > 2 && q[1].at.elapsed() >= WINDOW {
            q.pop_front();
        }
    }

    pub fn health_of_cache(&self) -> &'static str {
        match self.mirror.as_ref().map(|m| m.mode()) {
            Some(Mode::Healthy) => "in-sync",
            Some(Mode::Rebuilding) => "rebuilding",
            _ => "failed",
        }
    }

    /// The operator's `clear-flush-error` (see `device::layer::backing_guard::Durability`).
    pub async fn clear_flush_error(&self) -> Result<String, String> {
        let Some(loss) = self.backing_io.durability.loss() else {
            return Ok("no flush error to clear: the backing has kept every flush".into());
        };
        let r = match (&self.mirror, &self.plain) {
            (Some(m), _) => m.clear_durability_loss().await,
            (None, Some(p)) => p.clear_durability_loss().await,
            (None, None) => return Err("no volume".into()),
        };
        r.map_err(|e| format!("cannot clear the flush error: {e}"))?;
        Ok(format!("flush error cleared ({}); FLUSH and FUA writes succeed again", loss.cause))
    }

    /// The STATUS= line for the service manager.
    pub(super) fn service_status(&self) -> String {
        if self.backing_io.durability.is_lost() {
            return "FLUSH FAILING: a backing flush failed, data may be lost; see `superdisk status`, then \
                    `superdisk clear-flush-error`"
                .into();
        }
        let mode = self.mode_name();
        if let (Some(m), "rebuilding") = (&self.mirror, mode) {
            let st = m.stats();
            let left = st.invalid_regions.load(Relaxed) * m.region_bytes();
            let total = st.rebuild_total_bytes.load(Relaxed).max(left);
            let rate = st.rebuild_rate_bytes_per_s.load(Relaxed);
            let pct = if total == 0 { 100.0 } else { 100.0 * (total - left) as f64 / total as f64 };
            let eta = if rate > 0 { status::human_duration(left.div_ceil(rate)) } else { "unknown".into() };
            return format!(
                "serving, rebuilding {pct:.1}% ({} left, {}/s, ETA {eta}){}",
                status::human_bytes(left as f64),
                status::human_bytes(rate as f64),
                if m.rebuild_paused() { ", paused" } else { "" }
            );
        }
        format!("serving, mode {mode}{}", self.slow_members_note())
    }

    /// `, cache member 1 slow (reads from the backing)` for the STATUS line.
    fn slow_members_note(&self) -> String {
        let Some(m) = &self.mirror else { return String::new() };
        let views = m.stats().slow.members.lock().expect("views poisoned").clone();
        let slow: Vec<String> = views
            .iter()
            .enumerate()
            .filter(|(_, v)| v.state == crate::mirror::slow::MemberState::Slow)
            .map(|(i, _)| i.to_string())
            .collect();
        if slow.is_empty() {
            return String::new();
        }
        format!(", cache member {} slow (reads from the backing)", slow.join(", "))
    }

    /// SIGHUP: re-reads the configuration and applies what can change while serving.
    pub fn reload(&self) {
        let Some(reload) = &self.reload else {
            tracing::warn!("SIGHUP: no configuration file to reload (started without --config)");
            return;
        };
        let new = match reload() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the configuration has an error; nothing changed");
                return;
            }
        };
        let mut cur = self.cfg.lock().expect("config poisoned");
        let changed = cur.changed_keys(&new);
        if changed.is_empty() {
            tracing::info!("SIGHUP: configuration reloaded; nothing changed");
            return;
        }
        let (live, restart): (Vec<&str>, Vec<&str>) = changed.iter().partition(|k| ServeConfig::is_live(k));
        let applied = live.join(", ");
        let restart = restart.join(", ");
        // Said before the level changes, so a quieter level does not swallow the news of itself.
        if !applied.is_empty() {
            tracing::info!(applied = %applied, "SIGHUP: configuration reloaded");
        }
        if !restart.is_empty() {
            tracing::warn!(keys = %restart, "SIGHUP: these changed keys take effect only after a restart");
        }
        if live.contains(&"log_level") {
            logging::set_level(&new.log_level);
            cur.log_level = new.log_level.clone();
        }
        if let Some(m) = &self.mirror {
            m.set_tunables(new.tunables.clone());
        }
        cur.tunables = new.tunables.clone();
    }
}

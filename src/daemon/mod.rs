//! The running daemon: opens the devices named by the config, builds the volume (plain, or the
//! mirror), and runs the NBD server, the admin socket, the metrics endpoint and the service-manager
//! notifications around it until SIGTERM. [`Node`] is the state they share.

pub mod control;
pub mod logging;
pub mod metrics;
pub mod status;

use crate::config::ServeConfig;
use crate::device::layer::injected_stall::{ReadStall, Stalled};
use crate::device::layer::instrumented::{DevOp, DeviceStats, Instrumented};
use crate::device::{FileDevice, OpenOptions};
use crate::mirror::{MirrorOptions, MirrorVolume, Mode};
use crate::nbd::ExportParams;
use crate::server::stats::{ReqOp, ServerStats};
use crate::server::{self, ServerConfig};
use crate::service::Notifier;
use crate::telemetry::OpSnapshot;
use crate::volume::{PlainVolume, Volume};
use status::{
    op_status, BackingIoStatus, CacheStatus, CacheTimeoutStatus, ConnectionStatus, DeviceStatus, ExportStatus,
    HedgeStatus, RebuildStatus, Status, VerifyOutcome, VerifyStatus,
};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub type AnyError = Box<dyn std::error::Error + Send + Sync>;
/// Every device the daemon opens is counted (and may have read stalls injected, for benchmarks).
pub type Dev = Instrumented<Stalled<FileDevice>>;
pub type Mirror = MirrorVolume<Dev, Dev>;
pub type Plain = PlainVolume<Dev>;
/// Re-reads the configuration (file plus the command line's overrides) for SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<ServeConfig, AnyError> + Send + Sync>;

/// How far back status rates and percentiles look.
const WINDOW: Duration = Duration::from_secs(10);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

struct Sample {
    at: Instant,
    /// (device name, path) → its counters then.
    devices: Vec<((String, String), [OpSnapshot; 4])>,
    requests: Vec<OpSnapshot>,
}

struct LastVerify {
    outcome: Result<Vec<(u64, u64)>, String>,
    repair: bool,
    finished: Instant,
}

/// What the daemon's control paths (admin socket, metrics, SIGHUP, mode monitor) share.
pub struct Node {
    started: Instant,
    cfg: Mutex<ServeConfig>,
    export_size_bytes: u64,
    pub backing: Arc<DeviceStats>,
    pub server: Arc<ServerStats>,
    pub mirror: Option<Arc<Mirror>>,
    /// The volume when no cache is configured.
    plain: Option<Arc<Plain>>,
    /// Timeouts, retries and outages of backing I/O (the guard around the backing).
    pub backing_io: Arc<crate::device::BackingIoStats>,
    /// The attached (or last failed) cache set's members; emptied by `cache remove`.
    caches: Mutex<Vec<Arc<DeviceStats>>>,
    samples: Mutex<VecDeque<Sample>>,
    verify_task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    last_verify: Mutex<Option<LastVerify>>,
    reload: Option<Reloader>,
}

/// Wraps `dev` in its counters, with the read stall `SUPERDISK_INJECT_READ_STALL` names for it.
fn instrument(name: &str, dev: FileDevice) -> Result<(Dev, Arc<DeviceStats>), AnyError> {
    let stats = device_stats(name, &dev);
    let mut stall = None;
    if let Some(spec) = std::env::var(ReadStall::ENV).ok().filter(|s| !s.is_empty()) {
        let (target, s) = ReadStall::parse(&spec)?;
        if target == name {
            tracing::warn!(device = name, spec = %spec, "INJECTING READ STALLS (benchmark/test only)");
            stall = Some(Arc::new(s));
        }
    }
    Ok((Instrumented::new(Stalled::new(dev, stall), stats.clone()), stats))
}

fn device_stats(name: &str, dev: &FileDevice) -> Arc<DeviceStats> {
    use crate::device::BlockDevice;
    Arc::new(DeviceStats::new(name, &dev.path().display().to_string(), dev.size_bytes()))
}

impl Node {
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

    fn verify_running(&self) -> bool {
        self.mirror.as_ref().is_some_and(|m| m.stats().verify_running.load(Relaxed) == 1)
    }

    pub fn cache_members(&self) -> Vec<Arc<DeviceStats>> {
        self.caches.lock().expect("caches poisoned").clone()
    }

    fn set_cache_members(&self, members: Vec<Arc<DeviceStats>>) {
        *self.caches.lock().expect("caches poisoned") = members;
    }

    /// Every device, backing first.
    pub fn devices(&self) -> Vec<(Arc<DeviceStats>, &'static str)> {
        let mut out = vec![(self.backing.clone(), "backing")];
        out.extend(self.cache_members().into_iter().map(|d| (d, "cache")));
        out
    }

    fn take_sample(&self) -> Sample {
        Sample {
            at: Instant::now(),
            devices: self.devices().iter().map(|(d, _)| ((d.name.clone(), d.path.clone()), d.snapshot())).collect(),
            requests: ReqOp::ALL.iter().map(|op| self.server.request(*op).snapshot()).collect(),
        }
    }

    fn record_sample(&self) {
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

    pub fn status(&self) -> Status {
        let now = self.take_sample();
        let (then_at, then_devices, then_requests) = {
            let q = self.samples.lock().expect("samples poisoned");
            match q.front() {
                Some(s) => (s.at, s.devices.clone(), s.requests.clone()),
                None => (self.started, Vec::new(), Vec::new()),
            }
        };
        let secs = now.at.duration_since(then_at).as_secs_f64();
        let zero = OpSnapshot::default();
        let cfg = self.config();
        let mut devices = Vec::new();
        for (d, role) in self.devices() {
            let key = (d.name.clone(), d.path.clone());
            let before = then_devices.iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone());
            let after = d.snapshot();
            let ops = DevOp::ALL
                .iter()
                .map(|op| {
                    let i = *op as usize;
                    op_status(op.name(), &after[i], before.as_ref().map_or(&zero, |b| &b[i]), secs)
                })
                .collect::<Vec<_>>();
            let health = if role == "backing" {
                // Errors within the window say the backing is in trouble now, not once.
                let errors_then = before.as_ref().map_or(0, |b| b.iter().map(|s| s.errors).sum::<u64>());
                if self.backing_io.in_outage.load(Relaxed) == 1 {
                    "stalled"
                } else if after.iter().map(|s| s.errors).sum::<u64>() > errors_then {
                    "erroring"
                } else {
                    "ok"
                }
            } else {
                self.health_of_cache()
            };
            devices.push(DeviceStatus {
                name: d.name.clone(),
                role: role.into(),
                path: d.path.clone(),
                size_bytes: d.size_bytes,
                health: health.into(),
                ops,
            });
        }
        let requests = ReqOp::ALL
            .iter()
            .enumerate()
            .map(|(i, op)| op_status(op.name(), &now.requests[i], then_requests.get(i).unwrap_or(&zero), secs))
            .collect();
        let (cache, rebuild, verify) = match &self.mirror {
            None => (None, None, None),
            Some(m) => {
                let st = m.stats();
                let tunables = m.tunables();
                let (from_cache, from_backing) =
                    (st.read_bytes_cache.load(Relaxed), st.read_bytes_backing.load(Relaxed));
                let total = from_cache + from_backing;
                let cache = CacheStatus {
                    reads_from_cache_total: st.reads_cache.load(Relaxed),
                    reads_from_backing_total: st.reads_backing.load(Relaxed),
                    cache_read_share: if total == 0 { 1.0 } else { from_cache as f64 / total as f64 },
                    repairs_total: st.repairs.load(Relaxed),
                    errors_total: st.cache_errors.load(Relaxed),
                    failures_total: st.cache_failures.load(Relaxed),
                    read_error_budget: tunables.read_error_budget,
                    hedge: HedgeStatus {
                        enabled: tunables.hedge.enabled,
                        threshold_us: st.hedge.threshold_us.load(Relaxed),
                        hedged_total: st.hedge.hedged.load(Relaxed),
                        backing_won_total: st.hedge.backing_won.load(Relaxed),
                        over_budget_total: st.hedge.over_budget.load(Relaxed),
                        max_percent: tunables.hedge.max_percent,
                    },
                    timeout: CacheTimeoutStatus {
                        timeout_ms: tunables.cache_timeout.as_millis() as u64,
                        timed_out_total: st.cache_io.timed_out.load(Relaxed),
                        abandoned_now: st.cache_io.abandoned_now.load(Relaxed),
                    },
                };
                let (min, max) = (tunables.rebuild_min_bytes_per_s, tunables.rebuild_max_bytes_per_s);
                let done = st.rebuild_done_bytes.load(Relaxed);
                let total = st.rebuild_total_bytes.load(Relaxed);
                let rate = st.rebuild_rate_bytes_per_s.load(Relaxed);
                let invalid = st.invalid_regions.load(Relaxed);
                let left = invalid * m.region_bytes();
                let rebuild = RebuildStatus {
                    done_bytes: done,
                    total_bytes: total,
                    rate_bytes_per_s: rate,
                    eta_secs: (rate > 0 && left > 0).then(|| left.div_ceil(rate)).or((left == 0).then_some(0)),
                    paused: m.rebuild_paused(),
                    min_bytes_per_s: min,
                    max_bytes_per_s: (max != u64::MAX).then_some(max),
                    invalid_regions: invalid,
                    region_bytes: m.region_bytes(),
                };
                let last = self.last_verify.lock().expect("verify poisoned").as_ref().map(|l| VerifyOutcome {
                    repair: l.repair,
                    mismatches: l.outcome.as_ref().map_or(0, |v| v.len() as u64),
                    error: l.outcome.as_ref().err().cloned(),
                    finished_secs_ago: l.finished.elapsed().as_secs(),
                });
                let verify = VerifyStatus {
                    running: self.verify_running(),
                    done_regions: st.verify_done_regions.load(Relaxed),
                    total_regions: st.verify_total_regions.load(Relaxed),
                    last,
                };
                (Some(cache), Some(rebuild), Some(verify))
            }
        };
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            mode: self.mode_name().into(),
            export: ExportStatus {
                name: cfg.export.clone(),
                size_bytes: self.export_size_bytes,
                read_only: cfg.read_only,
            },
            window_secs: secs,
            devices,
            cache,
            rebuild,
            verify,
            connections: ConnectionStatus {
                active: self.server.connections_active.load(Relaxed),
                accepted_total: self.server.connections_accepted.load(Relaxed),
                refused_total: self.server.connections_refused.load(Relaxed),
            },
            requests,
            backing_io: BackingIoStatus {
                in_outage: self.backing_io.in_outage.load(Relaxed) == 1,
                stalled_ops: self.backing_io.stalled_ops.load(Relaxed),
                outages_total: self.backing_io.outages.load(Relaxed),
                timeouts_total: self.backing_io.timeouts.load(Relaxed),
                read_retries_total: self.backing_io.retries.load(Relaxed),
                deadline_errors_total: self.backing_io.deadline_errors.load(Relaxed),
                flush_failures_total: self.backing_io.durability.failures(),
                durability_lost: self.backing_io.durability.loss(),
            },
        }
    }

    /// The operator's `clear-flush-error` (see `device::guard::Durability`).
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
    fn service_status(&self) -> String {
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
        format!("serving, mode {mode}")
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

/// Opens the devices, builds the volume and serves until SIGTERM/SIGINT. `on_ready` runs once
/// every listener is bound, with their addresses.
pub async fn serve(
    cfg: ServeConfig,
    reload: Option<Reloader>,
    on_ready: impl FnOnce(&[String]),
) -> Result<(), AnyError> {
    serve_with(cfg, reload, false, on_ready).await
}

/// [`serve`]; with `stdio`, one client on stdin/stdout instead of the listeners (`serve --stdio`).
pub async fn serve_with(
    cfg: ServeConfig,
    reload: Option<Reloader>,
    stdio: bool,
    on_ready: impl FnOnce(&[String]),
) -> Result<(), AnyError> {
    // Before any device opens: the first io_uring engine creates the arena with this size.
    if !crate::device::buf::set_registered_buffer_bytes(cfg.registered_buffer_bytes) {
        tracing::debug!("registered-buffer arena already exists (an earlier serve in this process); keeping its size");
    }
    // With a mirror the daemon writes metadata to the backing even for a read-only export.
    let backing_read_only = cfg.read_only && cfg.cache.is_empty();
    let dev = FileDevice::open(
        &cfg.backing,
        &OpenOptions { read_only: backing_read_only, direct: cfg.direct, engine: cfg.io_engine },
    )?;
    tracing::info!(
        backing = %cfg.backing.display(),
        engine = dev.engine_name(),
        registered_buffers = dev.registered_buffers(),
        direct = dev.is_direct(),
        block_device = dev.is_block_device(),
        "opened backing device"
    );
    let rotational = dev.rotational();
    let (dev, backing_stats) = instrument("backing", dev)?;
    let server_stats = Arc::new(ServerStats::default());
    let node = |mirror: Option<Arc<Mirror>>,
                plain: Option<Arc<Plain>>,
                caches: Vec<Arc<DeviceStats>>,
                backing_io: Arc<crate::device::BackingIoStats>,
                size: u64,
                cfg: &ServeConfig| {
        Arc::new(Node {
            backing_io,
            started: Instant::now(),
            cfg: Mutex::new(cfg.clone()),
            export_size_bytes: size,
            backing: backing_stats.clone(),
            server: server_stats.clone(),
            mirror,
            plain,
            caches: Mutex::new(caches),
            samples: Mutex::new(VecDeque::new()),
            verify_task: tokio::sync::Mutex::new(None),
            last_verify: Mutex::new(None),
            reload,
        })
    };
    if cfg.cache.is_empty() {
        let volume = PlainVolume::open_with_policy(dev, cfg.read_only, cfg.backing_io.clone())
            .await
            .map_err(|e| format!("{}: {e}", cfg.backing.display()))?;
        if volume.recovered_from_crash {
            tracing::warn!("the previous run did not shut down cleanly");
        }
        let volume = Arc::new(volume);
        let node = node(None, Some(volume.clone()), Vec::new(), volume.io_stats(), volume.size_bytes(), &cfg);
        return run(volume, node, &cfg, rotational, stdio, on_ready).await;
    }
    let (caches, members) = match open_caches(&cfg.cache, &cfg) {
        Ok(c) => c,
        Err(e) => {
            // A missing SSD (a migrated VM, a dead device) must not stop the disk: serve degraded.
            tracing::error!(error = %e, "cache device unavailable; the whole cache set is left out");
            (Vec::new(), Vec::new())
        }
    };
    let opts = MirrorOptions {
        tunables: cfg.tunables.clone(),
        take_over_foreign_cache: cfg.take_over_foreign_cache,
        metadata_interval_ms: cfg.metadata_interval_ms,
        backing_io: cfg.backing_io.clone(),
        ..MirrorOptions::default()
    };
    let volume =
        Arc::new(MirrorVolume::open(dev, caches, opts).await.map_err(|e| format!("{}: {e}", cfg.backing.display()))?);
    let node = node(Some(volume.clone()), None, members, volume.stats().backing_io.clone(), volume.size_bytes(), &cfg);
    run(volume, node, &cfg, rotational, stdio, on_ready).await
}

/// Opens cache devices as the config says (O_DIRECT, engine), each counted under `cacheN`.
pub fn open_caches(
    paths: &[std::path::PathBuf],
    cfg: &ServeConfig,
) -> Result<(Vec<Dev>, Vec<Arc<DeviceStats>>), AnyError> {
    let mut devs = Vec::new();
    let mut members = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let d =
            FileDevice::open(path, &OpenOptions { read_only: false, direct: cfg.cache_direct, engine: cfg.io_engine })
                .map_err(|e| format!("cache {}: {e}", path.display()))?;
        tracing::info!(
            cache = %path.display(),
            engine = d.engine_name(),
            registered_buffers = d.registered_buffers(),
            direct = d.is_direct(),
            "opened cache device"
        );
        let (d, s) = instrument(&format!("cache{i}"), d)?;
        members.push(s);
        devs.push(d);
    }
    Ok((devs, members))
}

/// Runs the NBD server over `volume` until SIGTERM/SIGINT, then flushes it.
async fn run<V: Volume>(
    volume: Arc<V>,
    node: Arc<Node>,
    cfg: &ServeConfig,
    rotational: bool,
    stdio: bool,
    on_ready: impl FnOnce(&[String]),
) -> Result<(), AnyError> {
    let export = ExportParams {
        name: cfg.export.clone(),
        description: cfg.description.clone(),
        size_bytes: volume.size_bytes(),
        read_only: cfg.read_only,
        fast_zero: volume.fast_zero(),
        rotational,
        min_block_bytes: 1,
        preferred_block_bytes: 4096,
        max_payload_bytes: 32 << 20,
    };
    let server_cfg = ServerConfig {
        listen: cfg.listen,
        unix: cfg.unix.clone(),
        unix_mode: cfg.unix_mode,
        export,
        max_connections: cfg.max_connections,
        max_inflight_bytes_per_connection: cfg.max_inflight_bytes_per_connection,
        handshake_timeout: Duration::from_secs(cfg.handshake_timeout_secs),
        idle_timeout: Duration::from_secs(cfg.idle_timeout_secs),
        zero_copy_reads: cfg.zero_copy_reads,
        idle_poll: Duration::from_micros(cfg.idle_poll_us),
        stats: node.server.clone(),
        policy: cfg.policy()?,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Install the handlers now, before READY=1: a SIGTERM that arrives between READY and the
    // first poll of a spawned task must still drain, not kill the process.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let notifier = Arc::new(Notifier::from_env());
    let stop_notifier = notifier.clone();
    tokio::spawn(async move {
        let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        tracing::info!(signal = name, "shutting down: finishing in-flight requests");
        // STOPPING while draining, so `systemctl status` says why the disk is going away.
        stop_notifier.notify("STOPPING=1\nSTATUS=draining: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let hup_node = node.clone();
    let hup_notifier = notifier.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            hup_notifier.notify("RELOADING=1");
            hup_node.reload();
            hup_notifier.notify("READY=1");
        }
    });
    spawn_monitor(node.clone(), notifier.clone(), stop_rx.clone());
    if let Some(path) = cfg.admin_socket.clone() {
        let listener = crate::admin::bind(&path)?;
        let admin_task = crate::admin::serve_admin(listener, path, node.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = admin_task.await {
                tracing::error!(error = %e, "admin socket failed");
            }
        });
    }
    if let Some(addr) = cfg.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("config key `metrics`: cannot listen on {addr}: {e}"))?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        tokio::spawn(metrics::serve(listener, node.clone(), stop_rx.clone()));
    }
    let ready_notifier = notifier.clone();
    let ready_node = node.clone();
    if stdio {
        // One client on stdin/stdout (as `nbdkit -s`), then shut down as on SIGTERM.
        let (r, w) = server::stdio_streams().map_err(|e| format!("--stdio: {e}"))?;
        tracing::info!("serving one client on stdin/stdout");
        ready_notifier.notify(&format!("READY=1\nSTATUS={} on stdio", ready_node.service_status()));
        on_ready(&["stdio".to_owned()]);
        server::serve_stream(r, w, volume.clone(), server::StreamConfig::from(&server_cfg), stop_rx).await;
    } else {
        server::run(volume.clone(), server_cfg, stop_rx, |endpoints| {
            // READY only now: recovery (superblock, bitmaps) is done and every listener is bound.
            ready_notifier.notify(&format!(
                "READY=1\nSTATUS={} on {}",
                ready_node.service_status(),
                endpoints.join(", ")
            ));
            on_ready(endpoints)
        })
        .await?;
    }
    if let Some(path) = &cfg.admin_socket {
        // The admin task also removes it, but the process may exit before that task runs.
        let _ = std::fs::remove_file(path);
    }
    notifier.notify("STOPPING=1\nSTATUS=flushing the devices");
    volume.shutdown().await.map_err(|e| format!("flush at shutdown failed: {e}"))?;
    tracing::info!("flushed; clean shutdown recorded");
    Ok(())
}

/// Logs mode changes, keeps the service manager's STATUS= line current, sends watchdog
/// keep-alives and samples the counters for status rates.
fn spawn_monitor(node: Arc<Node>, n: Arc<Notifier>, mut stop: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut last_mode: Option<&'static str> = None;
        let mut last_status = String::new();
        let mut last_sample = Instant::now() - SAMPLE_EVERY;
        // The watchdog keep-alive comes from this task, so a wedged runtime stops it and systemd
        // restarts the daemon.
        let watchdog = Notifier::watchdog_interval();
        let tick = watchdog.unwrap_or(Duration::from_millis(250)).min(Duration::from_millis(250));
        loop {
            if node.mirror.is_some() {
                let mode = node.mode_name();
                if last_mode != Some(mode) {
                    if last_mode == Some("rebuilding") && mode == "healthy" {
                        tracing::info!("rebuild complete");
                    }
                    tracing::info!("mode={mode}");
                    last_mode = Some(mode);
                }
            }
            let status = node.service_status();
            if status != last_status {
                n.notify(&format!("STATUS={status}"));
                last_status = status;
            }
            if watchdog.is_some() {
                n.notify("WATCHDOG=1");
            }
            if last_sample.elapsed() >= SAMPLE_EVERY {
                node.record_sample();
                last_sample = Instant::now();
            }
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
        }
    });
}

//! The running daemon: opens the devices named by the config, builds the volume (plain, or the
//! mirror), and runs the NBD server, the admin socket, the metrics endpoint and the service-manager
//! notifications around it until SIGTERM. [`Node`] is the state they share.
//!
//! ```text
//!  superdisk status|rebuild|cache|verify ──JSON line──▶ admin socket (Unix, 0600) ─┐
//!  Prometheus ──GET /metrics──▶ metrics endpoint (TCP, off by default) ────────────┤
//!  systemd ◀──READY/STATUS/WATCHDOG/STOPPING── monitor task (250 ms tick)          ├─▶ Node
//!  SIGHUP ──▶ re-read config, apply live keys, name the rest                       ┘
//! ```
//!
//! Status rates and percentiles cover the last ~10 s: the monitor samples every counter once a
//! second and `status` subtracts the oldest sample from now; Prometheus gets cumulative counters
//! and does its own `rate()`. Mode as reported: `plain` (no cache configured), `healthy`,
//! `rebuilding`, `degraded`, `verifying`; the systemd `STATUS=` line carries it, the rebuild's
//! progress and ETA, and "FLUSH FAILING" while the backing has lost a write-back.
//!
//! A verify runs as a background task (one at a time) so a client that goes away does not stop
//! it. `cache replace` opens and classifies the new devices before detaching the attached set, so
//! a refused replacement leaves the old set serving; `cache remove` persists the set's valid
//! bitmap first, so bringing the same set back resyncs only what changed meanwhile.

pub mod admin;
mod commands;
pub mod logging;
pub mod metrics;
mod node;
pub mod notify;
mod report;
pub mod status;

pub use node::Node;

use crate::config::ServeConfig;
use crate::device::layer::injected_stall::{ReadStall, Stalled};
use crate::device::layer::instrumented::{DeviceStats, Instrumented};
use crate::device::{FileDevice, OpenOptions};
use crate::mirror::{MirrorOptions, MirrorVolume};
use crate::nbd::ExportParams;
use crate::server::stats::ServerStats;
use crate::server::{self, ServerConfig};
use crate::volume::{PlainVolume, Volume};
use notify::Notifier;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub type AnyError = Box<dyn std::error::Error + Send + Sync>;
/// Every device the daemon opens is counted (and may have read stalls injected, for benchmarks).
pub type Dev = Instrumented<Stalled<FileDevice>>;
pub type Mirror = MirrorVolume<Dev, Dev>;
pub type Plain = PlainVolume<Dev>;
/// Re-reads the configuration (file plus the command line's overrides) for SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<ServeConfig, AnyError> + Send + Sync>;

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
    let node = |volume: node::VolumeRef, caches: Vec<Arc<DeviceStats>>, size: u64, cfg: &ServeConfig| {
        let parts = node::Parts { backing: backing_stats.clone(), server: server_stats.clone(), caches };
        Arc::new(Node::new(volume, parts, size, cfg.clone(), reload))
    };
    if cfg.cache.is_empty() {
        let volume = PlainVolume::open_with_policy(dev, cfg.read_only, cfg.backing_io.clone())
            .await
            .map_err(|e| format!("{}: {e}", cfg.backing.display()))?;
        if volume.recovered_from_crash {
            tracing::warn!("the previous run did not shut down cleanly");
        }
        let volume = Arc::new(volume);
        let node = node(node::VolumeRef::Plain(volume.clone()), Vec::new(), volume.size_bytes(), &cfg);
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
    let node = node(node::VolumeRef::Mirror(volume.clone()), members, volume.size_bytes(), &cfg);
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
    let server_cfg = server_config(cfg, &*volume, &node, rotational)?;
    let notifier = Arc::new(Notifier::from_env());
    let stop_rx = spawn_signal_handlers(&node, &notifier)?;
    spawn_monitor(node.clone(), notifier.clone(), stop_rx.clone());
    spawn_control(cfg, &node, &stop_rx).await?;
    let ready = |endpoints: &[String]| {
        // READY only now: recovery (superblock, bitmaps) is done and every listener is bound.
        notifier.notify(&format!("READY=1\nSTATUS={} on {}", node.service_status(), endpoints.join(", ")));
        on_ready(endpoints)
    };
    if stdio {
        // One client on stdin/stdout (as `nbdkit -s`), then shut down as on SIGTERM.
        let (r, w) = server::stdio_streams().map_err(|e| format!("--stdio: {e}"))?;
        tracing::info!("serving one client on stdin/stdout");
        ready(&["stdio".to_owned()]);
        server::serve_stream(r, w, volume.clone(), server::StreamConfig::from(&server_cfg), stop_rx).await;
    } else {
        server::run(volume.clone(), server_cfg, stop_rx, ready).await?;
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

/// What the NBD front end is told: the export as the volume presents it, and the config's limits.
fn server_config<V: Volume>(
    cfg: &ServeConfig,
    volume: &V,
    node: &Node,
    rotational: bool,
) -> Result<ServerConfig, AnyError> {
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
    Ok(ServerConfig {
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
    })
}

/// SIGTERM/SIGINT turn the returned watch true (drain and stop); SIGHUP reloads the config.
/// Installed before READY=1: a SIGTERM that arrives between READY and the first poll of a spawned
/// task must still drain, not kill the process.
fn spawn_signal_handlers(node: &Arc<Node>, notifier: &Arc<Notifier>) -> Result<watch::Receiver<bool>, AnyError> {
    use tokio::signal::unix::{signal, SignalKind};
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let stop_notifier = notifier.clone();
    tokio::spawn(async move {
        let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        tracing::info!(signal = name, "shutting down: finishing in-flight requests");
        // STOPPING while draining, so `systemctl status` says why the disk is going away.
        stop_notifier.notify("STOPPING=1\nSTATUS=draining: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let (hup_node, hup_notifier) = (node.clone(), notifier.clone());
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            hup_notifier.notify("RELOADING=1");
            hup_node.reload();
            hup_notifier.notify("READY=1");
        }
    });
    Ok(stop_rx)
}

/// The admin socket and the metrics endpoint, when configured.
async fn spawn_control(cfg: &ServeConfig, node: &Arc<Node>, stop: &watch::Receiver<bool>) -> Result<(), AnyError> {
    if let Some(path) = cfg.admin_socket.clone() {
        let listener = admin::bind(&path)?;
        let admin_task = admin::serve_admin(listener, path, node.clone(), stop.clone());
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
        tokio::spawn(metrics::serve(listener, node.clone(), stop.clone()));
    }
    Ok(())
}

/// Logs mode changes, keeps the service manager's STATUS= line current, sends watchdog
/// keep-alives and samples the counters for status rates.
fn spawn_monitor(node: Arc<Node>, n: Arc<Notifier>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut last_mode: Option<&'static str> = None;
        let mut last_status = String::new();
        let mut last_sample = Instant::now() - node::SAMPLE_EVERY;
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
            if last_sample.elapsed() >= node::SAMPLE_EVERY {
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

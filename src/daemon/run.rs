//! One serving run over an open volume: the NBD server, the control plane and the signals, until a
//! stop (drain, flush, clean) or an operator's upgrade (park, close cleanly, hand over).

use super::handover::upgrade::{self, Standby};
use super::handover::{Inherited, UpgradeRequest};
use super::monitor::spawn_monitor;
use super::notify::Notifier;
use super::{admin, metrics, AnyError, Node, Outcome};
use crate::config::ServeConfig;
use crate::device::OpenFile;
use crate::nbd::ExportParams;
use crate::server::handover::{Handover, ParkedConnection};
use crate::server::{self, Listeners, ServerConfig};
use crate::volume::Volume;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Sockets the previous process handed over (or this one kept across a failed handover).
#[derive(Default)]
pub(super) struct Inherit {
    pub nbd_tcp: Option<OwnedFd>,
    pub nbd_unix: Option<OwnedFd>,
    pub admin: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    pub connections: Vec<ParkedConnection>,
}

/// What `run` needs besides the volume and its node.
pub(super) struct Base<'a> {
    pub cfg: &'a ServeConfig,
    pub rotational: bool,
    pub stdio: bool,
    pub inherit: Inherit,
    /// The backing device's file, kept for a handover.
    pub backing_file: OpenFile,
}

/// A handover ready to go: the state, the successor waiting for it, and the operator's request.
pub(super) struct HandOver {
    state: Inherited,
    /// None when the handover failed before the successor could be asked: only resume.
    standby: Option<Standby>,
    reply: oneshot::Sender<Result<String, String>>,
    /// When the clients were paused (the pause they see ends when the successor serves).
    paused_at: Instant,
    notifier: Arc<Notifier>,
}

/// Copies of every socket a handover passes on, taken when they are bound.
struct Kept {
    nbd: (Option<OwnedFd>, Option<OwnedFd>),
    admin: Option<OwnedFd>,
    metrics: Option<OwnedFd>,
}

/// Serves `volume` until SIGTERM/SIGINT (then flushes it) or until an upgrade hands it over.
pub(super) async fn run<V: Volume>(
    volume: Arc<V>,
    node: Arc<Node>,
    base: Base<'_>,
    on_ready: impl FnOnce(&[String]),
) -> Result<Outcome, AnyError> {
    let Base { cfg, rotational, stdio, inherit, backing_file } = base;
    let handover = Arc::new(Handover::default());
    let server_cfg = server_config(cfg, &*volume, &node, rotational, &handover)?;
    let notifier = Arc::new(Notifier::from_env());
    let (stop_tx, stop_rx) = watch::channel(false);
    spawn_signal_handlers(&node, &notifier, stop_tx.clone(), stop_rx.clone())?;
    spawn_monitor(node.clone(), notifier.clone(), stop_rx.clone());
    let (admin_fd, metrics_fd) = spawn_control(cfg, &node, &stop_rx, &handover, inherit.admin, inherit.metrics).await?;
    let ready = |endpoints: &[String]| {
        let mut endpoints = endpoints.to_vec();
        endpoints.extend(node.ublk.lock().expect("ublk poisoned").as_ref().map(|u| u.path.clone()));
        // READY only now: recovery (superblock, bitmaps) is done, every listener is bound and
        // the ublk device serves.
        notifier.notify(&format!("READY=1\nSTATUS={} on {}", node.service_status(), endpoints.join(", ")));
        on_ready(&endpoints)
    };
    if stdio {
        // One client on stdin/stdout (as `nbdkit -s`), then shut down as on SIGTERM.
        let (r, w) = server::stdio_streams().map_err(|e| format!("--stdio: {e}"))?;
        tracing::info!("serving one client on stdin/stdout");
        ready(&["stdio".to_owned()]);
        server::serve_stream(r, w, volume.clone(), server::StreamConfig::from(&server_cfg), stop_rx).await;
        return stop(volume, cfg, &notifier).await;
    }
    let listeners = match (inherit.nbd_tcp, inherit.nbd_unix) {
        (None, None) => Listeners::bind(&server_cfg).await?,
        (tcp, unix) => Listeners::from_fds(tcp, unix)?,
    };
    let kept = Kept { nbd: listeners.dup_fds()?, admin: admin_fd, metrics: metrics_fd };
    // Last: from here on nothing fails before the serving loop, which stops or parks it.
    let ublk = match &cfg.ublk {
        Some(opts) => Some(start_ublk(&volume, opts, cfg, rotational, &node).await?),
        None => {
            let cookie = crate::ublk::cookie_for(&cfg.backing);
            let _ = tokio::task::spawn_blocking(move || crate::ublk::warn_if_left_waiting(cookie)).await;
            None
        }
    };
    let (upgrade_tx, upgrade_rx) = mpsc::unbounded_channel();
    *node.upgrades.lock().expect("upgrade channel poisoned") = Some(upgrade_tx);
    let serving = server::run(volume.clone(), server_cfg, listeners, inherit.connections, stop_rx, ready);
    let pending = serve_until_stopped(serving, upgrade_rx, &node, &handover, &stop_tx).await?;
    let Some((standby, reply)) = pending else {
        if let Some(u) = ublk {
            stop_ublk(u, &node, &notifier).await;
        }
        return stop(volume, cfg, &notifier).await;
    };
    let paused_at = handover.requested_at().unwrap_or_else(Instant::now);
    if let Some(u) = ublk {
        // Its requests in flight finish here; the rest wait in the kernel for the successor.
        *node.ublk.lock().expect("ublk poisoned") = None;
        u.park().await;
    }
    let drained_ms = paused_at.elapsed().as_millis();
    match park_volume(&*volume, &node).await {
        Ok(()) => {
            tracing::info!(
                drained_ms,
                closed_ms = paused_at.elapsed().as_millis(),
                "upgrade: clients parked, volume closed"
            );
            let state = gather(&node, backing_file, kept, &handover);
            Ok(Outcome::HandOver(Box::new(HandOver { state, standby: Some(standby), reply, paused_at, notifier })))
        }
        Err(e) => {
            // The volume is not cleanly closed: resume as after a crash (intent bits), here.
            standby.abandon_quietly();
            let _ = reply.send(Err(format!("{e}; the running daemon carries on")));
            let state = gather(&node, backing_file, kept, &handover);
            let (reply, _) = oneshot::channel();
            Ok(Outcome::HandOver(Box::new(HandOver { state, standby: None, reply, paused_at, notifier })))
        }
    }
}

/// Adds (or recovers) the ublk device; any failure stops the daemon with one line saying why.
async fn start_ublk<V: Volume>(
    volume: &Arc<V>,
    opts: &crate::ublk::UblkOptions,
    cfg: &ServeConfig,
    rotational: bool,
    node: &Node,
) -> Result<crate::ublk::UblkServer, AnyError> {
    let cookie = crate::ublk::cookie_for(&cfg.backing);
    let server = crate::ublk::UblkServer::start(volume.clone(), opts.clone(), cookie, rotational, node.server.clone())
        .await
        .map_err(|e| e.to_string())?;
    *node.ublk.lock().expect("ublk poisoned") = Some(server.info.clone());
    Ok(server)
}

/// A stop: the kernel flushes the disk, its requests finish, and the device is removed.
async fn stop_ublk(u: crate::ublk::UblkServer, node: &Node, notifier: &Notifier) {
    notifier.notify(&format!("STOPPING=1\nSTATUS=removing {}", u.info.path));
    *node.ublk.lock().expect("ublk poisoned") = None;
    if let Err(e) = u.stop().await {
        tracing::error!(error = %e, "removing the ublk device failed");
    }
}

/// Serves until the server returns; an upgrade request that passes its checks starts the
/// successor and turns the next stop into a handover (returned).
async fn serve_until_stopped(
    serving: impl std::future::Future<Output = std::io::Result<()>>,
    mut upgrades: mpsc::UnboundedReceiver<UpgradeRequest>,
    node: &Node,
    handover: &Handover,
    stop_tx: &watch::Sender<bool>,
) -> Result<Option<(Standby, oneshot::Sender<Result<String, String>>)>, AnyError> {
    tokio::pin!(serving);
    let mut pending = None;
    loop {
        tokio::select! {
            r = &mut serving => {
                r?;
                return Ok(pending);
            }
            Some(req) = upgrades.recv(), if pending.is_none() && !*stop_tx.borrow() => {
                match prepare_upgrade(&req.binary, node, handover).await {
                    Ok(standby) => {
                        tracing::info!(binary = %req.binary.display(), version = %standby.info.version, build = %standby.info.build, "upgrade: handing over to the new binary");
                        handover.request();
                        let _ = stop_tx.send(true);
                        pending = Some((standby, req.reply));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "upgrade refused");
                        let _ = req.reply.send(Err(e));
                    }
                }
            }
        }
    }
}

/// Every check that can refuse an upgrade before any client is paused, then the successor started
/// in standby.
async fn prepare_upgrade(binary: &std::path::Path, node: &Node, handover: &Handover) -> Result<Standby, String> {
    let tls = handover.tls_connections();
    if tls > 0 {
        return Err(format!(
            "{tls} client connection(s) use TLS, whose session keys cannot pass to another process; \
             they would see a disconnect (stop those clients, or restart the daemon instead)"
        ));
    }
    if node.backing_io.durability.is_lost() {
        return Err(
            "a backing flush failed (see `superdisk status`): clear it first with `superdisk clear-flush-error`".into(),
        );
    }
    let in_doubt = node.device_ops_in_doubt();
    if in_doubt > 0 {
        return Err(format!(
            "{in_doubt} device operation(s) given up on have not been answered yet (a stalled device); \
             another process must not write there until they are. Try again once `superdisk status` shows none"
        ));
    }
    let info = upgrade::check(binary).await?;
    let standby = upgrade::start(binary, info).await?;
    // While clients still run: the pause then only covers what they write from here on.
    if let Err(e) = node.write_back().await {
        standby.abandon_quietly();
        return Err(format!("writing back before the handover failed: {e}"));
    }
    Ok(standby)
}

/// Every client is parked: close the volume cleanly for the successor.
async fn park_volume<V: Volume>(volume: &V, node: &Node) -> Result<(), String> {
    volume.shutdown().await.map_err(|e| format!("closing the volume for the handover failed: {e}"))?;
    let in_doubt = node.device_ops_in_doubt();
    if in_doubt > 0 {
        return Err(format!("{in_doubt} device operation(s) are still in flight after the volume closed"));
    }
    Ok(())
}

/// The state to hand over: devices, sockets and parked connections.
fn gather(node: &Node, backing: OpenFile, kept: Kept, handover: &Handover) -> Inherited {
    let caches = node.mirror.as_ref().map(|m| m.cache_files());
    Inherited {
        backing,
        caches,
        nbd_tcp: kept.nbd.0,
        nbd_unix: kept.nbd.1,
        admin: kept.admin,
        metrics: kept.metrics,
        connections: handover.take_parked(),
    }
}

/// Hands the state to the successor. On success this process exits; otherwise the state comes
/// back to be served here again.
pub(super) async fn finish_handover(h: HandOver) -> Inherited {
    let HandOver { state, standby, reply, paused_at, notifier } = h;
    let Some(standby) = standby else { return state };
    let (version, build) = (standby.info.version.clone(), standby.info.build.clone());
    match upgrade::hand_over(standby, &state).await {
        Ok(pid) => {
            let pause_ms = paused_at.elapsed().as_millis();
            notifier.notify(&format!("MAINPID={pid}"));
            tracing::info!(pid, version = %version, build = %build, pause_ms, connections = state.connections.len(), "upgrade: the new binary serves; exiting");
            let _ = reply.send(Ok(format!(
                "upgraded to superdisk {version} (build {build}), pid {pid}; {} connection(s) carried, clients paused {pause_ms} ms",
                state.connections.len()
            )));
            // The answer goes out on the admin connection before this process goes.
            let deadline = Instant::now() + Duration::from_secs(2);
            while admin::open_connections() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            std::process::exit(0);
        }
        Err(e) => {
            tracing::error!(error = %e, "upgrade failed; resuming");
            let _ = reply.send(Err(format!("{e}; the running daemon carries on")));
            state
        }
    }
}

/// The end of a run without a handover: flush the volume and record a clean shutdown.
async fn stop<V: Volume>(volume: Arc<V>, cfg: &ServeConfig, notifier: &Notifier) -> Result<Outcome, AnyError> {
    if let Some(path) = &cfg.admin_socket {
        // The admin task also removes it, but the process may exit before that task runs.
        let _ = std::fs::remove_file(path);
    }
    notifier.notify("STOPPING=1\nSTATUS=flushing the devices");
    if let Err(e) = volume.shutdown().await {
        let stop = UncleanStop(e.to_string());
        tracing::error!("{stop}");
        return Err(Box::new(stop));
    }
    tracing::info!("flushed; clean shutdown recorded");
    Ok(Outcome::Stopped)
}

/// A stop that could not be recorded as clean, typically because the backing does not answer
/// (an outage): the daemon exits with [`UncleanStop::EXIT_CODE`] and says what the next start does.
#[derive(Debug)]
pub struct UncleanStop(pub String);

impl UncleanStop {
    /// EX_TEMPFAIL: stopped, nothing acknowledged lost, but the record of a clean stop is missing.
    pub const EXIT_CODE: u8 = 75;
}

impl std::fmt::Display for UncleanStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped without recording a clean shutdown ({}). Every acknowledged write is on the backing, and \
             the cache's metadata was written first; the next start treats this as a crash and resyncs the \
             regions marked in the write-intent bitmap",
            self.0
        )
    }
}

impl std::error::Error for UncleanStop {}

/// What the NBD front end is told: the export as the volume presents it, and the config's limits.
fn server_config<V: Volume>(
    cfg: &ServeConfig,
    volume: &V,
    node: &Node,
    rotational: bool,
    handover: &Arc<Handover>,
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
        handover: handover.clone(),
    })
}

/// SIGTERM/SIGINT turn `stop_tx` true (drain and stop); SIGHUP reloads the config. Installed
/// before READY=1: a SIGTERM that arrives between READY and the first poll of a spawned task must
/// still drain, not kill the process.
fn spawn_signal_handlers(
    node: &Arc<Node>,
    notifier: &Arc<Notifier>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
) -> Result<(), AnyError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let stop_notifier = notifier.clone();
    let (mut stopped, mut hup_stopped) = (stop_rx.clone(), stop_rx);
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            // A handover ended this run: a resumed run installs its own handlers.
            _ = stopped.wait_for(|s| *s) => return,
        };
        tracing::info!(signal = name, "shutting down: finishing in-flight requests");
        // STOPPING while draining, so `systemctl status` says why the disk is going away.
        stop_notifier.notify("STOPPING=1\nSTATUS=draining: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let (hup_node, hup_notifier) = (node.clone(), notifier.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = hup.recv() => if r.is_none() { return },
                _ = hup_stopped.wait_for(|s| *s) => return,
            }
            hup_notifier.notify("RELOADING=1");
            hup_node.reload();
            hup_notifier.notify("READY=1");
        }
    });
    Ok(())
}

/// The admin socket and the metrics endpoint, when configured (bound here, or handed over);
/// returns copies of their descriptors for a later handover.
async fn spawn_control(
    cfg: &ServeConfig,
    node: &Arc<Node>,
    stop: &watch::Receiver<bool>,
    handover: &Arc<Handover>,
    admin_fd: Option<OwnedFd>,
    metrics_fd: Option<OwnedFd>,
) -> Result<(Option<OwnedFd>, Option<OwnedFd>), AnyError> {
    let mut kept = (None, None);
    if let Some(path) = cfg.admin_socket.clone() {
        let listener = match admin_fd {
            Some(fd) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                tokio::net::UnixListener::from_std(l)?
            }
            None => admin::bind(&path)?,
        };
        kept.0 = Some(listener.as_fd().try_clone_to_owned()?);
        let admin_task = admin::serve_admin(listener, path, node.clone(), stop.clone(), handover.clone());
        tokio::spawn(async move {
            if let Err(e) = admin_task.await {
                tracing::error!(error = %e, "admin socket failed");
            }
        });
    }
    if let Some(addr) = cfg.metrics {
        let listener = match metrics_fd {
            Some(fd) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)?
            }
            None => tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("config key `metrics`: cannot listen on {addr}: {e}"))?,
        };
        kept.1 = Some(listener.as_fd().try_clone_to_owned()?);
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        tokio::spawn(metrics::serve(listener, node.clone(), stop.clone()));
    }
    Ok(kept)
}

//! Listeners and the server's life cycle: accept until shutdown, then wait for every connection to
//! finish its in-flight requests.

use super::connection::{serve_adopted, serve_connection, ConnLimits, Sock, BUDGET_UNIT_BYTES};
use super::handover::{Handover, ParkedConnection, SocketKind};
use super::tls::TlsMode;
use super::Policy;
use super::ZeroCopyReads;
use crate::nbd::ExportParams;
use crate::server::stats::ServerStats;
use crate::volume::Volume;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    /// Permission bits of the Unix socket (only root and the group by default).
    pub unix_mode: u32,
    pub export: ExportParams,
    pub max_connections: usize,
    pub max_inflight_bytes_per_connection: usize,
    pub handshake_timeout: Duration,
    /// Zero disables it: see `tune_tcp` for why half-open detection uses keepalive instead.
    pub idle_timeout: Duration,
    /// How large reads go from the page cache to the socket where they can (see `zerocopy`).
    pub zero_copy_reads: ZeroCopyReads,
    /// How long a connection polls for the next request after its last reply (`idle_poll_us`).
    pub idle_poll: Duration,
    /// Counters shared with the status command and the metrics endpoint.
    pub stats: Arc<ServerStats>,
    /// TLS, allowed client networks, Unix socket ownership, the server-wide in-flight budget.
    pub policy: Policy,
    /// Whether the next stop is an in-place upgrade's handover (connections park, the listeners
    /// and the Unix socket's path stay for the next process).
    pub handover: Arc<Handover>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover").field("requested", &self.requested()).finish()
    }
}

/// The bound listening sockets, bound here or inherited from the previous process.
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixListener>,
}

impl Listeners {
    /// Binds what the config names (the Unix socket with its mode and owner).
    pub async fn bind(cfg: &ServerConfig) -> io::Result<Listeners> {
        let tcp = match cfg.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?,
            ),
            None => None,
        };
        let unix = match &cfg.unix {
            Some(path) => Some(bind_unix(path, cfg)?),
            None => None,
        };
        Ok(Listeners { tcp, unix })
    }

    /// Listeners the previous process handed over (already bound, already listening).
    pub fn from_fds(tcp: Option<OwnedFd>, unix: Option<OwnedFd>) -> io::Result<Listeners> {
        let tcp = match tcp {
            Some(fd) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Some(TcpListener::from_std(l)?)
            }
            None => None,
        };
        let unix = match unix {
            Some(fd) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                Some(UnixListener::from_std(l)?)
            }
            None => None,
        };
        Ok(Listeners { tcp, unix })
    }

    /// Duplicates of the listening sockets, kept for a handover: clients that connect while the
    /// handover runs wait in the kernel's backlog instead of being refused.
    pub fn dup_fds(&self) -> io::Result<(Option<OwnedFd>, Option<OwnedFd>)> {
        let tcp = self.tcp.as_ref().map(|l| l.as_fd().try_clone_to_owned()).transpose()?;
        let unix = self.unix.as_ref().map(|l| l.as_fd().try_clone_to_owned()).transpose()?;
        Ok((tcp, unix))
    }
}

/// Serves until `shutdown` turns true, then drains and returns. `adopted` are connections a
/// previous process parked (see `handover`). `ready` is called once the listeners are announced
/// (for the service manager and for tests).
pub async fn run<V: Volume>(
    volume: Arc<V>,
    cfg: ServerConfig,
    listeners: Listeners,
    adopted: Vec<ParkedConnection>,
    shutdown: watch::Receiver<bool>,
    ready: impl FnOnce(&[String]),
) -> io::Result<()> {
    let endpoints = announce(&cfg, &listeners.tcp)?;
    ready(&endpoints);
    accept_loop(volume, &cfg, &listeners, adopted, shutdown).await;
    // After a handover the socket's path belongs to the next process.
    if let (Some(p), false) = (&cfg.unix, cfg.handover.requested()) {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Binds the Unix socket (replacing a stale one) with the configured mode, then owner.
fn bind_unix(path: &std::path::Path, cfg: &ServerConfig) -> io::Result<UnixListener> {
    // A stale socket from a killed daemon would make bind fail; only remove sockets.
    if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    // Mode first, owner second: between the two steps the socket is at most as open as the
    // configured mode for its original owner (root), never wider.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.unix_mode))?;
    let (owner, group) = (cfg.policy.unix_owner, cfg.policy.unix_group);
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(path, owner, group).map_err(|e| {
            let key = if owner.is_some() { "unix_owner" } else { "unix_group" };
            io::Error::new(
                e.kind(),
                format!("config key `{key}`: cannot give {} to {owner:?}:{group:?}: {e}", path.display()),
            )
        })?;
    }
    Ok(l)
}

/// The endpoints clients connect to (as URIs), logged with what applies to them.
fn announce(cfg: &ServerConfig, tcp: &Option<TcpListener>) -> io::Result<Vec<String>> {
    let mut endpoints = Vec::new();
    if let Some(l) = tcp {
        endpoints.push(format!("nbd://{}", l.local_addr()?));
    }
    if let Some(p) = &cfg.unix {
        endpoints.push(format!("nbd+unix:///?socket={}", p.display()));
    }
    // No listener at all is valid only beside another front end (`ublk`); the config checks it.
    let tls = cfg.policy.tls_mode != TlsMode::Off;
    if tls {
        // libnbd and qemu name TLS endpoints nbds:// and nbds+unix://.
        for e in &mut endpoints {
            *e = e.replacen("nbd", "nbds", 1);
        }
    }
    for e in &endpoints {
        tracing::info!(endpoint = %e, export = %cfg.export.name, size_bytes = cfg.export.size_bytes, "listening");
    }
    if tls {
        tracing::info!(
            mode = if cfg.policy.tls_mode == TlsMode::Required { "require" } else { "on" },
            client_certificates = if cfg.policy.client_certificates { "required" } else { "not requested" },
            "TLS enabled"
        );
    }
    if !cfg.policy.allow.is_empty() {
        let nets: Vec<String> = cfg.policy.allow.iter().map(|n| n.to_string()).collect();
        tracing::info!(allow = %nets.join(","), "TCP clients limited to these networks");
    }
    match cfg.zero_copy_reads {
        ZeroCopyReads::Sendfile => tracing::info!(
            "large reads are sent from the page cache with sendfile where they can be (zero_copy_reads = \"sendfile\")"
        ),
        ZeroCopyReads::Mapped => tracing::info!(
            "large reads are sent from mapped page-cache pages where they can be (zero_copy_reads = \"mapped\")"
        ),
        ZeroCopyReads::Off => {}
    }
    Ok(endpoints)
}

fn conn_limits(cfg: &ServerConfig) -> Arc<ConnLimits> {
    // The largest single request must fit in the total too, or it would wait forever.
    let max_request_units = (cfg.export.max_payload_bytes as usize).div_ceil(BUDGET_UNIT_BYTES) + 1;
    let total_units = (cfg.policy.max_inflight_bytes_total / BUDGET_UNIT_BYTES).max(max_request_units);
    Arc::new(ConnLimits {
        export: cfg.export.clone(),
        max_inflight_bytes: cfg.max_inflight_bytes_per_connection,
        handshake_timeout: cfg.handshake_timeout,
        idle_timeout: cfg.idle_timeout,
        zero_copy_reads: cfg.zero_copy_reads,
        idle_poll: cfg.idle_poll,
        stats: cfg.stats.clone(),
        tls_mode: cfg.policy.tls_mode,
        tls: cfg.policy.tls.clone(),
        total_budget: Arc::new(Semaphore::new(total_units)),
        handover: cfg.handover.clone(),
    })
}

/// Accepts until shutdown, then waits for every connection to finish its requests.
async fn accept_loop<V: Volume>(
    volume: Arc<V>,
    cfg: &ServerConfig,
    l: &Listeners,
    adopted: Vec<ParkedConnection>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = conn_limits(cfg);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    for p in adopted {
        next_id += 1;
        // A carried connection was admitted by the previous process: it takes a slot if one is
        // free, and is served even if not.
        let permit = slots.clone().try_acquire_owned().ok();
        spawn_conn(&mut conns, next_id, permit, serve_parked(p, volume.clone(), limits.clone(), shutdown.clone()));
    }
    loop {
        // Reap finished connections so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            r = accept_tcp(&l.tcp) => r.map(Accepted::Tcp),
            r = accept_unix(&l.unix) => r.map(Accepted::Unix),
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving existing clients.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Accepted::Tcp((_, peer)) = &conn {
            if !cfg.policy.allows(peer.ip()) {
                // Closed before a byte is sent: the client learns nothing about the export.
                tracing::warn!(%peer, "client address is not in `allow`; connection closed");
                continue;
            }
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            cfg.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(max = cfg.max_connections, "connection limit reached; refusing a client");
            continue; // dropping the stream closes it
        };
        next_id += 1;
        spawn_conn(
            &mut conns,
            next_id,
            Some(permit),
            serve_accepted(conn, volume.clone(), limits.clone(), shutdown.clone()),
        );
    }
    tracing::info!(connections = conns.len(), "stopped accepting; draining connections");
    while conns.join_next().await.is_some() {}
}

/// Runs one connection in its own task and span, holding its slot for its life.
fn spawn_conn(
    conns: &mut JoinSet<()>,
    id: u64,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    serve: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let span = tracing::info_span!("conn", id, peer = tracing::field::Empty);
    conns.spawn(
        async move {
            let _permit = permit;
            serve.await
        }
        .instrument(span),
    );
}

async fn serve_accepted<V: Volume>(
    conn: Accepted,
    volume: Arc<V>,
    limits: Arc<ConnLimits>,
    shutdown: watch::Receiver<bool>,
) {
    let _active = ActiveGuard::new(&limits.stats);
    match conn {
        Accepted::Tcp((s, peer)) => {
            tracing::Span::current().record("peer", tracing::field::display(peer));
            if let Err(e) = super::tune_tcp(&s) {
                tracing::warn!(error = %e, "cannot set TCP options");
            }
            serve_connection(Sock(s, Vec::new()), volume, limits, shutdown).await
        }
        Accepted::Unix(s) => {
            tracing::Span::current().record("peer", "unix");
            serve_connection(Sock(s, Vec::new()), volume, limits, shutdown).await
        }
    }
}

/// A connection the previous process parked, served from where it stopped.
async fn serve_parked<V: Volume>(
    p: ParkedConnection,
    volume: Arc<V>,
    limits: Arc<ConnLimits>,
    shutdown: watch::Receiver<bool>,
) {
    let _active = ActiveGuard::new(&limits.stats);
    let served = match p.kind {
        SocketKind::Tcp => {
            let s = std::net::TcpStream::from(p.fd);
            let s = s.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(s));
            s.map(|s| {
                if let Ok(peer) = s.peer_addr() {
                    tracing::Span::current().record("peer", tracing::field::display(peer));
                }
                serve_adopted(Sock(s, p.unread), p.session, volume, limits, shutdown)
            })
            .map(|f| Box::pin(f) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>)
        }
        SocketKind::Unix => {
            tracing::Span::current().record("peer", "unix");
            let s = std::os::unix::net::UnixStream::from(p.fd);
            let s = s.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(s));
            s.map(|s| serve_adopted(Sock(s, p.unread), p.session, volume, limits, shutdown))
                .map(|f| Box::pin(f) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>)
        }
    };
    match served {
        Ok(f) => f.await,
        Err(e) => tracing::warn!(error = %e, "a carried-over connection could not be resumed; closed"),
    }
}

enum Accepted {
    Tcp((tokio::net::TcpStream, SocketAddr)),
    Unix(tokio::net::UnixStream),
}

async fn accept_tcp(l: &Option<TcpListener>) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_unix(l: &Option<UnixListener>) -> io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Counts a connection as active for its life, whichever way it ends.
struct ActiveGuard(Arc<ServerStats>);

impl ActiveGuard {
    fn new(stats: &Arc<ServerStats>) -> Self {
        stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
        stats.connections_active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(stats.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

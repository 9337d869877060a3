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
pub mod handover;
pub mod logging;
pub mod metrics;
mod monitor;
mod node;
pub mod notify;
mod open;
mod report;
mod run;
pub mod status;

pub use node::Node;
pub use open::open_caches;
pub use run::UncleanStop;

use crate::config::ServeConfig;
use crate::device::layer::injected_stall::Stalled;
use crate::device::layer::instrumented::Instrumented;
use crate::device::FileDevice;
use crate::mirror::MirrorVolume;
use crate::volume::PlainVolume;
use handover::takeover::Takeover;
use handover::Inherited;
use std::sync::Arc;

pub type AnyError = Box<dyn std::error::Error + Send + Sync>;
/// Every device the daemon opens is counted (and may have read stalls injected, for benchmarks).
pub type Dev = Instrumented<Stalled<FileDevice>>;
pub type Mirror = MirrorVolume<Dev, Dev>;
pub type Plain = PlainVolume<Dev>;
/// Re-reads the configuration (file plus the command line's overrides) for SIGHUP.
pub type Reloader = Arc<dyn Fn() -> Result<ServeConfig, AnyError> + Send + Sync>;

/// Opens the devices, builds the volume and serves until SIGTERM/SIGINT. `on_ready` runs once
/// every listener is bound, with their addresses.
pub async fn serve(
    cfg: ServeConfig,
    reload: Option<Reloader>,
    on_ready: impl FnOnce(&[String]),
) -> Result<(), AnyError> {
    serve_with(cfg, reload, false, None, on_ready).await
}

/// How one serving run ended.
enum Outcome {
    /// SIGTERM/SIGINT (or the stdio client left): drained, flushed, clean.
    Stopped,
    /// An operator's upgrade: everything is parked and the volume closed cleanly; the state goes
    /// to the successor (or back into this process, if the successor fails).
    HandOver(Box<run::HandOver>),
}

/// [`serve`]; with `stdio`, one client on stdin/stdout instead of the listeners (`serve --stdio`);
/// with `takeover`, the state comes from the daemon this one replaces (`superdisk upgrade`).
pub async fn serve_with(
    cfg: ServeConfig,
    reload: Option<Reloader>,
    stdio: bool,
    takeover: Option<Takeover>,
    on_ready: impl FnOnce(&[String]),
) -> Result<(), AnyError> {
    let mut takeover = takeover;
    let mut inherited: Option<Inherited> = None;
    if let Some(t) = takeover.as_mut() {
        t.standby().map_err(|e| format!("telling the running daemon this one is ready: {e}"))?;
        inherited = Some(t.receive().map_err(|e| format!("receiving the running daemon's state: {e}"))?);
        tracing::info!("took over the running daemon's devices, listeners and connections");
    }
    let mut on_ready = Some(on_ready);
    loop {
        let ready = |endpoints: &[String]| {
            if let Some(t) = takeover.take() {
                t.serving();
            }
            if let Some(f) = on_ready.take() {
                f(endpoints);
            }
        };
        match open::serve_once(cfg.clone(), reload.clone(), stdio, inherited.take(), ready).await {
            Ok(Outcome::Stopped) => return Ok(()),
            Ok(Outcome::HandOver(h)) => inherited = Some(run::finish_handover(*h).await),
            Err(e) => {
                if let Some(t) = takeover.take() {
                    t.refuse(&e.to_string());
                }
                return Err(e);
            }
        }
    }
}

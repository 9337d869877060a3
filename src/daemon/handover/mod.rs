//! In-place upgrade: the running daemon hands its devices, listening sockets and every client
//! connection to a new binary, which carries on serving; the kernel and libnbd clients never see
//! a disconnect.
//!
//! ```text
//!  superdisk upgrade ──admin──► old: check the new binary (handover-info: format and handover
//!                                    versions), no TLS connection, no device operation in doubt
//!                               old: spawn `NEW serve … --takeover-fd N` ──► new: parse config,
//!                                    ◄─────────────────────────────── "standby" ─┘ validate
//!                               old: stop accepting, park every connection at a request boundary
//!                                    (in-flight requests answered), volume shut down cleanly
//!                               old: send descriptors + sessions ──────► new: open volume from
//!                                    ◄──────────────────────────────── "serving"  the descriptors,
//!                               old: MAINPID=new to systemd, "ok" to the operator, exit 0
//!  any failure before "serving": the old kills the new process and resumes from the same state
//! ```
//!
//! Why a child and not `exec` in place: the old process stays whole until the new one says it
//! is serving, so a new build that fails to start, or to accept the state, costs a pause and an
//! error message, never the disk. systemd follows the change of main process through `MAINPID=`
//! (the same PID would have needed no message, but `exec` cannot come back from a failure).
//! Why not the systemd file-descriptor store: it holds descriptors, not a conversation; the
//! sessions and unread bytes would need a file beside them, and runs without systemd (tests,
//! containers) would have no upgrade at all.

pub mod takeover;
pub mod upgrade;
mod wire;

use crate::device::OpenFile;
use crate::server::handover::ParkedConnection;
use serde::{Deserialize, Serialize};
use std::os::fd::OwnedFd;

/// The handover's own protocol version: a successor must speak the same one.
pub const HANDOVER_VERSION: u32 = 1;

static BUILD_ID: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Names this build (the binary sets it from `SUPERDISK_BUILD_ID` at compile time; only the
/// binary's own crate reads that variable, so a differently named build recompiles only it).
pub fn set_build_id(id: &'static str) {
    let _ = BUILD_ID.set(id);
}

/// What `superdisk handover-info` prints: what a running daemon checks before it hands over.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: String,
    /// A build identifier (`SUPERDISK_BUILD_ID` when the binary was compiled; "dev" without), so
    /// two builds of one version can be told apart.
    pub build: String,
    /// The on-disk format (superblock version) this build reads and writes.
    pub format_version: u32,
    pub handover_version: u32,
}

impl BuildInfo {
    pub fn this() -> Self {
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            build: BUILD_ID.get().copied().unwrap_or("dev").to_owned(),
            format_version: crate::meta::superblock::VERSION,
            handover_version: HANDOVER_VERSION,
        }
    }

    /// Whether a daemon of this build may hand over to `next`; the reason if not.
    pub fn accepts(&self, next: &BuildInfo) -> Result<(), String> {
        if next.format_version != self.format_version {
            return Err(format!(
                "the new binary writes on-disk format {} and this daemon's devices are in format {}",
                next.format_version, self.format_version
            ));
        }
        if next.handover_version != self.handover_version {
            return Err(format!(
                "the new binary speaks handover protocol {} and this daemon speaks {}",
                next.handover_version, self.handover_version
            ));
        }
        Ok(())
    }
}

/// Everything a daemon starts from when it takes over from another, or resumes after a handover
/// that failed: open devices, bound listeners, parked connections.
pub struct Inherited {
    pub backing: OpenFile,
    /// The cache set's members as attached; `Some(empty)` when none was attached (the successor
    /// starts degraded, as its predecessor was), `None` when no cache is configured.
    pub caches: Option<Vec<OpenFile>>,
    pub nbd_tcp: Option<OwnedFd>,
    pub nbd_unix: Option<OwnedFd>,
    pub admin: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    pub connections: Vec<ParkedConnection>,
}

/// An operator's `upgrade` command, answered once the handover succeeded or was refused.
pub struct UpgradeRequest {
    pub binary: std::path::PathBuf,
    pub reply: tokio::sync::oneshot::Sender<Result<String, String>>,
}

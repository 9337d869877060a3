//! The kernel's own NBD client, configured and supervised by us: `superdisk attach` negotiates
//! each connection itself, hands the sockets to the kernel over generic netlink, and replaces any
//! connection that dies (a daemon crash, restart or upgrade), so the filesystem on the device sees
//! a pause instead of I/O errors. `superdisk detach` disconnects. See [`supervisor`] for the
//! kernel's quirks and how they are met.

pub mod dial;
pub mod netlink;
pub mod supervisor;

use dial::Endpoint;
use netlink::NbdNetlink;

/// Default time a request may go unanswered before the kernel resends it on another (or a fresh)
/// connection. It bounds what a daemon crash costs the requests it had in flight; a healthy
/// daemon answers in microseconds to milliseconds, and one whose backing stalls longer than this
/// sees its connection replaced and the requests resent (a pause, not an error).
pub const DEFAULT_IO_TIMEOUT_SECS: u64 = 10;
/// Default time the device waits for a live connection before failing I/O: long enough for
/// systemd to restart a crashed daemon several times over (it starts in well under a second),
/// short enough that a daemon that cannot come back fails the filesystem in minutes, not never,
/// so the database's own failover can take over.
pub const DEFAULT_DEAD_TIMEOUT_SECS: u64 = 120;

#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub endpoint: Endpoint,
    pub export: String,
    /// The device's index (N of /dev/nbdN); None lets the kernel pick a free one.
    pub device: Option<u32>,
    pub connections: u32,
    pub block_size: u32,
    pub io_timeout_secs: u64,
    pub dead_timeout_secs: u64,
    /// How long the first connections may take to reach the server (it may still be starting).
    pub connect_timeout_secs: u64,
    pub detach_on_exit: bool,
}

impl AttachOptions {
    /// What the kernel records as the device's backend (`/sys/block/nbdN/backend` on 5.19+).
    pub fn backend_id(&self) -> String {
        format!("superdisk {} export {:?}", self.endpoint, self.export)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NoModule(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Server(String),
    #[error("{0}")]
    Kernel(String),
}

/// The index of `/dev/nbdN`; refuses anything that is not an NBD device path.
pub fn device_index(path: &str) -> Result<u32, AttachError> {
    let name = path.strip_prefix("/dev/").unwrap_or(path);
    let n = name.strip_prefix("nbd").and_then(|n| n.parse::<u32>().ok());
    let Some(n) = n else {
        return Err(AttachError::Usage(format!("{path}: not an NBD device (expected /dev/nbdN)")));
    };
    if let Ok(meta) = std::fs::metadata(format!("/dev/nbd{n}")) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_block_device() {
            return Err(AttachError::Usage(format!("{path}: not a block device")));
        }
    }
    Ok(n)
}

/// The `nbd` netlink family, loading the module if it is missing.
pub fn open_netlink() -> Result<NbdNetlink, AttachError> {
    let open = || NbdNetlink::open().map_err(|e| AttachError::Kernel(format!("netlink: {e}")));
    if let Some(nl) = open()? {
        return Ok(nl);
    }
    let probe = modprobe("nbd");
    if let Some(nl) = open()? {
        return Ok(nl);
    }
    let why = probe.unwrap_or_else(|| "modprobe succeeded, yet the family is missing".to_owned());
    Err(AttachError::NoModule(format!("the kernel has no NBD driver (the nbd module is not loaded: {why})")))
}

/// Loads a kernel module; what modprobe said when it failed (None: it succeeded). Used where a
/// missing driver is likely only unloaded (`nbd`, `ublk_drv`).
pub fn modprobe(module: &str) -> Option<String> {
    match std::process::Command::new("modprobe").arg(module).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Some(format!("cannot run modprobe: {e}")),
    }
}

/// `superdisk detach /dev/nbdN`.
pub fn detach(path: &str) -> Result<(), AttachError> {
    let index = device_index(path)?;
    let mut nl = open_netlink()?;
    match nl.connected(index) {
        Ok(Some(true)) => {}
        Ok(_) => return Err(AttachError::Usage(format!("{path} is not connected"))),
        Err(e) => return Err(AttachError::Kernel(format!("status of {path}: {e}"))),
    }
    nl.disconnect(index).map_err(|e| AttachError::Kernel(format!("disconnecting {path}: {e}")))
}

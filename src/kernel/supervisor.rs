//! `superdisk attach`: connect a kernel NBD device, then stay beside it and replace every
//! connection that dies.
//!
//! ```text
//!   dial N connections (handshake: GO, simple replies) ──► netlink CONNECT (size, flags, timeouts,
//!   sockets) ──► device answers a read ──► READY ──► supervise:
//!        LINK_DEAD(our device) ─► dial (backoff) ─► RECONFIGURE with one fresh socket ─┐
//!        ◄──────────────────────────────────────────────────────────────────────────────┘
//!   SIGTERM: leave the device attached (it does not need us to carry I/O) unless --detach-on-exit
//! ```
//!
//! The kernel's quirks, and what is done about each:
//! * RECONFIGURE only replaces a socket the kernel has already marked dead; any other new socket
//!   is dropped silently (and the call still succeeds). So a replacement is sent once per
//!   LINK_DEAD event, each of which the kernel sends exactly when it marks one socket dead — one
//!   event, one dead socket, one replacement.
//! * Requests already sent on a socket that died are resent only when their I/O timeout fires
//!   (`--io-timeout-secs`): a daemon crash costs at most that long for them, and the daemon sees
//!   those writes twice (harmless: a replayed write carries the same data to the same place, and
//!   the filesystem sent nothing overlapping while it waited).
//! * While no socket is alive, new requests wait in the kernel up to `--dead-timeout-secs`, then
//!   fail. On older kernels that wait shows up as hung-task warnings; it is still only a wait.
//! * Events can be lost if the netlink socket overflows (ENOBUFS); a copy of every socket handed
//!   to the kernel is kept, and one that hangs up with no event after `EVENT_GRACE` (3 s) counts as
//!   dead anyway.

use super::dial::{dial, DialError};
use super::netlink::{Connect, NbdNetlink};
use super::{AttachError, AttachOptions};
use crate::nbd::client::ExportInfo;
use crate::nbd::consts::FLAG_CAN_MULTI_CONN;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a hung-up socket may go without its LINK_DEAD event before it counts as dead.
const EVENT_GRACE: Duration = Duration::from_secs(3);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Attaches and supervises until `stop` turns true; `ready` gets the device path once it answers.
pub fn run(opts: &AttachOptions, stop: &AtomicBool, ready: &mut dyn FnMut(&str)) -> Result<(), AttachError> {
    let (socks, info) = first_connections(opts, stop)?;
    let mut nl = super::open_netlink()?;
    nl.subscribe().map_err(|e| AttachError::Kernel(format!("listening for dead links: {e}")))?;
    if let Some(i) = opts.device {
        if nl.connected(i).map_err(|e| AttachError::Kernel(format!("status of /dev/nbd{i}: {e}")))? == Some(true) {
            return Err(AttachError::Busy(format!(
                "/dev/nbd{i} is already connected; detach it first (superdisk detach /dev/nbd{i})"
            )));
        }
    }
    let raw: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
    let index = nl
        .connect(&Connect {
            index: opts.device,
            size_bytes: info.size_bytes,
            block_size_bytes: u64::from(opts.block_size),
            server_flags: info.transmission_flags,
            io_timeout_secs: opts.io_timeout_secs,
            dead_conn_timeout_secs: opts.dead_timeout_secs,
            sockets: &raw,
            backend: &opts.backend_id(),
        })
        .map_err(|e| connect_error(opts.device, e))?;
    let dev = format!("/dev/nbd{index}");
    if let Err(e) = wait_answering(&dev, stop) {
        let _ = nl.disconnect(index);
        return Err(e);
    }
    tracing::info!(device = %dev, connections = socks.len(), size_bytes = info.size_bytes, "attached");
    ready(&dev);
    let mut sup = Supervisor { opts, nl, index, held: socks, hung_since: None, dead: 0 };
    sup.supervise(stop);
    if opts.detach_on_exit {
        tracing::info!(device = %dev, "detaching (--detach-on-exit)");
        sup.nl.disconnect(index).map_err(|e| AttachError::Kernel(format!("detaching {dev}: {e}")))?;
    } else {
        tracing::info!(device = %dev, "supervisor stopping; the device stays attached");
    }
    Ok(())
}

/// The first N connections, all to the same export. An unreachable server is retried (the daemon
/// may be starting); one that answers and refuses is not.
fn first_connections(opts: &AttachOptions, stop: &AtomicBool) -> Result<(Vec<OwnedFd>, ExportInfo), AttachError> {
    let deadline = Instant::now() + Duration::from_secs(opts.connect_timeout_secs);
    let mut socks = Vec::new();
    let mut info: Option<ExportInfo> = None;
    while socks.len() < opts.connections as usize {
        match dial(&opts.endpoint, &opts.export, HANDSHAKE_TIMEOUT) {
            Ok((fd, i)) => {
                if let Some(first) = info {
                    if (first.size_bytes, first.transmission_flags) != (i.size_bytes, i.transmission_flags) {
                        return Err(AttachError::Server(
                            "the server described the export differently on two connections".into(),
                        ));
                    }
                }
                info = Some(i);
                socks.push(fd);
            }
            Err(DialError::Refused(m)) => return Err(AttachError::Server(m)),
            Err(DialError::Unreachable(e)) if Instant::now() >= deadline || stop.load(Ordering::SeqCst) => {
                return Err(AttachError::Server(format!("cannot reach the server: {e}")));
            }
            Err(DialError::Unreachable(_)) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let info = info.expect("at least one connection");
    if socks.len() > 1 && info.transmission_flags & FLAG_CAN_MULTI_CONN == 0 {
        return Err(AttachError::Server(
            "the server does not allow several connections to one export (no CAN_MULTI_CONN); use --connections 1"
                .into(),
        ));
    }
    if info.size_bytes == 0 || info.size_bytes % u64::from(opts.block_size) != 0 {
        return Err(AttachError::Server(format!(
            "the export's size ({} bytes) is not a whole number of {}-byte blocks",
            info.size_bytes, opts.block_size
        )));
    }
    Ok((socks, info))
}

fn connect_error(device: Option<u32>, e: std::io::Error) -> AttachError {
    let dev = device.map(|i| format!("/dev/nbd{i}")).unwrap_or_else(|| "a free NBD device".into());
    match e.raw_os_error() {
        Some(libc::EBUSY) => AttachError::Busy(format!("{dev} is busy (in use or still being torn down)")),
        Some(libc::EPERM) | Some(libc::EACCES) => {
            AttachError::Kernel(format!("connecting {dev}: permission denied (needs CAP_SYS_ADMIN)"))
        }
        _ => AttachError::Kernel(format!("connecting {dev}: {e}")),
    }
}

/// READY means the block device answers: its size is set and a read of its first block returns.
fn wait_answering(dev: &str, stop: &AtomicBool) -> Result<(), AttachError> {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(30);
    let sys = format!("/sys/block/{}/size", dev.trim_start_matches("/dev/"));
    loop {
        let sized = std::fs::read_to_string(&sys).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0) > 0;
        if sized {
            let mut block = [0u8; 512];
            if std::fs::File::open(dev).and_then(|mut f| f.read_exact(&mut block)).is_ok() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline || stop.load(Ordering::SeqCst) {
            return Err(AttachError::Kernel(format!("{dev} was connected but does not answer reads")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Supervisor<'a> {
    opts: &'a AttachOptions,
    nl: NbdNetlink,
    index: u32,
    /// Our copies of the sockets the kernel holds: one hanging up is a link going dead.
    held: Vec<OwnedFd>,
    hung_since: Option<Instant>,
    /// LINK_DEAD events for our device not yet answered with a replacement.
    dead: usize,
}

impl Supervisor<'_> {
    fn supervise(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            match self.nl.next_events(Duration::from_millis(250)) {
                Ok(devices) => {
                    for _ in devices.iter().filter(|&&i| i == self.index) {
                        self.dead += 1;
                        tracing::warn!(device = self.index, "a connection died; reconnecting");
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!("dead-link events were lost; checking the connections directly");
                }
                Err(e) => tracing::warn!(error = %e, "reading dead-link events"),
            }
            self.reap_hung_up();
            while self.dead > 0 && !stop.load(Ordering::SeqCst) {
                self.replace_one(stop);
            }
        }
    }

    /// Drops our copies of sockets that hung up; if none of their events came within
    /// [`EVENT_GRACE`], counts them as dead links anyway.
    fn reap_hung_up(&mut self) {
        let mut hung = 0;
        self.held.retain(|s| {
            let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
            // SAFETY: a zero-timeout poll on one descriptor we own.
            let n = unsafe { libc::poll(&mut p, 1, 0) };
            let gone = n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
            hung += usize::from(gone);
            !gone
        });
        if hung > 0 && self.dead == 0 {
            let since = *self.hung_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= EVENT_GRACE {
                tracing::warn!(sockets = hung, "connections hung up without a dead-link event; replacing them");
                self.dead += hung;
                self.hung_since = None;
            }
        } else if self.dead > 0 {
            self.hung_since = None;
        }
    }

    /// Dials until the server answers (backing off), then hands the kernel the new socket.
    fn replace_one(&mut self, stop: &AtomicBool) {
        let mut wait = BACKOFF_MIN;
        let started = Instant::now();
        loop {
            match dial(&self.opts.endpoint, &self.opts.export, HANDSHAKE_TIMEOUT) {
                Ok((fd, _)) => match self.nl.reconfigure(self.index, &[fd.as_raw_fd()], &self.opts.backend_id()) {
                    Ok(()) => {
                        tracing::info!(device = self.index, after_ms = started.elapsed().as_millis(), "reconnected");
                        self.held.push(fd);
                        self.dead -= 1;
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "the kernel refused the new connection; retrying"),
                },
                Err(e) => tracing::debug!(error = %e, "server not reachable yet"),
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(BACKOFF_MAX);
        }
    }
}

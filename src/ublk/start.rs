//! Bringing a device up (new, or recovered from the previous process) and down (deleted at a
//! stop, parked for an upgrade). Everything here blocks: it runs on a blocking thread while the
//! runtime's workers serve the requests the queues hand them.

use super::ctrl::{existing_ids, Control, ControlError};
use super::queue::{self, QueueShared, QueueSpec};
use super::{sys, QueueStatsHandle, UblkInfo, UblkOptions, UblkServer, MAX_IO_BYTES};
use crate::server::stats::ServerStats;
use crate::volume::Volume;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a restarted daemon waits for the kernel to quiesce the device its predecessor left,
/// and for that predecessor to let go of it (an exiting process closes its rings asynchronously).
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(
        "ublk device id {0} is in use by another device (choose another `ublk_id`, or remove the key to let the \
         kernel pick one)"
    )]
    IdInUse(u32),
    #[error(
        "ublk: the kernel refused to add a device: operation not permitted (adding a ublk device needs \
         CAP_SYS_ADMIN; under systemd the unit's CapabilityBoundingSet= must include it, see docs/OPERATIONS.md)"
    )]
    NotPermitted,
    #[error("ublk device {id} (/dev/ublkb{id}) for this backing is still served by pid {pid}; stop that daemon first")]
    Busy { id: u32, pid: i32 },
    #[error(
        "ublk device {id} (/dev/ublkb{id}) was left by an earlier run for this backing, but {why}; unmount its \
         filesystem, remove it with `superdisk detach /dev/ublkb{id}` and start again"
    )]
    Mismatch { id: u32, why: String },
    #[error("ublk device {id}: {what}: {err}")]
    Device { id: u32, what: &'static str, err: io::Error },
}

/// What start needs besides the volume.
pub(super) struct StartArgs {
    pub opts: UblkOptions,
    pub cookie: u64,
    pub rotational: bool,
    pub requests: Arc<ServerStats>,
    pub rt: tokio::runtime::Handle,
}

impl UblkServer {
    /// Adds and starts a device for `volume`, or recovers the one a previous process of this
    /// backing left.
    pub async fn start<V: Volume>(
        volume: Arc<V>,
        opts: UblkOptions,
        cookie: u64,
        rotational: bool,
        requests: Arc<ServerStats>,
    ) -> Result<UblkServer, StartError> {
        let args = StartArgs { opts, cookie, rotational, requests, rt: tokio::runtime::Handle::current() };
        tokio::task::spawn_blocking(move || start_blocking(volume, args))
            .await
            .unwrap_or_else(|e| Err(StartError::Control(ControlError::command("start", io::Error::other(e)))))
    }

    /// A stop: removes the device once its requests are answered (the kernel flushes it first).
    pub async fn stop(self) -> io::Result<()> {
        tokio::task::spawn_blocking(move || self.stop_blocking()).await.map_err(io::Error::other)?
    }

    /// An upgrade (or a failed start): finishes and commits the requests in flight, leaves the
    /// rest for the next server and lets go of the device, which the kernel quiesces.
    pub async fn park(self) {
        let _ = tokio::task::spawn_blocking(move || self.park_blocking()).await;
    }

    fn stop_blocking(mut self) -> io::Result<()> {
        let id = self.info.dev_id;
        let mut ctrl = Control::open().map_err(io::Error::other)?;
        let stopped = ctrl.stop(id);
        if let Err(e) = &stopped {
            tracing::error!(dev_id = id, error = %e, "ublk STOP_DEV failed; parking the queues instead");
            self.shared.iter().for_each(|s| s.request_park());
        }
        self.join();
        ctrl.delete(id).map_err(|e| io::Error::new(e.kind(), format!("deleting /dev/ublkb{id}: {e}")))?;
        tracing::info!(dev_id = id, "ublk device removed");
        stopped
    }

    fn park_blocking(mut self) {
        self.shared.iter().for_each(|s| s.request_park());
        self.join();
        tracing::info!(dev_id = self.info.dev_id, "ublk queues parked; the device waits for the next server");
    }

    /// Waits for every queue thread, then frees their buffers and closes the char device.
    fn join(&mut self) {
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(end) => {
                    if let Some(e) = end.error {
                        tracing::error!(dev_id = self.info.dev_id, error = %e, "ublk queue ended with an error");
                    }
                    // The thread has exited: the kernel copies into its buffers no more.
                    drop(end.buffers);
                }
                Err(_) => tracing::error!(dev_id = self.info.dev_id, "ublk queue thread panicked"),
            }
        }
        self.cdev = None;
    }
}

fn start_blocking<V: Volume>(volume: Arc<V>, args: StartArgs) -> Result<UblkServer, StartError> {
    let mut ctrl = Control::open()?;
    let features = ctrl.features().map_err(|e| ControlError::command("GET_FEATURES", e))?;
    let size_bytes = volume.size_bytes();
    let (info, recovered) = match find_ours(&mut ctrl, args.cookie, args.opts.id)? {
        Some(info) => (prepare_recovery(&mut ctrl, info, size_bytes)?, true),
        None => (add_device(&mut ctrl, &args, features, size_bytes)?, false),
    };
    let id = info.dev_id;
    let server = match spawn_queues(volume, &info, &args, recovered) {
        Ok(s) => s,
        Err(e) => {
            if !recovered {
                let _ = ctrl.delete(id);
            }
            return Err(e);
        }
    };
    let started = Instant::now();
    let result = if recovered { ctrl.end_recovery(id) } else { ctrl.start(id) };
    if let Err(err) = result {
        server.park_blocking();
        if !recovered {
            let _ = ctrl.delete(id);
        }
        let what = if recovered { "END_USER_RECOVERY" } else { "START_DEV" };
        return Err(StartError::Device { id, what, err });
    }
    tracing::info!(
        dev_id = id,
        path = %server.info.path,
        queues = info.nr_hw_queues,
        depth = info.queue_depth,
        flags = format!("{:#x}", info.flags),
        recovered,
        start_ms = started.elapsed().as_millis() as u64,
        "ublk device serving"
    );
    Ok(server)
}

/// The device an earlier process of this backing left, if it can be recovered; refuses what
/// cannot be (served by a live process, a pinned id held by another device).
fn find_ours(ctrl: &mut Control, cookie: u64, pinned: Option<u32>) -> Result<Option<sys::DevInfo>, StartError> {
    for id in existing_ids() {
        let Ok(mut info) = ctrl.info(id) else { continue };
        if info.ublksrv_flags != cookie {
            if pinned == Some(id) {
                return Err(StartError::IdInUse(id));
            }
            continue;
        }
        // A predecessor that just died (or this process, after a failed upgrade) may still be
        // letting go: the kernel quiesces the device once its queues are gone.
        let deadline = Instant::now() + RECOVERY_WAIT;
        while info.state == sys::S_DEV_LIVE && !pid_alive_elsewhere(info.ublksrv_pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            info = ctrl.info(id).map_err(|err| StartError::Device { id, what: "GET_DEV_INFO", err })?;
        }
        match info.state {
            sys::S_DEV_QUIESCED => return Ok(Some(info)),
            sys::S_DEV_LIVE => return Err(StartError::Busy { id, pid: info.ublksrv_pid }),
            sys::S_DEV_DEAD => {
                // Added but never started (a crash during start): nothing can be waiting on it.
                tracing::warn!(dev_id = id, "removing ublk device an earlier run added but never started");
                ctrl.delete(id).map_err(|err| StartError::Device { id, what: "DEL_DEV", err })?;
            }
            s => return Err(StartError::Mismatch { id, why: format!("it is in kernel state {s}") }),
        }
    }
    Ok(None)
}

/// Whether `pid` is a live process other than this one.
fn pid_alive_elsewhere(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && pid as u32 != std::process::id() && unsafe { libc::kill(pid, 0) } == 0
}

/// START_USER_RECOVERY, retried while the predecessor still holds the char device.
fn prepare_recovery(ctrl: &mut Control, info: sys::DevInfo, size_bytes: u64) -> Result<sys::DevInfo, StartError> {
    let id = info.dev_id;
    let params = ctrl.params(id).map_err(|err| StartError::Device { id, what: "GET_PARAMS", err })?;
    if params.basic.dev_sectors != size_bytes >> 9 {
        let why = format!("it has {} bytes and the volume {size_bytes}", params.basic.dev_sectors << 9);
        return Err(StartError::Mismatch { id, why });
    }
    let deadline = Instant::now() + RECOVERY_WAIT;
    loop {
        match ctrl.start_recovery(id) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(err) => return Err(StartError::Device { id, what: "START_USER_RECOVERY", err }),
        }
    }
    tracing::info!(dev_id = id, "recovering the ublk device a previous process left");
    ctrl.info(id).map_err(|err| StartError::Device { id, what: "GET_DEV_INFO", err })
}

fn add_device(
    ctrl: &mut Control,
    args: &StartArgs,
    features: u64,
    size_bytes: u64,
) -> Result<sys::DevInfo, StartError> {
    let wanted = sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE | sys::F_CMD_IOCTL_ENCODE;
    if features & (sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE)
        != sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE
    {
        tracing::warn!(
            features = format!("{features:#x}"),
            "this kernel's ublk cannot re-issue requests to a restarted daemon: a crash will fail the I/O in flight"
        );
    }
    let want = sys::DevInfo {
        nr_hw_queues: args.opts.queues,
        queue_depth: args.opts.queue_depth,
        max_io_buf_bytes: MAX_IO_BYTES as u32,
        dev_id: args.opts.id.unwrap_or(u32::MAX),
        flags: wanted & features,
        ublksrv_flags: args.cookie,
        ..Default::default()
    };
    // A failed add never deletes anything: the id may belong to a device someone else serves.
    let info = ctrl.add(&want).map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST) => StartError::IdInUse(want.dev_id),
        Some(libc::EPERM) => StartError::NotPermitted,
        _ => StartError::Control(ControlError::command("ADD_DEV", e)),
    })?;
    let id = info.dev_id;
    let params = super::params_for(size_bytes, args.rotational, args.opts.read_only);
    if let Err(err) = ctrl.set_params(id, &params) {
        let _ = ctrl.delete(id);
        return Err(StartError::Device { id, what: "SET_PARAMS", err });
    }
    Ok(info)
}

/// Opens `/dev/ublkcN` (udev may take a moment to make it) and starts one thread per queue;
/// returns once every queue has fetched all its tags.
fn spawn_queues<V: Volume>(
    volume: Arc<V>,
    info: &sys::DevInfo,
    args: &StartArgs,
    recovered: bool,
) -> Result<UblkServer, StartError> {
    let id = info.dev_id;
    let cdev =
        Arc::new(open_cdev(id).map_err(|err| StartError::Device { id, what: "opening its char device", err })?);
    let mut server = UblkServer {
        info: Arc::new(UblkInfo {
            dev_id: id,
            path: format!("/dev/ublkb{id}"),
            queue_depth: info.queue_depth,
            flags: info.flags,
            recovered,
            queues: Vec::new(),
        }),
        threads: Vec::new(),
        shared: Vec::new(),
        cdev: Some(cdev.clone()),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    for q in 0..info.nr_hw_queues {
        let shared = QueueShared::new(q, args.requests.clone()).map_err(|err| StartError::Device {
            id,
            what: "eventfd",
            err,
        })?;
        let spec =
            QueueSpec { depth: info.queue_depth, max_io_bytes: info.max_io_buf_bytes as usize, cdev: cdev.clone() };
        let (s, v, rt, tx) = (shared.clone(), volume.clone(), args.rt.clone(), tx.clone());
        let t = std::thread::Builder::new()
            .name(format!("ublk-q{q}"))
            .spawn(move || queue::run(spec, s, v, rt, tx))
            .map_err(|err| StartError::Device { id, what: "starting a queue thread", err })?;
        server.threads.push(t);
        handles.push(Arc::new(QueueStatsHandle { q_id: q, shared: shared.clone() }));
        server.shared.push(shared);
    }
    drop(tx);
    for _ in 0..info.nr_hw_queues {
        let r = rx.recv().unwrap_or_else(|_| Err(io::Error::other("a queue thread ended before fetching")));
        if let Err(err) = r {
            server.park_blocking();
            return Err(StartError::Device { id, what: "setting up a queue", err });
        }
    }
    if let Some(i) = Arc::get_mut(&mut server.info) {
        i.queues = handles;
    }
    Ok(server)
}

fn open_cdev(id: u32) -> io::Result<std::fs::File> {
    let path = format!("/dev/ublkc{id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::File::options().read(true).write(true).open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// `superdisk detach /dev/ublkbN`: stops and deletes a device no process serves (one a crashed
/// or stopped daemon left quiesced). A device still served is refused.
pub fn delete_device(id: u32) -> Result<(), StartError> {
    let mut ctrl = Control::open()?;
    let info = ctrl.info(id).map_err(|err| match err.raw_os_error() {
        Some(libc::ENODEV) => StartError::Control(ControlError::command(
            format!("/dev/ublkb{id}"),
            io::Error::other("no such ublk device"),
        )),
        _ => StartError::Device { id, what: "GET_DEV_INFO", err },
    })?;
    if info.state == sys::S_DEV_LIVE && pid_alive_elsewhere(info.ublksrv_pid) {
        return Err(StartError::Busy { id, pid: info.ublksrv_pid });
    }
    // STOP_DEV fails the requests waiting on a quiesced device and removes the disk.
    let _ = ctrl.stop(id);
    ctrl.delete(id).map_err(|err| StartError::Device { id, what: "DEL_DEV", err })
}

impl Drop for UblkServer {
    /// Dropped without `stop` or `park` (a serving run that ended in an error): the queues finish
    /// what they started and let go, leaving the device for the next start to recover. Not
    /// joined here (this may be an async context). The threads then free their buffers before
    /// they have fully exited, which `join` otherwise avoids (module doc of `queue.rs`); this path
    /// only precedes the process's exit.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            tracing::warn!(dev_id = self.info.dev_id, "ublk device left for the next start to recover");
            self.shared.iter().for_each(|s| s.request_park());
        }
    }
}

/// With `ublk` off: a device of this backing that an earlier run left waiting for recovery (a
/// crash, then the config changed) would hang its filesystem's I/O forever; say so, and how to
/// remove it. Quiet where there is no ublk driver or the control device cannot be opened.
pub fn warn_if_left_waiting(cookie: u64) {
    if !std::path::Path::new(super::ctrl::CONTROL_PATH).exists() {
        return;
    }
    let Ok(mut ctrl) = Control::open() else { return };
    for id in existing_ids() {
        match ctrl.info(id) {
            Ok(info) if info.ublksrv_flags == cookie && info.state != sys::S_DEV_LIVE => tracing::warn!(
                dev_id = id,
                "ublk device /dev/ublkb{id} of this backing waits for a daemon with `ublk = true`; its I/O hangs \
                 until then. Turn ublk back on, or remove it with `superdisk detach /dev/ublkb{id}`"
            ),
            _ => {}
        }
    }
}

//! The running daemon's half of an in-place upgrade: check the new binary, start it in standby,
//! and hand it the state once everything is parked.

use super::{wire, BuildInfo, Inherited};
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long the new binary may take to describe itself, to reach standby (config parsed and
/// checked), and to be serving once it has the state.
const INFO_TIMEOUT: Duration = Duration::from_secs(10);
const STANDBY_TIMEOUT: Duration = Duration::from_secs(30);
const SERVING_TIMEOUT: Duration = Duration::from_secs(60);

/// A successor started and waiting for the state.
pub struct Standby {
    child: Child,
    sock: UnixStream,
    pub info: BuildInfo,
}

/// What `binary handover-info` says, if this daemon may hand over to it; else why not.
pub async fn check(binary: &Path) -> Result<BuildInfo, String> {
    let shown = binary.display();
    let meta = std::fs::metadata(binary).map_err(|e| format!("{shown}: {e}"))?;
    use std::os::unix::fs::PermissionsExt;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{shown}: not an executable file"));
    }
    let out = tokio::time::timeout(
        INFO_TIMEOUT,
        tokio::process::Command::new(binary).arg("handover-info").stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| format!("{shown} handover-info did not answer within {} s", INFO_TIMEOUT.as_secs()))?
    .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let not_ours = || {
        format!(
            "{shown}: not a superdisk build that can take over a running daemon (`handover-info` {})",
            describe(&out)
        )
    };
    if !out.status.success() {
        return Err(not_ours());
    }
    let info: BuildInfo = serde_json::from_slice(&out.stdout).map_err(|_| not_ours())?;
    BuildInfo::this().accepts(&info).map_err(|e| format!("{shown}: {e}"))?;
    Ok(info)
}

fn describe(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().next().unwrap_or("").trim();
    match (out.status.code(), first.is_empty()) {
        (Some(c), true) => format!("exited with status {c}"),
        (Some(c), false) => format!("exited with status {c}: {first}"),
        (None, _) => "was killed by a signal".to_owned(),
    }
}

/// Starts `binary` as this daemon's successor and waits until it has checked its configuration.
pub async fn start(binary: &Path, info: BuildInfo) -> Result<Standby, String> {
    let binary = binary.to_owned();
    tokio::task::spawn_blocking(move || start_blocking(&binary, info))
        .await
        .map_err(|e| format!("starting the new binary: {e}"))?
}

fn start_blocking(binary: &Path, info: BuildInfo) -> Result<Standby, String> {
    let (mine, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let fd = theirs.as_raw_fd();
    // SAFETY: F_SETFD on a descriptor we own: the successor inherits this one descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(format!("cannot pass the handover socket: {}", io::Error::last_os_error()));
    }
    let child = Command::new(binary)
        .args(successor_args(fd))
        // The watchdog is the successor's own once it is the main process; systemd treats a
        // missing WATCHDOG_PID as "meant for you".
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    drop(theirs);
    let mut standby = Standby { child, sock: mine, info };
    match read_line(&standby.sock, STANDBY_TIMEOUT) {
        Ok(l) if l.starts_with("standby") => Ok(standby),
        other => Err(standby.abandon(other, "before taking over")),
    }
}

/// This process's own arguments with `--takeover-fd FD` (an earlier one replaced).
fn successor_args(fd: i32) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if a == "--takeover-fd" {
            args.next();
            continue;
        }
        if a.to_string_lossy().starts_with("--takeover-fd=") {
            continue;
        }
        out.push(a);
    }
    out.push("--takeover-fd".into());
    out.push(fd.to_string().into());
    out
}

/// Sends the state and waits until the successor serves it; its PID on success. On failure the
/// successor is killed (and reaped) before this returns, so nothing else touches the devices.
pub async fn hand_over(standby: Standby, state: &Inherited) -> Result<u32, String> {
    let mut standby = standby;
    // Blocking on a runtime thread is fine here: every client is parked, nothing else waits.
    let r = tokio::task::block_in_place(|| {
        wire::send(&mut standby.sock, state).map_err(|e| format!("sending the state: {e}"))?;
        match read_line(&standby.sock, SERVING_TIMEOUT) {
            Ok(l) if l.starts_with("serving") => Ok(standby.child.id()),
            other => Err(other),
        }
        .map_err(|other| standby.abandon(other, "while taking over"))
    });
    // On success the successor lives on; this process exits soon and it is reparented.
    r
}

impl Standby {
    /// Kills and reaps a successor that will not be used.
    pub fn abandon_quietly(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills and reaps the successor; the message says what it did.
    fn abandon(&mut self, got: Result<String, String>, when: &str) -> String {
        let _ = self.child.kill();
        let status = self.child.wait();
        match got {
            Ok(l) if l.starts_with("error ") => format!("the new binary refused the state: {}", &l[6..]),
            Ok(l) if !l.is_empty() => format!("the new binary said {l:?} {when}"),
            Err(e) if !e.is_empty() => format!("the new binary failed {when}: {e}"),
            _ => match status {
                Ok(s) => format!("the new binary exited {when} ({s}); its log is in the daemon's log"),
                Err(e) => format!("the new binary exited {when}: {e}"),
            },
        }
    }
}

/// One line from the successor; "" when it closed its end (it exited).
fn read_line(sock: &UnixStream, timeout: Duration) -> Result<String, String> {
    sock.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut line = String::new();
    match BufReader::new(sock).read_line(&mut line) {
        Ok(_) => Ok(line.trim_end().to_owned()),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(format!("no answer within {} s", timeout.as_secs()))
        }
        Err(e) => Err(e.to_string()),
    }
}

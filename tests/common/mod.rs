//! Shared harness for integration tests: builds a temp dir, prepares a backing image with
//! `superdisk create`, runs `superdisk serve` on a free loopback port, and stops it on drop.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_superdisk");

/// Fails the test with a clear message when an external tool is missing: CI installs all of them
/// (.ci/run), so a skip would hide a broken install.
pub fn require_tool(name: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().map(|o| o.status.success());
    assert!(found.unwrap_or(false), "required tool `{name}` is not installed (see .ci/run for the package list)");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub port: u16,
    pub unix: PathBuf,
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Creates a backing image whose *exported* size is `size_bytes` and starts serving it.
    pub fn start(size_bytes: u64, extra_args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        run_ok(Command::new(BIN).args(["create", "--backing"]).arg(&backing).args(["--size", &size_bytes.to_string()]));
        let mut d = Daemon {
            unix: dir.path().join("nbd.sock"),
            dir,
            backing,
            port: 0,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        d.spawn();
        d
    }

    /// Starts (or restarts) the serve process on a new free port.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.port = free_port();
        let _ = std::fs::remove_file(&self.unix);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("daemon.log")).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--backing"])
            .arg(&self.backing)
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--unix"])
            .arg(&self.unix)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn superdisk serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("superdisk serve exited early with {status}; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "superdisk did not start listening; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.port)
    }

    pub fn unix_uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.unix.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM and wait; returns the exit status (the daemon must exit 0 after draining).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("superdisk did not exit within 30 s of SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Asserts the daemon is still alive (it did not panic or abort).
    pub fn assert_alive(&mut self) {
        let status = self.child.as_mut().expect("running").try_wait().unwrap();
        assert!(status.is_none(), "superdisk died: {status:?}; log:\n{}", self.log());
        assert!(!self.log().contains("panicked"), "superdisk logged a panic:\n{}", self.log());
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn sha256_file(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

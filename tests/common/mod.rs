//! Shared harness for integration tests: builds a temp dir, prepares a backing image with
//! `superdisk create`, runs `superdisk serve` on a free loopback port, and stops it on drop.
#![allow(dead_code)]

use std::net::TcpListener;
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

/// A loopback port nothing listened on a moment ago. Never the same one twice in one test binary:
/// tests run in parallel, and two daemons given one port would leave one of them failing to bind
/// while its test's readiness probe reached the other one (a CI failure once).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Whether process `pid` holds a listening TCP socket on `port` (IPv4). Between `free_port` and
/// the daemon's bind another process can take the port; a connect would then reach that process,
/// so readiness is read from /proc instead: the listening socket's inode among `pid`'s files.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
            let local_port = f.get(1)?.rsplit(':').next()?;
            (u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == "0A")
                .then(|| f.get(9).map(|i| i.to_string()))?
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|target| {
        let t = target.to_string_lossy();
        inodes.iter().any(|inode| t == format!("socket:[{inode}]"))
    })
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
    /// Environment variables for the serve process.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    /// After an in-place upgrade: the process now serving, which is not our child (the test
    /// process is made a child subreaper, so it can still reap it).
    adopted: Option<i32>,
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
            env: Vec::new(),
            child: None,
            adopted: None,
        };
        d.spawn();
        d
    }

    /// Starts (or restarts) the serve process on a new free port. Should another process take the
    /// port before the daemon binds it, the daemon exits saying so and is started on another one.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none() && self.adopted.is_none(), "already running");
        for _attempt in 0..5 {
            let log_from = self.log().len();
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
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn superdisk serve");
            let pid = child.id();
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !listens_on(pid, self.port) {
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    self.child = None;
                    let log = self.log();
                    if log[log_from..].contains("Address already in use") {
                        break;
                    }
                    panic!("superdisk serve exited early with {status}; log:\n{log}");
                }
                assert!(Instant::now() < deadline, "superdisk did not start listening; log:\n{}", self.log());
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.child.is_some() {
                return;
            }
        }
        panic!("five free ports were taken before superdisk could bind them; log:\n{}", self.log());
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
        match self.adopted {
            Some(pid) => pid as u32,
            None => self.child.as_ref().expect("running").id(),
        }
    }

    /// The admin socket `Daemon::start` gives every daemon started with `--admin-socket` via
    /// [`Daemon::admin_args`].
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// `--admin-socket PATH` for `extra_args`.
    pub fn admin_args(dir: &Path) -> Vec<String> {
        vec!["--admin-socket".into(), dir.join("admin.sock").display().to_string()]
    }

    /// `superdisk upgrade --binary BINARY`: its output and whether it succeeded. On success the
    /// old process has exited (reaped here) and the new one is the daemon from now on.
    pub fn upgrade(&mut self, binary: &Path) -> (bool, String) {
        // SAFETY: prctl with integer arguments only; makes orphaned descendants (the new daemon,
        // once the old one exits) our children, so `stop`/`kill` can reap them.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let out = Command::new(BIN)
            .args(["upgrade", "--socket"])
            .arg(self.admin_socket())
            .arg("--binary")
            .arg(binary)
            .output()
            .expect("run superdisk upgrade");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            return (false, text);
        }
        let pid = text
            .split(", pid ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("no pid in the upgrade's answer: {text}"));
        let old = self.pid() as i32;
        if let Some(mut c) = self.child.take() {
            let status = c.wait().unwrap();
            assert!(status.success(), "the old daemon exited with {status} after the upgrade; log:\n{}", self.log());
        } else {
            wait_pid(old, Duration::from_secs(10)).expect("the old daemon did not exit after the upgrade");
        }
        self.adopted = Some(pid);
        (true, text)
    }

    /// SIGTERM and wait; returns the exit status (the daemon must exit 0 after draining).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.adopted.take() {
            // SAFETY: signalling the daemon this test started (through an upgrade).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            return wait_pid(pid, Duration::from_secs(30))
                .unwrap_or_else(|| panic!("superdisk did not exit within 30 s of SIGTERM; log:\n{}", self.log()));
        }
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

    /// SIGTERM without waiting (see [`Daemon::wait_exit`]).
    pub fn term(&self) {
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
    }

    /// Waits up to `limit` for the daemon (our child) to exit; its status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running (and our child)");
        wait_child(&mut child, limit, || format!("superdisk; log:\n{}", self.log()))
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) {
        if let Some(pid) = self.adopted.take() {
            // SAFETY: signalling the daemon this test started (through an upgrade).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_pid(pid, Duration::from_secs(10));
            return;
        }
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Asserts the daemon is still alive (it did not panic or abort).
    pub fn assert_alive(&mut self) {
        if let Some(pid) = self.adopted {
            assert!(wait_pid(pid, Duration::ZERO).is_none(), "superdisk died; log:\n{}", self.log());
            assert!(!self.log().contains("panicked"), "superdisk logged a panic:\n{}", self.log());
            return;
        }
        let status = self.child.as_mut().expect("running").try_wait().unwrap();
        assert!(status.is_none(), "superdisk died: {status:?}; log:\n{}", self.log());
        assert!(!self.log().contains("panicked"), "superdisk logged a panic:\n{}", self.log());
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Waits up to `limit` for process `pid` (our child, or a descendant we are subreaper for) to
/// exit; its status, or None if it still runs.
/// Waits up to `limit` for `child` to exit; past it, kills and reaps it and fails the test, naming
/// it with `what()`.
pub fn wait_child(child: &mut Child, limit: Duration, what: impl FnOnce() -> String) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not exit within {limit:?}", what());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_pid(pid: i32, limit: Duration) -> Option<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on one pid, writing into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(std::process::ExitStatus::from_raw(status));
        }
        if r < 0 {
            // Not our child (already reaped elsewhere): gone if it no longer exists.
            // SAFETY: signal 0 only checks existence.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return Some(std::process::ExitStatus::from_raw(0));
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.adopted.take() {
            // SAFETY: killing the daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_pid(pid, Duration::from_secs(5));
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn sha256_file(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

// ------------------------------------------------------------------------------------------------
// Mirror helpers (tests/mirror_process.rs, tests/mirror_xfs.rs): a daemon whose backing is created
// with cache devices, waits on its log, the offline `superdisk verify`, FUSE-presented files and
// commands with a time limit.

/// The Python with the `nbd` module (python3-libnbd is packaged for the system interpreter).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// A `tests/py` script run by [`SYSTEM_PYTHON`], without writing `__pycache__` into the tree.
pub fn py_command(script: &str) -> Command {
    require_tool(SYSTEM_PYTHON);
    let ok = Command::new(SYSTEM_PYTHON).args(["-c", "import nbd"]).status().map(|s| s.success());
    assert!(ok.unwrap_or(false), "{SYSTEM_PYTHON} cannot import nbd: install python3-libnbd (see .ci/run)");
    let mut cmd = Command::new(SYSTEM_PYTHON);
    cmd.env("PYTHONDONTWRITEBYTECODE", "1").arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(script));
    cmd
}

/// Runs `cmd`, killing it after `limit`; returns its output. A hung external tool must fail the
/// test with a message instead of eating the CI budget.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Drain both pipes on threads so that a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut so, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut se, &mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
            let err = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            panic!("{cmd:?} did not finish within {limit:?}\nstdout:\n{out}\nstderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

/// What `superdisk verify` reported.
#[derive(Debug)]
pub struct VerifyReport {
    pub exit_code: Option<i32>,
    /// The `mismatch offset=N length=M` lines.
    pub mismatches: Vec<(u64, u64)>,
    /// From the summary line `verify: N regions checked, M mismatches`.
    pub regions_checked: u64,
    pub mismatch_count: u64,
    pub output: String,
}

/// Parses `superdisk verify` output; panics if the summary line is missing (a verify that printed
/// nothing has checked nothing).
pub fn parse_verify(out: &std::process::Output) -> VerifyReport {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let output = format!("{stdout}{stderr}");
    let num =
        |s: &str| -> u64 { s.parse().unwrap_or_else(|_| panic!("not a number {s:?} in verify output:\n{output}")) };
    let mut mismatches = Vec::new();
    let mut summary = None;
    for line in output.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("mismatch ") {
            let mut off = None;
            let mut len = None;
            for kv in rest.split_whitespace() {
                if let Some(v) = kv.strip_prefix("offset=") {
                    off = Some(num(v));
                } else if let Some(v) = kv.strip_prefix("length=") {
                    len = Some(num(v));
                }
            }
            mismatches.push((off.expect("mismatch line without offset="), len.expect("mismatch line without length=")));
        } else if let Some(rest) = line.strip_prefix("verify: ") {
            // "N regions checked, M mismatches"
            let words: Vec<&str> =
                rest.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()).collect();
            let n = words.iter().position(|w| *w == "regions").map(|i| num(words[i - 1]));
            let m = words.iter().position(|w| w.starts_with("mismatch")).map(|i| num(words[i - 1]));
            if let (Some(n), Some(m)) = (n, m) {
                summary = Some((n, m));
            }
        }
    }
    let (regions_checked, mismatch_count) =
        summary.unwrap_or_else(|| panic!("no `verify: N regions checked, M mismatches` line in:\n{output}"));
    VerifyReport { exit_code: out.status.code(), mismatches, regions_checked, mismatch_count, output }
}

impl Daemon {
    /// A daemon whose directory exists but whose backing is not yet created and which is not
    /// running: cache files go into [`Daemon::path`] first, then [`Daemon::create_with`] and
    /// [`Daemon::spawn`].
    pub fn unstarted() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Daemon {
            backing: dir.path().join("backing.img"),
            unix: dir.path().join("nbd.sock"),
            dir,
            port: 0,
            extra_args: Vec::new(),
            env: Vec::new(),
            child: None,
            adopted: None,
        }
    }

    /// `superdisk create --backing B --size N ARGS…`; returns its stdout.
    pub fn create_with(&self, size_bytes: u64, args: &[&std::ffi::OsStr]) -> String {
        run_ok(
            Command::new(BIN)
                .args(["create", "--backing"])
                .arg(&self.backing)
                .args(["--size", &size_bytes.to_string()])
                .args(args),
        )
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some() || self.adopted.is_some()
    }

    /// Bytes in the log so far: pass to [`Daemon::log_since`] / [`Daemon::wait_log`] to look only
    /// at what a later start printed (the log is appended across restarts).
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    pub fn log_since(&self, mark: usize) -> String {
        let log = self.log();
        log.get(mark..).unwrap_or("").to_owned()
    }

    /// Waits until the log after `mark` contains `needle`; fails if the daemon dies or `limit`
    /// passes. Returns the log after `mark`.
    pub fn wait_log(&mut self, mark: usize, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log_since(mark);
            if log.contains(needle) {
                return log;
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    panic!("superdisk exited ({status}) while waiting for {needle:?}; log:\n{}", self.log());
                }
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log within {limit:?}; log since start:\n{log}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The last `mode=` value the log printed after `mark` (lowercased), if any.
    pub fn last_mode(&self, mark: usize) -> Option<String> {
        let log = self.log_since(mark);
        // The field `mode=…`, not a longer key that ends in "mode" (`io_mode=`).
        let pos = log
            .match_indices("mode=")
            .map(|(i, _)| i)
            .filter(|&i| i == 0 || !log.as_bytes()[i - 1].is_ascii_alphanumeric() && log.as_bytes()[i - 1] != b'_')
            .last()?;
        let rest = &log[pos + 5..];
        let end = rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len());
        Some(rest[..end].to_ascii_lowercase())
    }

    /// Waits until the last `mode=` logged after `mark` is `mode`.
    pub fn wait_mode(&mut self, mark: usize, mode: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.last_mode(mark).as_deref() == Some(mode) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    panic!("superdisk exited ({status}) while waiting for mode={mode}; log:\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "mode={mode} not reached within {limit:?} (last: {:?}); log since start:\n{}",
                self.last_mode(mark),
                self.log_since(mark)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// After a SIGKILL the kernel may hold the dead daemon's files a moment longer (io_uring
    /// requests in flight are torn down asynchronously), and with them its lock on the backing.
    /// Waits until the lock is free so a restart does not race the teardown.
    pub fn wait_backing_unlocked(&self) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&self.backing).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // SAFETY: flock on a file descriptor we own; released at once.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                // SAFETY: as above.
                unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
                return;
            }
            assert!(Instant::now() < deadline, "the backing is still locked 10 s after the daemon died");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `superdisk verify --backing B --cache C… [EXTRA…]`, offline (the daemon must be stopped).
    pub fn verify_offline(&self, caches: &[PathBuf], extra: &[&str]) -> VerifyReport {
        assert!(!self.is_running(), "verify is offline: stop the daemon first");
        let mut cmd = Command::new(BIN);
        cmd.args(["verify", "--backing"]).arg(&self.backing);
        for c in caches {
            cmd.arg("--cache").arg(c);
        }
        cmd.args(extra);
        parse_verify(&output_within(&mut cmd, Duration::from_secs(60)))
    }
}

/// A file presented by nbdfuse from an NBD URI: `DIR/NAME`. Dropping it unmounts (lazily if the
/// file is still open, e.g. by a daemon that is still running) and reaps nbdfuse.
pub struct FuseFile {
    pub dir: PathBuf,
    pub file: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl FuseFile {
    /// Mounts `uri` at `dir/name` (dir is created) and waits until the file has `size` bytes.
    pub fn mount(dir: &Path, name: &str, uri: &str, size: u64) -> FuseFile {
        require_tool("nbdfuse");
        require_tool("fusermount3");
        std::fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let log = dir.with_extension("log");
        let _ = std::fs::remove_file(&pidfile);
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir.join(name))
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = FuseFile { dir: dir.to_path_buf(), file: dir.join(name), child: Some(child), log };
        let deadline = Instant::now() + Duration::from_secs(20);
        // nbdfuse writes its pid file once the FUSE mount serves.
        while !(pidfile.exists() && std::fs::metadata(&f.file).map(|m| m.len()).unwrap_or(0) == size) {
            if let Some(status) = f.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdfuse exited with {status}: {}", std::fs::read_to_string(&f.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "nbdfuse did not present {} bytes at {}", size, f.file.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mounted").id()
    }

    /// Unmounts and waits for nbdfuse to exit; `lazy` detaches even while the file is open.
    /// Returns how nbdfuse exited (None if it had to be killed).
    pub fn unmount(&mut self, lazy: bool) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let flag = if lazy { "-uz" } else { "-u" };
        let out = output_within(Command::new("fusermount3").arg(flag).arg(&self.dir), Duration::from_secs(20));
        if !out.status.success() {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = None;
        while exited.is_none() {
            exited = child.try_wait().unwrap();
            if exited.is_none() && Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            out.status.success() || lazy,
            "fusermount3 {flag} {} failed: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        exited
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let ok = Command::new("fusermount3").arg("-u").arg(&self.dir).status().map(|s| s.success());
            if !ok.unwrap_or(false) {
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Fills `buf` with seeded pseudo-random bytes (splitmix64), 8 bytes a step: the `rand` crate's
/// per-byte generators are too slow in debug builds for the megabytes these tests write.
pub fn fill_random(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

// ------------------------------------------------------------------------------------------------
// A filesystem on the export: tests/mirror_xfs.rs, tests/postgres.rs.

const STACK_WAIT: Duration = Duration::from_secs(40);

/// nbdfuse + loop + mount, torn down in reverse order on drop, so that a failing assertion leaves
/// no mount, loop device or FUSE mount behind.
pub struct XfsStack {
    pub mnt: PathBuf,
    loop_dev: Option<String>,
    mounted: bool,
    fuse: Option<FuseFile>,
}

impl XfsStack {
    /// Presents the daemon's export (`size_bytes`) as a loop device; mount it with [`Self::mount`].
    pub fn attach(d: &Daemon, size_bytes: u64) -> XfsStack {
        let mnt = d.path("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let fuse = FuseFile::mount(&d.path("fuse"), "disk", &d.uri(), size_bytes);
        let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&fuse.file)).trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        XfsStack { mnt, loop_dev: Some(dev), mounted: false, fuse: Some(fuse) }
    }

    pub fn dev(&self) -> &str {
        self.loop_dev.as_deref().expect("attached")
    }

    pub fn mount(&mut self) {
        let out = output_within(Command::new("mount").args(["-t", "xfs", self.dev()]).arg(&self.mnt), STACK_WAIT);
        assert!(
            out.status.success(),
            "mount -t xfs failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = true;
    }

    pub fn umount(&mut self) {
        let out = output_within(Command::new("umount").arg(&self.mnt), STACK_WAIT);
        assert!(out.status.success(), "umount failed: {}", String::from_utf8_lossy(&out.stderr));
        self.mounted = false;
    }

    pub fn xfs_repair_clean(&self, when: &str) {
        assert!(!self.mounted);
        let out = output_within(Command::new("xfs_repair").args(["-n", self.dev()]), STACK_WAIT);
        assert!(
            out.status.success(),
            "xfs_repair -n found problems {when} ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Orderly: unmount, detach the loop device, make sure everything reached the daemon, unmount
    /// FUSE; every step must succeed.
    pub fn detach(mut self) {
        if self.mounted {
            self.umount();
        }
        if let Some(dev) = self.loop_dev.take() {
            run_ok(Command::new("losetup").args(["-d", &dev]));
        }
        // fsync through FUSE becomes an NBD flush before FUSE goes away.
        run_ok(&mut Command::new("sync"));
        let exited = self.fuse.take().unwrap().unmount(false);
        assert!(exited.is_some_and(|s| s.success()), "nbdfuse exited with {exited:?} after fusermount3 -u");
    }

    /// After the server died under it: the filesystem has shut itself down on I/O errors; take
    /// everything down without expecting success from the dead path.
    pub fn tear_down_dead(mut self) {
        if self.mounted {
            let out = output_within(Command::new("umount").arg(&self.mnt), STACK_WAIT);
            if !out.status.success() {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
            self.mounted = false;
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = output_within(Command::new("losetup").args(["-d", &dev]), STACK_WAIT);
        }
        self.fuse.take().unwrap().unmount(true);
    }
}

impl Drop for XfsStack {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount").arg(&self.mnt).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        // The FuseFile unmounts itself when dropped, after the fields above.
    }
}

/// An image served by nbdkit (a plugin, perhaps behind filters) and presented as a file by
/// nbdfuse: a device the test can make fail (through the filters or the plugin's own rules),
/// stall (SIGSTOP: every request through the FUSE file hangs in the kernel, a real hang), or take
/// away (kill nbdkit, or unmount). Dropping it continues, stops and unmounts whatever is up.
pub struct NbdkitFile {
    dir: tempfile::TempDir,
    name: String,
    len: u64,
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, std::ffi::OsString)>,
    nbdkit: Option<Child>,
    fuse: Option<FuseFile>,
    stalled: bool,
}

impl NbdkitFile {
    /// A fixture that will serve `len` bytes as `name`; put what nbdkit reads in [`Self::dir`],
    /// then [`Self::run`] it with its arguments.
    pub fn new(name: &str, len: u64) -> NbdkitFile {
        for t in ["nbdkit", "nbdfuse", "fusermount3"] {
            require_tool(t);
        }
        NbdkitFile {
            dir: tempfile::tempdir().unwrap(),
            name: name.into(),
            len,
            args: Vec::new(),
            env: Vec::new(),
            nbdkit: None,
            fuse: None,
            stalled: false,
        }
    }

    /// nbdkit's arguments (filters, the plugin and its parameters) and environment, for every
    /// [`Self::run`] from now on.
    pub fn set_args(&mut self, args: &[&std::ffi::OsStr], env: &[(&str, &std::ffi::OsStr)]) {
        self.args = args.iter().map(|a| a.to_os_string()).collect();
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_os_string())).collect();
    }

    /// A directory of the fixture's own, for files its nbdkit reads (images, trigger files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file the daemon uses.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("fuse").join(&self.name)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nbdkit.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.nbdkit.as_ref().expect("nbdkit running").id()
    }

    /// Starts nbdkit and mounts the file (again, after [`Self::stop`]).
    pub fn run(&mut self) {
        let sock = self.dir.path().join("nbdkit.sock");
        let pidfile = self.dir.path().join("nbdkit.pid");
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&pidfile);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("nbdkit.log")).unwrap();
        let mut child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&sock)
            .arg("-P")
            .arg(&pidfile)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nbdkit");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("nbdkit exited with {s}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.nbdkit = Some(child);
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        self.fuse = Some(FuseFile::mount(&self.dir.path().join("fuse"), &self.name, &uri, self.len));
    }

    fn signal(&self, sig: i32) {
        let pid = self.pid();
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill({pid}, {sig})");
    }

    /// The device stops answering: every request to the FUSE file hangs.
    pub fn stall(&mut self) {
        self.signal(libc::SIGSTOP);
        self.stalled = true;
    }

    pub fn answer(&mut self) {
        self.signal(libc::SIGCONT);
        self.stalled = false;
    }

    /// Takes the file away: unmounts FUSE (lazily: the daemon may hold it) and stops nbdkit.
    pub fn stop(&mut self) {
        if self.stalled {
            self.answer();
        }
        if let Some(mut f) = self.fuse.take() {
            f.unmount(true);
        }
        if let Some(mut c) = self.nbdkit.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// After its nbdkit was killed from outside (by the workload).
    pub fn reap_killed(&mut self) {
        let mut c = self.nbdkit.take().expect("nbdkit was started");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the killed nbdkit did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(!status.success(), "nbdkit should have been killed, exited with {status}");
    }
}

impl Drop for NbdkitFile {
    fn drop(&mut self) {
        self.stop();
    }
}

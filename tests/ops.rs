//! Operations files: the systemd units (`systemd-analyze verify`, and the daemon and the supervisor
//! accept the command lines the units run, under the unit's restrictions where they can be
//! reproduced without systemd), `scripts/gcp-setup.sh` (dry runs against fake
//! /dev/disk/by-id links) and the fio job files (`fio --parse-only`).
//!
//! Runs as root (CI does): it installs the built binary as /usr/local/bin/superdisk, which the
//! unit names and `systemd-analyze verify` checks, and it uses loop devices.

mod common;
use common::*;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const INSTALLED_BIN: &str = "/usr/local/bin/superdisk";

fn repo(rel: &str) -> PathBuf {
    Path::new(REPO).join(rel)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "tests/ops.rs runs as root (it installs {INSTALLED_BIN})");
}

/// Puts the binary under test where the unit's ExecStart= names it, unless an identical copy is
/// already there. Written next to it and renamed, so a running copy is never modified in place.
fn install_binary() {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let ours = std::fs::read(BIN).unwrap();
    if std::fs::read(INSTALLED_BIN).map(|b| b == ours).unwrap_or(false) {
        return;
    }
    std::fs::create_dir_all("/usr/local/bin").unwrap();
    let tmp = format!("{INSTALLED_BIN}.tmp.{}", std::process::id());
    std::fs::write(&tmp, &ours).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, INSTALLED_BIN).unwrap();
}

// --- unit files ----------------------------------------------------------------------------------

/// The values of `key=` in a unit file, in order (keys repeat: ExecStop=, Environment=).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines().filter_map(|l| l.strip_prefix(&prefix)).map(str::to_string).collect()
}

fn unit_value(unit: &str, key: &str) -> String {
    let v = unit_values(unit, key);
    assert_eq!(v.len(), 1, "expected exactly one {key}= line, found {v:?}");
    v.into_iter().next().unwrap()
}

/// `systemd-analyze verify` exits 0 even for unknown keys and unparsable values (it only warns),
/// so a unit passes only with status 0 and no line of output about the units under test.
fn analyze_verify(unit_dir: &Path, units: &[&str]) -> Result<String, String> {
    require_tool("systemd-analyze");
    let mut cmd = Command::new("systemd-analyze");
    // The trailing ':' appends the standard search path, so that targets the units refer to
    // (multi-user.target, remote-fs.target) resolve.
    cmd.env("SYSTEMD_UNIT_PATH", format!("{}:", unit_dir.display())).arg("verify").arg("--man=yes");
    cmd.args(units).current_dir(unit_dir);
    let out = cmd.output().expect("run systemd-analyze");
    let all = text(&out);
    let dir = unit_dir.display().to_string();
    let ours: Vec<&str> = all
        .lines()
        .filter(|l| l.contains(&dir) || units.iter().any(|u| l.contains(u.split('@').next().unwrap())))
        .collect();
    if out.status.success() && ours.is_empty() {
        Ok(all)
    } else {
        Err(format!("systemd-analyze verify {units:?} ({}):\n{all}", out.status))
    }
}

/// A unit directory holding the repository's units and examples, plus a stand-in for the
/// database unit that the example drop-in extends.
fn unit_dir_with_repo_units() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["superdisk@.service", "superdisk-nbd@.service", "var-lib-scylla.mount"] {
        std::fs::copy(repo(&format!("systemd/{f}")), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("scylla-server.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
    std::fs::create_dir(dir.path().join("scylla-server.service.d")).unwrap();
    std::fs::copy(
        repo("systemd/scylla-server.service.d/superdisk.conf"),
        dir.path().join("scylla-server.service.d/superdisk.conf"),
    )
    .unwrap();
    dir
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    install_binary();
    // Every file in systemd/ is covered here or by name below, so a new unit cannot slip past.
    let mut files: Vec<String> = std::fs::read_dir(repo("systemd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "scylla-server.service.d",
            "superdisk-nbd.env.example",
            "superdisk-nbd@.service",
            // A drop-in for ublk instances; verified below as superdisk@ublk.service's.
            "superdisk-ublk.conf",
            // Not a unit: the instance config the package ships; tests/package.rs parses it.
            "superdisk.example.toml",
            "superdisk@.service",
            "var-lib-scylla.mount"
        ],
        "systemd/ changed: add the new file to this test"
    );
    let dir = unit_dir_with_repo_units();
    let drop_in = dir.path().join("superdisk@ublk.service.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    std::fs::copy(repo("systemd/superdisk-ublk.conf"), drop_in.join("ublk.conf")).unwrap();
    for unit in [
        "superdisk@test.service",
        "superdisk@ublk.service",
        "superdisk-nbd@test.service",
        "var-lib-scylla.mount",
        "scylla-server.service",
    ] {
        if let Err(e) = analyze_verify(dir.path(), &[unit]) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_verify_check_catches_a_unit_with_a_bad_key() {
    install_binary();
    // The control for the test above: systemd-analyze's status alone would pass these.
    for bad in ["Restart=sometimes\n", "Bogus=1\n"] {
        let dir = unit_dir_with_repo_units();
        let path = dir.path().join("superdisk@.service");
        let unit = std::fs::read_to_string(&path).unwrap().replace("[Install]\n", &format!("{bad}[Install]\n"));
        std::fs::write(&path, unit).unwrap();
        let result = analyze_verify(dir.path(), &["superdisk@test.service"]);
        assert!(result.is_err(), "a unit with {bad:?} passed: {result:?}");
    }
}

/// Child processes and loop devices of a test, released even when the test fails.
#[derive(Default)]
struct Cleanup {
    children: Vec<std::process::Child>,
    loops: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
    }
}

fn losetup(file: &Path, cleanup: &mut Cleanup) -> String {
    require_tool("losetup");
    let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(file)).trim().to_string();
    cleanup.loops.push(dev.clone());
    dev
}

fn sparse_file(path: &Path, size_bytes: u64) {
    std::fs::File::create(path).unwrap().set_len(size_bytes).unwrap();
}

/// Receives sd_notify datagrams as systemd would.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> NotifySocket {
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        NotifySocket { sock, path, seen: Vec::new() }
    }

    /// Waits until a datagram holds `line` as one of its lines.
    fn wait_for(&mut self, line: &str, limit: Duration, daemon: &mut std::process::Child, log: &Path) {
        let deadline = Instant::now() + limit;
        loop {
            if self.seen.iter().any(|m| m.lines().any(|l| l == line)) {
                return;
            }
            if let Ok(Some(status)) = daemon.try_wait() {
                panic!("daemon exited with {status} before sending {line}; log:\n{}", read(log));
            }
            assert!(Instant::now() < deadline, "no {line} within {limit:?}; got {:?}; log:\n{}", self.seen, read(log));
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    fn collect_for(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    fn count(&self, line: &str) -> usize {
        self.seen.iter().filter(|m| m.lines().any(|l| l == line)).count()
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A field of /proc/PID/status, e.g. "CapEff".
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let prefix = format!("{field}:");
    status.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().to_string()).unwrap()
}

fn seconds(value: &str) -> u64 {
    match value.strip_suffix("min") {
        Some(m) => m.parse::<u64>().unwrap() * 60,
        None => value.trim_end_matches('s').parse().unwrap(),
    }
}

/// The unit's ExecStart= runs the daemon as systemd would: Type=notify (READY=1 once the NBD
/// socket serves), the watchdog pings, the admin socket in the runtime directory, ExecReload=
/// leaves it serving, KillSignal= drains and exits 0. It runs with no capabilities at all, as
/// CapabilityBoundingSet= (empty) gives it, on loop devices: opening block devices, O_DIRECT,
/// io_uring and flock must not need any. Paths under /etc/superdisk and /run/superdisk are
/// moved into a temp dir; the other sandboxing needs systemd itself.
#[test]
fn service_command_lines_work_without_capabilities() {
    install_binary();
    require_tool("setpriv");
    require_tool("nbdinfo");
    let unit = std::fs::read_to_string(repo("systemd/superdisk@.service")).unwrap();
    assert_eq!(unit_value(&unit, "Type"), "notify");
    // all: an upgraded daemon (a child of the old one) notifies before it becomes MAINPID.
    assert_eq!(unit_value(&unit, "NotifyAccess"), "all");
    assert_eq!(unit_value(&unit, "RuntimeDirectory"), "superdisk/%i");
    assert_eq!(unit_value(&unit, "CapabilityBoundingSet"), "");
    let instance = "opstest";
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc/superdisk");
    let run = dir.path().join("run/superdisk");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(run.join(instance)).unwrap();
    std::fs::set_permissions(run.join(instance), std::fs::Permissions::from_mode(0o750)).unwrap();
    let expand = |s: &str| {
        s.replace("%i", instance)
            .replace("/etc/superdisk/", &format!("{}/", etc.display()))
            .replace("/run/superdisk/", &format!("{}/", run.display()))
    };

    let mut cleanup = Cleanup::default();
    sparse_file(&dir.path().join("pd.img"), 64 << 20);
    sparse_file(&dir.path().join("ssd.img"), 80 << 20);
    let pd = losetup(&dir.path().join("pd.img"), &mut cleanup);
    let ssd = losetup(&dir.path().join("ssd.img"), &mut cleanup);
    run_ok(Command::new(INSTALLED_BIN).args(["create", "--backing", &pd, "--cache", &ssd]));
    std::fs::write(
        etc.join(format!("{instance}.toml")),
        format!("backing = \"{pd}\"\ncache = [\"{ssd}\"]\nlisten = \"\"\nexport = \"{instance}\"\n"),
    )
    .unwrap();

    let exec_start = expand(&unit_value(&unit, "ExecStart"));
    assert!(!exec_start.contains(['"', '\'', '$']), "the test splits ExecStart on spaces: {exec_start}");
    let argv: Vec<&str> = exec_start.split_whitespace().collect();
    assert_eq!(argv[0], INSTALLED_BIN);
    let nbd_sock = run.join(instance).join("nbd.sock");
    let admin_sock = run.join(instance).join("admin.sock");
    assert!(exec_start.contains(&nbd_sock.display().to_string()), "{exec_start}");
    assert!(exec_start.contains(&admin_sock.display().to_string()), "{exec_start}");

    let mut notify = NotifySocket::bind(dir.path().join("notify.sock"));
    let watchdog_usec = seconds(&unit_value(&unit, "WatchdogSec")) * 1_000_000;
    let log = dir.path().join("daemon.log");
    // WATCHDOG_PID must be the daemon's pid, known only once it runs: the shell exports its own
    // pid and then becomes the daemon.
    let child = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs", "--"])
        .args(["/bin/sh", "-c", "WATCHDOG_PID=$$; export WATCHDOG_PID; exec \"$@\"", "sh"])
        .args(&argv)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", watchdog_usec.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    cleanup.children.push(child);
    let daemon = cleanup.children.last_mut().unwrap();
    let pid = daemon.id();

    notify.wait_for("READY=1", Duration::from_secs(60), daemon, &log);
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000", "the daemon was meant to run without capabilities");
    assert_eq!(proc_status(pid, "CapBnd"), "0000000000000000");
    // READY=1 means serving: a client gets the export at once.
    let uri = format!("nbd+unix:///{instance}?socket={}", nbd_sock.display());
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert!(size.trim().parse::<u64>().unwrap() > 0, "{size}");
    // io_uring needs no capability: the daemon must not have fallen back to psync.
    assert!(read(&log).contains("engine=\"uring\""), "log:\n{}", read(&log));
    run_ok(Command::new(INSTALLED_BIN).arg("verify").arg("--socket").arg(&admin_sock));
    // Pings at least every WatchdogSec/2 (the daemon sends them every 250 ms).
    let pings = notify.count("WATCHDOG=1");
    notify.collect_for(Duration::from_secs(2));
    assert!(notify.count("WATCHDOG=1") >= pings + 3, "watchdog pings stopped: {:?}", notify.seen);

    // ExecReload= as systemd runs it: $MAINPID is the daemon.
    let reload = unit_value(&unit, "ExecReload").replace("$MAINPID", &pid.to_string());
    let reload_argv: Vec<&str> = reload.split_whitespace().collect();
    run_ok(Command::new(reload_argv[0]).args(&reload_argv[1..]));
    std::thread::sleep(Duration::from_secs(1));
    assert!(daemon.try_wait().unwrap().is_none(), "ExecReload= stopped the daemon; log:\n{}", read(&log));
    run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));

    let signal = match unit_value(&unit, "KillSignal").as_str() {
        "SIGTERM" => libc::SIGTERM,
        other => panic!("this test knows SIGTERM, not {other}"),
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, signal) };
    notify.wait_for("STOPPING=1", Duration::from_secs(30), daemon, &log);
    let limit = Duration::from_secs(seconds(&unit_value(&unit, "TimeoutStopSec")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within TimeoutStopSec; log:\n{}", read(&log));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}; log:\n{}", read(&log));
    assert!(read(&log).contains("clean shutdown recorded"), "log:\n{}", read(&log));
}

/// What runs inside the container of the next test, as a oneshot service under its systemd: it
/// drives superdisk@opstest with systemctl and reports `key=value` lines to /out/result.txt.
const IN_CONTAINER: &str = r#"#!/bin/bash
exec >/out/result.txt 2>&1
I=opstest
U=superdisk@$I.service
PD=$(cat /out/pd); SSD=$(cat /out/ssd)
URI="nbd+unix:///$I?socket=/run/superdisk/$I/nbd.sock"
mkdir -p /etc/superdisk
/usr/local/bin/superdisk create --backing "$PD" --cache "$SSD"
printf 'backing = "%s"\ncache = ["%s"]\nlisten = ""\nexport = "%s"\n' "$PD" "$SSD" "$I" >/etc/superdisk/$I.toml
systemctl start $U; echo "start_rc=$?"
systemctl show -p ActiveState -p SubState -p StatusText -p NRestarts $U
echo "sockets=$(stat -c '%n:%a' /run/superdisk/$I/nbd.sock /run/superdisk/$I/admin.sock | tr '\n' ' ')"
echo "size=$(nbdinfo --size "$URI")"
head -c 16M /dev/urandom >/tmp/data
nbdcopy /tmp/data "$URI"; echo "write_rc=$?"
if cmp -s /tmp/data <(nbdcopy "$URI" - | head -c 16M); then echo "data_ok=yes"; else echo "data_ok=no"; fi
/usr/local/bin/superdisk status --instance $I >/dev/null; echo "status_rc=$?"
echo 'log_level = "debug"' >>/etc/superdisk/$I.toml
systemctl reload $U; echo "reload_rc=$?"
sleep 1
echo "after_reload=$(systemctl is-active $U)"
old=$(systemctl show -p MainPID --value $U)
/usr/local/bin/superdisk upgrade --instance $I; echo "upgrade_rc=$?"
sleep 1
new=$(systemctl show -p MainPID --value $U)
if [ "$old" != "$new" ] && [ "$new" != 0 ]; then echo "upgrade_mainpid_followed=yes"; else echo "upgrade_mainpid_followed=no"; fi
echo "after_upgrade=$(systemctl is-active $U)"
if cmp -s /tmp/data <(nbdcopy "$URI" - | head -c 16M); then echo "data_after_upgrade=yes"; else echo "data_after_upgrade=no"; fi
kill -KILL "$new"
for _ in $(seq 100); do [ "$(systemctl show -p NRestarts --value $U)" = 1 ] && [ "$(systemctl is-active $U)" = active ] && break; sleep 0.1; done
echo "after_crash=$(systemctl is-active $U) restarts=$(systemctl show -p NRestarts --value $U)"
if cmp -s /tmp/data <(nbdcopy "$URI" - | head -c 16M); then echo "data_after_crash=yes"; else echo "data_after_crash=no"; fi
pid=$(systemctl show -p MainPID --value $U)
grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/$pid/status | tr -d '\t ' | sed 's/:/=/'
echo "watchdog_ping_usec=$(systemctl show -p WatchdogTimestampMonotonic --value $U)"
systemctl stop $U; echo "stop_rc=$?"
systemctl show -p Result -p ExecMainStatus -p ActiveState $U | sed 's/^/after_stop_/'
if [ -e /run/superdisk/$I ]; then echo "rundir_after_stop=present"; else echo "rundir_after_stop=removed"; fi
journalctl -u $U --no-pager -o cat | sed 's/^/journal: /'
echo "done=yes"
kill -s RTMIN+4 1
"#;

/// The daemon unit itself, under a real systemd (252 on Debian 12) as PID 1 of a container that
/// boots the host's /usr: every sandboxing setting applies (empty capability set, seccomp filter,
/// read-only filesystem, device policy), Type=notify start, RuntimeDirectory= sockets, data
/// written and read back through the NBD socket, ExecReload= (SIGHUP), an in-place upgrade that
/// systemd follows (MAINPID=), a SIGKILL that systemd restarts, the watchdog, and a stop that
/// drains, flushes and removes the runtime directory. The devices are loop devices.
#[test]
fn daemon_unit_runs_under_systemd_in_a_container() {
    install_binary();
    require_tool("systemd-nspawn");
    require_tool("nbdinfo");
    require_tool("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let mut cleanup = Cleanup::default();
    sparse_file(&dir.path().join("pd.img"), 96 << 20);
    sparse_file(&dir.path().join("ssd.img"), 112 << 20);
    let pd = losetup(&dir.path().join("pd.img"), &mut cleanup);
    let ssd = losetup(&dir.path().join("ssd.img"), &mut cleanup);
    std::fs::write(out_dir.join("pd"), &pd).unwrap();
    std::fs::write(out_dir.join("ssd"), &ssd).unwrap();
    let script = out_dir.join("run.sh");
    std::fs::write(&script, IN_CONTAINER).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let runner = dir.path().join("opstest.service");
    std::fs::write(&runner, "[Unit]\nAfter=basic.target\n[Service]\nType=oneshot\nExecStart=/out/run.sh\n").unwrap();

    let bind = |from: &Path, to: &str| format!("{}:{to}", from.display());
    let out = output_within(
        Command::new("systemd-nspawn")
            .args(["--quiet", "--keep-unit", "--register=no", "--volatile=yes", "--directory=/"])
            .arg(format!("--machine=opstest-{}", std::process::id()))
            .arg(format!("--bind={}", bind(&out_dir, "/out")))
            .arg(format!("--bind={pd}"))
            .arg(format!("--bind={ssd}"))
            .arg(format!(
                "--bind-ro={}",
                bind(&repo("systemd/superdisk@.service"), "/etc/systemd/system/superdisk@.service")
            ))
            .arg(format!("--bind-ro={}", bind(&runner, "/etc/systemd/system/opstest.service")))
            .args(["--boot", "--", "systemd.firstboot=off", "systemd.unit=opstest.service"]),
        Duration::from_secs(180),
    );
    let result = read(&out_dir.join("result.txt"));
    let context = format!("result.txt:\n{result}\nsystemd-nspawn ({}):\n{}", out.status, text(&out));
    let facts: HashMap<&str, &str> = result.lines().filter_map(|l| l.split_once('=')).collect();
    let fact = |k: &str| *facts.get(k).unwrap_or_else(|| panic!("no {k}= in the report; {context}"));
    assert_eq!(fact("done"), "yes", "{context}");
    assert_eq!(fact("start_rc"), "0", "{context}");
    assert_eq!((fact("ActiveState"), fact("SubState"), fact("NRestarts")), ("active", "running", "0"), "{context}");
    // STATUS= from the daemon (it starts rebuilding the new cache at once).
    assert!(fact("StatusText").starts_with("serving"), "{context}");
    assert_eq!(
        fact("sockets").trim(),
        "/run/superdisk/opstest/nbd.sock:660 /run/superdisk/opstest/admin.sock:600",
        "{context}"
    );
    assert!(fact("size").parse::<u64>().unwrap() > 16 << 20, "{context}");
    assert_eq!((fact("write_rc"), fact("data_ok"), fact("status_rc")), ("0", "yes", "0"), "{context}");
    assert_eq!((fact("reload_rc"), fact("after_reload")), ("0", "active"), "{context}");
    assert!(result.contains("SIGHUP: configuration reloaded applied=log_level"), "{context}");
    // An in-place upgrade: systemd follows the new main process, the unit never stops.
    assert_eq!(fact("upgrade_rc"), "0", "{context}");
    assert_eq!(fact("upgrade_mainpid_followed"), "yes", "{context}");
    assert_eq!((fact("after_upgrade"), fact("data_after_upgrade")), ("active", "yes"), "{context}");
    // A crash of the upgraded process: systemd restarts it (Restart=on-failure) and the data is there.
    assert_eq!(fact("after_crash"), "active restarts=1", "{context}");
    assert_eq!(fact("data_after_crash"), "yes", "{context}");
    assert_eq!((fact("CapEff"), fact("CapBnd")), ("0000000000000000", "0000000000000000"), "{context}");
    assert_eq!((fact("NoNewPrivs"), fact("Seccomp")), ("1", "2"), "{context}");
    assert!(fact("watchdog_ping_usec").parse::<u64>().unwrap() > 0, "no watchdog ping recorded; {context}");
    // The syscall filter and the missing capabilities must not push it off io_uring.
    assert!(result.contains("engine=\"uring\""), "{context}");
    assert_eq!(fact("stop_rc"), "0", "{context}");
    assert_eq!(
        (fact("after_stop_Result"), fact("after_stop_ExecMainStatus"), fact("after_stop_ActiveState")),
        ("success", "0", "inactive"),
        "{context}"
    );
    assert!(result.contains("clean shutdown recorded"), "{context}");
    assert_eq!(fact("rundir_after_stop"), "removed", "{context}");
    assert!(!result.contains("panicked"), "{context}");
}

/// Splits a unit command line into words as systemd does for the forms the units use: blanks
/// separate words, single and double quotes group (and are removed).
fn systemd_words(line: &str) -> Vec<(String, bool)> {
    let mut words = Vec::new();
    let mut word: Option<(String, bool)> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert((String::new(), true)).0.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert((String::new(), true)).1 = true;
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert((String::new(), false)).0.push(c),
        }
    }
    assert!(quote.is_none(), "unterminated quote in {line}");
    words.extend(word);
    words
}

/// Expands a unit command line the way systemd does for the forms the units use: `${VAR}` is one
/// argument, an unquoted word that is exactly `$VAR` splits on whitespace (empty: no argument),
/// `$$` is `$`.
fn systemd_expand(line: &str, env: &HashMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (word, quoted) in systemd_words(line) {
        if let Some(var) = word.strip_prefix('$').filter(|v| !quoted && !v.starts_with(['{', '$'])) {
            out.extend(env.get(var).map(String::as_str).unwrap_or("").split_whitespace().map(str::to_string));
            continue;
        }
        let mut w = word.clone();
        for (k, v) in env {
            w = w.replace(&format!("${{{k}}}"), v);
        }
        assert!(!w.contains("${"), "unset variable in {word}");
        out.push(w.replace("$$", "$"));
    }
    out
}

fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not KEY=value: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The attach unit's `superdisk attach` command line, with the example environment file, against
/// the daemon's Unix socket: every connection negotiates the export (the supervisor dials them all
/// before it asks the kernel for the device). Where the nbd module exists the device attaches, the
/// unit's READY comes once it answers, and the ExecStop= lines detach it; this machine has no nbd
/// module, so attach must stop with a one-line error that says so, leaving nothing attached.
#[test]
fn nbd_unit_command_line_negotiates_every_connection() {
    install_binary();
    let unit = std::fs::read_to_string(repo("systemd/superdisk-nbd@.service")).unwrap();
    assert_eq!(unit_value(&unit, "Type"), "notify");
    assert_eq!(unit_value(&unit, "Wants"), "superdisk@%i.service");
    assert!(!unit.contains("BindsTo=") && !unit.contains("PartOf="), "a daemon restart must not detach the device");
    assert_eq!(unit_value(&unit, "EnvironmentFile"), "/etc/superdisk/%i.nbd.env");
    let daemon_unit = std::fs::read_to_string(repo("systemd/superdisk@.service")).unwrap();
    assert_eq!(unit_value(&daemon_unit, "PropagatesStopTo"), "superdisk-nbd@%i.service");
    assert_eq!(unit_value(&daemon_unit, "NotifyAccess"), "all", "an upgraded daemon notifies before it is MAINPID");
    let mut env: HashMap<String, String> = HashMap::new();
    for line in unit_values(&unit, "Environment") {
        env.extend(parse_env_file(&line.split_whitespace().collect::<Vec<_>>().join("\n")));
    }
    env.extend(parse_env_file(&std::fs::read_to_string(repo("systemd/superdisk-nbd.env.example")).unwrap()));
    // A device that nothing has attached; where the module is absent, none has a pid file.
    let index = (0..16).rev().find(|i| !Path::new(&format!("/sys/block/nbd{i}/pid")).exists()).unwrap();
    env.insert("NBD_DEVICE".into(), format!("/dev/nbd{index}"));
    let instance = "disk0";
    assert_eq!(env["NBD_EXPORT"], instance, "the example env file and this test name the same export");

    let mut d = Daemon::unstarted();
    let run = d.dir.path().join("run/superdisk");
    std::fs::create_dir_all(run.join(instance)).unwrap();
    d.create_with(64 << 20, &[]);
    d.unix = run.join(instance).join("nbd.sock");
    d.extra_args = vec!["--export".into(), instance.into()];
    d.spawn();
    let mark = d.log_mark();

    let expand = |line: &str| -> Vec<String> {
        let line = line.replace("%i", instance).replace("/run/superdisk/", &format!("{}/", run.display()));
        systemd_expand(&line, &env)
    };
    let argv = expand(&unit_value(&unit, "ExecStart"));
    assert_eq!(argv[..2], [INSTALLED_BIN.to_string(), "attach".to_string()]);
    let nbd_present = Path::new("/sys/module/nbd").exists();
    let child = Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let connections: usize = env["NBD_CONNECTIONS"].parse().unwrap();
    assert!(connections > 1, "the example uses several connections");
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.log_since(mark).matches("client connected").count() < connections {
        assert!(Instant::now() < deadline, "{argv:?} did not open {connections} connections:\n{}", d.log_since(mark));
        std::thread::sleep(Duration::from_millis(50));
    }
    if nbd_present {
        // The kernel took the device: detach it as the unit's stop does, then stop the supervisor.
        for stop in unit_values(&unit, "ExecStop") {
            let argv = expand(stop.trim_start_matches('-'));
            run_ok(Command::new(&argv[0]).args(&argv[1..]));
        }
        // SAFETY: signalling the supervisor this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let out = output_within_child(child, Duration::from_secs(30));
    if !nbd_present {
        assert!(!out.status.success());
        let err = text(&out);
        assert!(err.contains("no NBD driver") && err.lines().count() == 1, "attach without the module: {err}");
    }
    d.assert_alive();
}

fn output_within_child(child: std::process::Child, limit: Duration) -> std::process::Output {
    let id = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| {
            // SAFETY: killing the process this test started.
            unsafe { libc::kill(id, libc::SIGKILL) };
            panic!("superdisk attach did not finish within {limit:?}")
        })
        .unwrap()
}

// --- scripts/gcp-setup.sh ------------------------------------------------------------------------

/// A fake VM for the setup script: ROOT/dev/disk/by-id/google-* links to sparse files in
/// ROOT/disks, and ROOT/proc/self/mounts. The boot disk has a partition holding "/".
struct FakeVm {
    root: tempfile::TempDir,
}

impl FakeVm {
    fn new() -> FakeVm {
        let vm = FakeVm { root: tempfile::tempdir().unwrap() };
        for d in ["dev/disk/by-id", "disks", "proc/self", "etc"] {
            std::fs::create_dir_all(vm.path(d)).unwrap();
        }
        vm.disk("persistent-disk-0", "sda", 10 << 30);
        vm.disk("persistent-disk-0-part1", "sda1", 10 << 30);
        vm.mounts(&[&format!("{} / ext4 rw,relatime 0 0", vm.path("disks/sda1").display())]);
        vm
    }

    /// The usual machine: two NVMe local SSDs and one persistent disk named "data".
    fn standard() -> FakeVm {
        let vm = FakeVm::new();
        vm.disk("local-nvme-ssd-0", "nvme0n1", 600 << 20);
        vm.disk("local-nvme-ssd-1", "nvme1n1", 600 << 20);
        vm.disk("data", "sdb", 1 << 30);
        vm
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn by_id(&self, name: &str) -> String {
        self.path(&format!("dev/disk/by-id/google-{name}")).display().to_string()
    }

    fn disk(&self, link: &str, file: &str, size_bytes: u64) {
        let target = self.path(&format!("disks/{file}"));
        if !target.exists() {
            sparse_file(&target, size_bytes);
        }
        std::os::unix::fs::symlink(format!("../../../disks/{file}"), self.by_id(link)).unwrap();
    }

    fn mounts(&self, lines: &[&str]) {
        std::fs::write(self.path("proc/self/mounts"), lines.iter().map(|l| format!("{l}\n")).collect::<String>())
            .unwrap();
    }

    fn setup(&self, args: &[&str]) -> Output {
        Command::new(repo("scripts/gcp-setup.sh"))
            .arg("--dry-run")
            .arg("--binary")
            .arg(BIN)
            .args(args)
            .env("SUPERDISK_SETUP_ROOT", self.root.path())
            .output()
            .unwrap()
    }

    fn setup_ok(&self, args: &[&str]) -> String {
        let out = self.setup(args);
        assert!(out.status.success(), "gcp-setup.sh {args:?} failed:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn setup_err(&self, args: &[&str]) -> String {
        let out = self.setup(args);
        assert!(!out.status.success(), "gcp-setup.sh {args:?} should have refused:\n{}", text(&out));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// The "+ " lines of a run: the commands, in order.
fn commands(out: &str) -> Vec<String> {
    out.lines().filter_map(|l| l.strip_prefix("+ ")).map(str::to_string).collect()
}

/// The files a dry run would write: "would write PATH:" followed by the content, indented.
fn would_write(out: &str) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let mut lines = out.lines().peekable();
    while let Some(l) = lines.next() {
        let Some(path) = l.strip_prefix("gcp-setup: would write ").and_then(|p| p.strip_suffix(':')) else {
            continue;
        };
        let mut content = String::new();
        while let Some(body) = lines.peek().and_then(|n| n.strip_prefix("    ")) {
            content.push_str(body);
            content.push('\n');
            lines.next();
        }
        files.push((PathBuf::from(path), content));
    }
    files
}

fn file_content<'a>(files: &'a [(PathBuf, String)], path: &Path) -> &'a str {
    &files.iter().find(|(p, _)| p == path).unwrap_or_else(|| panic!("no {} among {files:?}", path.display())).1
}

#[test]
fn gcp_setup_dry_run_prints_the_config_and_every_command_in_order() {
    let vm = FakeVm::standard();
    let out = vm.setup_ok(&[]);
    let root = vm.root.path().display().to_string();
    let (ssd0, ssd1, pd) = (vm.by_id("local-nvme-ssd-0"), vm.by_id("local-nvme-ssd-1"), vm.by_id("data"));
    assert!(out.contains(&format!("the only persistent disk that is not a local SSD and not in use: {pd}")), "{out}");

    let files = would_write(&out);
    let config = file_content(&files, &vm.path("etc/superdisk/disk0.toml"));
    let settings: Vec<&str> = config.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        settings,
        [
            format!("backing = \"{pd}\"").as_str(),
            "cache = [",
            format!("    \"{ssd0}\",").as_str(),
            format!("    \"{ssd1}\",").as_str(),
            "]",
            "export = \"disk0\"",
            "listen = \"\"",
            "unix = \"/run/superdisk/disk0/nbd.sock\"",
            "unix_mode = \"0600\"",
            "admin_socket = \"/run/superdisk/disk0/admin.sock\"",
            "metrics = \"127.0.0.1:9510\"",
        ],
        "{out}"
    );
    let env = parse_env_file(file_content(&files, &vm.path("etc/superdisk/disk0.nbd.env")));
    let want: HashMap<String, String> = [
        ("NBD_DEVICE", "/dev/nbd0"),
        ("NBD_EXPORT", "disk0"),
        ("NBD_CONNECTIONS", "4"),
        ("NBD_BLOCK_SIZE", "4096"),
        ("NBD_IO_TIMEOUT", "10"),
        ("NBD_DEAD_TIMEOUT", "120"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env, want);
    assert!(out.contains("would write") && out.contains("superdisk@.service with a copy of"), "{out}");

    let mount_unit =
        run_ok(Command::new("systemd-escape").args(["--path", "--suffix=mount"]).arg(vm.path("var/lib/scylla")));
    let mount_unit = mount_unit.trim();
    assert_eq!(
        commands(&out),
        [
            format!("install -D -m 0755 {BIN} {root}/usr/local/bin/superdisk"),
            format!("{root}/usr/local/bin/superdisk create --backing {pd} --cache {ssd0} --cache {ssd1}"),
            "systemctl daemon-reload".to_string(),
            "systemctl enable --now superdisk@disk0.service".to_string(),
            "systemctl enable --now superdisk-nbd@disk0.service".to_string(),
            "mkfs.xfs -K /dev/nbd0".to_string(),
            format!("mkdir -p {root}/var/lib/scylla"),
            format!("systemctl enable --now {mount_unit}"),
        ],
        "{out}"
    );
    assert!(out.trim_end().ends_with("dry run: 13 change(s) would be made"), "{out}");
    // A dry run writes nothing.
    assert!(!vm.path("etc/superdisk").exists() && !vm.path("usr").exists());
}

#[test]
fn gcp_setup_refuses_to_guess_the_persistent_disk() {
    // Two candidates: refused, both listed, and naming one works.
    let vm = FakeVm::standard();
    vm.disk("data2", "sdc", 1 << 30);
    let err = vm.setup_err(&[]);
    assert!(err.contains("refusing to guess") && err.contains("--pd-name"), "{err}");
    assert!(err.contains(&vm.by_id("data")) && err.contains(&vm.by_id("data2")), "{err}");
    let out = vm.setup_ok(&["--pd-name", "data2"]);
    assert!(out.contains(&format!("--backing {} ", vm.by_id("data2"))), "{out}");

    // None besides the boot disk: refused, saying why the boot disk is not one.
    let vm = FakeVm::new();
    vm.disk("local-nvme-ssd-0", "nvme0n1", 600 << 20);
    let err = vm.setup_err(&[]);
    assert!(err.contains("no persistent disk to use"), "{err}");
    assert!(err.contains(&vm.by_id("persistent-disk-0")) && err.contains("the boot disk?"), "{err}");

    // A name that does not exist.
    let err = vm.setup_err(&["--pd-name", "nope"]);
    assert!(err.contains("no persistent disk with device name 'nope'"), "{err}");
}

#[test]
fn gcp_setup_needs_a_local_ssd() {
    let vm = FakeVm::new();
    vm.disk("data", "sdb", 1 << 30);
    let err = vm.setup_err(&[]);
    assert!(err.contains("no local SSD found") && err.contains("google-local-nvme-ssd-*"), "{err}");
    // SCSI local SSDs count too.
    vm.disk("local-ssd-0", "sdc", 600 << 20);
    let out = vm.setup_ok(&[]);
    assert!(out.contains(&format!("--cache {}", vm.by_id("local-ssd-0"))), "{out}");
}

#[test]
fn gcp_setup_never_takes_a_disk_in_use_or_holding_a_filesystem() {
    require_tool("mkfs.xfs");
    // Named, but mounted.
    let vm = FakeVm::standard();
    let boot = format!("{} / ext4 rw 0 0", vm.path("disks/sda1").display());
    vm.mounts(&[&boot, &format!("{} /mnt/data xfs rw 0 0", vm.path("disks/sdb").display())]);
    let err = vm.setup_err(&["--pd-name", "data"]);
    assert!(err.contains("is in use: mounted"), "{err}");
    // The boot disk, named: a partition of it holds /.
    let err = vm.setup_err(&["--pd-name", "persistent-disk-0"]);
    assert!(err.contains("a partition of it is mounted"), "{err}");
    // A local SSD that is mounted stops the run too.
    vm.mounts(&[&boot, &format!("{} /mnt/ssd xfs rw 0 0", vm.path("disks/nvme1n1").display())]);
    let err = vm.setup_err(&["--pd-name", "data"]);
    assert!(err.contains("local SSD") && err.contains("is in use"), "{err}");
    vm.mounts(&[&boot]);

    // A persistent disk with a filesystem of its own: superdisk would cut its end off.
    run_ok(Command::new("mkfs.xfs").arg("-q").arg(vm.path("disks/sdb")));
    let err = vm.setup_err(&["--pd-name", "data"]);
    assert!(err.contains("holds a 'xfs' signature and is not a superdisk backing"), "{err}");
    assert!(!String::from_utf8_lossy(&vm.setup(&["--pd-name", "data"]).stdout).contains("+ "), "nothing may run");

    // A local SSD with a filesystem: refused unless taken over.
    let vm = FakeVm::standard();
    run_ok(Command::new("mkfs.xfs").arg("-q").arg(vm.path("disks/nvme0n1")));
    let err = vm.setup_err(&[]);
    assert!(err.contains("holds a 'xfs' signature and is not a superdisk cache"), "{err}");
    let out = vm.setup_ok(&["--take-over-cache"]);
    assert!(out.contains(" --take-over-cache\n"), "{out}");
}

#[test]
fn gcp_setup_recognises_its_own_devices() {
    require_tool("mkfs.xfs");
    let vm = FakeVm::standard();
    let (ssd0, ssd1, pd) = (vm.by_id("local-nvme-ssd-0"), vm.by_id("local-nvme-ssd-1"), vm.by_id("data"));
    let created = run_ok(Command::new(BIN).args(["create", "--backing", &pd, "--cache", &ssd0, "--cache", &ssd1]));
    // XFS made on the export is XFS at the persistent disk's head, and at the first SSD's once
    // mirrored. mkfs.xfs on the whole file would also zero its tail (superdisk's metadata), so
    // the filesystem is made elsewhere and its first blocks copied in.
    let fs = vm.path("xfs.img");
    sparse_file(&fs, 512 << 20);
    run_ok(Command::new("mkfs.xfs").arg("-q").arg(&fs));
    let head = &std::fs::read(&fs).unwrap()[..64 << 10];
    for disk in ["disks/sdb", "disks/nvme0n1"] {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(vm.path(disk)).unwrap().write_all_at(head, 0).unwrap();
    }
    let out = vm.setup_ok(&[]);
    let export_bytes = created.split("export size ").nth(1).unwrap().split(' ').next().unwrap();
    assert!(
        out.contains(&format!("already a superdisk backing, export size {export_bytes} bytes (xfs on it)")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{ssd0} -> {}: already a superdisk cache", vm.path("disks/nvme0n1").display())),
        "{out}"
    );
    assert!(out.contains("the export already holds 'xfs'") && !out.contains("mkfs.xfs"), "{out}");
}

#[test]
fn gcp_setup_second_run_changes_nothing_and_says_so() {
    let vm = FakeVm::standard();
    let first = vm.setup_ok(&[]);
    // Carry out what the first run would have written.
    for (path, content) in would_write(&first) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
    }
    for unit in ["superdisk@.service", "superdisk-nbd@.service"] {
        std::fs::copy(repo(&format!("systemd/{unit}")), vm.path(&format!("etc/systemd/system/{unit}"))).unwrap();
    }
    std::fs::create_dir_all(vm.path("usr/local/bin")).unwrap();
    std::fs::copy(BIN, vm.path("usr/local/bin/superdisk")).unwrap();

    let second = vm.setup_ok(&[]);
    assert!(!second.contains("would write") && !second.contains("would replace"), "{second}");
    let unchanged = second.lines().filter(|l| l.starts_with("gcp-setup: unchanged: ")).count();
    // Binary, config, env file, two units, the devices drop-in, the mount unit, the database drop-in.
    assert_eq!(unchanged, 8, "{second}");
    let cmds = commands(&second);
    assert!(!cmds.iter().any(|c| c.starts_with("install ") || c == "systemctl daemon-reload"), "{second}");

    // A config the operator changed is not overwritten behind their back.
    let config = vm.path("etc/superdisk/disk0.toml");
    let edited = std::fs::read_to_string(&config).unwrap() + "rebuild_max_bytes_per_s = \"200M\"\n";
    std::fs::write(&config, &edited).unwrap();
    let err = vm.setup_err(&[]);
    assert!(err.contains("refusing to overwrite") && err.contains("--replace-config"), "{err}");
    assert!(err.contains("-rebuild_max_bytes_per_s = \"200M\""), "the refusal shows the difference: {err}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    let out = vm.setup_ok(&["--replace-config"]);
    assert!(out.contains(&format!("would replace {}:", config.display())), "{out}");
}

#[test]
fn gcp_setup_units_it_generates_pass_systemd_analyze_verify() {
    install_binary();
    let vm = FakeVm::standard();
    let out = vm.setup_ok(&["--name", "db1", "--mountpoint", "/srv/data"]);
    let files = would_write(&out);
    let unit_dir = tempfile::tempdir().unwrap();
    for f in ["superdisk@.service", "superdisk-nbd@.service"] {
        std::fs::copy(repo(&format!("systemd/{f}")), unit_dir.path().join(f)).unwrap();
    }
    std::fs::write(unit_dir.path().join("scylla-server.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
    let mut names = vec!["superdisk@db1.service".to_string(), "scylla-server.service".to_string()];
    for (path, content) in &files {
        let rel = path.strip_prefix(vm.path("etc/systemd/system")).ok();
        let Some(rel) = rel else { continue };
        let dest = unit_dir.path().join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, content).unwrap();
        if rel.extension().is_some_and(|e| e == "mount") {
            names.push(rel.display().to_string());
        }
    }
    assert!(unit_dir.path().join("superdisk@db1.service.d/devices.conf").exists(), "{out}");
    assert!(unit_dir.path().join("scylla-server.service.d/superdisk-db1.conf").exists(), "{out}");
    assert_eq!(names.len(), 3, "one mount unit: {out}");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    if let Err(e) = analyze_verify(unit_dir.path(), &names) {
        panic!("{e}");
    }
}

/// The configuration the script writes is one the daemon accepts: served from the fake VM's
/// devices (files), with the unit's socket flags.
#[test]
fn gcp_setup_config_is_accepted_by_the_daemon() {
    require_tool("nbdinfo");
    let vm = FakeVm::standard();
    let out = vm.setup_ok(&["--metrics", "127.0.0.1:0"]);
    let files = would_write(&out);
    let config_path = vm.path("etc/superdisk/disk0.toml");
    std::fs::create_dir_all(config_path.parent().unwrap()).unwrap();
    std::fs::write(&config_path, file_content(&files, &config_path)).unwrap();
    let create = commands(&out).into_iter().find(|c| c.contains(" create ")).unwrap();
    let argv: Vec<&str> = create.split_whitespace().collect();
    run_ok(Command::new(BIN).args(&argv[1..]));

    let sock = vm.path("nbd.sock");
    let log = vm.path("daemon.log");
    let mut cleanup = Cleanup::default();
    cleanup.children.push(
        Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--unix")
            .arg(&sock)
            .arg("--admin-socket")
            .arg(vm.path("admin.sock"))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
    loop {
        if let Some(s) = cleanup.children[0].try_wait().unwrap() {
            panic!("serve --config exited with {s}:\n{}", read(&log));
        }
        let probe = Command::new("nbdinfo").arg("--size").arg(&uri).output().unwrap();
        if probe.status.success() {
            assert!(String::from_utf8_lossy(&probe.stdout).trim().parse::<u64>().unwrap() > 0);
            break;
        }
        assert!(Instant::now() < deadline, "the export never served; log:\n{}", read(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

// --- docs/OPERATIONS.md ---------------------------------------------------------------------------

/// The `superdisk` commands in code blocks of docs/OPERATIONS.md that talk to a running daemon
/// (status, cache, rebuild, verify --socket), one per entry, continuation lines joined and
/// trailing comments dropped.
fn doc_daemon_commands() -> Vec<String> {
    let doc = std::fs::read_to_string(repo("docs/OPERATIONS.md")).unwrap();
    let mut in_fence = false;
    let mut code = Vec::new();
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if in_fence {
            code.push(line.trim().to_string());
        } else if let Some(indented) = line.strip_prefix("    ") {
            code.push(indented.trim().to_string());
        }
    }
    let mut cmds = Vec::new();
    let mut pending: Option<String> = None;
    for line in code {
        let line = line.split(" #").next().unwrap().trim().to_string();
        let joined = match pending.take() {
            Some(p) => format!("{p} {line}"),
            None if line.starts_with("superdisk ") => line,
            None => continue,
        };
        match joined.strip_suffix('\\') {
            Some(head) => pending = Some(head.trim().to_string()),
            None => cmds.push(joined),
        }
    }
    cmds.retain(|c| ["status", "cache", "rebuild", "verify"].contains(&c.split_whitespace().nth(1).unwrap_or("")));
    cmds
}

/// Every such command parses: run against an instance that does not exist, each must get as far
/// as looking for its admin socket (exit 1), not stop at the argument parser (exit 2, usage).
#[test]
fn operations_doc_commands_are_accepted_by_the_cli() {
    let cmds = doc_daemon_commands();
    for sub in ["status", "cache", "rebuild", "verify"] {
        assert!(cmds.iter().any(|c| c.split_whitespace().nth(1) == Some(sub)), "no `superdisk {sub}` found: {cmds:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = "ops-doc-test-no-such-instance";
    for cmd in &cmds {
        let cmd = cmd
            .replace("--instance disk0", &format!("--instance {missing}"))
            .replace("/run/superdisk/disk0/", &format!("{}/", dir.path().display()));
        assert!(!cmd.contains("disk0 "), "a daemon command the test cannot point elsewhere: {cmd}");
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        let out = Command::new(BIN).args(&argv[1..]).env_remove("SUPERDISK_SOCKET").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && err.contains("admin socket"),
            "docs/OPERATIONS.md: `{cmd}` was not accepted ({}): {err}",
            out.status
        );
    }
}

// --- scripts/fio ----------------------------------------------------------------------------------

#[test]
fn fio_job_files_parse() {
    require_tool("fio");
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("scripts/fio")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["nbd-loopback.fio", "scylla-like-raw.fio", "scylla-like.fio"]);
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("URI", "nbd://127.0.0.1:10809/superdisk".to_string()),
        ("SIZE", "1G".to_string()),
        ("DIRECTORY", dir.path().display().to_string()),
        ("FILENAME", dir.path().join("device").display().to_string()),
    ];
    for f in &files {
        let out = Command::new("fio").arg("--parse-only").arg(f).envs(vars.iter().cloned()).output().unwrap();
        assert!(out.status.success(), "fio --parse-only {}:\n{}", f.display(), text(&out));
        // Every parameter a job file uses must be set; fio refuses an unset one, which is what a
        // user who forgets it should see.
        let body = std::fs::read_to_string(f).unwrap();
        for (var, _) in &vars {
            if body.contains(&format!("${{{var}}}")) {
                let out = Command::new("fio")
                    .arg("--parse-only")
                    .arg(f)
                    .envs(vars.iter().filter(|(v, _)| v != var).cloned())
                    .env_remove(var)
                    .output()
                    .unwrap();
                assert!(!out.status.success(), "{} parsed without {var}", f.display());
            }
        }
    }
}

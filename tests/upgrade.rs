//! In-place upgrade (`superdisk upgrade`): the running daemon hands its devices, listeners and
//! client connections to another binary, and clients see a pause, never a disconnect. Driven by
//! python3-libnbd clients with 64 requests in flight per connection (libnbd fails on a reply to a
//! cookie it does not know, so an answer sent twice is caught), and by binaries that cannot take
//! over: each must be refused with a reason while the old daemon keeps serving.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A mirror daemon (backing + cache file) with an admin socket.
fn mirror_daemon() -> Daemon {
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    std::fs::File::create(&cache).unwrap().set_len(SIZE + 16 * MIB).unwrap();
    d.create_with(SIZE, &["--cache".as_ref(), cache.as_os_str()]);
    d.extra_args = Daemon::admin_args(d.dir.path());
    d.extra_args.extend(["--cache".into(), cache.display().to_string()]);
    d.spawn();
    let mark = 0;
    d.wait_mode(mark, "healthy", Duration::from_secs(60));
    d
}

/// tests/py/upgrade_clients.py on `uris`, running until the stop file appears.
fn start_clients(d: &Daemon, uris: &[String], depth: usize) -> (Child, PathBuf) {
    let stop = d.path("clients.stop");
    let _ = std::fs::remove_file(&stop);
    let mut cmd = py_command("upgrade_clients.py");
    cmd.arg(&stop).arg(SIZE.to_string()).args(uris).args(["--depth", &depth.to_string()]);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start upgrade_clients.py");
    // Let every connection fill its queue before anything happens to the daemon.
    std::thread::sleep(Duration::from_millis(1500));
    (child, stop)
}

/// Stops the clients and returns their report; fails the test if they found anything wrong.
fn finish_clients(d: &Daemon, child: Child, stop: &Path) -> String {
    std::fs::write(stop, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the clients saw a problem:\n{text}\ndaemon log:\n{}", d.log());
    text
}

/// A shell script standing in for a new binary; `body` may use $REAL for the real one.
fn script(d: &Daemon, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = d.path(name);
    std::fs::write(&p, format!("#!/bin/sh\nREAL={BIN}\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn requests_in_flight_cross_two_upgrades_each_answered_once_with_the_right_data() {
    let mut d = mirror_daemon();
    let uris = vec![d.uri(), d.unix_uri(), d.unix_uri()];
    let (clients, stop) = start_clients(&d, &uris, 64);
    let first_pid = d.pid();
    for round in 0..2 {
        let (ok, text) = d.upgrade(Path::new(BIN));
        assert!(ok, "upgrade {round} failed: {text}\nlog:\n{}", d.log());
        assert!(text.contains("3 connection(s) carried"), "upgrade {round}: {text}");
        std::thread::sleep(Duration::from_millis(700));
    }
    assert_ne!(d.pid(), first_pid, "another process serves now");
    let report = finish_clients(&d, clients, &stop);
    println!("{report}");
    d.assert_alive();
    assert!(d.log().matches("connection carried over from the previous process").count() >= 6, "{}", d.log());
    // New connections are served by the new process too, on the same addresses.
    let out = Command::new("nbdinfo").args(["--size", &d.uri()]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), SIZE.to_string());
    assert!(d.stop().success());
    let report = d.verify_offline(&[d.path("cache.img")], &[]);
    assert_eq!(report.mismatch_count, 0, "{}", report.output);
}

#[test]
fn binaries_that_cannot_take_over_are_refused_and_the_daemon_keeps_serving() {
    let mut d = mirror_daemon();
    let (clients, stop) = start_clients(&d, &[d.unix_uri()], 16);
    let pid = d.pid();
    let cases: Vec<(PathBuf, &str)> = vec![
        (d.path("missing-binary"), "No such file"),
        (script(&d, "not-superdisk", "echo hello"), "not a superdisk build"),
        (
            script(
                &d,
                "other-format",
                r#"echo '{"version":"9.0.0","build":"x","format_version":99,"handover_version":1}'"#,
            ),
            "on-disk format 99",
        ),
        (
            script(
                &d,
                "exits-at-start",
                r#"[ "$1" = serve ] && { echo "refusing to start" >&2; exit 3; }; exec $REAL "$@""#,
            ),
            "exited before taking over",
        ),
        // Reaches standby, receives the state, then fails building on it: the old daemon must
        // take its connections back.
        (
            script(
                &d,
                "fails-with-the-state",
                r#"[ "$1" = serve ] && export SUPERDISK_INJECT_READ_STALL=nonsense; exec $REAL "$@""#,
            ),
            "refused the state",
        ),
    ];
    for (binary, says) in &cases {
        let (ok, text) = d.upgrade(binary);
        assert!(!ok, "upgrade to {} succeeded: {text}", binary.display());
        assert!(text.contains(says), "upgrade to {}: expected {says:?} in {text:?}", binary.display());
        assert_eq!(d.pid(), pid, "the old daemon must still be the one serving");
        d.assert_alive();
    }
    let report = finish_clients(&d, clients, &stop);
    assert!(report.contains("OK"), "{report}");
    // After all that, a real upgrade still works.
    let (ok, text) = d.upgrade(Path::new(BIN));
    assert!(ok, "{text}");
    assert!(d.stop().success());
}

#[test]
fn a_plain_daemon_hands_over_too_and_status_names_the_new_process() {
    let mut d = Daemon::unstarted();
    d.create_with(SIZE, &[]);
    d.extra_args = Daemon::admin_args(d.dir.path());
    d.spawn();
    let (clients, stop) = start_clients(&d, &[d.uri()], 64);
    let (ok, text) = d.upgrade(Path::new(BIN));
    assert!(ok, "{text}");
    let out = Command::new(BIN).args(["status", "--json", "--socket"]).arg(d.admin_socket()).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["pid"].as_u64(), Some(u64::from(d.pid())), "{status}");
    assert_eq!(status["mode"], "plain");
    finish_clients(&d, clients, &stop);
    assert!(d.stop().success(), "the new daemon exits cleanly on SIGTERM");
}

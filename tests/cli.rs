//! The command line: the README's demo command, `create`'s refusals, and config errors that name
//! their key. Each failure must leave the device untouched.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_creates_serves_and_stops_cleanly() {
    require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["demo"])
        .arg(dir.path().join("demo"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--size", "64M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The demo prints how to connect once it is listening.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut printed = String::new();
    while !printed.contains("fio --name") {
        assert!(Instant::now() < deadline, "demo printed no instructions: {printed}");
        printed.push_str(&lines.next().expect("demo stdout ended").unwrap());
        printed.push('\n');
    }
    assert!(printed.contains(&format!("nbdinfo nbd://127.0.0.1:{port}")), "{printed}");
    let info = run_ok(Command::new("nbdinfo").arg("--size").arg(format!("nbd://127.0.0.1:{port}")));
    assert_eq!(info.trim(), (64u64 << 20).to_string());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit status {status}");
    assert!(dir.path().join("demo/backing.img").exists());
}

#[test]
fn create_refuses_a_tail_with_data_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, &data).unwrap();
    let out = Command::new(BIN).args(["create", "--backing"]).arg(&img).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not blank") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), data, "a refused device must be left untouched");
    // --force takes it; the data before the tail survives.
    run_ok(Command::new(BIN).args(["create", "--force", "--backing"]).arg(&img));
    let after = std::fs::read(&img).unwrap();
    assert_eq!(&after[..1 << 20], &data[..1 << 20]);
}

#[test]
fn create_is_idempotent_and_refuses_to_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.img");
    run_ok(Command::new(BIN).args(["create", "--size", "16M", "--backing"]).arg(&img));
    let again = run_ok(Command::new(BIN).args(["create", "--size", "16M", "--backing"]).arg(&img));
    assert!(again.contains("already prepared"), "{again}");
    let out = Command::new(BIN).args(["create", "--size", "8M", "--backing"]).arg(&img).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to truncate"));
}

#[test]
fn serve_refuses_an_unprepared_device() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("plain.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let out = Command::new(BIN).args(["serve", "--listen", "127.0.0.1:0", "--backing"]).arg(&img).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("superdisk create"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; 1 << 20]);
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("backing = \"/nonexistent\"\nlisten = \"not an address\"\n", "`listen`"),
        ("backing = \"/x\"\nbogus_key = 1\n", "bogus_key"),
        ("backing = \"/x\"\nio_engine = \"aio\"\n", "`io_engine`"),
        ("backing = \"/x\"\nmax_connections = 0\n", "`max_connections`"),
        ("listen = \"127.0.0.1:1\"\n", "`backing`"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let cfg = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(BIN).args(["serve", "--config"]).arg(&cfg).output().unwrap();
        assert!(!out.status.success(), "config {text:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "error for {text:?} does not name {key}: {err}");
    }
}

#[test]
fn sigterm_drains_and_records_a_clean_shutdown() {
    require_tool("nbdinfo");
    let mut d = Daemon::start(8 << 20, &[]);
    run_ok(Command::new("nbdinfo").arg(d.uri()));
    let status = d.stop();
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
    assert!(d.log().contains("clean shutdown recorded"));
    d.spawn();
    assert!(!d.log().contains("did not shut down cleanly"), "{}", d.log());
    d.kill();
    d.spawn();
    assert!(d.log().contains("did not shut down cleanly"), "a SIGKILL must be noticed at the next start");
}

/// Under systemd (Type=notify), READY=1 comes only once the listener is up, and STOPPING=1 when
/// SIGTERM starts the drain.
#[test]
fn notifies_systemd_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.img");
    run_ok(Command::new(BIN).args(["create", "--size", "8M", "--backing"]).arg(&img));
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--backing"])
        .arg(&img)
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    // STATUS= lines may come first (the mode, while starting); READY=1 only with the listener up.
    loop {
        let n = sock.recv(&mut buf).expect("READY=1 within 20 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.contains("READY=1") {
            break;
        }
        assert!(msg.starts_with("STATUS="), "unexpected notification before READY: {msg}");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "READY=1 before the listener was up");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut seen = String::new();
    while !seen.contains("STOPPING=1") {
        let n = sock.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(child.wait().unwrap().success());
}

/// `superdisk verify --socket` runs the cache check inside the running daemon: clean after a
/// rebuild, a corrupted cache range is reported (exit 1), `--repair` rewrites it from the backing,
/// and a daemon without a cache says there is nothing to verify.
#[test]
fn online_verify_through_the_admin_socket() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (img, cache, sock) = (dir.path().join("b.img"), dir.path().join("c.img"), dir.path().join("admin.sock"));
    std::fs::File::create(&cache).unwrap().set_len(40 << 20).unwrap();
    run_ok(Command::new(BIN).args(["create", "--size", "32M", "--backing"]).arg(&img).arg("--cache").arg(&cache));
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--backing"])
        .arg(&img)
        .arg("--cache")
        .arg(&cache)
        .arg("--admin-socket")
        .arg(&sock)
        .stderr(log)
        .spawn()
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x5c 0 1M", "-c", "flush"]));
    let verify = |extra: &[&str]| {
        Command::new(BIN).args(["verify", "--wait", "--socket"]).arg(&sock).args(extra).output().unwrap()
    };
    // Wait for the rebuild to make region 0 valid in the cache: its bytes then equal the backing's.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        if log.contains("mode=healthy") {
            break;
        }
        assert!(Instant::now() < deadline, "no rebuild within 30 s:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = verify(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("verify: 0 mismatches"));
    // Corrupt 4 KiB of the cache copy of region 0 behind the daemon's back (same page cache).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&cache).unwrap();
        f.write_all_at(&[0xee; 4096], 8192).unwrap();
    }
    let out = verify(&[]);
    assert!(!out.status.success(), "a corrupted cache must fail verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("mismatch offset="), "{stdout}");
    let out = verify(&["--repair"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = verify(&[]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("verify: 0 mismatches"));
    // And the client still reads the right bytes.
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x5c 0 1M"]));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists(), "the admin socket is removed at exit");
}

/// While a cache rebuilds, systemd's STATUS= line carries the progress: percentage, rate and ETA.
#[test]
fn notifies_systemd_of_rebuild_progress() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let (img, cache) = (dir.path().join("b.img"), dir.path().join("c.img"));
    std::fs::File::create(&cache).unwrap().set_len(80 << 20).unwrap();
    run_ok(Command::new(BIN).args(["create", "--size", "64M", "--backing"]).arg(&img).arg("--cache").arg(&cache));
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "backing = {img:?}\ncache = [{cache:?}]\nlisten = \"127.0.0.1:{}\"\n\
             rebuild_min_bytes_per_s = \"4M\"\nrebuild_max_bytes_per_s = \"4M\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let mut seen = Vec::new();
    let progress = loop {
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no rebuild STATUS= within 20 s ({e}): {seen:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        // Once the copy has a rate, the line says how long is left.
        if msg.contains("rebuilding") && msg.contains("% (") && msg.contains("ETA") && !msg.contains("ETA unknown") {
            break msg;
        }
        seen.push(msg);
    };
    assert!(progress.contains("STATUS=serving, rebuilding") && progress.contains("/s"), "{progress}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// `serve --stdio` serves one client on stdin/stdout, as `nbdkit -s`: libnbd's connect_command
/// starts it on a socketpair, writes, reads back and flushes; the process exits 0 when the client
/// goes, having recorded a clean shutdown.
#[test]
fn serves_one_client_on_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.img");
    run_ok(Command::new(BIN).args(["create", "--size", "8M", "--backing"]).arg(&img));
    let script = "import nbd, sys\n\
        h = nbd.NBD()\n\
        h.connect_command([sys.argv[1], 'serve', '--stdio', '--backing', sys.argv[2]])\n\
        h.pwrite(b'\\x5a' * 65536, 4096)\n\
        h.flush()\n\
        assert h.pread(65536, 4096) == b'\\x5a' * 65536\n\
        assert h.get_size() == 8 << 20\n\
        h.shutdown()\n\
        print('ok')\n";
    let out = run_ok(Command::new(SYSTEM_PYTHON).args(["-c", script, BIN]).arg(&img));
    assert_eq!(out.trim(), "ok");
    // The data is on the backing and the previous run shut down cleanly.
    let mut d = Daemon::unstarted();
    d.backing = img.clone();
    d.spawn();
    assert!(!d.log().contains("did not shut down cleanly"), "{}", d.log());
    run_ok(Command::new("qemu-io").args(["-f", "raw", &d.uri(), "-c", "read -P 0x5a 4096 64k"]));
    assert!(d.stop().success());
}

/// `ublk = true` where the kernel has no ublk driver (this machine, and CI's): the daemon refuses
/// to start with one line that says why and what to do, and does not fall back to NBD alone.
#[test]
fn serve_ublk_without_the_driver_refuses_to_start_with_one_line() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this kernel has ublk_drv loaded (scripts/ublk-e2e.sh covers it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("backing.img");
    run_ok(Command::new(BIN).args(["create", "--size", "64M", "--backing"]).arg(&img));
    let port = free_port();
    let out = Command::new(BIN)
        .args(["serve", "--ublk", "--listen", &format!("127.0.0.1:{port}"), "--backing"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success(), "served without a ublk driver");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("no ublk driver") && last.contains("/dev/ublk-control") && last.contains("modprobe ublk_drv"),
        "{err}"
    );
    assert!(!err.contains("listening"), "it must refuse before serving NBD: {err}");
}

//! Access control and limits, each shown to hold against a real daemon: the `allow` list of client
//! networks, Unix socket owner/group/mode, read-only exports, `max_connections`, the handshake
//! deadline, and the server-wide in-flight budget (`max_inflight_bytes_total`).

mod common;
mod raw_client;

use common::*;
use raw_client::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};
use superdisk::nbd::consts::*;
use superdisk::nbd::request::{encode_header, RequestHeader};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
const EPERM: u32 = 1;

/// A daemon with `toml` as its config file (the harness adds --backing, --listen and --unix).
fn daemon_with(toml: &str) -> Daemon {
    let mut d = Daemon::unstarted();
    d.create_with(SIZE, &[]);
    let conf = d.path("superdisk.toml");
    std::fs::write(&conf, toml).unwrap();
    d.extra_args = vec!["--config".into(), conf.display().to_string()];
    d.spawn();
    d
}

/// `superdisk serve` with `toml` must refuse to start, naming `key`.
fn refuses_to_start(toml: &str, key: &str) {
    let d = Daemon::unstarted();
    d.create_with(SIZE, &[]);
    let conf = d.path("bad.toml");
    std::fs::write(&conf, toml).unwrap();
    let out = output_within(
        Command::new(BIN)
            .args(["serve", "--backing"])
            .arg(&d.backing)
            .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--unix"])
            .arg(d.path("nbd.sock"))
            .arg("--config")
            .arg(&conf),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started with:\n{toml}");
    assert!(err.contains(&format!("config key `{key}`")), "with\n{toml}\nthe error does not name `{key}`:\n{err}");
}

/// A TCP connection to the daemon from a chosen loopback source address (Linux routes all of
/// 127.0.0.0/8 to lo, so 127.0.0.2 is a second client host).
fn connect_from(source: &str, port: u16) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    let s = rt
        .block_on(async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(format!("{source}:0").parse().unwrap())?;
            sock.connect(format!("127.0.0.1:{port}").parse().unwrap()).await
        })
        .unwrap_or_else(|e| panic!("connect from {source}: {e}"));
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Opens a session, retrying while the server closes the connection at accept: a slot freed by a
/// client that just left is released by its connection task a moment after the client sees EOF.
fn open_when_admitted(port: u16) -> Session<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = connect(port);
        let mut g = [0u8; 18];
        match s.read_exact(&mut g) {
            Ok(()) => {
                assert_eq!(be_u64(&g), NBDMAGIC);
                s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
                let size = go(&mut s).expect("GO");
                return Session::in_transmission(s, size);
            }
            Err(e) => assert!(Instant::now() < deadline, "no connection admitted within 20 s (last: {e})"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn allow_list_closes_other_clients_before_the_handshake() {
    let mut d = daemon_with("allow = [\"127.0.0.1/32\", \"::1/128\"]");
    // 127.0.0.2 is not listed: closed before the greeting.
    let mut s = connect_from("127.0.0.2", d.port);
    let got = expect_closed(&mut s, Duration::from_secs(10), "a client from 127.0.0.2");
    assert!(got.is_empty(), "{} bytes sent to a client outside `allow`", got.len());
    d.wait_log(0, "not in `allow`", Duration::from_secs(10));
    // 127.0.0.1 is listed: served.
    Session::open(connect_from("127.0.0.1", d.port)).round_trip(MIB, 1);
    let out = run_ok(Command::new("nbdinfo").args(["--size", &d.uri()]));
    assert_eq!(out.trim(), SIZE.to_string());
    // The Unix socket is governed by file permissions, not by `allow`.
    run_ok(Command::new("nbdinfo").args(["--size", &d.unix_uri()]));
    d.stop();

    // The other way round: only 127.0.0.2 (a /31 holding .2 and .3) may connect.
    let conf = d.path("superdisk.toml");
    std::fs::write(&conf, "allow = [\"127.0.0.2/31\"]").unwrap();
    d.spawn();
    let mut s = connect_from("127.0.0.1", d.port);
    assert!(expect_closed(&mut s, Duration::from_secs(10), "a client from 127.0.0.1").is_empty());
    Session::open(connect_from("127.0.0.3", d.port)).round_trip(2 * MIB, 2);
    let out = output_within(Command::new("nbdinfo").args(["--size", &d.uri()]), Duration::from_secs(30));
    assert!(!out.status.success(), "nbdinfo from 127.0.0.1 was served");
    d.assert_alive();

    refuses_to_start("allow = [\"10.0.0.1/8\"]", "allow");
    refuses_to_start("allow = []", "allow");
}

/// nbdinfo run as `uid`:`gid` (no supplementary groups) against the Unix socket.
fn nbdinfo_as(d: &Daemon, uid: u32, gid: u32) -> std::process::Output {
    require_tool("setpriv");
    output_within(
        Command::new("setpriv")
            .args([&format!("--reuid={uid}"), &format!("--regid={gid}"), "--clear-groups", "nbdinfo", "--size"])
            .arg(d.unix_uri()),
        Duration::from_secs(30),
    )
}

#[test]
fn unix_socket_owner_group_and_mode_decide_who_connects() {
    // nobody (65534) owns the socket; group 4242 may use it too; everyone else may not.
    let mut d = daemon_with("unix_owner = \"nobody\"\nunix_group = \"4242\"\nunix_mode = \"0660\"");
    let m = std::fs::metadata(&d.unix).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (65534, 4242, 0o660), "socket ownership and mode");
    // Other users must be able to reach the socket's directory to be refused by the socket itself.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let owner = nbdinfo_as(&d, 65534, 65534);
    assert!(owner.status.success(), "the owner was refused: {}", String::from_utf8_lossy(&owner.stderr));
    let group = nbdinfo_as(&d, 31337, 4242);
    assert!(group.status.success(), "the group was refused: {}", String::from_utf8_lossy(&group.stderr));
    let other = nbdinfo_as(&d, 31337, 31337);
    assert!(!other.status.success(), "a user outside owner and group connected");
    assert!(String::from_utf8_lossy(&other.stderr).contains("Permission denied"), "{other:?}");
    d.stop();

    // The defaults: root-owned, 0660: an unprivileged user is kept out.
    std::fs::write(d.path("superdisk.toml"), "").unwrap();
    d.spawn();
    let m = std::fs::metadata(&d.unix).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o660));
    assert!(!nbdinfo_as(&d, 65534, 65534).status.success(), "nobody connected to the default socket");
    d.assert_alive();

    refuses_to_start("unix_owner = \"no-such-user-superdisk\"", "unix_owner");
    refuses_to_start("unix_group = \"no-such-group-superdisk\"", "unix_group");
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let mut d = daemon_with("read_only = true");
    let mut s = Session::open(connect(d.port));
    let data = vec![0xeeu8; 8192];
    assert_eq!(s.write(MIB, &data), EPERM, "write on a read-only export");
    let c = s.send(CMD_WRITE_ZEROES, 0, 0, 4096, &[]);
    assert_eq!(s.reply(), (c, EPERM), "write zeroes on a read-only export");
    let c = s.send(CMD_TRIM, 0, 0, 4096, &[]);
    assert_eq!(s.reply(), (c, EPERM), "trim on a read-only export");
    // The refused payload was consumed (the session is still in sync) and nothing was written.
    assert_eq!(s.read(MIB, 8192), vec![0u8; 8192]);
    assert_eq!(s.flush(), 0);
    s.disconnect();
    let out = output_within(Command::new("nbdinfo").args(["--is", "read-only", &d.uri()]), Duration::from_secs(30));
    assert!(out.status.success(), "nbdinfo --is read-only: {out:?}");
    d.assert_alive();
}

#[test]
fn max_connections_refuses_the_next_client_and_keeps_serving_the_others() {
    let mut d = daemon_with("max_connections = 3");
    let mut held: Vec<Session<TcpStream>> = (0..3).map(|_| open_when_admitted(d.port)).collect();
    // All three slots are taken: the fourth is closed at accept, before the greeting.
    let mut fourth = connect(d.port);
    let got = expect_closed(&mut fourth, Duration::from_secs(10), "the fourth connection");
    assert!(got.is_empty(), "the fourth connection got {} bytes", got.len());
    d.wait_log(0, "connection limit reached", Duration::from_secs(10));
    for (i, s) in held.iter_mut().enumerate() {
        s.round_trip(i as u64 * MIB, i as u8);
    }
    // A slot that frees up is given to the next client.
    held.pop().unwrap().disconnect();
    let mut again = open_when_admitted(d.port);
    again.round_trip(8 * MIB, 9);
    for s in &mut held {
        s.round_trip(16 * MIB, 3);
    }
    d.assert_alive();
}

#[test]
fn handshake_deadline_cuts_silent_and_trickling_clients() {
    let mut d = daemon_with("handshake_timeout_secs = 3");
    // Sends nothing at all (does not even read the greeting).
    let mut silent = connect(d.port);
    // Sends a valid handshake, one byte a second: every single read completes quickly, so only a
    // deadline on the whole handshake ends it. All of it would take over 17 minutes.
    let mut trickle = connect(d.port);
    let mut g = [0u8; 18];
    trickle.read_exact(&mut g).unwrap();
    let mut bytes = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    let name = "x".repeat(1000);
    bytes.extend_from_slice(&option_bytes(OPT_INFO, &go_data(&name)));
    let started = Instant::now();
    let mut sent = 0;
    for b in &bytes {
        match trickle.write_all(std::slice::from_ref(b)) {
            Ok(()) => sent += 1,
            Err(e) => {
                assert!(matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset), "write error: {e}");
                break;
            }
        }
        // The server's close shows up as a reset on the next write, or as EOF here.
        trickle.set_nonblocking(true).unwrap();
        let mut probe = [0u8; 64];
        let closed = match trickle.read(&mut probe) {
            Ok(0) => true,
            Ok(n) => panic!("the server answered {n} bytes to half an option"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
            Err(e) => panic!("{e}"),
        };
        trickle.set_nonblocking(false).unwrap();
        if closed {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "still connected after 60 s of trickling");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(sent < bytes.len(), "the whole trickled handshake was accepted");
    // The silent client was cut too (the greeting is all it ever got).
    let got = expect_closed(&mut silent, Duration::from_secs(30), "the silent client");
    assert_eq!(got.len(), 18, "the silent client got more than the greeting");
    // Both cut-offs are logged (the socket closes a moment before the line is written).
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log().matches("handshake timed out").count() < 2 {
        assert!(Instant::now() < deadline, "two handshake time-outs not logged:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Others are served meanwhile and after.
    Session::open(connect(d.port)).round_trip(0, 5);
    d.assert_alive();
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} missing"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits until the daemon's resident size stops growing (no growth above 2 MiB for 3 s, at most
/// 40 s): the hogs below fill whatever the server lets them, then everything stalls.
fn settle_rss(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last = vm_kib(pid, "VmRSS:");
    let mut stable_since = Instant::now();
    while Instant::now() < deadline && stable_since.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(200));
        let now = vm_kib(pid, "VmRSS:");
        if now > last + 2048 {
            stable_since = Instant::now();
        }
        last = last.max(now);
    }
}

#[test]
fn total_inflight_budget_bounds_memory_across_connections() {
    const TOTAL_MIB: u64 = 96;
    const HOGS: usize = 12;
    let mut d = daemon_with(&format!("max_inflight_bytes_total = \"{TOTAL_MIB}M\""));
    // Warm up (allocator arenas, worker threads) before the baseline.
    Session::open(connect(d.port)).round_trip(0, 1);
    let hwm_before = vm_kib(d.pid(), "VmHWM:");

    // Each hog sends a 16 MiB write and four 32 MiB reads and never reads a reply. Its own budget
    // (64 MiB by default) admits two of the reads at once, so twelve of them could make the server
    // hold 768 MiB of read buffers; the total must keep that to 96 MiB.
    let payload = std::sync::Arc::new(vec![0x5au8; 16 << 20]);
    let mut hogs = Vec::new();
    let mut threads = Vec::new();
    for h in 0..HOGS {
        let mut s = open_when_admitted(d.port).s;
        hogs.push(s.try_clone().unwrap());
        let payload = payload.clone();
        threads.push(std::thread::spawn(move || {
            let offset = h as u64 * 16 * MIB;
            let w = RequestHeader { flags: 0, command: CMD_WRITE, cookie: 1, offset, length: 16 << 20 };
            let mut reads = Vec::new();
            for i in 0..4u64 {
                let length = 32 << 20;
                let r = RequestHeader { flags: 0, command: CMD_READ, cookie: 2 + i, offset: i * 32 * MIB, length };
                reads.extend_from_slice(&encode_header(&r));
            }
            // Blocks if the server stops reading; ends when the test shuts the socket down.
            let _ =
                s.write_all(&encode_header(&w)).and_then(|()| s.write_all(&payload)).and_then(|()| s.write_all(&reads));
        }));
    }
    settle_rss(d.pid());
    let grown_mib = (vm_kib(d.pid(), "VmHWM:") - hwm_before) / 1024;

    // While the hogs hold the whole total, another client's small requests still go through
    // (each connection has a small reserve outside the total).
    let mut fresh = open_when_admitted(d.port);
    fresh.round_trip(200 * MIB, 7);

    for s in &hogs {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    for t in threads {
        t.join().unwrap();
    }
    // Closing the last descriptor with replies unread resets the connections, so the server's
    // blocked reply writes fail now and give the budget back.
    drop(hogs);
    // The load reached the server (reads of up to the total were in flight), and stayed bounded.
    assert!(grown_mib >= TOTAL_MIB / 3, "peak RSS grew by only {grown_mib} MiB: the clients did not load the server");
    assert!(
        grown_mib < TOTAL_MIB + 64,
        "peak RSS grew by {grown_mib} MiB with {HOGS} clients not reading replies; the total is {TOTAL_MIB} MiB"
    );
    // The hogs' budget comes back: a 32 MiB request (which needs the total) is served again.
    let data: Vec<u8> = (0u32..32 << 20).map(|i| (i >> 9) as u8).collect();
    assert_eq!(fresh.write(64 * MIB, &data), 0);
    assert_eq!(fresh.read(64 * MIB, 32 << 20), data);
    fresh.disconnect();
    d.assert_alive();
    eprintln!("peak RSS growth with {HOGS} stalled clients and a {TOTAL_MIB} MiB total: {grown_mib} MiB");
}

/// Thousands of multi-GiB TRIMs in flight, each spanning 4096 regions of a 15 TiB (sparse) export
/// on the mirror engine (degraded, so the write-intent and changed records are both kept): memory
/// must not grow with the regions they span. Registering every region of every TRIM once took
/// 280 MB of peak RSS here for 3,800 of them; one registration per request takes a few MB.
#[test]
fn huge_trims_in_flight_cost_memory_per_request_not_per_region() {
    const EXPORT_BYTES: u64 = 15 << 40;
    const TRIMS: u64 = 3800;
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    std::fs::File::create(&cache).unwrap().set_len(EXPORT_BYTES + (64 << 30)).unwrap();
    d.create_with(EXPORT_BYTES, &[]);
    let admin = d.path("admin.sock");
    d.extra_args =
        vec!["--cache".into(), cache.display().to_string(), "--admin-socket".into(), admin.display().to_string()];
    d.spawn();
    let out = output_within(Command::new(BIN).args(["cache", "fail", "--socket"]).arg(&admin), Duration::from_secs(60));
    assert!(out.status.success(), "cache fail: {}", String::from_utf8_lossy(&out.stderr));
    let before = vm_kib(d.pid(), "VmHWM:");
    let mut cmd = py_command("trim_flood.py");
    cmd.arg(d.uri()).arg(TRIMS.to_string());
    let out = output_within(&mut cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "trim_flood.py: {}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let grown_mib = (vm_kib(d.pid(), "VmHWM:").saturating_sub(before)) / 1024;
    eprintln!("peak RSS grew by {grown_mib} MiB with {TRIMS} TRIMs of 4 GiB in flight");
    assert!(grown_mib < 64, "peak RSS grew by {grown_mib} MiB: TRIMs cost memory per region");
    d.assert_alive();
}

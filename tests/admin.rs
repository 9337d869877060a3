//! The running daemon's controls, driven through the real CLI: `superdisk status [--json]`, the
//! Prometheus endpoint (parsed by Prometheus' own Python parser), `rebuild pause|resume|rate`,
//! `cache fail|remove|add|replace` under client I/O, and SIGHUP reloading the config file.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn sparse(path: &Path, bytes: u64) {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
}

/// `superdisk ARGS… --socket SOCK` with a time limit.
fn ctl(sock: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--socket").arg(sock);
    output_within(&mut cmd, Duration::from_secs(60))
}

fn ctl_ok(sock: &Path, args: &[&str]) -> String {
    let out = ctl(sock, args);
    assert!(
        out.status.success(),
        "superdisk {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ctl_err(sock: &Path, args: &[&str], needle: &str) {
    let out = ctl(sock, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "superdisk {args:?} should have failed");
    assert!(stderr.contains(needle), "superdisk {args:?}: expected {needle:?} in:\n{stderr}");
}

fn status(sock: &Path) -> Value {
    serde_json::from_str(ctl_ok(sock, &["status", "--json"]).trim()).expect("status --json is JSON")
}

fn device<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["devices"].as_array().unwrap().iter().find(|d| d["name"] == name).unwrap_or_else(|| panic!("no {name} in {s}"))
}

fn op<'a>(ops: &'a Value, name: &str) -> &'a Value {
    ops.as_array().unwrap().iter().find(|o| o["op"] == name).unwrap_or_else(|| panic!("no op {name} in {ops}"))
}

fn wait_status(sock: &Path, what: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(sock);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} not reached within {limit:?}; last status: {s:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = output_within(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !stdout.contains("fail"), "qemu-io {cmds:?}: {stdout}");
}

/// A mirrored daemon: `size` exported, a cache file per name in `caches` (the first is used),
/// an admin socket and the extra args.
fn mirrored(size: u64, caches: &[&str], extra: &[&str]) -> (Daemon, PathBuf, Vec<PathBuf>) {
    require_tool("qemu-io");
    let mut d = Daemon::unstarted();
    let paths: Vec<PathBuf> = caches.iter().map(|c| d.path(c)).collect();
    for p in &paths {
        sparse(p, size + 16 * MIB);
    }
    d.create_with(size, &["--cache".as_ref(), paths[0].as_os_str()]);
    let sock = d.path("admin.sock");
    d.extra_args = vec!["--cache".into(), paths[0].display().to_string(), "--admin-socket".into()];
    d.extra_args.push(sock.display().to_string());
    d.extra_args.extend(extra.iter().map(|s| s.to_string()));
    d.spawn();
    (d, sock, paths)
}

#[test]
fn status_and_metrics_report_devices_latencies_and_mode() {
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let (mut d, sock, _) = mirrored(64 * MIB, &["cache.img"], &["--metrics", &metrics, "--zero-copy-reads", "true"]);
    wait_status(&sock, "healthy", Duration::from_secs(60), |s| s["mode"] == "healthy");
    qemu_io(&d.uri(), &["write -P 0xab 0 4M", "flush", "read -P 0xab 0 4M", "read -P 0xab 1M 64k"]);

    let s = status(&sock);
    assert_eq!(s["mode"], "healthy");
    assert_eq!(s["export"]["size_bytes"], 64 * MIB);
    let backing = device(&s, "backing");
    assert_eq!(backing["role"], "backing");
    assert_eq!(backing["health"], "ok");
    assert!(op(&backing["ops"], "write")["bytes_total"].as_u64().unwrap() >= 4 * MIB, "{backing}");
    let cache = device(&s, "cache0");
    assert_eq!(cache["health"], "in-sync");
    let cache_read = op(&cache["ops"], "read");
    assert!(cache_read["bytes_total"].as_u64().unwrap() >= 4 * MIB, "reads come from the cache: {cache}");
    let lat = &cache_read["latency_us"];
    let (p50, p99, p999) = (lat["p50"].as_f64().unwrap(), lat["p99"].as_f64().unwrap(), lat["p999"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "percentiles out of order: {lat}");
    let writes = op(&s["requests"], "write");
    assert!(writes["ops_total"].as_u64().unwrap() >= 1 && writes["bytes_total"].as_u64().unwrap() >= 4 * MIB);
    assert!(s["connections"]["accepted_total"].as_u64().unwrap() >= 1);
    assert!(s["cache"]["cache_read_share"].as_f64().unwrap() > 0.9, "{}", s["cache"]);
    let text = ctl_ok(&sock, &["status"]);
    for needle in ["HEALTHY", "backing", "cache0", "in-sync", "p99"] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }

    let check = |url: &str| -> Value {
        let out = output_within(py_command("metrics_check.py").arg(url), Duration::from_secs(30));
        assert!(out.status.success(), "metrics check failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let url = format!("http://{metrics}/metrics");
    let m = check(&url);
    let types = &m["types"];
    // The parser strips `_total` from counter family names.
    for (family, kind) in [
        ("superdisk_device_latency_seconds", "histogram"),
        ("superdisk_request_latency_seconds", "histogram"),
        ("superdisk_device_operations", "counter"),
        ("superdisk_device_errors", "counter"),
        ("superdisk_read_bytes", "counter"),
        ("superdisk_cache_read_ratio", "gauge"),
        ("superdisk_rebuild_remaining_bytes", "gauge"),
        ("superdisk_degraded", "gauge"),
        ("superdisk_connections", "gauge"),
        ("superdisk_zero_copy_reads", "counter"),
        ("superdisk_zero_copy_fallbacks", "counter"),
        ("superdisk_registered_buffer_bytes", "gauge"),
        ("superdisk_registered_buffer_misses", "counter"),
    ] {
        assert_eq!(types[family], kind, "family {family} in {types}");
    }
    let sample = |m: &Value, k: &str| m["samples"][k].as_f64().unwrap_or_else(|| panic!("no sample {k}"));
    assert_eq!(sample(&m, "superdisk_degraded"), 0.0);
    assert_eq!(sample(&m, "superdisk_mode{mode=healthy}"), 1.0);
    assert!(sample(&m, "superdisk_read_bytes_total{source=cache}") >= (4 * MIB) as f64);
    assert!(sample(&m, "superdisk_device_latency_seconds_count{device=cache0,op=read}") >= 1.0);
    assert!(sample(&m, "superdisk_rebuild_remaining_bytes") == 0.0);
    // The 4 MiB and 64 KiB reads (checked by qemu-io's -P) went from the cache file's page cache
    // straight to the socket (where the kernel can tell what is in the page cache: 6.5 and later).
    if superdisk::device::page_cache_visible() {
        assert!(sample(&m, "superdisk_zero_copy_reads_total") >= 2.0);
        assert!(sample(&m, "superdisk_zero_copy_read_bytes_total") >= (4 * MIB + 64 * 1024) as f64);
    }
    assert_eq!(sample(&m, "superdisk_zero_copy_fallbacks_total"), 0.0);
    // The default arena, registered by the rings (root here, so pinning is not limited).
    assert_eq!(sample(&m, "superdisk_registered_buffer_bytes"), (36 * MIB) as f64);
    assert!(sample(&m, "superdisk_registered_buffer_misses_total") >= 0.0);

    // The cache fails: clients see nothing, status and metrics say degraded.
    assert!(ctl_ok(&sock, &["cache", "fail"]).contains("degraded"));
    qemu_io(&d.uri(), &["read -P 0xab 0 4M"]);
    let s = status(&sock);
    assert_eq!(s["mode"], "degraded");
    assert_eq!(device(&s, "cache0")["health"], "failed");
    assert_eq!(s["cache"]["failures_total"], 1);
    let m = check(&url);
    assert_eq!(sample(&m, "superdisk_degraded"), 1.0);
    assert_eq!(sample(&m, "superdisk_cache_failures_total"), 1.0);
    // Only /metrics is served.
    let out = Command::new(SYSTEM_PYTHON)
        .args([
            "-c",
            "import sys,urllib.request\ntry:\n urllib.request.urlopen(sys.argv[1])\nexcept Exception as e:\n print(e)",
        ])
        .arg(format!("http://{metrics}/nope"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("404"));
    assert!(d.stop().success());
}

#[test]
fn rebuild_pause_resume_and_rate_and_sighup_reload() {
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    sparse(&cache, 96 * MIB);
    d.create_with(64 * MIB, &["--cache".as_ref(), cache.as_os_str()]);
    // Plenty of data to copy, and slowly: the rebuild is still running when we pause it.
    qemu_io_file(&d.backing, "write -P 0x3c 0 48M");
    let sock = d.path("admin.sock");
    let config = d.path("superdisk.toml");
    let backing = d.backing.clone();
    let write_config = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "backing = {:?}\ncache = [{:?}]\nadmin_socket = {:?}\nrebuild_min_bytes_per_s = \"1M\"\n\
                 rebuild_max_bytes_per_s = \"2M\"\n{extra}",
                backing, cache, sock
            ),
        )
        .unwrap();
    };
    write_config("");
    d.extra_args = vec!["--config".into(), config.display().to_string()];
    d.spawn();
    wait_status(&sock, "rebuilding", Duration::from_secs(20), |s| s["mode"] == "rebuilding");

    ctl_ok(&sock, &["rebuild", "pause"]);
    let s = wait_status(&sock, "paused", Duration::from_secs(5), |s| s["rebuild"]["paused"] == true);
    std::thread::sleep(Duration::from_millis(500)); // a copy in flight when paused may still finish
    let before = status(&sock)["rebuild"]["invalid_regions"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let after = status(&sock);
    assert_eq!(after["rebuild"]["invalid_regions"].as_u64().unwrap(), before, "paused rebuild moved: {s}");
    assert_eq!(after["mode"], "rebuilding");
    assert!(ctl_ok(&sock, &["status"]).contains("PAUSED"));

    ctl_err(&sock, &["rebuild", "rate", "0"], "MIN must be a positive rate");
    ctl_err(&sock, &["rebuild", "rate", "10M", "1M"], "below MIN");
    ctl_err(&sock, &["rebuild", "rate", "fast"], "not a size");
    ctl_ok(&sock, &["rebuild", "rate", "1G", "unlimited"]);
    let s = status(&sock);
    assert_eq!(s["rebuild"]["min_bytes_per_s"], 1u64 << 30);
    assert!(s["rebuild"]["max_bytes_per_s"].is_null(), "unlimited: {}", s["rebuild"]);
    ctl_ok(&sock, &["rebuild", "resume"]);
    wait_status(&sock, "healthy", Duration::from_secs(60), |s| s["mode"] == "healthy");
    qemu_io(&d.uri(), &["read -P 0x3c 0 48M"]);

    // SIGHUP: live keys apply and are named; restart-only keys are named as such.
    let mark = d.log_mark();
    write_config("log_level = \"warn\"\nmax_connections = 7\n");
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace("\"1M\"", "\"3M\"").replace("\"2M\"", "\"4M\""),
    )
    .unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    let log = d.wait_log(mark, "take effect only after a restart", Duration::from_secs(10));
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(log.contains("log_level") && log.contains("rebuild_min_bytes_per_s"), "{log}");
    assert!(log.contains("keys=max_connections"), "{log}");
    assert_eq!(status(&sock)["rebuild"]["min_bytes_per_s"], 3 * MIB);
    // At level warn, the info line each admin command logs is gone.
    let mark = d.log_mark();
    status(&sock);
    assert!(!d.log_since(mark).contains("admin command"), "log level did not change: {}", d.log_since(mark));

    // A broken config changes nothing and the daemon keeps serving.
    let mark = d.log_mark();
    write_config("log_level = \"loud\"\n");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    let log = d.wait_log(mark, "nothing changed", Duration::from_secs(10));
    assert!(log.contains("log_level"), "the error names the key: {log}");
    assert_eq!(status(&sock)["rebuild"]["min_bytes_per_s"], 3 * MIB);
    qemu_io(&d.uri(), &["read -P 0x3c 0 1M"]);
    assert!(d.stop().success());
}

/// Writes to an image file directly (before the daemon runs), through qemu-io's file driver.
fn qemu_io_file(path: &Path, cmd: &str) {
    let out = output_within(Command::new("qemu-io").args(["-f", "raw", "-c", cmd]).arg(path), Duration::from_secs(60));
    assert!(out.status.success(), "qemu-io {cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn cache_swapped_online_under_client_writes() {
    let (mut d, sock, caches) = mirrored(64 * MIB, &["c1.img", "c2.img", "c3.img"], &[]);
    wait_status(&sock, "healthy", Duration::from_secs(60), |s| s["mode"] == "healthy");
    let (c1, c2, c3) = (&caches[0], &caches[1], &caches[2]);
    let c = |p: &PathBuf| p.display().to_string();

    // Refusals first: each leaves the attached set serving.
    ctl_err(&sock, &["cache", "add", &c(c2)], "use `cache replace`");
    ctl_err(&sock, &["cache", "replace", &d.backing.display().to_string()], "is the backing device");
    ctl_err(&sock, &["cache", "replace", "/nonexistent/ssd"], "/nonexistent/ssd");
    ctl_err(&sock, &["cache", "frobnicate"], "unrecognized subcommand");
    // Another superdisk's cache is refused unless taken over.
    let other = Daemon::unstarted();
    other.create_with(64 * MIB, &["--cache".as_ref(), c3.as_os_str()]);
    ctl_err(&sock, &["cache", "replace", &c(c3)], "take");
    assert_eq!(status(&sock)["mode"], "healthy");

    // A client writes and flushes throughout; every swap below happens under it.
    let writer = py_command("admin_writer.py")
        .args([&d.uri(), &(48 * MIB).to_string(), "12", "7"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ctl_ok(&sock, &["cache", "remove"]).contains("removed"));
    assert_eq!(status(&sock)["mode"], "degraded");
    assert!(status(&sock)["devices"].as_array().unwrap().len() == 1, "removed members are gone");
    std::thread::sleep(Duration::from_millis(1000));
    ctl_ok(&sock, &["cache", "add", &c(c2)]);
    std::thread::sleep(Duration::from_millis(1500));
    ctl_ok(&sock, &["cache", "replace", "--take-over", &c(c3)]);
    std::thread::sleep(Duration::from_millis(1500));
    ctl_ok(&sock, &["cache", "fail"]);
    std::thread::sleep(Duration::from_millis(1000));
    // The first cache comes back: it was removed cleanly, but the backing moved on without it.
    ctl_ok(&sock, &["cache", "add", &c(c1)]);
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the client saw an error or wrong data during the swaps:\n{}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let s = wait_status(&sock, "healthy", Duration::from_secs(60), |s| s["mode"] == "healthy");
    assert_eq!(device(&s, "cache0")["path"], c(c1));
    let v = ctl_ok(&sock, &["verify", "--wait"]);
    assert!(v.contains("verify: 0 mismatches"), "{v}");
    assert!(d.stop().success());
    let report = d.verify_offline(std::slice::from_ref(c1), &[]);
    assert_eq!(report.mismatch_count, 0, "{}", report.output);
    assert!(report.regions_checked > 0, "{}", report.output);
}

#[test]
fn plain_daemon_says_there_is_no_cache_to_control() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("admin.sock");
    let mut d = Daemon::start(16 * MIB, &["--admin-socket", sock.to_str().unwrap()]);
    let s = status(&sock);
    assert_eq!(s["mode"], "plain");
    assert!(s["cache"].is_null() && s["rebuild"].is_null());
    ctl_err(&sock, &["cache", "fail"], "no cache is configured");
    ctl_err(&sock, &["rebuild", "pause"], "no cache is configured");
    ctl_err(&sock, &["verify", "--wait"], "no cache is configured");
    // A socket nobody listens on gives a clear error, not a hang.
    ctl_err(&sock_dir.path().join("nope.sock"), &["status"], "cannot reach the daemon's admin socket");
    assert!(d.stop().success());
}

/// The backing written behind superdisk's back (an emergency read-write mount, a restored
/// snapshot): `forget-cache` unpairs the cache so the next start rebuilds it and serves the
/// backing's bytes, not the cache's older copy. It refuses to run under a live daemon.
#[test]
fn forget_cache_after_the_backing_changed_behind_our_back() {
    let (mut d, sock, caches) = mirrored(32 * MIB, &["cache.img"], &[]);
    wait_status(&sock, "healthy", Duration::from_secs(60), |s| s["mode"] == "healthy");
    qemu_io(&d.uri(), &["write -P 0x11 0 1M", "flush"]);
    let out =
        output_within(Command::new(BIN).args(["forget-cache", "--backing"]).arg(&d.backing), Duration::from_secs(30));
    assert!(!out.status.success(), "forget-cache must not run under a live daemon");
    assert!(d.stop().success());
    // The outside write: straight into the exported area of the backing.
    qemu_io_file(&d.backing, "write -P 0x22 0 1M");
    let out = run_ok(Command::new(BIN).args(["forget-cache", "--backing"]).arg(&d.backing));
    assert!(out.contains("unpaired"), "{out}");
    let mark = d.log_mark();
    d.spawn();
    d.wait_log(mark, "full rebuild", Duration::from_secs(30));
    // Served from the backing until rebuilt, and from the rebuilt cache after: the new bytes.
    qemu_io(&d.uri(), &["read -P 0x22 0 1M"]);
    wait_status(&sock, "healthy", Duration::from_secs(60), |s| s["mode"] == "healthy");
    qemu_io(&d.uri(), &["read -P 0x22 0 1M"]);
    assert!(d.stop().success());
    let report = d.verify_offline(&caches, &[]);
    assert_eq!(report.mismatch_count, 0, "{}", report.output);
}

/// Runs tests/py/random_reads.py (random 4 KiB reads, each checked against the byte its MiB was
/// written with) and returns its output line.
fn random_reads(uri: &str, count: u32, seed: u32) -> String {
    let out = output_within(
        py_command("random_reads.py").args([uri, &count.to_string(), &seed.to_string()]),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "random_reads.py: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.into_owned()
}

#[test]
fn hedged_reads_answer_stalled_cache_reads_from_the_backing() {
    require_tool("qemu-io");
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    sparse(&cache, 16 * MIB + 16 * MIB);
    d.create_with(16 * MIB, &["--cache".as_ref(), cache.as_os_str()]);
    // MiB i holds byte i + 1: random_reads.py knows what every block must contain.
    let writes: Vec<String> = (0..16).map(|i| format!("write -P {} {i}M 1M", i + 1)).collect();
    for w in &writes {
        qemu_io_file(&d.backing, w);
    }
    let sock = d.path("admin.sock");
    let config = d.path("superdisk.toml");
    let metrics_port = free_port();
    let backing = d.backing.clone();
    let write_config = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "backing = {:?}\ncache = [{:?}]\nadmin_socket = {:?}\nmetrics = \"{metrics_port}\"\n\
                 hedge_min_us = 2000\nhedge_max_us = 2000\nhedge_max_percent = 100\n{extra}",
                backing, cache, sock
            ),
        )
        .unwrap();
    };
    write_config("");
    d.extra_args = vec!["--config".into(), config.display().to_string()];
    // One cache read in 50 stalls for 300 ms, as an SSD in garbage collection does.
    d.env.push(("SUPERDISK_INJECT_READ_STALL".into(), "cache0:20000:300".into()));
    d.spawn();
    d.wait_log(0, "INJECTING READ STALLS", Duration::from_secs(10));
    wait_status(&sock, "healthy", Duration::from_secs(60), |s| s["mode"] == "healthy");

    random_reads(&d.uri(), 1500, 1);
    let s = status(&sock);
    let h = &s["cache"]["hedge"];
    assert_eq!(h["enabled"], true, "{h}");
    assert_eq!(h["threshold_us"], 2000, "{h}");
    let hedged = h["hedged_total"].as_u64().unwrap();
    let won = h["backing_won_total"].as_u64().unwrap();
    // ~30 stalls expected in 1,500 reads; the chance of none is below 1e-12.
    assert!(hedged > 0 && won > 0, "no read was hedged or none answered by the backing: {h}");
    assert_eq!(s["cache"]["errors_total"], 0, "a stall is not an error: {}", s["cache"]);
    assert_eq!(s["mode"], "healthy");
    let text = ctl_ok(&sock, &["status"]);
    assert!(text.contains("hedged reads: after 2.0ms"), "{text}");
    let out = output_within(
        py_command("metrics_check.py").arg(format!("http://127.0.0.1:{metrics_port}/metrics")),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "metrics check failed: {}", String::from_utf8_lossy(&out.stderr));
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sample = |k: &str| m["samples"][k].as_f64().unwrap_or_else(|| panic!("no sample {k} in {m}"));
    assert!(sample("superdisk_hedged_reads_total") >= hedged as f64);
    assert!(sample("superdisk_hedged_reads_backing_won_total") >= won as f64);
    assert_eq!(sample("superdisk_hedge_threshold_seconds"), 0.002);

    // Switched off by SIGHUP: nothing is hedged any more.
    let mark = d.log_mark();
    write_config("hedge_reads = false\n");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    let log = d.wait_log(mark, "configuration reloaded", Duration::from_secs(10));
    assert!(log.contains("hedge_reads"), "{log}");
    let before = status(&sock)["cache"]["hedge"]["hedged_total"].as_u64().unwrap();
    random_reads(&d.uri(), 500, 2);
    let s = status(&sock);
    assert_eq!(s["cache"]["hedge"]["enabled"], false);
    assert_eq!(s["cache"]["hedge"]["hedged_total"].as_u64().unwrap(), before, "hedged while off");
    assert!(ctl_ok(&sock, &["status"]).contains("hedged reads: off"));
    assert!(d.stop().success());

    // A malformed injection spec stops the daemon, naming the variable, before it serves.
    d.env = vec![("SUPERDISK_INJECT_READ_STALL".into(), "cache0:lots".into())];
    let out = output_within(
        Command::new(BIN).args(["serve", "--config"]).arg(&config).envs(d.env.clone()),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SUPERDISK_INJECT_READ_STALL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_cache_that_stops_answering_is_given_up_on_at_cache_timeout_ms() {
    require_tool("qemu-io");
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    sparse(&cache, 16 * MIB + 16 * MIB);
    d.create_with(16 * MIB, &["--cache".as_ref(), cache.as_os_str()]);
    for i in 0..16 {
        qemu_io_file(&d.backing, &format!("write -P {} {i}M 1M", i + 1));
    }
    let sock = d.path("admin.sock");
    let config = d.path("superdisk.toml");
    let metrics_port = free_port();
    std::fs::write(
        &config,
        format!(
            "backing = {:?}\ncache = [{:?}]\nadmin_socket = {:?}\nmetrics = \"{metrics_port}\"\n\
             cache_timeout_ms = 500\nhedge_reads = false\n",
            d.backing, cache, sock
        ),
    )
    .unwrap();
    d.extra_args = vec!["--config".into(), config.display().to_string()];
    // From 5 s to 10 s after start every cache read hangs for 4 s: the SSD stops answering,
    // then recovers. Start-up (metadata reads) is over long before.
    let (from, until) = (Duration::from_secs(5), Duration::from_secs(10));
    d.env.push(("SUPERDISK_INJECT_READ_STALL".into(), "cache0:1000000:4000:5:10".into()));
    let t0 = Instant::now();
    d.spawn();
    wait_status(&sock, "healthy", Duration::from_secs(60), |s| s["mode"] == "healthy");
    std::thread::sleep((from + Duration::from_millis(500)).saturating_sub(t0.elapsed()));

    // Every read is answered, with the right bytes, though the cache holds every one of them.
    let mark = d.log_mark();
    let started = Instant::now();
    random_reads(&d.uri(), 300, 3);
    assert!(started.elapsed() < Duration::from_secs(4), "reads waited for the hung SSD: {:?}", started.elapsed());
    let s = status(&sock);
    assert_eq!(s["mode"], "degraded", "{s}");
    let t = &s["cache"]["timeout"];
    assert_eq!(t["timeout_ms"], 500, "{t}");
    assert!(t["timed_out_total"].as_u64().unwrap() >= 1, "{t}");
    assert!(t["abandoned_now"].as_u64().unwrap() >= 1, "{t}");
    d.wait_log(mark, "did not answer within cache_timeout_ms", Duration::from_secs(10));
    assert!(ctl_ok(&sock, &["status"]).contains("cache time limit: 500 ms"));
    let out = output_within(
        py_command("metrics_check.py").arg(format!("http://127.0.0.1:{metrics_port}/metrics")),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "metrics check failed: {}", String::from_utf8_lossy(&out.stderr));
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(m["samples"]["superdisk_cache_timeouts_total"].as_f64().unwrap() >= 1.0, "{m}");
    assert!(m["samples"]["superdisk_cache_abandoned_ops"].as_f64().unwrap() >= 1.0, "{m}");

    // The hung reads may still land: the device cannot come back until it has answered them.
    let c = cache.to_str().unwrap();
    ctl_err(&sock, &["cache", "add", c], "still outstanding");
    wait_status(&sock, "given-up reads answered", Duration::from_secs(30), |s| {
        s["cache"]["timeout"]["abandoned_now"] == 0
    });
    std::thread::sleep((until + Duration::from_millis(500)).saturating_sub(t0.elapsed()));
    ctl_ok(&sock, &["cache", "add", c]);
    wait_status(&sock, "healthy", Duration::from_secs(60), |s| s["mode"] == "healthy");
    random_reads(&d.uri(), 300, 4);
    let v = ctl_ok(&sock, &["verify", "--wait"]);
    assert!(v.contains("verify: 0 mismatches"), "{v}");

    // The limit changes live on SIGHUP.
    let text = std::fs::read_to_string(&config).unwrap().replace("cache_timeout_ms = 500", "cache_timeout_ms = 700");
    std::fs::write(&config, text).unwrap();
    let mark = d.log_mark();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    let log = d.wait_log(mark, "configuration reloaded", Duration::from_secs(10));
    assert!(log.contains("cache_timeout_ms"), "{log}");
    assert_eq!(status(&sock)["cache"]["timeout"]["timeout_ms"], 700);
    assert!(d.stop().success());
}

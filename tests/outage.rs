//! A backing that stops answering, as a network disk can: the backing image is served by nbdkit
//! and presented as a file by nbdfuse, and the nbdkit is SIGSTOPped, so every request that reaches
//! the file hangs in the kernel (a real hang, not an error) until SIGCONT. The daemon runs with
//! short backing timeouts (1 s per attempt, 3 s deadline).
//!
//! * Mirror: during the stall, reads of valid regions are served from the cache with the right
//!   bytes, also while a stalled write is pending; writes and a flush fail with EIO within the
//!   deadline (plus slack), never succeed; the daemon stays up. After SIGCONT the given-up write
//!   lands or not, but its range reads the same from either copy, new writes succeed, every write
//!   acknowledged before the stall is intact, the cache is rebuilt, and `superdisk verify` (online,
//!   and offline after a clean stop) finds the cache equal to the backing.
//! * Plain (no cache, O_DIRECT so the page cache cannot answer for the backing): during the stall
//!   reads, writes and a flush fail with EIO within the deadline; after SIGCONT everything works
//!   and the data is intact.
//!
//! Every wait is bounded, and nbdkit, the FUSE mount and the daemon are cleaned up on drop (nbdkit
//! is continued before it is killed).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const REGION: u64 = 256 << 10;
const CACHE_SLACK: u64 = 8 * MIB;
const DEADLINE_MS: u64 = 3000;
/// The cleaner clears a region's write-intent bit after one to two idle intervals.
const METADATA_INTERVAL_MS: u64 = 2000;
const WAIT: Duration = Duration::from_secs(60);

/// The backing image behind nbdkit and nbdfuse: `path()` is the file the daemon uses;
/// `stall()` / `answer()` stop and continue the nbdkit.
struct StallableBacking {
    file: NbdkitFile,
}

/// An nbdkit `sh` plugin serving a file (with `dd`) whose FLUSH fails with EIO while the file
/// `$IMG.fail-flush` exists: nbdkit 1.32's error filter cannot fail FLUSH.
const FLUSH_FAILING_PLUGIN: &str = r#"#!/bin/bash
case "$1" in
  get_size) stat -c %s "$IMG" ;;
  pread) dd if="$IMG" skip="$4" count="$3" iflag=count_bytes,skip_bytes status=none ;;
  pwrite) dd of="$IMG" seek="$4" conv=notrunc oflag=seek_bytes status=none ;;
  can_write|can_flush) exit 0 ;;
  flush)
    if [ -e "$IMG.fail-flush" ]; then echo "EIO injected flush failure" >&2; exit 1; fi
    sync "$IMG" ;;
  *) exit 2 ;;
esac
"#;

impl StallableBacking {
    fn start(image: &Path) -> StallableBacking {
        Self::start_plugin(image, &["file".as_ref(), image.as_os_str()])
    }

    /// The image behind nbdkit's `sh` plugin whose FLUSH fails while `image`.fail-flush exists.
    fn start_flush_failing(image: &Path) -> StallableBacking {
        let script = image.with_extension("plugin.sh");
        std::fs::write(&script, FLUSH_FAILING_PLUGIN).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Self::start_plugin(image, &["sh".as_ref(), script.as_os_str()])
    }

    fn start_plugin(image: &Path, plugin: &[&std::ffi::OsStr]) -> StallableBacking {
        let len = std::fs::metadata(image).unwrap().len();
        let mut file = NbdkitFile::new("backing", len);
        file.set_args(plugin, &[("IMG", image.as_os_str())]);
        file.run();
        StallableBacking { file }
    }

    fn path(&self) -> PathBuf {
        self.file.path()
    }

    /// The backing stops answering: every request to the FUSE file hangs.
    fn stall(&mut self) {
        self.file.stall();
    }

    fn answer(&mut self) {
        self.file.answer();
    }
}

/// The daemon's config file: short backing timeouts, an admin socket, and `extra` keys.
fn write_config(d: &Daemon, extra: &str) -> PathBuf {
    let path = d.path("outage.toml");
    let text = format!(
        "backing_timeout_ms = 1000\nbacking_read_retries = 1\nbacking_retry_backoff_ms = 100\n\
         backing_io_deadline_ms = {DEADLINE_MS}\nmetadata_interval_ms = {METADATA_INTERVAL_MS}\nadmin_socket = \"{}\"\n{extra}",
        d.path("admin.sock").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn client(d: &mut Daemon, args: &[&str]) -> String {
    let mut cmd = py_command("outage_client.py");
    cmd.arg(d.unix_uri()).args(args);
    let out = output_within(&mut cmd, Duration::from_secs(180));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "outage_client.py {args:?} failed ({})\nstdout:\n{stdout}\nstderr:\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    d.assert_alive();
    stdout
}

/// `superdisk status --json` through the admin socket.
fn status(d: &Daemon) -> serde_json::Value {
    let out = output_within(
        Command::new(BIN).args(["status", "--json", "--socket"]).arg(d.path("admin.sock")),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// Waits until the cache has no invalid region (the rebuild copied back what the stall
/// invalidated).
fn wait_rebuilt(d: &mut Daemon) {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(d);
        let invalid = s["rebuild"]["invalid_regions"].as_u64().expect("rebuild.invalid_regions in status");
        if invalid == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{invalid} regions still invalid after {WAIT:?}; log:\n{}", d.log());
        d.assert_alive();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A mirror daemon (256 KiB regions, a cache file) on a backing that can be stalled, started and
/// rebuilt: the daemon, the backing, the cache file, the backing's image under the FUSE file and
/// the log mark before the start. The daemon comes first so that it is dropped after the backing:
/// it holds the FUSE file.
struct StallableMirror {
    d: Daemon,
    backing: StallableBacking,
    cache: PathBuf,
    image: PathBuf,
    mark: usize,
}

fn stallable_mirror() -> StallableMirror {
    let mut d = Daemon::unstarted();
    let image = d.backing.clone();
    let cache = d.path("cache.img");
    std::fs::File::create(&cache).unwrap().set_len(SIZE + CACHE_SLACK).unwrap();
    d.create_with(SIZE, &["--region-size".as_ref(), "256K".as_ref(), "--cache".as_ref(), cache.as_os_str()]);
    let backing = StallableBacking::start(&image);
    d.backing = backing.path();
    let config = write_config(&d, "");
    d.extra_args = vec!["--config".into(), config.display().to_string(), "--cache".into(), cache.display().to_string()];
    let mark = d.log_mark();
    d.spawn();
    d.wait_log(mark, "rebuild complete", WAIT);
    d.wait_mode(mark, "healthy", WAIT);
    StallableMirror { d, backing, cache, image, mark }
}

#[test]
fn mirror_serves_cached_reads_and_fails_writes_cleanly_while_the_backing_is_stalled() {
    let StallableMirror { mut d, mut backing, cache, image, mark } = stallable_mirror();

    let expect = d.path("expect.img");
    let failed = d.path("failed.json");
    let (expect_s, failed_s) = (expect.display().to_string(), failed.display().to_string());
    client(&mut d, &["fill", "--expect", &expect_s, "--size", &SIZE.to_string(), "--seed", "1"]);
    // Let the cleaner clear the fill's write-intent bits, so that a write into a quiet region
    // needs a write-intent commit (which stalls too) before its data write.
    std::thread::sleep(Duration::from_millis(2 * METADATA_INTERVAL_MS + 500));
    // Two writes will fail: w1, unaligned across the boundary of regions 4 and 5, which are
    // written just before the stall (their intent bits are durable, so w1's data write is issued
    // and stalls, and lands after the stall); w2 into a quiet region (its intent commit stalls).
    let w1 = format!("{}:{}", 5 * REGION - 1000, 9000);
    let w2 = format!("{}:{}", 70 * REGION + 4096, 65536);
    let touch = format!("{}:{}", 5 * REGION - 8192, 16384);
    client(&mut d, &["touch", "--expect", &expect_s, "--seed", "8", "--write", &touch]);

    backing.stall();
    let out = client(
        &mut d,
        &[
            "during",
            "--expect",
            &expect_s,
            "--failed",
            &failed_s,
            "--deadline-ms",
            &DEADLINE_MS.to_string(),
            "--seed",
            "2",
            "--write",
            &w1,
            "--write",
            &w2,
        ],
    );
    eprintln!("during the stall: {out}");
    d.assert_alive();

    backing.answer();
    let log = d.wait_log(mark, "backing answering again", WAIT);
    // One warning for the outage, not one per failed request.
    assert_eq!(log.matches("backing I/O stalled").count(), 1, "the stall must be logged once:\n{log}");
    for line in
        log.lines().filter(|l| l.contains("stalled") || l.contains("answering again") || l.contains("opened backing"))
    {
        eprintln!("daemon: {line}");
    }
    // Status and metrics count the outage: one outage, the failed requests, nothing stalled now.
    let io = status(&d)["backing_io"].clone();
    assert!(io["outages_total"].as_u64().unwrap() >= 1, "{io}");
    assert!(io["deadline_errors_total"].as_u64().unwrap() >= 2, "two writes failed at the deadline: {io}");
    assert!(io["timeouts_total"].as_u64().unwrap() >= 1, "{io}");
    assert_eq!(io["in_outage"], false, "{io}");
    let out = client(&mut d, &["after", "--expect", &expect_s, "--failed", &failed_s, "--seed", "3"]);
    eprintln!("after the stall: {out}");
    wait_rebuilt(&mut d);
    let out = output_within(
        Command::new(BIN).args(["verify", "--wait", "--socket"]).arg(d.path("admin.sock")),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("verify: 0 mismatches"),
        "online verify after the stall:\n{stdout}\n{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    client(&mut d, &["after", "--expect", &expect_s, "--failed", &failed_s, "--seed", "4"]);
    wait_rebuilt(&mut d);
    let status = d.stop();
    assert!(status.success(), "superdisk exited with {status} after SIGTERM; log:\n{}", d.log());

    // Offline, on the image itself: the cache calls every region valid and each equals the backing.
    d.backing = image;
    let r = d.verify_offline(std::slice::from_ref(&cache), &[]);
    assert!(
        r.exit_code == Some(0) && r.mismatch_count == 0,
        "offline verify found the cache differing from the backing:\n{}\nlog:\n{}",
        r.output,
        d.log()
    );
    assert_eq!(r.regions_checked, SIZE / REGION, "verify checked too few regions:\n{}", r.output);
}

#[test]
fn plain_volume_fails_requests_cleanly_while_the_backing_is_stalled_and_recovers() {
    let mut d = Daemon::unstarted();
    let image = d.backing.clone();
    d.create_with(SIZE, &[]);
    let mut backing = StallableBacking::start(&image);
    d.backing = backing.path();
    // O_DIRECT: with the page cache, reads of recently used bytes would be answered without the
    // backing even while it is stalled.
    let config = write_config(&d, "direct = true\n");
    d.extra_args = vec!["--config".into(), config.display().to_string()];
    let mark = d.log_mark();
    d.spawn();

    let expect = d.path("expect.img");
    let failed = d.path("failed.json");
    let (expect_s, failed_s) = (expect.display().to_string(), failed.display().to_string());
    client(&mut d, &["fill", "--expect", &expect_s, "--size", &SIZE.to_string(), "--seed", "5"]);

    backing.stall();
    let w1 = format!("{}:{}", 3 * MIB + 100, 10000);
    let out = client(
        &mut d,
        &[
            "during",
            "--plain",
            "--expect",
            &expect_s,
            "--failed",
            &failed_s,
            "--deadline-ms",
            &DEADLINE_MS.to_string(),
            "--seed",
            "6",
            "--write",
            &w1,
        ],
    );
    eprintln!("during the stall: {out}");
    d.wait_log(mark, "backing I/O stalled", Duration::from_secs(10));

    backing.answer();
    d.wait_log(mark, "backing answering again", WAIT);
    client(&mut d, &["after", "--expect", &expect_s, "--failed", &failed_s, "--seed", "7"]);
    let status = d.stop();
    assert!(status.success(), "superdisk exited with {status} after SIGTERM; log:\n{}", d.log());
}

fn flush_client(d: &mut Daemon, phase: &str, trigger: &Path) {
    let mut cmd = py_command("flush_error.py");
    cmd.arg(d.unix_uri()).arg(phase).arg("--trigger").arg(trigger);
    let out = output_within(&mut cmd, Duration::from_secs(180));
    assert!(
        out.status.success(),
        "flush_error.py {phase} failed ({})\nstdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    d.assert_alive();
}

/// Issue 15 #1 at the process level: the backing is a real file whose `fdatasync` fails (nbdkit
/// behind nbdfuse fails FLUSH while a trigger file exists). After one failed flush no FLUSH or
/// FUA write succeeds, on any connection, across a restart, until `superdisk clear-flush-error`;
/// status and metrics say so; nothing acknowledged before the failure is lost.
#[test]
fn a_failed_backing_flush_fails_every_later_flush_until_the_operator_clears_it() {
    let mut d = Daemon::unstarted();
    let image = d.backing.clone();
    let cache = d.path("cache.img");
    std::fs::File::create(&cache).unwrap().set_len(SIZE + CACHE_SLACK).unwrap();
    d.create_with(SIZE, &["--region-size".as_ref(), "256K".as_ref(), "--cache".as_ref(), cache.as_os_str()]);
    let trigger = PathBuf::from(format!("{}.fail-flush", image.display()));
    let backing = StallableBacking::start_flush_failing(&image);
    d.backing = backing.path();
    let config = write_config(&d, "");
    d.extra_args = vec!["--config".into(), config.display().to_string(), "--cache".into(), cache.display().to_string()];
    let mark = d.log_mark();
    d.spawn();
    d.wait_mode(mark, "healthy", WAIT);

    flush_client(&mut d, "fail", &trigger);
    let io = status(&d)["backing_io"].clone();
    assert!(io["flush_failures_total"].as_u64().unwrap() >= 1, "{io}");
    assert!(io["durability_lost"]["cause"].as_str().is_some_and(|c| c.contains("backing")), "{io}");
    let log = d.log();
    assert_eq!(log.matches("data acknowledged before it may not be durable").count(), 1, "logged once:\n{log}");

    // A restart does not forget it: the daemon's stop is not clean, and the next run still fails
    // FLUSH (the loss is on the backing's superblock).
    let stopped = d.stop();
    assert!(!stopped.success(), "a stop after a lost flush must not look clean; log:\n{}", d.log());
    let mark = d.log_mark();
    d.spawn();
    d.wait_log(mark, "failed in an earlier run", WAIT);
    flush_client(&mut d, "refused", &trigger);
    let out = output_within(
        Command::new(BIN).args(["status", "--socket"]).arg(d.path("admin.sock")),
        Duration::from_secs(30),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("BACKING FLUSH FAILED"), "status shows it");

    let out = output_within(
        Command::new(BIN).args(["clear-flush-error", "--socket"]).arg(d.path("admin.sock")),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("flush error cleared"),
        "clear-flush-error: {}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    flush_client(&mut d, "cleared", &trigger);
    assert!(status(&d)["backing_io"]["durability_lost"].is_null());
    wait_rebuilt(&mut d);
    let stopped = d.stop();
    assert!(stopped.success(), "superdisk exited with {stopped}; log:\n{}", d.log());
    drop(backing);
    d.backing = image;
    let r = d.verify_offline(std::slice::from_ref(&cache), &[]);
    assert!(r.exit_code == Some(0) && r.mismatch_count == 0, "offline verify:\n{}", r.output);
}

/// SIGTERM while the backing does not answer: the daemon finishes what clients have in flight (at
/// their deadline), writes the cache's metadata, gives the backing's flush its deadline, and exits
/// with status 75 saying the stop is not recorded as clean. The next start treats it as a crash
/// (the write-intent regions are resynced) and every byte is there.
#[test]
fn sigterm_during_a_backing_outage_exits_75_and_the_next_start_recovers() {
    let StallableMirror { mut d, mut backing, cache, image, mark } = stallable_mirror();
    let expect = d.path("expect.img");
    let expect_s = expect.display().to_string();
    client(&mut d, &["fill", "--expect", &expect_s, "--size", &SIZE.to_string(), "--seed", "11"]);

    backing.stall();
    d.term();
    // The stop decides within the deadline; the process then finishes exiting only once the
    // kernel's operations on the stalled file return (Linux does not let a process go while
    // its io_uring workers wait in the kernel), i.e. once the backing answers again.
    d.wait_log(mark, "stopped without recording a clean shutdown", Duration::from_millis(DEADLINE_MS * 3 + 10_000));
    backing.answer();
    let status = d.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(75), "exit status {status} after SIGTERM in an outage; log:\n{}", d.log());

    let mark = d.log_mark();
    d.spawn();
    d.wait_log(mark, "did not stop cleanly", WAIT);
    d.wait_mode(mark, "healthy", WAIT);
    // No write failed: the stop came while no client was writing.
    let none = d.path("none.json");
    std::fs::write(&none, "[]").unwrap();
    client(&mut d, &["after", "--expect", &expect_s, "--failed", &none.display().to_string(), "--seed", "12"]);
    assert!(d.stop().success(), "a clean stop once the backing answers; log:\n{}", d.log());
    d.backing = image;
    let r = d.verify_offline(std::slice::from_ref(&cache), &[]);
    assert!(r.exit_code == Some(0) && r.mismatch_count == 0, "{}", r.output);
}

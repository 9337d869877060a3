//! The mirror as a process: `superdisk serve --cache …` under real clients, killed, restarted, with
//! its cache zeroed, deleted, failing or vanishing, and checked with the offline `superdisk verify`.
//!
//! * Crash: a python3-libnbd workload journals every write it issues, every reply and every
//!   completed flush (tests/py/mirror_crash.py); the daemon is SIGKILLed at seeded random moments,
//!   many times; after each restart every block must hold its last durable write or one issued
//!   after it, and `superdisk verify` must find no valid cache region that differs from the
//!   backing. Every fifth cycle stops cleanly (SIGTERM) under the same load instead. Replay with
//!   `SUPERDISK_CRASH_SEED=N`.
//! * Cache loss while stopped (zeroed, deleted, blank replacement): the daemon starts, rebuilds (or
//!   serves degraded while there is no cache) and the data is what the clients wrote.
//! * Cache faults while running: the cache is a real file presented by nbdfuse from an nbdkit whose
//!   error filter fails every request once a trigger file exists; killing that nbdkit makes the
//!   cache vanish. No client may see an error, reads stay correct, and once the cache is back a
//!   restart resyncs it.
//!
//! Every test bounds its waits and cleans up (daemon, nbdkit, FUSE mounts) on drop, so a failure
//! leaves nothing running on the machine.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Small enough that a whole-export check is quick in an unoptimised build, large enough for many
/// regions (with 256 KiB regions: 128 of them).
const SIZE: u64 = 32 * MIB;
const REGION: u64 = 256 << 10;
/// Room for the cache's own metadata at its tail.
const CACHE_SLACK: u64 = 8 * MIB;
const WAIT: Duration = Duration::from_secs(30);

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn new_cache_file(path: &Path, len: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
}

/// `superdisk create` for `d` with these caches and 256 KiB regions; later starts get `--cache` too.
fn create_mirror(d: &mut Daemon, caches: &[PathBuf], extra: &[&str]) {
    let mut args: Vec<&OsStr> = vec![os("--region-size"), os("256K")];
    for c in caches {
        args.push(os("--cache"));
        args.push(c.as_os_str());
    }
    args.extend(extra.iter().map(|s| os(s)));
    d.create_with(SIZE, &args);
    set_caches(d, caches);
}

fn set_caches(d: &mut Daemon, caches: &[PathBuf]) {
    d.extra_args.clear();
    for c in caches {
        d.extra_args.push("--cache".into());
        d.extra_args.push(c.to_string_lossy().into_owned());
    }
}

/// Starts the daemon and waits until it reports `mode`; returns the log mark of this start.
fn start_expecting(d: &mut Daemon, mode: &str) -> usize {
    let mark = d.log_mark();
    d.spawn();
    d.wait_mode(mark, mode, WAIT);
    mark
}

/// Starts the daemon on a cache that must be rebuilt (fully or partly) and waits for the rebuild
/// to finish and the mirror to be healthy.
fn start_and_rebuild(d: &mut Daemon) -> usize {
    let mark = d.log_mark();
    d.spawn();
    d.wait_log(mark, "rebuild complete", WAIT);
    d.wait_mode(mark, "healthy", WAIT);
    mark
}

/// Runs tests/py/mirror_rw.py against the daemon: checks the whole export against `expect`, then
/// seeded reads, writes and zeroes, then checks again. Fails with its message and the log.
fn rw(d: &mut Daemon, expect: &Path, seed: u64, ops: u32, events: &[String]) -> String {
    let mut cmd = py_command("mirror_rw.py");
    cmd.arg(d.unix_uri()).arg("--expect").arg(expect).args(["--seed", &seed.to_string(), "--ops", &ops.to_string()]);
    for e in events {
        cmd.args(["--event", e]);
    }
    let out = output_within(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mirror_rw.py (seed {seed}) failed ({})\nstdout:\n{stdout}\nstderr:\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    d.assert_alive();
    stdout
}

fn stop_ok(d: &mut Daemon) {
    let status = d.stop();
    assert!(status.success(), "superdisk exited with {status} after SIGTERM; log:\n{}", d.log());
}

/// Offline verify must be clean; `all_regions` also requires every region to have been checked (a
/// healthy mirror stopped cleanly calls every region valid, so a verify that checked fewer has
/// silently skipped some).
fn verify_clean(d: &Daemon, caches: &[PathBuf], all_regions: bool) -> VerifyReport {
    let r = d.verify_offline(caches, &[]);
    assert!(
        r.exit_code == Some(0) && r.mismatch_count == 0 && r.mismatches.is_empty(),
        "superdisk verify found the cache differing from the backing (exit {:?}):\n{}\ndaemon log:\n{}",
        r.exit_code,
        r.output,
        d.log()
    );
    if all_regions {
        assert_eq!(r.regions_checked, SIZE / REGION, "verify checked too few regions:\n{}", r.output);
    }
    r
}

// ------------------------------------------------------------------------------------------------
// Crash

const CRASH_CYCLES: u32 = 15;
/// Each cycle writes inside this many random pairs of adjacent regions (16 of the 128 regions).
const HOT_PAIRS: u32 = 8;

fn crash_seed() -> u64 {
    match std::env::var("SUPERDISK_CRASH_SEED") {
        Ok(s) => s.parse().expect("SUPERDISK_CRASH_SEED must be a number"),
        Err(_) => 0x5d_c4a5,
    }
}

/// Kills the python workload if the test fails while it runs.
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_no_flushed_write() {
    let seed = crash_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    new_cache_file(&cache, SIZE + CACHE_SLACK);
    create_mirror(&mut d, std::slice::from_ref(&cache), &[]);
    let state = d.path("state");
    std::fs::create_dir_all(&state).unwrap();
    // The first copy of the blank cache completes before the crashes start, so that every crash
    // finds valid regions for the offline verify (an early kill in cycle 1 would otherwise land
    // while nothing is valid yet).
    start_and_rebuild(&mut d);
    stop_ok(&mut d);
    let ctx = |d: &Daemon, cycle: u32, mark: usize, py_err: &str| {
        format!(
            "crash test seed {seed} (replay: SUPERDISK_CRASH_SEED={seed}), cycle {cycle}\n\
             workload stderr:\n{py_err}\ndaemon log of this cycle:\n{}",
            d.log_since(mark)
        )
    };

    let mut checked_cycles = 0;
    let base_args = d.extra_args.clone();
    for cycle in 1..=CRASH_CYCLES {
        // Odd cycles open both devices with O_DIRECT, as block-device SSDs and network disks are
        // opened in production: every read and write then goes through the io_uring engines, from
        // registered buffers, and the crash lands with those requests in flight.
        let direct = cycle % 2 == 1;
        d.extra_args = base_args.clone();
        if direct {
            d.extra_args.extend(["--direct", "true", "--cache-direct", "true"].map(String::from));
        }
        let mark = d.log_mark();
        d.spawn();
        if direct {
            let log = d.log_since(mark);
            assert!(log.contains("opened cache device") && log.contains("direct=true"), "{log}");
            assert!(!log.contains("registered_buffers=false"), "{log}");
        }
        // Every fifth cycle ends with a clean stop (SIGTERM) under load instead: that clears the
        // write-intent bits, so the crashes that follow have regions the offline verify compares.
        let graceful = cycle % 5 == 0;
        // One other cycle in five is killed at a moment counted from start-up, which may fall
        // before the client connects, during start-up resync, or during the check; the others are
        // killed while the workload writes.
        let early = !graceful && rng.gen_ratio(1, 6);
        let delay = Duration::from_millis(if early { rng.gen_range(0..300) } else { rng.gen_range(30..900) });
        let out_path = state.join(format!("py.{cycle}.out"));
        let err_path = state.join(format!("py.{cycle}.err"));
        let child = py_command("mirror_crash.py")
            .arg(d.unix_uri())
            .arg(SIZE.to_string())
            .arg("--state")
            .arg(&state)
            .args(["--seed", &seed.to_string(), "--cycle", &cycle.to_string()])
            .args(["--hot-pairs", &HOT_PAIRS.to_string(), "--region-bytes", &REGION.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("spawn mirror_crash.py");
        let mut py = Reaper(Some(child));
        if !early {
            let marker = state.join(format!("writing.{cycle}"));
            let deadline = Instant::now() + WAIT;
            while !marker.exists() {
                if py.0.as_mut().unwrap().try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the workload did not start writing within {WAIT:?}\n{}",
                    ctx(&d, cycle, mark, &std::fs::read_to_string(&err_path).unwrap_or_default())
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(delay);
        d.assert_alive();
        if graceful {
            stop_ok(&mut d);
        } else {
            d.kill();
        }
        let status = wait_child(py.0.as_mut().unwrap(), WAIT, || "mirror_crash.py".into());
        py.0 = None;
        let py_out = std::fs::read_to_string(&out_path).unwrap_or_default();
        let py_err = std::fs::read_to_string(&err_path).unwrap_or_default();
        match status.code() {
            Some(0) => checked_cycles += 1,
            // Killed before the check finished: allowed only when the kill was aimed at start-up.
            Some(3) if early => {}
            _ => panic!("workload exited with {status}\nstdout:\n{py_out}\n{}", ctx(&d, cycle, mark, &py_err)),
        }
        // Offline, straight after the crash: no region the cache may call valid (persisted valid
        // bit, no write-intent bit) differs from the backing. Regions outside the hot pairs of the
        // cycles since the last clean stop carry no intent bit, so some are always compared.
        let r = d.verify_offline(std::slice::from_ref(&cache), &[]);
        assert!(
            r.exit_code == Some(0) && r.mismatch_count == 0 && r.regions_checked > 0,
            "superdisk verify after the crash of cycle {cycle} (exit {:?}):\n{}\n{}",
            r.exit_code,
            r.output,
            ctx(&d, cycle, mark, &py_err)
        );
        // Visible with --nocapture: what each cycle did, to see that kills land under load.
        println!(
            "cycle {cycle}{}: {} after {delay:?}{}; verify checked {} regions; {}",
            if direct { " (O_DIRECT)" } else { "" },
            if graceful { "SIGTERM" } else { "SIGKILL" },
            if early { " from start-up" } else { " of writing" },
            r.regions_checked,
            py_out.lines().last().unwrap_or("")
        );
    }
    assert!(checked_cycles >= CRASH_CYCLES / 2, "only {checked_cycles} cycles got as far as writing");

    // A last start: everything survived, the rebuild finishes, a clean stop leaves every region
    // valid and equal to the backing.
    let mark = d.log_mark();
    d.spawn();
    let check = |d: &mut Daemon, cycle: u32| {
        let out = output_within(
            py_command("mirror_crash.py").arg(d.unix_uri()).arg(SIZE.to_string()).arg("--state").arg(&state).args([
                "--seed",
                &seed.to_string(),
                "--cycle",
                &cycle.to_string(),
                "--verify-only",
            ]),
            WAIT,
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "final check failed ({})\n{}", out.status, ctx(d, cycle, mark, &err));
    };
    check(&mut d, CRASH_CYCLES + 1);
    d.wait_mode(mark, "healthy", WAIT);
    check(&mut d, CRASH_CYCLES + 2);
    stop_ok(&mut d);
    verify_clean(&d, std::slice::from_ref(&cache), true);
}

// ------------------------------------------------------------------------------------------------
// Cache loss while stopped

#[test]
fn cache_zeroed_deleted_or_replaced_while_stopped() {
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    let caches = vec![cache.clone()];
    let expect = d.path("expect.img");
    new_cache_file(&cache, SIZE + CACHE_SLACK);
    create_mirror(&mut d, &caches, &[]);

    // A fresh cache is copied from the backing before it serves reads.
    start_and_rebuild(&mut d);
    rw(&mut d, &expect, 1, 400, &[]);
    stop_ok(&mut d);
    verify_clean(&d, &caches, true);

    // Zeroed (same size, superblock gone): a blank cache, so a full rebuild.
    std::fs::write(&cache, vec![0u8; (SIZE + CACHE_SLACK) as usize]).unwrap();
    start_and_rebuild(&mut d);
    rw(&mut d, &expect, 2, 400, &[]);
    stop_ok(&mut d);
    verify_clean(&d, &caches, true);

    // Deleted: the daemon starts degraded, serves the backing's data and takes writes.
    std::fs::remove_file(&cache).unwrap();
    start_expecting(&mut d, "degraded");
    rw(&mut d, &expect, 3, 400, &[]);
    stop_ok(&mut d);

    // A blank replacement at the same path: formatted and fully rebuilt, including what was
    // written while degraded.
    new_cache_file(&cache, SIZE + CACHE_SLACK);
    start_and_rebuild(&mut d);
    rw(&mut d, &expect, 4, 400, &[]);
    stop_ok(&mut d);
    verify_clean(&d, &caches, true);
}

/// Verify is not vacuous: a byte changed in a striped cache member, behind superdisk's back, is
/// reported at the right exported offset, `--repair` fixes it, and the data served is right.
#[test]
fn verify_reports_and_repairs_a_cache_that_differs() {
    let mut d = Daemon::unstarted();
    let c1 = d.path("cache1.img");
    let c2 = d.path("cache2.img");
    let caches = vec![c1.clone(), c2.clone()];
    let expect = d.path("expect.img");
    for c in &caches {
        new_cache_file(c, SIZE / 2 + CACHE_SLACK);
    }
    create_mirror(&mut d, &caches, &["--stripe-size", "512K"]);
    start_and_rebuild(&mut d);
    rw(&mut d, &expect, 5, 300, &[]);
    stop_ok(&mut d);
    verify_clean(&d, &caches, true);

    // Stripe 1 (exported bytes 512K..1M) is the first stripe of member 2, at its offset 0.
    let member_off = 8192 + 100;
    let exported = 512 * 1024 + member_off;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&c2).unwrap();
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, member_off).unwrap();
        for x in &mut b {
            *x = !*x;
        }
        f.write_all_at(&b, member_off).unwrap();
    }
    let r = d.verify_offline(&caches, &[]);
    assert_eq!(r.exit_code, Some(1), "verify must exit 1 on a mismatch:\n{}", r.output);
    assert_eq!(r.mismatch_count, 1, "one 4 KiB block differs:\n{}", r.output);
    assert_eq!(r.mismatches.len(), 1, "{}", r.output);
    let (off, len) = r.mismatches[0];
    assert!(
        off <= exported && exported + 16 <= off + len && len <= REGION,
        "mismatch reported at {off}+{len}, the changed bytes are at exported offset {exported}:\n{}",
        r.output
    );

    let r = d.verify_offline(&caches, &["--repair"]);
    assert_eq!(r.exit_code, Some(0), "verify --repair must exit 0 once repaired:\n{}", r.output);
    verify_clean(&d, &caches, true);
    start_expecting(&mut d, "healthy");
    rw(&mut d, &expect, 6, 100, &[]);
    stop_ok(&mut d);
}

#[test]
fn create_refuses_caches_too_small_for_the_export() {
    let d = Daemon::unstarted();
    let cache = d.path("small.img");
    new_cache_file(&cache, SIZE / 2);
    let out = Command::new(BIN)
        .args(["create", "--backing"])
        .arg(&d.backing)
        .args(["--size", &SIZE.to_string(), "--cache"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(!out.status.success(), "create accepted a cache of half the export's size");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too small"), "the error should say the cache is too small: {err}");
    // Refused before anything was written: the backing file this call would have created is not
    // left behind, and the cache is untouched (still all zeroes).
    assert!(!d.backing.exists(), "a refused create left a backing file behind");
    let c = std::fs::read(&cache).unwrap();
    assert!(c.iter().all(|&b| b == 0), "a refused create wrote to the cache");
    // The same with an existing, prepared backing: its superblock generation does not move.
    run_ok(Command::new(BIN).args(["create", "--backing"]).arg(&d.backing).args(["--size", &SIZE.to_string()]));
    let before = std::fs::read(&d.backing).unwrap();
    let out =
        Command::new(BIN).args(["create", "--backing"]).arg(&d.backing).arg("--cache").arg(&cache).output().unwrap();
    assert!(!out.status.success());
    assert!(std::fs::read(&d.backing).unwrap() == before, "a refused create changed the backing");
}

/// A cache paired with another backing is refused (its valid bits describe other data), unless
/// the operator says to take it over; then it is formatted and rebuilt from this backing.
#[test]
fn a_cache_of_another_backing_is_refused_unless_taken_over() {
    let mut a = Daemon::unstarted();
    let cache = a.path("cache.img");
    let caches = vec![cache.clone()];
    new_cache_file(&cache, SIZE + CACHE_SLACK);
    create_mirror(&mut a, &caches, &[]);
    start_and_rebuild(&mut a);
    let expect_a = a.path("expect-a.img");
    rw(&mut a, &expect_a, 7, 150, &[]);
    stop_ok(&mut a);

    let mut b = Daemon::unstarted();
    let expect_b = b.path("expect-b.img");
    b.create_with(SIZE, &[os("--region-size"), os("256K")]);
    // B's own data, written with no cache attached.
    b.spawn();
    rw(&mut b, &expect_b, 8, 150, &[]);
    stop_ok(&mut b);

    set_caches(&mut b, &caches);
    let out = output_within(
        Command::new(BIN)
            .args(["serve", "--backing"])
            .arg(&b.backing)
            .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--cache"])
            .arg(&cache),
        WAIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve accepted a cache paired with another backing:\n{err}");
    assert!(err.contains("--take-over-cache"), "the refusal should say how to override it:\n{err}");

    b.extra_args.push("--take-over-cache".into());
    start_and_rebuild(&mut b);
    rw(&mut b, &expect_b, 9, 150, &[]);
    stop_ok(&mut b);
    verify_clean(&b, &caches, true);
}

// ------------------------------------------------------------------------------------------------
// Cache faults while running

/// A cache file that can be made to fail: an image served by nbdkit through its error filter
/// (requests fail with EIO at the given rates while the trigger file exists) and presented as a
/// file by nbdfuse. Killing the nbdkit makes the file's I/O fail for good: the cache vanishes.
struct FaultyCache {
    file: NbdkitFile,
}

impl FaultyCache {
    /// Every request fails while the trigger exists.
    fn new(len: u64) -> FaultyCache {
        FaultyCache::with_rates(len, &["error-rate=100%"])
    }

    /// Requests fail at these error-filter rates (e.g. `error-pread-rate=2%`) while the trigger
    /// exists.
    fn with_rates(len: u64, rates: &[&str]) -> FaultyCache {
        let mut file = NbdkitFile::new("cache", len);
        let image = file.dir().join("cache.img");
        new_cache_file(&image, len);
        let trigger = file.dir().join("trigger");
        let mut args: Vec<String> = vec!["--filter=error".into(), "file".into(), image.display().to_string()];
        args.push("error=EIO".into());
        args.extend(rates.iter().map(|r| r.to_string()));
        // Every kind of request obeys the one trigger file.
        args.extend(
            ["", "-pread", "-pwrite", "-trim", "-zero", "-extents", "-cache"]
                .iter()
                .map(|k| format!("error{k}-file={}", trigger.display())),
        );
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        file.set_args(&args, &[]);
        file.run();
        FaultyCache { file }
    }

    fn trigger(&self) -> PathBuf {
        self.file.dir().join("trigger")
    }

    /// The path the daemon uses as its cache.
    fn path(&self) -> PathBuf {
        self.file.path()
    }

    fn log(&self) -> String {
        self.file.log()
    }

    /// Requests the error filter has failed so far (it logs each one it injects).
    fn injected_errors(&self) -> usize {
        self.log().matches("injecting").count()
    }

    fn nbdkit_pid(&self) -> u32 {
        self.file.pid()
    }

    fn start(&mut self) {
        self.file.run();
    }

    fn stop(&mut self) {
        self.file.stop();
    }

    fn reap_killed_nbdkit(&mut self) {
        self.file.reap_killed();
    }
}

#[test]
fn cache_eio_while_running_is_absorbed_and_resynced_after() {
    // Declared before the cache so that it is dropped after it: the daemon holds the FUSE file.
    let mut d = Daemon::unstarted();
    let mut fc = FaultyCache::new(SIZE + CACHE_SLACK);
    let caches = vec![fc.path()];
    let expect = d.path("expect.img");
    create_mirror(&mut d, &caches, &[]);
    let mark = start_and_rebuild(&mut d);
    rw(&mut d, &expect, 1, 200, &[]);

    // Every cache request fails from operation 60 on; the clients must not notice.
    rw(&mut d, &expect, 2, 400, &[format!("60:touch:{}", fc.trigger().display())]);
    d.wait_mode(mark, "degraded", WAIT);
    rw(&mut d, &expect, 3, 200, &[]);
    stop_ok(&mut d);

    // The cache answers again: a restart takes it back and resyncs what it missed.
    std::fs::remove_file(fc.trigger()).unwrap();
    start_and_rebuild(&mut d);
    rw(&mut d, &expect, 4, 200, &[]);
    stop_ok(&mut d);
    verify_clean(&d, &caches, true);
    fc.stop();
}

#[test]
fn cache_vanishing_while_running_is_absorbed_and_resynced_after() {
    let mut d = Daemon::unstarted();
    let mut fc = FaultyCache::new(SIZE + CACHE_SLACK);
    let caches = vec![fc.path()];
    let expect = d.path("expect.img");
    create_mirror(&mut d, &caches, &[]);
    let mark = start_and_rebuild(&mut d);
    rw(&mut d, &expect, 1, 200, &[]);

    // The nbdkit behind the cache file dies at operation 60.
    rw(&mut d, &expect, 2, 400, &[format!("60:kill:{}", fc.nbdkit_pid())]);
    fc.reap_killed_nbdkit();
    d.wait_mode(mark, "degraded", WAIT);
    rw(&mut d, &expect, 3, 200, &[]);
    stop_ok(&mut d);

    // The cache path is gone entirely: start degraded and serve.
    fc.stop();
    assert!(!fc.path().exists(), "{} should be gone with its FUSE mount", fc.path().display());
    start_expecting(&mut d, "degraded");
    rw(&mut d, &expect, 4, 200, &[]);
    stop_ok(&mut d);

    // The same cache comes back: a restart resyncs what it missed while away.
    fc.start();
    start_and_rebuild(&mut d);
    rw(&mut d, &expect, 5, 200, &[]);
    stop_ok(&mut d);
    verify_clean(&d, &caches, true);
    fc.stop();
}

/// Sporadic cache errors (some reads and writes fail, most succeed): each failed read is answered
/// from the backing and repaired, each failed write invalidates its region, the rebuild copies it
/// again; clients see none of it, and the cache never holds a valid region that differs.
#[test]
fn sporadic_cache_errors_are_repaired_and_never_reach_clients() {
    let mut d = Daemon::unstarted();
    let mut fc = FaultyCache::with_rates(SIZE + CACHE_SLACK, &["error-pread-rate=2%", "error-pwrite-rate=3%"]);
    let caches = vec![fc.path()];
    let expect = d.path("expect.img");
    create_mirror(&mut d, &caches, &[]);
    // O_DIRECT, so that every cache request the daemon makes reaches nbdkit: buffered, the FUSE
    // file's page cache absorbed them, and under load none of the reads and writes of a round
    // reached the error filter while the trigger existed.
    d.extra_args.extend(["--cache-direct", "true"].map(String::from));
    let mark = start_and_rebuild(&mut d);
    let opened = d.log_since(mark);
    assert!(
        opened.lines().any(|l| l.contains("opened cache device") && l.contains("direct=true")),
        "the cache was not opened with O_DIRECT; log:\n{opened}"
    );
    rw(&mut d, &expect, 1, 100, &[]);

    std::fs::File::create(fc.trigger()).unwrap();
    // Rounds until the filter has failed a request, so the test does not rest on a probability.
    let mut seed = 2;
    while fc.injected_errors() == 0 {
        assert!(
            seed < 12,
            "10 rounds of 300 requests and the error filter injected no error; nbdkit log:\n{}",
            fc.log()
        );
        rw(&mut d, &expect, seed, 300, &[]);
        seed += 1;
    }
    std::fs::remove_file(fc.trigger()).unwrap();
    let log = d.log_since(mark);
    assert!(
        log.contains("cache read error") || log.contains("cache write failed"),
        "nbdkit failed {} cache requests and the daemon logged no cache error; log:\n{log}",
        fc.injected_errors()
    );
    stop_ok(&mut d);
    verify_clean(&d, &caches, false);

    // Whatever the errors left invalid (or a failed set) is resynced at the next start.
    let mark = d.log_mark();
    d.spawn();
    d.wait_mode(mark, "healthy", WAIT);
    rw(&mut d, &expect, 3, 100, &[]);
    stop_ok(&mut d);
    verify_clean(&d, &caches, true);
    fc.stop();
}

//! PostgreSQL on XFS on the mirror, and the daemon SIGKILLed under load.
//!
//! The export becomes a block device the way tests/mirror_xfs.rs does it (nbdfuse presents it as
//! a file, a loop device on top, XFS on that); a PostgreSQL cluster with data checksums lives on
//! it, with fsync, full_page_writes and synchronous_commit on. Three pgbench runs load it at once:
//!
//! * the built-in TPC-B-like script, whose tables carry the classic invariant (every balance is
//!   the sum of the history deltas of its account, teller or branch);
//! * a ledger script that inserts a row with a random key and payload and, only after its `END`
//!   returned, appends the row's id and key to a journal file through `\shell`: the journal is
//!   the list of commits the client saw acknowledged;
//! * a `CHECKPOINT` every 1.5 s, so that the crash finds checkpoints behind it and perhaps one
//!   under way (pages written in the middle of a checkpoint are what full_page_writes repairs).
//!
//! Once commits and checkpoints have piled up, superdisk is SIGKILLed. The NBD server gone, the
//! filesystem fails its I/O and PostgreSQL PANICs or stalls; the postmaster and its children are
//! killed and everything is torn down. Then superdisk restarts (and must report the unclean stop);
//! while it resyncs the regions with write-intent bits, XFS replays its log at mount, `xfs_repair
//! -n` finds nothing, and PostgreSQL must complete crash recovery, after which:
//!
//! * every journaled ledger id is there with its payload, and no ledger row is garbled;
//! * the TPC-B invariant holds for every account, teller and branch, and pgbench_history holds at
//!   least the transactions pgbench counted as done;
//! * `pg_amcheck --heapallindexed --rootdescend` finds no corruption in any database, and after a
//!   clean shutdown `pg_checksums --check` finds no bad page;
//! * `superdisk verify` finds the cache equal to the backing.
//!
//! This runs [`CYCLES`] times on the same cluster, so later cycles also check that the commits of
//! earlier ones survived further crashes. The ledger check was seen to fail when the journal line
//! is written before `END`, and the recovery check when PostgreSQL runs with fsync off.

mod common;

use common::*;
use rand::Rng;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// mkfs.xfs refuses filesystems under 300 MiB; the cluster with pgbench scale 5 and its WAL
/// (max_wal_size below) takes well under 200 MiB.
const SIZE: u64 = 512 * MIB;
const REGION: u64 = MIB;
const CACHE_SLACK: u64 = 8 * MIB;
const WAIT: Duration = Duration::from_secs(40);
/// pgbench scale: 100,000 accounts a unit, ~15 MiB a unit on disk. Five times shared_buffers, so
/// that backends and the background writer write data pages during the load, not only WAL.
const SCALE: u32 = 5;
/// Each pgbench is started with this duration; the kill comes long before it ends.
const BENCH_SECS: u32 = 120;
/// The kill waits for at least this much load and these many commits and checkpoints, so that a
/// workload that never ran (or a crash that hit nothing) cannot pass.
const MIN_LOAD: Duration = Duration::from_secs(6);
const MIN_LEDGER_COMMITS: usize = 100;
const MIN_TPCB_COMMITS: u64 = 100;
const MIN_CHECKPOINTS: usize = 2;
const LEDGER_PAYLOAD_REPEAT: u32 = 8;
/// Load, kill, recover, check: each cycle also checks that the commits of the cycles before it
/// survived another crash and recovery.
const CYCLES: u32 = 3;
const TOOLS: [&str; 8] = ["nbdfuse", "fusermount3", "losetup", "mkfs.xfs", "xfs_repair", "mount", "umount", "sync"];

// ------------------------------------------------------------------------------------------------
// PostgreSQL.

/// The bin directory of the newest PostgreSQL server installed the Debian way
/// (`/usr/lib/postgresql/<major>/bin`): the `/usr/bin` wrappers pick a cluster, not a version.
fn pg_bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let Ok(major) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let bin = entry.path().join("bin");
        let complete = ["initdb", "postgres", "pg_isready", "psql", "pgbench", "pg_amcheck", "pg_checksums"]
            .iter()
            .all(|t| bin.join(t).exists());
        if complete && best.as_ref().is_none_or(|(m, _)| major > *m) {
            best = Some((major, bin));
        }
    }
    best.map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server with initdb, postgres, psql, pgbench, pg_amcheck and pg_checksums under \
             /usr/lib/postgresql/<major>/bin: install postgresql (and postgresql-client)"
        )
    })
}

/// The uid and gid PostgreSQL runs as: it refuses to run as root. The Debian package creates the
/// `postgres` system user; a machine without it gets one.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| Command::new("id").args([flag, "postgres"]).output();
    if !id("-u").map(|o| o.status.success()).unwrap_or(false) {
        run_ok(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "postgres",
        ]));
    }
    let num = |flag: &str| -> u32 {
        let out = id(flag).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("id {flag} postgres: {out:?}"))
    };
    (num("-u"), num("-g"))
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every process below `root` (its children, theirs, ...), from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(close) = stat.rfind(')') else { continue };
        if let Some(ppid) = stat[close + 1..].split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, ppid) in &parent_of {
            if ppid == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// Gone, or a zombie: it holds no file any more. (Orphans may stay zombies where PID 1 does not
/// reap them.)
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_owned));
            matches!(state.as_deref(), Some("Z") | Some("X") | None)
        }
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: a signal to a process this test started (the postmaster) or one it forked.
    unsafe { libc::kill(pid as i32, sig) };
}

/// One cluster: its data directory on the XFS mount, its socket directory and log outside it.
/// Dropping it kills the postmaster and every process it forked.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    uid: u32,
    gid: u32,
    postmaster: Option<Child>,
}

impl Postgres {
    /// `work` must be reachable by the postgres user; `data` must be an empty directory on the
    /// filesystem under test.
    fn new(work: &Path, data: PathBuf) -> Postgres {
        let bin = pg_bin_dir();
        let (uid, gid) = postgres_ids();
        let sock = work.join("pgsock");
        std::fs::create_dir_all(&sock).unwrap();
        chown(&sock, uid, gid);
        set_mode(&sock, 0o700);
        Postgres { bin, data, sock, log: work.join("postgres.log"), uid, gid, postmaster: None }
    }

    /// A server program run as the postgres user (std drops root's supplementary groups when it
    /// changes the uid).
    fn as_postgres(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.uid(self.uid).gid(self.gid).current_dir(&self.sock).env("LC_ALL", "C");
        cmd
    }

    /// A client program, run by the test (root), connecting over the private socket.
    fn client(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.env("LC_ALL", "C").env("PGCONNECT_TIMEOUT", "10").arg("-h").arg(&self.sock).args(["-U", "postgres"]);
        cmd
    }

    fn initdb(&self) {
        let out = output_within(
            self.as_postgres("initdb")
                .args(["--data-checksums", "--auth=trust", "--username=postgres", "--locale=C", "--encoding=UTF8"])
                .arg("-D")
                .arg(&self.data),
            Duration::from_secs(180),
        );
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log_mark(&self) -> usize {
        std::fs::metadata(&self.log).map(|m| m.len() as usize).unwrap_or(0)
    }

    fn log_since(&self, mark: usize) -> String {
        let log = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(log.get(mark..).unwrap_or(&[])).into_owned()
    }

    /// Starts the postmaster and waits until it accepts connections (after crash recovery, when
    /// there is one). Returns the server log of this start.
    fn start(&mut self, limit: Duration) -> String {
        assert!(self.postmaster.is_none(), "already running");
        let mark = self.log_mark();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let sock = self.sock.to_string_lossy().into_owned();
        let child = self
            .as_postgres("postgres")
            .arg("-D")
            .arg(&self.data)
            .args(["-c", "listen_addresses="])
            .args(["-c", &format!("unix_socket_directories={sock}")])
            // What makes a crash survivable; the defaults, set here so that no packaged
            // configuration can weaken the test.
            .args(["-c", "fsync=on", "-c", "full_page_writes=on", "-c", "synchronous_commit=on"])
            .args(["-c", "shared_buffers=16MB", "-c", "max_wal_size=64MB", "-c", "min_wal_size=32MB"])
            .args(["-c", "log_checkpoints=on", "-c", "logging_collector=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.postmaster = Some(child);
        let deadline = Instant::now() + limit;
        loop {
            let ready = self.client("pg_isready").arg("-q").status().map(|s| s.success()).unwrap_or(false);
            if ready {
                return self.log_since(mark);
            }
            if let Some(status) = self.postmaster.as_mut().unwrap().try_wait().unwrap() {
                self.postmaster = None;
                panic!("postgres exited with {status} while starting; its log:\n{}", self.log_since(mark));
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections within {limit:?}; its log:\n{}",
                self.log_since(mark)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL with psql (tuples only, unaligned, stops at the first error); returns stdout.
    fn sql(&self, sql: &str) -> String {
        let out = output_within(
            self.client("psql").args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", sql]),
            Duration::from_secs(180),
        );
        assert!(
            out.status.success(),
            "psql -c {sql:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn sql_u64(&self, sql: &str) -> u64 {
        let out = self.sql(sql);
        out.parse().unwrap_or_else(|_| panic!("{sql:?} returned {out:?}, not a number"))
    }

    /// Fast shutdown (SIGINT): a clean stop with a final checkpoint.
    fn stop(&mut self) {
        let mut child = self.postmaster.take().expect("running");
        let mark = self.log_mark();
        signal(child.id(), libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                self.postmaster = Some(child);
                panic!("postgres did not shut down within 120 s; its log:\n{}", self.log_since(mark));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "postgres exited with {status} on a fast shutdown; its log:\n{}",
            self.log_since(mark)
        );
    }

    /// SIGKILLs the postmaster and every process it forked (they are their own process groups, so
    /// the group cannot be signalled), and waits until they hold nothing open. Returns the pids
    /// that did not go within `limit`.
    fn kill_all(&mut self, limit: Duration) -> Vec<u32> {
        let Some(mut child) = self.postmaster.take() else { return Vec::new() };
        let pm = child.id();
        // A postmaster that already exited (it gives up when crash restart fails on a dead disk)
        // has had its children re-parented; they are not listed here, but they exit by themselves
        // once they see the postmaster gone.
        // Stopped, the postmaster forks nothing new while its children are listed.
        signal(pm, libc::SIGSTOP);
        let kids = descendants(pm);
        signal(pm, libc::SIGKILL);
        let _ = child.wait();
        for &k in &kids {
            signal(k, libc::SIGKILL);
        }
        let deadline = Instant::now() + limit;
        loop {
            let left: Vec<u32> = kids.iter().copied().filter(|&k| !process_gone(k)).collect();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill_all(Duration::from_secs(10));
    }
}

/// A pgbench run in the background, its output in files; killed on drop.
struct Bench {
    name: &'static str,
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

impl Bench {
    fn spawn(name: &'static str, dir: &Path, cmd: &mut Command) -> Bench {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run pgbench ({name}): {e}"));
        Bench { name, child: Some(child), out, err }
    }

    fn output(&self) -> String {
        format!(
            "pgbench ({}) stdout:\n{}\nstderr:\n{}",
            self.name,
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("pgbench ({}) ended with {status} before the kill\n{}", self.name, self.output());
        }
    }

    /// Waits for it to end (its server is gone); kills it and fails if it hangs.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        wait_child(&mut child, limit, || {
            format!("pgbench ({}) after its server was killed\n{}", self.name, self.output())
        })
    }

    /// "number of transactions actually processed: N": transactions whose every command, their
    /// `END` included, returned. pgbench prints it even for a run cut short by errors.
    fn processed(&self) -> u64 {
        let out = std::fs::read_to_string(&self.out).unwrap_or_default();
        out.lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or_else(|| {
                panic!("no transaction count in the output of pgbench ({})\n{}", self.name, self.output())
            })
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The ids and keys of the ledger commits pgbench saw acknowledged.
fn read_journal(path: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut f = l.split_whitespace().map(|v| v.parse::<u64>());
            match (f.next(), f.next(), f.next()) {
                (Some(Ok(id)), Some(Ok(key)), None) => (id, key),
                _ => panic!("malformed journal line {l:?} in {}", path.display()),
            }
        })
        .collect()
}

fn journal_len(path: &Path) -> usize {
    std::fs::read(path).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0)
}

// ------------------------------------------------------------------------------------------------
// The mirror.

fn mirror_daemon() -> (Daemon, PathBuf) {
    for t in TOOLS {
        require_tool(t);
    }
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    std::fs::File::create(&cache).unwrap().set_len(SIZE + CACHE_SLACK).unwrap();
    d.create_with(SIZE, &[OsStr::new("--cache"), cache.as_os_str()]);
    d.extra_args = vec!["--cache".into(), cache.to_string_lossy().into_owned()];
    (d, cache)
}

fn verify_clean(d: &Daemon, cache: &Path, when: &str) -> VerifyReport {
    let r = d.verify_offline(&[cache.to_path_buf()], &[]);
    assert!(
        r.exit_code == Some(0) && r.mismatch_count == 0,
        "superdisk verify {when} found the cache differing from the backing (exit {:?}):\n{}\ndaemon log:\n{}",
        r.exit_code,
        r.output,
        d.log()
    );
    r
}

fn phase(start: Instant, what: &str) {
    println!("[{:6.1} s] {what}", start.elapsed().as_secs_f64());
}

/// The pgbench scripts of the load, written once into the test directory.
struct Scripts {
    ledger: PathBuf,
    checkpoint: PathBuf,
    journal: PathBuf,
}

impl Scripts {
    fn write(d: &Daemon) -> Scripts {
        let journal = d.path("ledger.journal");
        // The journal line is written only once END has returned: pgbench runs a script's commands
        // in order and aborts the client on an error, so a failed COMMIT never reaches \shell.
        let ledger = d.path("ledger.sql");
        std::fs::write(
            &ledger,
            format!(
                "\\set key random(1, 1000000000000)\n\
                 BEGIN;\n\
                 INSERT INTO ledger (key, payload) VALUES (:key, repeat(md5(:key::text), {LEDGER_PAYLOAD_REPEAT})) \
                 RETURNING id \\gset\n\
                 END;\n\
                 \\shell echo :id :key >> {}\n",
                journal.display()
            ),
        )
        .unwrap();
        let checkpoint = d.path("checkpoint.sql");
        std::fs::write(&checkpoint, "CHECKPOINT;\n\\sleep 1500 ms\n").unwrap();
        Scripts { ledger, checkpoint, journal }
    }
}

/// The three pgbench runs of the load, for `secs` seconds: TPC-B, the journaled ledger, checkpoints.
fn start_load(pg: &Postgres, scripts: &Scripts, work: &Path, secs: &str) -> [Bench; 3] {
    [
        Bench::spawn("tpcb", work, pg.client("pgbench").args(["-n", "-c", "4", "-j", "2", "-T", secs, "postgres"])),
        Bench::spawn(
            "ledger",
            work,
            pg.client("pgbench")
                .args(["-n", "-c", "2", "-j", "2", "-T", secs, "-f"])
                .arg(&scripts.ledger)
                .arg("postgres"),
        ),
        Bench::spawn(
            "checkpoint",
            work,
            pg.client("pgbench").args(["-n", "-c", "1", "-T", secs, "-f"]).arg(&scripts.checkpoint).arg("postgres"),
        ),
    ]
}

/// Loads the running cluster until enough has committed, then SIGKILLs superdisk and kills what
/// is left of PostgreSQL and pgbench. Returns the TPC-B transactions pgbench counted as done.
fn load_and_kill(d: &mut Daemon, pg: &mut Postgres, scripts: &Scripts, t0: Instant) -> u64 {
    let work = d.dir.path().to_path_buf();
    let load_mark = pg.log_mark();
    let journal_before = journal_len(&scripts.journal);
    let history_before = pg.sql_u64("SELECT count(*) FROM pgbench_history");
    let secs = BENCH_SECS.to_string();
    let [mut tpcb, mut ledger, mut checkpoints] = start_load(pg, scripts, &work, &secs);
    let load_start = Instant::now();
    let deadline = load_start + Duration::from_secs(90);
    loop {
        for b in [&mut tpcb, &mut ledger, &mut checkpoints] {
            b.assert_running();
        }
        let commits = journal_len(&scripts.journal) - journal_before;
        let ckpts = pg.log_since(load_mark).matches("checkpoint complete").count();
        if load_start.elapsed() >= MIN_LOAD
            && commits >= MIN_LEDGER_COMMITS
            && ckpts >= MIN_CHECKPOINTS
            && pg.sql_u64("SELECT count(*) FROM pgbench_history") - history_before >= MIN_TPCB_COMMITS
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the load did not reach {MIN_LEDGER_COMMITS} ledger commits, {MIN_TPCB_COMMITS} TPC-B commits and \
             {MIN_CHECKPOINTS} checkpoints in 90 s (ledger: {commits}, checkpoints: {ckpts})\n{}\n{}",
            tpcb.output(),
            ledger.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Somewhere in the cycle of checkpoints, not always at the same point.
    std::thread::sleep(Duration::from_millis(rand::thread_rng().gen_range(0..1500)));
    for b in [&mut tpcb, &mut ledger, &mut checkpoints] {
        b.assert_running();
    }
    d.assert_alive();
    d.kill();
    let journal_at_kill = journal_len(&scripts.journal) - journal_before;
    phase(
        t0,
        &format!(
            "superdisk SIGKILLed after {:.1} s of load, {journal_at_kill} ledger commits journaled",
            load_start.elapsed().as_secs_f64()
        ),
    );

    // Without its disk PostgreSQL PANICs (or blocks in I/O); it gets a moment to show which.
    let crash_mark = pg.log_mark();
    let panic_deadline = Instant::now() + Duration::from_secs(5);
    while !pg.log_since(crash_mark).contains("PANIC") && Instant::now() < panic_deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after_kill = pg.log_since(crash_mark);
    println!("  postgres: {}", after_kill.lines().find(|l| l.contains("PANIC")).unwrap_or("no PANIC within 5 s"));
    let stuck = pg.kill_all(WAIT);
    assert!(stuck.is_empty(), "postgres processes {stuck:?} did not die within {WAIT:?} of SIGKILL");
    for b in [&mut tpcb, &mut ledger, &mut checkpoints] {
        let status = b.wait(WAIT);
        assert!(!status.success(), "pgbench ({}) succeeded although its server was killed\n{}", b.name, b.output());
    }
    let tpcb_done = tpcb.processed();
    let journaled = journal_len(&scripts.journal) - journal_before;
    assert!(journaled >= MIN_LEDGER_COMMITS, "only {journaled} ledger commits were journaled");
    println!(
        "  pgbench counted {tpcb_done} TPC-B, {} ledger transactions and {} checkpoints; {journaled} ledger commits \
         journaled",
        ledger.processed(),
        checkpoints.processed()
    );
    tpcb_done
}

/// What must hold after every recovery: each journaled ledger commit present with its content,
/// the TPC-B invariant row by row, at least `tpcb_done` transactions in the history, and no
/// corruption that pg_amcheck can see.
fn check_cluster(pg: &Postgres, d: &Daemon, scripts: &Scripts, tpcb_done: u64) {
    let recorded = read_journal(&scripts.journal);
    let csv = d.path("journal.csv");
    let mut f = std::fs::File::create(&csv).unwrap();
    for (id, key) in &recorded {
        writeln!(f, "{id},{key}").unwrap();
    }
    drop(f);
    // The primary key also rejects an id journaled twice.
    pg.sql("DROP TABLE IF EXISTS journal; CREATE TABLE journal (id bigint PRIMARY KEY, key bigint NOT NULL)");
    pg.sql(&format!("\\copy journal FROM '{}' WITH (FORMAT csv)", csv.display()));
    let missing = pg.sql(
        "SELECT count(*) || ' missing, ids: ' || coalesce(string_agg(id::text, ' ' ORDER BY id), '') \
         FROM (SELECT j.id FROM journal j LEFT JOIN ledger l USING (id) WHERE l.id IS NULL) m",
    );
    assert!(
        missing.starts_with("0 missing"),
        "committed ledger transactions are lost after recovery (of {} journaled): {missing}",
        recorded.len()
    );
    let wrong = pg.sql(&format!(
        "SELECT count(*) || ' wrong, ids: ' || coalesce(string_agg(id::text, ' ' ORDER BY id), '') FROM \
         (SELECT j.id FROM journal j JOIN ledger l USING (id) \
          WHERE l.key <> j.key OR l.payload <> repeat(md5(j.key::text), {LEDGER_PAYLOAD_REPEAT})) w"
    ));
    assert!(wrong.starts_with("0 wrong"), "committed ledger rows came back with other content: {wrong}");
    let garbled = pg.sql_u64(&format!(
        "SELECT count(*) FROM ledger WHERE payload <> repeat(md5(key::text), {LEDGER_PAYLOAD_REPEAT})"
    ));
    assert_eq!(garbled, 0, "ledger rows whose payload does not match their key");
    let ledger_rows = pg.sql_u64("SELECT count(*) FROM ledger");
    println!("  ledger: {ledger_rows} rows, all {} journaled commits present and intact", recorded.len());

    // TPC-B: each transaction adds the same delta to one account, teller and branch and logs it in
    // the history, all in one transaction; the balances started at 0.
    let accounts = pg.sql_u64("SELECT count(*) FROM pgbench_accounts");
    assert_eq!(accounts, u64::from(SCALE) * 100_000, "pgbench_accounts lost rows");
    let sums = pg.sql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || (SELECT sum(tbalance) FROM pgbench_tellers) \
         || ' ' || (SELECT sum(bbalance) FROM pgbench_branches) || ' ' || \
         (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
    );
    let parts: Vec<&str> = sums.split(' ').collect();
    assert!(
        parts.len() == 4 && parts.iter().all(|p| *p == parts[0]),
        "TPC-B invariant broken: sum(abalance) sum(tbalance) sum(bbalance) sum(history.delta) = {sums}"
    );
    for (table, key, balance) in [
        ("pgbench_accounts", "aid", "abalance"),
        ("pgbench_tellers", "tid", "tbalance"),
        ("pgbench_branches", "bid", "bbalance"),
    ] {
        let off = pg.sql_u64(&format!(
            "SELECT count(*) FROM {table} t LEFT JOIN \
             (SELECT {key}, sum(delta) AS s FROM pgbench_history GROUP BY {key}) h USING ({key}) \
             WHERE t.{balance} <> coalesce(h.s, 0)"
        ));
        assert_eq!(off, 0, "{off} rows of {table} whose {balance} is not the sum of their history deltas");
    }
    let history = pg.sql_u64("SELECT count(*) FROM pgbench_history");
    assert!(
        history >= tpcb_done,
        "pgbench_history has {history} rows but pgbench saw {tpcb_done} TPC-B transactions committed"
    );
    println!("  TPC-B: {history} transactions in the history ({tpcb_done} counted by pgbench), balances consistent");

    let amcheck = output_within(
        pg.client("pg_amcheck").args(["--all", "--install-missing", "--heapallindexed", "--rootdescend"]),
        Duration::from_secs(300),
    );
    assert!(
        amcheck.status.success(),
        "pg_amcheck found corruption ({}):\n{}\n{}",
        amcheck.status,
        String::from_utf8_lossy(&amcheck.stdout),
        String::from_utf8_lossy(&amcheck.stderr)
    );
}

/// initdb on `data` (a directory it creates), postgres started, the pgbench tables and the ledger.
fn start_cluster(d: &Daemon, data: &Path, t0: Instant) -> Postgres {
    std::fs::create_dir(data).unwrap();
    let mut pg = Postgres::new(d.dir.path(), data.to_path_buf());
    chown(data, pg.uid, pg.gid);
    set_mode(data, 0o700);
    pg.initdb();
    pg.start(WAIT);
    phase(t0, "initdb done, postgres up");
    let init = output_within(
        pg.client("pgbench").args(["-i", "-q", "-s", &SCALE.to_string(), "postgres"]),
        Duration::from_secs(300),
    );
    assert!(init.status.success(), "pgbench -i failed:\n{}", String::from_utf8_lossy(&init.stderr));
    pg.sql("CREATE TABLE ledger (id bigserial PRIMARY KEY, key bigint NOT NULL, payload text NOT NULL)");
    phase(t0, &format!("pgbench tables at scale {SCALE} and the ledger table created"));
    pg
}

#[test]
fn postgres_survives_sigkill_of_the_daemon_under_pgbench() {
    let t0 = Instant::now();
    let (mut d, cache) = mirror_daemon();
    // The postgres user reaches the mount point, the socket directory and the scripts through it.
    set_mode(d.dir.path(), 0o755);
    let mark = d.log_mark();
    d.spawn();
    d.wait_log(mark, "rebuild complete", WAIT);
    d.wait_mode(mark, "healthy", WAIT);
    phase(t0, "superdisk serving, cache rebuilt");

    let mut stack = XfsStack::attach(&d, SIZE);
    run_ok(Command::new("mkfs.xfs").arg("-q").arg(stack.dev()));
    stack.mount();
    let data = stack.mnt.join("pgdata");
    // Declared after `stack`, so dropped before it: on a failure the cluster is killed before the
    // filesystem under it is unmounted.
    let mut pg = start_cluster(&d, &data, t0);
    let scripts = Scripts::write(&d);

    let mut tpcb_done = 0;
    for cycle in 1..=CYCLES {
        println!("cycle {cycle} of {CYCLES}");
        tpcb_done += load_and_kill(&mut d, &mut pg, &scripts, t0);
        stack.tear_down_dead();
        d.wait_backing_unlocked();
        verify_clean(&d, &cache, &format!("straight after kill {cycle}"));
        phase(t0, "torn down after the crash, superdisk verify clean");

        let mark = d.log_mark();
        d.spawn();
        let restart = d.wait_log(mark, "did not stop cleanly", WAIT);
        println!("  superdisk: {}", restart.lines().find(|l| l.contains("did not stop cleanly")).unwrap_or_default());
        // No wait for the resync of the regions with write-intent bits: the XFS log replay and
        // PostgreSQL's recovery run while it may still be going.
        stack = XfsStack::attach(&d, SIZE);
        // The first mount replays the XFS log; xfs_repair then checks what the replay left.
        stack.mount();
        stack.umount();
        stack.xfs_repair_clean(&format!("after the log replay of cycle {cycle}"));
        stack.mount();
        phase(t0, "superdisk restarted, XFS log replayed, xfs_repair -n clean");

        let recovery = pg.start(Duration::from_secs(120));
        assert!(
            recovery.contains("was not properly shut down") || recovery.contains("was interrupted"),
            "postgres did not go through crash recovery; its log of this start:\n{recovery}"
        );
        for l in recovery.lines().filter(|l| l.contains("redo ")) {
            println!("  {l}");
        }
        d.wait_mode(mark, "healthy", WAIT);
        phase(t0, "postgres recovered, superdisk resynced");
        check_cluster(&pg, &d, &scripts, tpcb_done);
        phase(t0, "ledger, TPC-B invariant and pg_amcheck clean");
    }

    pg.stop();
    let checksums =
        output_within(pg.as_postgres("pg_checksums").arg("--check").arg("-D").arg(&data), Duration::from_secs(180));
    assert!(
        checksums.status.success(),
        "pg_checksums --check failed ({}):\n{}\n{}",
        checksums.status,
        String::from_utf8_lossy(&checksums.stdout),
        String::from_utf8_lossy(&checksums.stderr)
    );
    stack.umount();
    stack.xfs_repair_clean("at the end");
    stack.detach();
    let status = d.stop();
    assert!(status.success(), "superdisk exited with {status} after SIGTERM; log:\n{}", d.log());
    let r = verify_clean(&d, &cache, "at the end");
    assert_eq!(r.regions_checked, SIZE / REGION, "a mirror stopped cleanly has every region valid:\n{}", r.output);
    phase(t0, "pg_checksums, xfs_repair -n and superdisk verify clean");
}

/// The same cluster and load, but the daemon is upgraded in place three times while pgbench runs:
/// PostgreSQL never notices. Every pgbench run ends successfully with no failed transaction,
/// every journaled commit is there, the TPC-B invariant holds and pg_amcheck is clean, without
/// any crash recovery.
#[test]
fn postgres_stays_up_across_three_in_place_upgrades_under_pgbench() {
    const UPGRADES: u32 = 3;
    let t0 = Instant::now();
    let (mut d, cache) = mirror_daemon();
    set_mode(d.dir.path(), 0o755);
    d.extra_args.extend(Daemon::admin_args(d.dir.path()));
    let mark = d.log_mark();
    d.spawn();
    d.wait_mode(mark, "healthy", WAIT);
    let mut stack = XfsStack::attach(&d, SIZE);
    run_ok(Command::new("mkfs.xfs").arg("-q").arg(stack.dev()));
    stack.mount();
    let data = stack.mnt.join("pgdata");
    let mut pg = start_cluster(&d, &data, t0);
    let scripts = Scripts::write(&d);

    let work = d.dir.path().to_path_buf();
    let secs = (UPGRADES * 6 + 6).to_string();
    let history_before = pg.sql_u64("SELECT count(*) FROM pgbench_history");
    let [mut tpcb, mut ledger, mut checkpoints] = start_load(&pg, &scripts, &work, &secs);
    for n in 1..=UPGRADES {
        std::thread::sleep(Duration::from_secs(5));
        for b in [&mut tpcb, &mut ledger, &mut checkpoints] {
            b.assert_running();
        }
        let (ok, text) = d.upgrade(Path::new(BIN));
        assert!(ok, "upgrade {n} failed: {text}\nlog:\n{}", d.log());
        phase(t0, &format!("upgrade {n}: {}", text.trim()));
    }
    for b in [&mut tpcb, &mut ledger, &mut checkpoints] {
        let status = b.wait(Duration::from_secs(120));
        let out = b.output();
        assert!(status.success(), "pgbench ({}) failed across the upgrades:\n{out}", b.name);
        assert!(
            !out.contains("number of failed transactions") || out.contains("number of failed transactions: 0"),
            "pgbench ({}) had failed transactions:\n{out}",
            b.name
        );
    }
    let tpcb_done = tpcb.processed();
    let history = pg.sql_u64("SELECT count(*) FROM pgbench_history") - history_before;
    println!("  pgbench: {tpcb_done} TPC-B transactions across {UPGRADES} upgrades ({history} new history rows)");
    assert!(!pg.log_since(0).contains("PANIC"), "postgres saw an I/O problem");
    check_cluster(&pg, &d, &scripts, tpcb_done);
    pg.stop();
    stack.umount();
    stack.xfs_repair_clean("after the upgrades");
    stack.detach();
    assert!(d.stop().success(), "the upgraded daemon stops cleanly");
    verify_clean(&d, &cache, "after the upgrades");
    phase(t0, "ledger, TPC-B invariant, pg_amcheck, xfs_repair -n and superdisk verify clean");
}

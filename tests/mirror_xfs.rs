//! XFS on the mirror: nbdfuse turns the export into a file, a loop device turns that into a block
//! device, XFS goes on top (the kernel NBD module is not available in CI; see tests/xfs.rs). The
//! kernel filesystem drives the real I/O pattern: journal writes with FUA, flushes, large
//! writeback.
//!
//! * The cache is deleted between runs: the daemon serves degraded, then a blank cache is rebuilt,
//!   and every file is intact throughout.
//! * The daemon is SIGKILLed in the middle of a copy: after a restart XFS recovers its journal at
//!   mount, every file whose fsync returned before the kill has its content, and `xfs_repair -n`
//!   finds nothing to repair.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// mkfs.xfs refuses filesystems under 300 MiB.
const SIZE: u64 = 512 * MIB;
const REGION: u64 = MIB;
const CACHE_SLACK: u64 = 8 * MIB;
const WAIT: Duration = Duration::from_secs(40);
const TOOLS: [&str; 8] = ["nbdfuse", "fusermount3", "losetup", "mkfs.xfs", "xfs_repair", "mount", "umount", "sync"];

/// Relative path -> content of ~`count` files of seeded random data and varied sizes (empty,
/// sub-block, unaligned, several MiB) in nested directories.
fn make_files(seed: u64, count: usize, max_len: usize) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut state = seed;
    let dirs = ["", "a", "a/b", "a/b/c", "d", "d/e", "f g"];
    let sizes = [0usize, 1, 511, 4095, 4096, 4097, 65536, 100_000, 1 << 20, 3 * (1 << 20) + 17];
    (0..count)
        .map(|i| {
            let dir = dirs[rng.gen_range(0..dirs.len())];
            let len = if i < sizes.len() { sizes[i].min(max_len) } else { rng.gen_range(0..max_len) };
            let mut data = vec![0u8; len];
            fill_random(&mut data, &mut state);
            let rel = if dir.is_empty() { format!("file{i:02}.bin") } else { format!("{dir}/file{i:02}.bin") };
            (rel, data)
        })
        .collect()
}

/// Writes the files under `root` and fsyncs each one and its directory.
fn write_files(root: &Path, files: &[(String, Vec<u8>)]) {
    for (rel, data) in files {
        write_durably(&root.join(rel), data).unwrap_or_else(|e| panic!("writing {rel}: {e}"));
    }
}

fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let parent = path.parent().unwrap();
    std::fs::create_dir_all(parent)?;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    // The new directory entry is durable only once the directory is.
    std::fs::File::open(parent)?.sync_all()
}

/// Relative path of every regular file under `root`.
fn list_files(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let ty = std::fs::symlink_metadata(&path).unwrap().file_type();
            if ty.is_dir() {
                stack.push(path);
            } else if ty.is_file() {
                out.insert(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Asserts that `root` holds exactly `files`, byte for byte.
fn assert_tree(root: &Path, files: &[(String, Vec<u8>)], what: &str) {
    let want: BTreeSet<String> = files.iter().map(|(rel, _)| rel.clone()).collect();
    assert_eq!(list_files(root), want, "{what}: the set of files differs");
    for (rel, data) in files {
        assert_file(&root.join(rel), data, what);
    }
}

fn assert_file(path: &Path, data: &[u8], what: &str) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("{what}: cannot read {}: {e}", path.display()));
    if got != data {
        let at = got.iter().zip(data).position(|(a, b)| a != b).unwrap_or(got.len().min(data.len()));
        panic!(
            "{what}: {} differs from what was written: {} bytes, expected {}, first difference at byte {at}",
            path.display(),
            got.len(),
            data.len()
        );
    }
}

fn new_cache_file(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(SIZE + CACHE_SLACK).unwrap();
}

fn mirror_daemon() -> (Daemon, PathBuf) {
    for t in TOOLS {
        require_tool(t);
    }
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    new_cache_file(&cache);
    d.create_with(SIZE, &[OsStr::new("--cache"), cache.as_os_str()]);
    d.extra_args = vec!["--cache".into(), cache.to_string_lossy().into_owned()];
    (d, cache)
}

fn start_and_rebuild(d: &mut Daemon) {
    let mark = d.log_mark();
    d.spawn();
    d.wait_log(mark, "rebuild complete", WAIT);
    d.wait_mode(mark, "healthy", WAIT);
}

fn stop_ok(d: &mut Daemon) {
    let status = d.stop();
    assert!(status.success(), "superdisk exited with {status} after SIGTERM; log:\n{}", d.log());
}

fn verify_clean(d: &Daemon, cache: &Path) {
    let r = d.verify_offline(&[cache.to_path_buf()], &[]);
    assert!(
        r.exit_code == Some(0) && r.mismatch_count == 0,
        "superdisk verify found the cache differing from the backing (exit {:?}):\n{}\ndaemon log:\n{}",
        r.exit_code,
        r.output,
        d.log()
    );
    assert_eq!(
        r.regions_checked,
        SIZE / REGION,
        "a healthy mirror stopped cleanly has every region valid:\n{}",
        r.output
    );
}

#[test]
fn xfs_survives_the_cache_deleted_between_runs() {
    let (mut d, cache) = mirror_daemon();
    let first = make_files(7, 30, 8 << 20);
    let second = make_files(8, 20, 4 << 20);
    start_and_rebuild(&mut d);

    let mut stack = XfsStack::attach(&d, SIZE);
    run_ok(Command::new("mkfs.xfs").arg("-q").arg(stack.dev()));
    stack.mount();
    write_files(&stack.mnt.join("first"), &first);
    stack.detach();
    stop_ok(&mut d);
    verify_clean(&d, &cache);

    // No cache: served degraded, from the backing alone.
    std::fs::remove_file(&cache).unwrap();
    let mark = d.log_mark();
    d.spawn();
    d.wait_mode(mark, "degraded", WAIT);
    let mut stack = XfsStack::attach(&d, SIZE);
    stack.mount();
    assert_tree(&stack.mnt.join("first"), &first, "with the cache deleted");
    write_files(&stack.mnt.join("second"), &second);
    stack.detach();
    stop_ok(&mut d);

    // A blank cache in its place is rebuilt from the backing, including what was written meanwhile.
    new_cache_file(&cache);
    start_and_rebuild(&mut d);
    let mut stack = XfsStack::attach(&d, SIZE);
    stack.mount();
    assert_tree(&stack.mnt.join("first"), &first, "after the rebuild");
    assert_tree(&stack.mnt.join("second"), &second, "files written while degraded, after the rebuild");
    stack.umount();
    stack.xfs_repair_clean("after the rebuild");
    stack.detach();
    stop_ok(&mut d);
    verify_clean(&d, &cache);
}

#[test]
fn xfs_survives_sigkill_in_the_middle_of_a_copy() {
    let (mut d, cache) = mirror_daemon();
    let before = make_files(11, 20, 4 << 20);
    // The copy the kill interrupts: enough data that it cannot finish first.
    let during = make_files(12, 60, 6 << 20);
    start_and_rebuild(&mut d);

    let mut stack = XfsStack::attach(&d, SIZE);
    run_ok(Command::new("mkfs.xfs").arg("-q").arg(stack.dev()));
    stack.mount();
    write_files(&stack.mnt.join("before"), &before);

    // The copy runs on a thread that records each file whose fsync (and its directory's) returned;
    // once the daemon dies its writes fail and it stops.
    let durable: Arc<Mutex<Vec<usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let copier = {
        let root = stack.mnt.join("during");
        let files = during.clone();
        let durable = durable.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            for (i, (rel, data)) in files.iter().enumerate() {
                if stop.load(Ordering::Relaxed) || write_durably(&root.join(rel), data).is_err() {
                    return;
                }
                durable.lock().unwrap().push(i);
            }
        })
    };
    // Kill once a few files are durable, while later ones are being written.
    let deadline = Instant::now() + WAIT;
    while durable.lock().unwrap().len() < 6 {
        assert!(!copier.is_finished(), "the copy stopped before the kill; log:\n{}", d.log());
        assert!(Instant::now() < deadline, "the copy made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(rand::rngs::StdRng::seed_from_u64(12).gen_range(0..150)));
    d.kill();
    let killed_at = durable.lock().unwrap().len();
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + WAIT;
    while !copier.is_finished() {
        assert!(Instant::now() < deadline, "the copy is stuck after the daemon was killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    copier.join().unwrap();
    let durable = durable.lock().unwrap().clone();
    assert!(durable.len() < during.len(), "the copy finished before the kill: nothing was interrupted");
    // A file whose fsync was in flight at the kill cannot have succeeded after it.
    assert!(durable.len() <= killed_at + 1, "{} files durable after the kill at {killed_at}", durable.len());
    println!("killed with {killed_at} of {} files of the copy fsync'ed; {} in the end", during.len(), durable.len());
    stack.tear_down_dead();

    let r = d.verify_offline(std::slice::from_ref(&cache), &[]);
    assert!(r.exit_code == Some(0) && r.mismatch_count == 0, "verify after the kill:\n{}", r.output);

    let mark = d.log_mark();
    d.spawn();
    d.wait_mode(mark, "healthy", WAIT);
    let mut stack = XfsStack::attach(&d, SIZE);
    // Mounting replays the XFS journal.
    stack.mount();
    assert_tree(&stack.mnt.join("before"), &before, "files fsync'ed before the copy");
    for &i in &durable {
        let (rel, data) = &during[i];
        assert_file(&stack.mnt.join("during").join(rel), data, "a file fsync'ed before the kill");
    }
    stack.umount();
    stack.xfs_repair_clean("after the journal recovery");
    stack.detach();
    stop_ok(&mut d);
    verify_clean(&d, &cache);
}

//! A real filesystem on the export: nbdfuse turns the export into a file, a loop device turns the
//! file into a block device, and XFS goes on top. A tree of files is copied in, everything is torn
//! down, the daemon is stopped with SIGTERM and started again, and every checksum must match and
//! `xfs_repair -n` must find nothing to repair.
//!
//! The kernel's NBD module is not available in CI; nbdfuse + loop stands in for it, with the same
//! effect that a real kernel filesystem drives the I/O pattern (journal writes, FUA, flushes).

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// mkfs.xfs refuses filesystems under 300 MiB.
const SIZE: u64 = 512 * MIB;

/// One nbdfuse + loop + mount stack. Dropping it tears down whatever is up, in order, so that a
/// failing assertion does not leave a mount, a loop device or a FUSE mount behind on the machine.
struct Stack {
    fuse_dir: PathBuf,
    mnt: PathBuf,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    mounted: bool,
}

impl Stack {
    fn attach(d: &Daemon) -> Stack {
        let fuse_dir = d.path("fuse");
        let mnt = d.path("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let pidfile = d.path("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.path("nbdfuse.log")).unwrap();
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(fuse_dir.join("disk"))
            .arg(d.uri())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nbdfuse");
        let mut s = Stack { fuse_dir, mnt, nbdfuse: Some(child), loop_dev: None, mounted: false };
        // nbdfuse writes its pid file once the FUSE mount is serving.
        let disk = s.disk();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(pidfile.exists() && std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) == SIZE) {
            if let Some(status) = s.nbdfuse.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdfuse exited with {status}: {}", std::fs::read_to_string(d.path("nbdfuse.log")).unwrap());
            }
            assert!(Instant::now() < deadline, "nbdfuse did not present {} of {SIZE} bytes", disk.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&disk)).trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        s.loop_dev = Some(dev);
        s
    }

    fn disk(&self) -> PathBuf {
        self.fuse_dir.join("disk")
    }

    fn dev(&self) -> &str {
        self.loop_dev.as_deref().expect("attached")
    }

    fn mount(&mut self) {
        run_ok(Command::new("mount").args(["-t", "xfs", self.dev()]).arg(&self.mnt));
        self.mounted = true;
    }

    fn umount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mnt));
        self.mounted = false;
    }

    /// Unmounts, detaches the loop device and unmounts FUSE, each step checked.
    fn detach(&mut self) {
        if self.mounted {
            self.umount();
        }
        if let Some(dev) = self.loop_dev.take() {
            run_ok(Command::new("losetup").args(["-d", &dev]));
        }
        // fsync through FUSE becomes an NBD flush before FUSE goes away.
        run_ok(&mut Command::new("sync"));
        run_ok(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir));
        let mut child = self.nbdfuse.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "nbdfuse exited with {status}");
                break;
            }
            assert!(Instant::now() < deadline, "nbdfuse did not exit after fusermount3 -u");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stack {
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
        if let Some(mut child) = self.nbdfuse.take() {
            let ok = Command::new("fusermount3").arg("-u").arg(&self.fuse_dir).status().map(|s| s.success());
            if !ok.unwrap_or(false) {
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.fuse_dir).status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes ~30 files of seeded random content and varied sizes (empty, sub-block, block-sized,
/// unaligned, several MiB) in nested directories under `root`.
fn make_tree(root: &Path, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut state = seed;
    let dirs = ["", "a", "a/b", "a/b/c", "d", "d/e", "f g"];
    let sizes = [0usize, 1, 511, 4095, 4096, 4097, 65536, 100_000, 1 << 20, 3 * (1 << 20) + 17];
    for dir in dirs {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for i in 0..30 {
        let dir = dirs[rng.gen_range(0..dirs.len())];
        let len = if i < sizes.len() { sizes[i] } else { rng.gen_range(0..8 << 20) };
        let mut data = vec![0u8; len];
        fill_random(&mut data, &mut state);
        std::fs::write(root.join(dir).join(format!("file{i:02}.bin")), data).unwrap();
    }
}

/// Relative path -> sha256 of every regular file under `root`.
fn checksums(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let ty = std::fs::symlink_metadata(&path).unwrap().file_type();
            if ty.is_dir() {
                stack.push(path);
            } else if ty.is_file() {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, sha256_file(&path));
            }
        }
    }
    out
}

#[test]
fn xfs_on_nbdfuse_survives_daemon_restart() {
    for tool in ["nbdfuse", "fusermount3", "losetup", "mkfs.xfs", "xfs_repair", "mount", "umount", "cp", "sync"] {
        require_tool(tool);
    }
    let mut d = Daemon::start(SIZE, &[]);
    let src = d.path("src");
    make_tree(&src, 7);
    let expected = checksums(&src);
    assert_eq!(expected.len(), 30);

    // Declared after the daemon so that it is dropped first: FUSE must go before its server.
    let mut stack = Stack::attach(&d);
    run_ok(Command::new("mkfs.xfs").arg("-q").arg(stack.dev()));
    stack.mount();
    run_ok(Command::new("cp").arg("-a").arg(&src).arg(stack.mnt.join("tree")));
    run_ok(&mut Command::new("sync"));
    // Read back through the page cache as a first sanity check.
    assert_eq!(checksums(&stack.mnt.join("tree")), expected, "files differ right after copying");
    stack.detach();
    drop(stack);

    let status = d.stop();
    assert!(status.success(), "superdisk exited with {status} after SIGTERM; log:\n{}", d.log());
    d.spawn();

    let mut stack = Stack::attach(&d);
    stack.mount();
    // A fresh mount after a fresh start: every byte comes from the daemon, not from a cache.
    let got = checksums(&stack.mnt.join("tree"));
    assert_eq!(got, expected, "files differ after unmount, daemon restart and mount");
    stack.umount();
    let out = Command::new("xfs_repair").args(["-n", stack.dev()]).output().unwrap();
    assert!(
        out.status.success(),
        "xfs_repair -n found problems ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    stack.detach();
    d.assert_alive();
}

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
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;
/// mkfs.xfs refuses filesystems under 300 MiB.
const SIZE: u64 = 512 * MIB;

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
    let mut stack = XfsStack::attach(&d, SIZE);
    run_ok(Command::new("mkfs.xfs").arg("-q").arg(stack.dev()));
    stack.mount();
    run_ok(Command::new("cp").arg("-a").arg(&src).arg(stack.mnt.join("tree")));
    run_ok(&mut Command::new("sync"));
    // Read back through the page cache as a first sanity check.
    assert_eq!(checksums(&stack.mnt.join("tree")), expected, "files differ right after copying");
    stack.detach();

    let status = d.stop();
    assert!(status.success(), "superdisk exited with {status} after SIGTERM; log:\n{}", d.log());
    d.spawn();

    let mut stack = XfsStack::attach(&d, SIZE);
    stack.mount();
    // A fresh mount after a fresh start: every byte comes from the daemon, not from a cache.
    let got = checksums(&stack.mnt.join("tree"));
    assert_eq!(got, expected, "files differ after unmount, daemon restart and mount");
    stack.umount();
    stack.xfs_repair_clean("after the restart");
    stack.detach();
    d.assert_alive();
}

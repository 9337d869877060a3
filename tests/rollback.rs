//! A backing rolled back under its cache: a persistent disk restored from a snapshot and attached
//! to a VM whose SSDs still hold the newer mirror. The cache set records the backing generation it
//! last saw (after the backing was made to advance past the writes the set holds); a backing found
//! older than that record is recognised at start-up, and the set is rebuilt from it. Without the
//! check the set's valid bits would serve the newer data for regions the restored disk has older
//! data in: a silent mix of two points in time. Every read must equal the restored image.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

fn random_file(path: &Path, len: u64, seed: u64) {
    let mut buf = vec![0u8; len as usize];
    let mut s = seed;
    fill_random(&mut buf, &mut s);
    std::fs::write(path, buf).unwrap();
}

/// Writes `src` over the export from `offset` (nbdcopy through the daemon's socket).
fn write_export(d: &Daemon, src: &Path) {
    require_tool("nbdcopy");
    run_ok(Command::new("nbdcopy").arg(src).arg(d.unix_uri()));
}

/// The whole export as the daemon serves it.
fn read_export(d: &Daemon) -> Vec<u8> {
    let out = d.path("export.read");
    run_ok(Command::new("nbdcopy").arg(d.unix_uri()).arg(&out));
    std::fs::read(out).unwrap()
}

/// The exported part of a backing image (metadata lives at its tail).
fn data_of(image: &Path) -> Vec<u8> {
    let mut b = std::fs::read(image).unwrap();
    b.truncate(SIZE as usize);
    b
}

/// A mirror daemon on a fresh backing and cache file, with the whole export written once and the
/// cache rebuilt (every region valid).
fn mirror(seed: u64) -> (Daemon, PathBuf) {
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    std::fs::File::create(&cache).unwrap().set_len(SIZE + 16 * MIB).unwrap();
    d.create_with(SIZE, &["--cache".as_ref(), cache.as_os_str()]);
    d.extra_args = vec!["--cache".into(), cache.display().to_string()];
    d.extra_args.extend(Daemon::admin_args(d.dir.path()));
    d.spawn();
    d.wait_mode(0, "healthy", Duration::from_secs(60));
    random_file(&d.path("a.bin"), SIZE, seed);
    write_export(&d, &d.path("a.bin"));
    (d, cache)
}

/// Restores `snap` as the backing, serves it with the same cache, and checks every byte against
/// the snapshot's data and the log for the detection.
fn serve_restored(d: &mut Daemon, cache: &Path, snap: &Path) {
    std::fs::copy(snap, &d.backing).unwrap();
    let mark = d.log_mark();
    d.spawn();
    let log = d.wait_log(mark, "mode=", Duration::from_secs(30));
    assert!(
        log.contains("backing rolled back under its cache set") && log.contains("rebuilding it from the backing"),
        "the rollback was not recognised; log:\n{log}"
    );
    let status =
        run_ok(Command::new(env!("CARGO_BIN_EXE_superdisk")).args(["status", "--socket"]).arg(d.admin_socket()));
    assert!(
        status.contains("cache set: formatted, full rebuild: the backing is older than this cache set"),
        "{status}"
    );
    let served = read_export(d);
    assert!(served == data_of(snap), "after the rollback the export is not the restored image");
    d.wait_mode(mark, "healthy", Duration::from_secs(60));
    assert!(read_export(d) == data_of(snap), "after the rebuild the export is not the restored image");
    assert!(d.stop().success());
    let r = d.verify_offline(&[cache.to_path_buf()], &[]);
    assert_eq!(r.mismatch_count, 0, "{}", r.output);
}

/// (a) A snapshot of the backing taken while the daemon was stopped, then more writes, then the
/// snapshot restored.
#[test]
fn a_backing_restored_from_a_snapshot_taken_while_stopped_is_recognised() {
    let (mut d, cache) = mirror(1);
    assert!(d.stop().success());
    let snap = d.path("snap.img");
    std::fs::copy(&d.backing, &snap).unwrap();
    d.spawn();
    random_file(&d.path("b.bin"), SIZE / 2, 2);
    write_export(&d, &d.path("b.bin"));
    assert!(d.stop().success());
    serve_restored(&mut d, &cache, &snap);
}

/// (b) A snapshot taken while the daemon serves and writes (a cloud snapshot without freezing the
/// filesystem is crash-consistent, like this copy), then writes to regions that were idle when it
/// was taken (their write-intent bits clear in the snapshot, so crash recovery alone would trust
/// the cache there), and a clean stop.
#[test]
fn a_backing_restored_from_a_snapshot_taken_while_serving_is_recognised() {
    let (mut d, cache) = mirror(3);
    // Idle regions lose their write-intent bits after a cleaner interval or two (5 s each).
    std::thread::sleep(Duration::from_secs(12));
    let stop = d.path("writer.stop");
    let mut cmd = py_command("upgrade_clients.py");
    // 16 slots of 64 KiB: the first MiB keeps being written while the snapshot is taken.
    cmd.arg(&stop).arg(SIZE.to_string()).arg(d.unix_uri()).args(["--depth", "16"]);
    let writer = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let snap = d.path("snap.img");
    std::fs::copy(&d.backing, &snap).unwrap();
    // After the snapshot: the upper half, idle until now.
    let b = d.path("b.bin");
    let mut upper = vec![0u8; (SIZE / 2) as usize];
    fill_random(&mut upper, &mut 4);
    let mut whole = data_of(&snap);
    whole[(SIZE / 2) as usize..].copy_from_slice(&upper);
    std::fs::write(&b, &whole[(SIZE / 2) as usize..]).unwrap();
    require_tool("nbdcopy");
    run_ok(Command::new("/usr/bin/python3").arg("-c").arg(format!(
        "import nbd; h=nbd.NBD(); h.connect_uri('{}'); h.pwrite(open('{}','rb').read(), {}); h.flush(); h.shutdown()",
        d.unix_uri(),
        b.display(),
        SIZE / 2
    )));
    // Past the cleaner's interval, so this run records a newer generation before it stops.
    std::thread::sleep(Duration::from_secs(7));
    std::fs::write(&stop, b"").unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success(), "writer: {}", String::from_utf8_lossy(&out.stderr));
    assert!(d.stop().success());
    serve_restored(&mut d, &cache, &snap);
}

/// (c) A backing of another array with the same sizes under the cache: refused, never mixed.
#[test]
fn a_backing_of_another_array_is_never_mixed_with_the_cache() {
    let (mut d, cache) = mirror(5);
    assert!(d.stop().success());
    let other = d.path("other.img");
    run_ok(Command::new(BIN).args(["create", "--backing"]).arg(&other).args(["--size", &SIZE.to_string()]));
    let out = output_within(
        Command::new(BIN)
            .args(["serve", "--listen", "", "--unix"])
            .arg(d.path("other.sock"))
            .arg("--backing")
            .arg(&other)
            .arg("--cache")
            .arg(&cache),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("belongs to another superdisk"), "{err}");
}

//! Real NBD clients against a running daemon: nbdinfo, python3-libnbd, qemu-io, qemu-img, nbdcopy
//! and fio. Each client was written by someone else against the NBD spec, so together they catch
//! what a test written from our own reading of the spec would share a blind spot with.
//!
//! The libnbd scenarios live in `tests/py/*.py` (run with /usr/bin/python3, which has the `nbd`
//! module); they exit non-zero with the failing operation, offset and seed.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
const PYTHON: &str = "/usr/bin/python3";
/// 64 MiB and three blocks: an exported size that is not a round number, so that a server which
/// rounds the size (to MiB, or to its metadata alignment) is caught.
const ODD_SIZE: u64 = 64 * MIB + 3 * 4096;

fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(name)
}

fn require_python_nbd() {
    require_tool(PYTHON);
    let ok = Command::new(PYTHON).args(["-c", "import nbd"]).status().map(|s| s.success());
    assert!(ok.unwrap_or(false), "{PYTHON} cannot import nbd: install python3-libnbd (see .ci/run)");
}

/// Runs a tests/py script against the daemon; fails with its message and the daemon's log.
fn python(daemon: &mut Daemon, script: &str, args: &[&str]) {
    require_python_nbd();
    let out = Command::new(PYTHON)
        // Keep the source tree clean of __pycache__ from importing nbdtest.py.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(py_script(script))
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({})\nstdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    daemon.assert_alive();
}

/// Flattens a JSON document into `path=value` pairs (see tests/py/flatten_json.py).
fn json_fields(json: &str) -> BTreeMap<String, String> {
    require_tool(PYTHON);
    let mut child = Command::new(PYTHON)
        .arg(py_script("flatten_json.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flatten_json.py");
    child.stdin.take().unwrap().write_all(json.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "flatten_json.py: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').expect("key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn field<'a>(fields: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    fields.get(key).unwrap_or_else(|| panic!("no `{key}` in {fields:#?}"))
}

fn nbdinfo_json(args: &[&str]) -> BTreeMap<String, String> {
    require_tool("nbdinfo");
    json_fields(&run_ok(Command::new("nbdinfo").arg("--json").args(args)))
}

/// `nbdinfo --map --json`: the extents of base:allocation as (offset, length, type).
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let fields = nbdinfo_json(&["--map", uri]);
    let mut extents = Vec::new();
    while let Some(off) = fields.get(&format!("{}.offset", extents.len())) {
        let n = extents.len();
        extents.push((
            off.parse().unwrap(),
            field(&fields, &format!("{n}.length")).parse().unwrap(),
            field(&fields, &format!("{n}.type")).parse().unwrap(),
        ));
    }
    extents
}

/// Asserts the extents tile [0, size) and returns them.
fn map_covering(uri: &str, size: u64) -> Vec<(u64, u64, u64)> {
    let extents = nbdinfo_map(uri);
    let mut pos = 0;
    for &(off, len, _) in &extents {
        assert_eq!(off, pos, "extents are not contiguous: {extents:?}");
        assert!(len > 0, "empty extent: {extents:?}");
        pos += len;
    }
    assert_eq!(pos, size, "extents do not cover the export: {extents:?}");
    extents
}

/// The types of every extent overlapping [start, end).
fn types_in(extents: &[(u64, u64, u64)], start: u64, end: u64) -> Vec<u64> {
    extents.iter().filter(|(off, len, _)| *off < end && off + len > start).map(|e| e.2).collect()
}

// ---------------------------------------------------------------------------------------------
// nbdinfo

#[test]
fn nbdinfo_reports_exact_size_flags_and_block_sizes() {
    let mut d = Daemon::start(ODD_SIZE, &[]);
    for uri in [d.uri(), d.unix_uri()] {
        let f = nbdinfo_json(&[&uri]);
        assert_eq!(field(&f, "exports.0.export-size"), ODD_SIZE.to_string(), "{uri}");
        assert_eq!(field(&f, "protocol"), "newstyle-fixed");
        assert_eq!(field(&f, "structured"), "true");
        assert_eq!(field(&f, "exports.0.is_read_only"), "false");
        for flag in
            ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_cache", "can_df"]
        {
            assert_eq!(field(&f, &format!("exports.0.{flag}")), "true", "{flag} over {uri}");
        }
        assert_eq!(field(&f, "exports.0.contexts.0"), "base:allocation");
        assert_eq!(field(&f, "exports.0.block_size_minimum"), "1");
        assert_eq!(field(&f, "exports.0.block_size_preferred"), "4096");
        assert_eq!(field(&f, "exports.0.block_size_maximum"), "33554432");
    }
    // Asking for the export by name gives the same export.
    let f = nbdinfo_json(&[&format!("{}/superdisk", d.uri())]);
    assert_eq!(field(&f, "exports.0.export-size"), ODD_SIZE.to_string());
    d.assert_alive();
}

#[test]
fn nbdinfo_read_only_export() {
    let mut d = Daemon::start(64 * MIB, &["--read-only"]);
    let uri = d.uri();
    let f = nbdinfo_json(&[&d.uri()]);
    assert_eq!(field(&f, "exports.0.is_read_only"), "true");
    assert_eq!(field(&f, "exports.0.export-size"), (64 * MIB).to_string());
    // And writes of every kind are refused with EPERM, reads still work.
    python(&mut d, "errors.py", &[&uri, &(64 * MIB).to_string(), "--read-only"]);
}

#[test]
fn nbdinfo_list_shows_the_export_name() {
    let mut d = Daemon::start(16 * MIB, &[]);
    let f = nbdinfo_json(&["--list", &d.uri()]);
    let names: Vec<&String> =
        f.iter().filter(|(k, _)| k.starts_with("exports.") && k.ends_with(".export-name")).map(|e| e.1).collect();
    assert!(names.iter().any(|n| *n == "superdisk"), "export `superdisk` missing from --list: {f:#?}");
    d.assert_alive();

    let mut d = Daemon::start(16 * MIB, &["--export", "vol0"]);
    let f = nbdinfo_json(&["--list", &d.uri()]);
    let names: Vec<&String> =
        f.iter().filter(|(k, _)| k.starts_with("exports.") && k.ends_with(".export-name")).map(|e| e.1).collect();
    assert!(names.iter().any(|n| *n == "vol0"), "export `vol0` missing from --list: {f:#?}");
    let f = nbdinfo_json(&[&format!("{}/vol0", d.uri())]);
    assert_eq!(field(&f, "exports.0.export-size"), (16 * MIB).to_string());
    // A name the server does not export is refused during negotiation.
    let out = Command::new("nbdinfo").arg(format!("{}/nosuch", d.uri())).output().unwrap();
    assert!(!out.status.success(), "nbdinfo of a missing export succeeded: {}", String::from_utf8_lossy(&out.stdout));
    d.assert_alive();
}

#[test]
fn nbdinfo_map_reports_holes_then_data() {
    let size = 64 * MIB;
    let mut d = Daemon::start(size, &[]);
    let uri = d.uri();
    // Type bit 0 is HOLE and bit 1 is ZERO; a fresh sparse image reads as zeroes everywhere.
    let fresh = map_covering(&d.uri(), size);
    assert!(fresh.iter().all(|e| e.2 & 2 == 2), "fresh image has non-zero extents: {fresh:?}");

    python(&mut d, "pwrite.py", &[&uri, &(4 * MIB).to_string(), &MIB.to_string(), "0x5a"]);
    let after = map_covering(&d.uri(), size);
    let written = types_in(&after, 4 * MIB, 5 * MIB);
    assert!(
        written.iter().all(|t| *t == 0),
        "written range [4 MiB, 5 MiB) is not reported as allocated data: {after:?}"
    );
    // Far from the write, the image is still known to be zero.
    for (a, b) in [(0, 2 * MIB), (8 * MIB, size)] {
        assert!(types_in(&after, a, b).iter().all(|t| t & 2 == 2), "[{a}, {b}) lost its zero flag: {after:?}");
    }
    d.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// python3-libnbd

#[test]
fn libnbd_random_round_trips_structured_replies() {
    let mut d = Daemon::start(ODD_SIZE, &[]);
    let uri = d.uri();
    python(&mut d, "roundtrip.py", &[&uri, &ODD_SIZE.to_string(), "--seed", "1"]);
}

#[test]
fn libnbd_random_round_trips_simple_replies_over_unix_socket() {
    let mut d = Daemon::start(ODD_SIZE, &[]);
    let uri = d.unix_uri();
    python(&mut d, "roundtrip.py", &[&uri, &ODD_SIZE.to_string(), "--seed", "2", "--no-structured"]);
}

/// The same random workload through each engine with O_DIRECT on, where every unaligned or
/// byte-granular client request must be widened to aligned I/O by the server; io_uring with its
/// registered buffers (the default, root here) and without them.
#[test]
fn libnbd_random_round_trips_direct_io_both_engines() {
    for (engine, registered, seed) in [("uring", "36M", "6"), ("uring", "0", "8"), ("psync", "36M", "7")] {
        let mut d = Daemon::start(
            ODD_SIZE,
            &["--io-engine", engine, "--direct", "true", "--registered-buffer-bytes", registered],
        );
        let uri = d.uri();
        let size = ODD_SIZE.to_string();
        python(&mut d, "roundtrip.py", &[&uri, &size, "--seed", seed, "--ops", "800"]);
        let expect = format!("registered_buffers={}", engine == "uring" && registered != "0");
        assert!(d.log().contains(&expect), "{engine}, {registered}: expected {expect} in\n{}", d.log());
    }
}

/// A counter from the daemon's metrics endpoint (plain HTTP on `addr`).
fn metric(addr: &str, name: &str) -> f64 {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let line =
        body.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name} in\n{body}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The random workload, whose reads up to 4 MiB go from the page cache to the socket: sent from
/// mapped pages, with `sendfile`, and copied. Every byte is checked against the script's model,
/// interleaved with writes to the same ranges (a mapped send reads the page cache as it is then).
#[test]
fn libnbd_random_round_trips_each_zero_copy_mode() {
    for (mode, seed, said) in [
        ("mapped", "9", Some("mapped page-cache pages")),
        ("sendfile", "10", Some("with sendfile")),
        ("false", "11", None),
    ] {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut d = Daemon::start(ODD_SIZE, &["--zero-copy-reads", mode, "--metrics", &addr]);
        let uri = d.uri();
        python(&mut d, "roundtrip.py", &[&uri, &ODD_SIZE.to_string(), "--seed", seed, "--ops", "800"]);
        let log = d.log();
        match said {
            Some(said) => assert!(log.contains(said), "{mode}: expected {said:?} in\n{log}"),
            None => assert!(!log.contains("large reads are sent"), "{mode}:\n{log}"),
        }
        let sent = metric(&addr, "superdisk_zero_copy_reads_total");
        if said.is_some() && superdisk::device::page_cache_visible() {
            assert!(sent > 0.0, "{mode}: no read was sent from the page cache");
        } else if said.is_none() {
            assert_eq!(sent, 0.0, "{mode}");
        }
        assert_eq!(metric(&addr, "superdisk_zero_copy_fallbacks_total"), 0.0, "{mode}");
    }
}

/// python3-libnbd's synchronous calls are a queue-depth-1 client in another process: with idle
/// polling the writer sees its next requests arrive (counted as hits in the metrics), and every
/// byte still matches the script's model; with `--idle-poll-us 0` nothing polls.
#[test]
fn libnbd_round_trips_with_and_without_idle_polling() {
    // The largest limit, so that a busy machine still answers within it.
    for (poll, seed) in [("1000", "12"), ("0", "13")] {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut d = Daemon::start(ODD_SIZE, &["--idle-poll-us", poll, "--metrics", &addr]);
        let uri = d.uri();
        python(&mut d, "roundtrip.py", &[&uri, &ODD_SIZE.to_string(), "--seed", seed, "--ops", "400"]);
        let hits = metric(&addr, "superdisk_idle_polls_total{outcome=\"hit\"}");
        let misses = metric(&addr, "superdisk_idle_polls_total{outcome=\"miss\"}");
        // One CPU never polls: the client needs it to send the request the poll would wait for.
        if poll == "0" || std::thread::available_parallelism().unwrap().get() < 2 {
            assert_eq!((hits, misses), (0.0, 0.0), "--idle-poll-us {poll}");
        } else {
            assert!(hits > 0.0, "no poll saw a request arrive ({misses} misses)");
        }
    }
}

#[test]
fn libnbd_128_requests_in_flight() {
    // Structured and simple replies take different reply paths; each run needs a fresh image
    // because the script's model starts from all zeroes.
    for (seed, extra) in [("3", None), ("4", Some("--no-structured"))] {
        let mut d = Daemon::start(64 * MIB, &[]);
        let uri = d.uri();
        let size = (64 * MIB).to_string();
        let mut args = vec![uri.as_str(), size.as_str(), "--seed", seed];
        args.extend(extra);
        python(&mut d, "inflight.py", &args);
    }
}

#[test]
fn libnbd_two_connections_write_flush_read() {
    let mut d = Daemon::start(64 * MIB, &[]);
    let uri = d.uri();
    python(&mut d, "multiconn.py", &[&uri, &(64 * MIB).to_string(), "--seed", "5"]);
}

#[test]
fn libnbd_bad_requests_get_the_specs_errors() {
    let size = 64 * MIB;
    let mut d = Daemon::start(size, &[]);
    let uri = d.uri();
    python(&mut d, "errors.py", &[&uri, &size.to_string()]);
    python(&mut d, "errors.py", &[&uri, &size.to_string(), "--no-structured"]);
}

// ---------------------------------------------------------------------------------------------
// qemu-io, qemu-img, nbdcopy, fio

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    require_tool("qemu-io");
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().expect("run qemu-io")
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let out = qemu_io(uri, cmds);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {cmds:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qemu_io_patterns_and_byte_granular_offsets() {
    let mut d = Daemon::start(64 * MIB, &[]);
    let uri = d.uri();
    qemu_io_ok(
        &uri,
        &["write -P 0xab 4096 8192", "read -P 0xab 4096 8192", "read -P 0 0 4096", "read -P 0 12288 4096"],
    );
    // Byte-granular: the server advertises a 1-byte minimum block size, so qemu sends these as is.
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xcd 1 3",
            "read -P 0 0 1",
            "read -P 0xcd 1 3",
            "read -P 0 4 4092",
            // Across a 4 KiB boundary, inside the 0xab range.
            "write -P 0x11 8191 2",
            "read -P 0xab 4096 4095",
            "read -P 0x11 8191 2",
            "read -P 0xab 8193 4095",
            // The last byte of the export.
            "write -P 0xee 67108863 1",
            "read -P 0xee 67108863 1",
            "read -P 0 67104768 4095",
        ],
    );
    // A fresh connection sees the same bytes.
    qemu_io_ok(&uri, &["read -P 0xcd 1 3", "read -P 0x11 8191 2", "read -P 0xee 67108863 1"]);
    // The check can fail: a wrong pattern makes qemu-io exit non-zero.
    let out = qemu_io(&uri, &["read -P 0xab 1 3"]);
    assert!(!out.status.success(), "qemu-io accepted a wrong pattern: {}", String::from_utf8_lossy(&out.stdout));
    d.assert_alive();
}

/// A reference image with random data, zero runs and short unaligned data runs.
fn make_reference(path: &Path, size: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut state = seed;
    let mut img = vec![0u8; size as usize];
    let mut pos = 0usize;
    while pos < img.len() {
        let run = rng.gen_range(1..=3 * MIB as usize).min(img.len() - pos);
        if rng.gen_bool(0.6) {
            fill_random(&mut img[pos..pos + run], &mut state);
        }
        pos += run;
    }
    std::fs::write(path, img).unwrap();
}

#[test]
fn qemu_img_convert_and_compare_against_reference() {
    require_tool("qemu-img");
    require_tool("nbdcopy");
    let size = 48 * MIB;
    let mut d = Daemon::start(size, &[]);
    let uri = d.uri();
    let reference = d.path("reference.img");
    make_reference(&reference, size, 11);
    // Fill the export with other bytes first, so the zero runs of the reference must really be
    // written (qemu-img sends them as WRITE_ZEROES) rather than found already zero.
    let garbage = d.path("garbage.img");
    make_reference(&garbage, size, 12);
    run_ok(Command::new("nbdcopy").arg(&garbage).arg(&uri));

    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&reference).arg(&uri));
    let out = run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&reference).arg(&uri));
    assert!(out.contains("Images are identical"), "qemu-img compare: {out}");

    // The comparison can fail: change one byte in a data run and it must report that offset.
    let data = std::fs::read(&reference).unwrap();
    let at = (5 * MIB as usize..).find(|&i| data[i] != 0x77).unwrap();
    qemu_io_ok(&uri, &[&format!("write -P 0x77 {at} 1")]);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&reference)
        .arg(&uri)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "qemu-img compare missed a changed byte: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("offset {at}")), "qemu-img compare: {stdout}");
    d.assert_alive();
}

#[test]
fn nbdcopy_round_trip_matches_sha256() {
    require_tool("nbdcopy");
    let size = 48 * MIB;
    let mut d = Daemon::start(size, &[]);
    let reference = d.path("reference.img");
    make_reference(&reference, size, 21);
    // nbdcopy opens several connections when the server advertises multi-conn, and mixes
    // writes with zeroes for the zero runs.
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&reference).arg(d.uri()));
    let out = d.path("out.img");
    run_ok(Command::new("nbdcopy").arg(d.unix_uri()).arg(&out));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    assert_eq!(sha256_file(&out), sha256_file(&reference), "nbdcopy export -> file differs from what was copied in");
    d.assert_alive();
}

fn fio_verify(d: &Daemon, name: &str, extra: &[&str]) {
    require_tool("fio");
    let json = d.path(&format!("{name}.json"));
    let mut cmd = Command::new("fio");
    cmd.args([
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={}", d.uri()),
        "--rw=randwrite",
        "--iodepth=16",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // Otherwise fio leaves local-*-verify.state files in the working directory.
        "--verify_state_save=0",
        "--output-format=json",
    ])
    .arg(format!("--output={}", json.display()))
    .args(extra);
    run_ok(&mut cmd);
    let f = json_fields(&std::fs::read_to_string(&json).unwrap());
    assert_eq!(field(&f, "jobs.0.error"), "0", "fio reported an error");
    // The verify pass reads back everything that was written; no bytes read means no verification.
    assert_eq!(field(&f, "jobs.0.write.io_bytes"), (16 * MIB).to_string());
    assert_eq!(field(&f, "jobs.0.read.io_bytes"), (16 * MIB).to_string());
}

#[test]
fn fio_nbd_engine_randwrite_verify_crc32c() {
    let mut d = Daemon::start(64 * MIB, &[]);
    fio_verify(&d, "bs4k", &["--bs=4k"]);
    // Mixed, sector-aligned but not block-aligned sizes, in another part of the disk.
    fio_verify(&d, "bsrange", &["--bsrange=512-64k", "--blockalign=512", "--offset=32M"]);
    d.assert_alive();
}

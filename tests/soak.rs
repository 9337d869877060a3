//! A short run of scripts/soak.sh (docs/SOAK.md): 64 fio connections with verification through a
//! cache failure and a daemon restart, the daemon's memory sampled, online and offline verify at the
//! end. The script does the checking; this test asserts on its exit status and summary so that a
//! regression shows up as a named line, not only as "exit 1".

mod common;

use common::{require_tool, BIN};
use std::process::Command;

/// I/O phases of the short run; rebuild waits and verification come on top (about 60-90 s in all
/// on a 2-core machine with the debug binary).
const DURATION_SECS: &str = "60";

fn line<'a>(summary: &'a str, key: &str) -> &'a str {
    summary
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("the soak summary has no `{key}` line:\n{summary}"))
}

fn value<'a>(l: &'a str, key: &str) -> &'a str {
    l.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in `{l}`"))
}

#[test]
fn soak_short_run_through_cache_failure_and_restart() {
    require_tool("fio");
    require_tool("python3");
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/soak.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(["--duration", DURATION_SECS, "--unit-mib", "1", "--bin", BIN, "--dir"])
        .arg(dir.path())
        .output()
        .expect("run scripts/soak.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed ({}):\n{stdout}\n--- stderr:\n{stderr}", out.status);
    let summary = stdout.split("==== soak summary").nth(1).unwrap_or_else(|| panic!("no summary:\n{stdout}"));
    assert_eq!(line(summary, "RESULT:"), "RESULT: PASS");

    for phase in ["phase1:", "phase2:"] {
        let l = line(summary, phase);
        assert_eq!(value(l, "errors"), "0", "{l}");
        assert!(value(l, "rounds").parse::<u32>().unwrap() >= 1, "{l}");
        assert!(value(l, "ios").parse::<u64>().unwrap() > 0, "{l}");
    }
    let cf = line(summary, "cache_fail:");
    assert_eq!(value(cf, "mode_after"), "degraded", "{cf}");
    assert_eq!(value(cf, "client_errors"), "0", "{cf}");
    let restart = line(summary, "restart:");
    assert_eq!(value(restart, "sigterm_exit"), "0", "{restart}");
    assert!(line(summary, "phase2_verify:").ends_with("ok"));
    assert!(line(summary, "phase3_verify:").ends_with("ok"));
    assert!(line(summary, "online_verify:").contains(" 0 mismatches"));
    assert!(line(summary, "offline_verify:").contains(" 0 mismatches"));
    let mem = line(summary, "memory:");
    let peak: u64 = value(mem, "peak_rss_mib").parse().unwrap();
    let bound: u64 = value(mem, "bound_mib").parse().unwrap();
    assert!(peak > 0 && peak <= bound, "{mem}");
}

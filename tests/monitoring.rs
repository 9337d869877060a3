//! The monitoring files an operator copies from docs/monitoring/ (docs/MONITORING.md): the
//! Prometheus alerting rules pass `promtool check rules` and their own unit tests
//! (`promtool test rules`); every rule carries a severity, a `for:`, a summary, a description and
//! a runbook link to a heading that exists in docs/OPERATIONS.md, and is tested both firing and
//! quiet; the Grafana dashboard is JSON whose queries Prometheus parses; and every metric the rules
//! or the dashboard name is exported by a running daemon with a cache. Without the last check a
//! renamed metric would leave an alert that can never fire and nobody would notice.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const RULES: &str = "docs/monitoring/superdisk-alerts.yml";
const RULE_TESTS: &str = "docs/monitoring/superdisk-alerts.test.yml";
const DASHBOARD: &str = "docs/monitoring/superdisk-dashboard.json";
const OPERATIONS: &str = "docs/OPERATIONS.md";
const MONITORING: &str = "docs/MONITORING.md";
/// Where the rules' runbook links point: docs/OPERATIONS.md as GitHub renders it.
const RUNBOOK_BASE: &str = "https://github.com/superdisk/superdisk/blob/main/docs/OPERATIONS.md#";
const MIB: u64 = 1 << 20;

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// `promtool ARGS…`, which must succeed; its stdout and stderr together.
fn promtool(args: &[&std::ffi::OsStr]) -> String {
    require_tool("promtool");
    let mut cmd = Command::new("promtool");
    cmd.args(args);
    let out = output_within(&mut cmd, Duration::from_secs(120));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed with {}:\n{text}", out.status);
    text
}

/// Every `superdisk_…` metric name in `text`: the rules' expressions and annotations, the
/// dashboard's queries and descriptions. A name ending in `_` (a glob such as `superdisk_rebuild_*`
/// in prose) is kept as it is, and then fails the check: name metrics in full.
fn metric_names(text: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("superdisk_") {
        if text[..at].chars().next_back().is_some_and(ident) {
            continue; // inside a longer identifier
        }
        let len = text[at..].find(|c: char| !ident(c)).unwrap_or(text.len() - at);
        names.insert(text[at..at + len].to_owned());
    }
    names
}

/// The anchors GitHub gives the headings of a Markdown file: lower case, spaces to hyphens, and
/// every other character but letters, digits, `-` and `_` dropped. Lines in fenced code blocks
/// (shell comments start with `#` too) are not headings.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let text = line.trim_start_matches('#').trim();
        let anchor: String = text
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        anchors.insert(anchor);
    }
    anchors
}

/// One alerting rule, as the lines of its YAML block (from `- alert:` to the next rule or group).
struct Rule {
    name: String,
    lines: Vec<String>,
}

impl Rule {
    /// The value of the first `key: value` line in the block (without quotes).
    fn field(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}:");
        self.lines.iter().map(|l| l.trim()).find_map(|l| {
            let v = l.strip_prefix(&prefix)?.trim();
            Some(v.trim_matches('"').to_owned())
        })
    }
}

/// The rules file split into rules. The file's layout is ours (one key a line), so a line scanner
/// is enough; promtool has already checked that it is valid YAML with valid expressions.
fn rules(yaml: &str) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::new();
    for line in yaml.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("- alert:") {
            out.push(Rule { name: name.trim().to_owned(), lines: Vec::new() });
        } else if t.starts_with("- name:") || t.starts_with("- record:") {
            // A new group (or a recording rule) ends the alert before it.
            out.push(Rule { name: String::new(), lines: Vec::new() });
        } else if let Some(r) = out.last_mut() {
            r.lines.push(line.to_owned());
        }
    }
    out.retain(|r| !r.name.is_empty());
    out
}

/// For each alert name in the unit tests: (cases where it must fire, cases where it must not).
fn test_cases(yaml: &str) -> BTreeMap<String, (usize, usize)> {
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let lines: Vec<&str> = yaml.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:") else { continue };
        let entry = cases.entry(name.trim().to_owned()).or_default();
        match lines.get(i + 1) {
            Some(&"exp_alerts: []") => entry.1 += 1,
            Some(&"exp_alerts:") => entry.0 += 1,
            other => panic!("alertname {name} in {RULE_TESTS} is followed by {other:?}, not exp_alerts"),
        }
    }
    cases
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let check = promtool(&["check".as_ref(), "rules".as_ref(), repo_path(RULES).as_os_str()]);
    assert!(check.contains("SUCCESS"), "{check}");
    // promtool reads `rule_files` relative to the test file, so this tests the file in the tree.
    let tests = promtool(&["test".as_ref(), "rules".as_ref(), repo_path(RULE_TESTS).as_os_str()]);
    assert!(tests.contains("SUCCESS"), "{tests}");
}

#[test]
fn every_alert_says_how_bad_what_to_do_and_where_the_runbook_is_and_is_tested_both_ways() {
    let rules = rules(&read(RULES));
    assert!(rules.len() >= 10, "only {} alerts found in {RULES}: is the scanner out of step with it?", rules.len());
    let anchors = heading_anchors(&read(OPERATIONS));
    let cases = test_cases(&read(RULE_TESTS));
    let monitoring_doc = read(MONITORING);
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    for r in &rules {
        let n = &r.name;
        if !seen.insert(n.clone()) {
            problems.push(format!("{n}: defined twice"));
        }
        match r.field("severity").as_deref() {
            Some("critical" | "warning" | "info") => {}
            other => problems.push(format!("{n}: severity {other:?}, not critical, warning or info")),
        }
        if r.field("for").is_none() {
            problems.push(format!("{n}: no `for:`"));
        }
        for key in ["summary", "description"] {
            if r.field(key).is_none_or(|v| v.is_empty()) {
                problems.push(format!("{n}: no {key} annotation"));
            }
        }
        match r.field("runbook_url") {
            None => problems.push(format!("{n}: no runbook_url")),
            Some(url) => match url.strip_prefix(RUNBOOK_BASE) {
                None => problems.push(format!("{n}: runbook_url {url} is not under {RUNBOOK_BASE}")),
                Some(anchor) if !anchors.contains(anchor) => problems.push(format!(
                    "{n}: runbook_url anchor #{anchor} is no heading of {OPERATIONS} (renamed?); headings: {anchors:?}"
                )),
                Some(_) => {}
            },
        }
        let (firing, quiet) = cases.get(n).copied().unwrap_or_default();
        if firing == 0 || quiet == 0 {
            problems.push(format!("{n}: {RULE_TESTS} has {firing} firing and {quiet} quiet cases; needs both"));
        }
        if !monitoring_doc.contains(n.as_str()) {
            problems.push(format!("{n}: not described in {MONITORING}"));
        }
    }
    for name in cases.keys() {
        if !seen.contains(name) {
            problems.push(format!("{RULE_TESTS} tests {name}, which {RULES} does not define"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_dashboard_is_grafana_json_whose_queries_prometheus_parses() {
    let d: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    assert!(d["schemaVersion"].as_u64().unwrap_or(0) >= 36, "schemaVersion {}", d["schemaVersion"]);
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    assert_eq!(var("DS_PROMETHEUS")["type"], "datasource");
    assert_eq!(var("DS_PROMETHEUS")["query"], "prometheus");
    assert_eq!(var("instance")["datasource"]["uid"], "${DS_PROMETHEUS}");

    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "panel id {} used twice", p["id"]);
        let g = &p["gridPos"];
        let (x, y, w, h) =
            (g["x"].as_u64().unwrap(), g["y"].as_u64().unwrap(), g["w"].as_u64().unwrap(), g["h"].as_u64().unwrap());
        assert!(x + w <= 24, "panel {title:?} sticks out of the 24-column grid");
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "panel {title:?} overlaps another at {cell:?}");
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {title:?} datasource");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no queries");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "a query of {title:?}");
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("a query of {title:?} has no expr"));
            // Every query follows the instance picker.
            assert!(expr.contains("instance=~\"$instance\""), "{title:?} ignores $instance: {expr}");
            exprs.push((title.to_owned(), expr.to_owned()));
        }
    }
    // promtool has no command that parses a bare query; as recording rules, it parses them all.
    // Grafana's variables become what Grafana would put there.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in exprs.iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".+");
        // A JSON string is a valid YAML double-quoted scalar.
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        labels: {{panel: {}}}\n        expr: {}\n",
            serde_json::to_string(title).unwrap(),
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules).unwrap();
    let out = promtool(&["check".as_ref(), "rules".as_ref(), file.as_os_str()]);
    assert!(out.contains(&format!("SUCCESS: {} rules found", exprs.len())), "{out}");
}

/// GET /metrics: the body, once the endpoint answers 200.
fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read the metrics response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET /metrics: {head}");
    body.to_owned()
}

#[test]
fn every_metric_the_rules_and_the_dashboard_name_is_exported() {
    let mut used: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for file in [RULES, DASHBOARD] {
        for name in metric_names(&read(file)) {
            used.entry(name).or_default().push(file);
        }
    }
    assert!(used.len() >= 20, "only {} metric names found: {used:?}", used.len());

    // A mirrored daemon: the per-member cache metrics only exist with a cache.
    let mut d = Daemon::unstarted();
    let cache = d.path("cache.img");
    std::fs::File::create(&cache).unwrap().set_len(80 * MIB).unwrap();
    d.create_with(64 * MIB, &["--cache".as_ref(), cache.as_os_str()]);
    let metrics_port = free_port();
    d.extra_args =
        vec!["--cache".into(), cache.display().to_string(), "--metrics".into(), format!("127.0.0.1:{metrics_port}")];
    d.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listens_on(d.pid(), metrics_port) {
        assert!(Instant::now() < deadline, "the metrics endpoint did not listen; log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = scrape(metrics_port);

    // Families from `# TYPE name kind`, samples from the first token of every other line.
    let mut families = BTreeMap::new();
    let mut samples = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut f = rest.split_whitespace();
            families.insert(f.next().unwrap_or("").to_owned(), f.next().unwrap_or("").to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            samples.insert(line.split(['{', ' ']).next().unwrap_or("").to_owned());
        }
    }
    let mut missing = Vec::new();
    for (name, files) in &used {
        // A histogram's series are NAME_bucket/_sum/_count of family NAME.
        let histogram_series = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .any(|family| families.get(family).is_some_and(|k| k == "histogram"));
        let found = families.contains_key(name) || samples.contains(name) || histogram_series;
        if !found {
            missing.push(format!("{name} (named in {})", files.join(", ")));
        }
        if name.ends_with("_bucket") {
            assert!(histogram_series, "{name}: histogram_quantile over a family that is not a histogram");
        }
    }
    assert!(
        missing.is_empty(),
        "metrics named by the monitoring files but not exported by the daemon:\n  {}\n\n/metrics:\n{text}",
        missing.join("\n  ")
    );
    assert!(d.stop().success(), "the daemon did not stop cleanly; log:\n{}", d.log());
}

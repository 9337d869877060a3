//! The Prometheus endpoint: text exposition format 0.0.4 over a minimal HTTP/1.1 server (GET
//! /metrics, one request per connection). Names follow Prometheus' conventions: the unit in the
//! name (`_seconds`, `_bytes`), `_total` on counters, base units, one histogram family per latency
//! with `device` and `op` labels.

use super::{Mirror, Node};
use crate::device::layer::instrumented::DevOp;
use crate::mirror::MirrorStats;
use crate::server::stats::ReqOp;
use crate::telemetry::HistSnapshot;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Escapes a label value as the exposition format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                let _ = write!(self.0, "{}{k}=\"{}\"", if i > 0 { "," } else { "" }, label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistSnapshot) {
        let bucket = format!("{name}_bucket");
        for (le, count) in h.cumulative_octaves() {
            let le = format!("{le:e}");
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, count);
        }
        let count = h.count();
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, count);
        self.sample(&format!("{name}_sum"), labels, h.sum_ns as f64 / 1e9);
        self.sample(&format!("{name}_count"), labels, count);
    }
}

/// The whole exposition.
pub fn render(node: &Node) -> String {
    let mut o = Out(String::with_capacity(64 * 1024));
    render_identity(&mut o, node);
    render_devices(&mut o, node);
    render_requests(&mut o, node);
    render_server(&mut o, node);
    render_ublk(&mut o, node);
    render_backing(&mut o, node);
    if let Some(m) = &node.mirror {
        let st = m.stats();
        render_mirror_reads(&mut o, &st);
        render_hedging(&mut o, &st);
        render_slow_members(&mut o, &st);
        render_mirror_state(&mut o, m, &st);
    }
    o.0
}

/// What this daemon is and what it exports.
fn render_identity(o: &mut Out, node: &Node) {
    let cfg = node.config();
    o.family("superdisk_build_info", "gauge", "Always 1; the labels say which superdisk this is.");
    o.sample("superdisk_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    o.family("superdisk_start_time_seconds", "gauge", "When the daemon started, in seconds since the epoch.");
    let started = node.started_unix;
    o.sample(
        "superdisk_start_time_seconds",
        &[],
        started.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
    );
    o.family("superdisk_export_size_bytes", "gauge", "Size of the exported disk.");
    o.sample("superdisk_export_size_bytes", &[("export", &cfg.export)], node.export_size_bytes);

    let mode = node.mode_name();
    o.family("superdisk_mode", "gauge", "1 for the current mode, 0 for the others.");
    for m in ["plain", "healthy", "rebuilding", "degraded", "verifying"] {
        o.sample("superdisk_mode", &[("mode", m)], u8::from(m == mode));
    }
    o.family("superdisk_degraded", "gauge", "1 while no cache set serves reads (reads go to the backing).");
    o.sample("superdisk_degraded", &[], u8::from(mode == "degraded"));
}

/// Each device's role, size, operations, bytes, errors and latency.
fn render_devices(o: &mut Out, node: &Node) {
    let devices = node.devices();
    o.family("superdisk_device_info", "gauge", "Always 1; names each device's role, path and health.");
    for (d, role) in &devices {
        let health = match *role {
            "backing" if node.backing_io.in_outage.load(Relaxed) == 1 => "stalled",
            "backing" => "ok",
            _ => node.health_of_cache(),
        };
        o.sample(
            "superdisk_device_info",
            &[("device", &d.name), ("role", role), ("path", &d.path), ("health", health)],
            1,
        );
    }
    o.family("superdisk_device_size_bytes", "gauge", "Size of each device.");
    for (d, _) in &devices {
        o.sample("superdisk_device_size_bytes", &[("device", &d.name)], d.size_bytes);
    }
    let snaps: Vec<_> = devices.iter().map(|(d, _)| (d.name.clone(), d.snapshot())).collect();
    o.family("superdisk_device_operations_total", "counter", "Operations completed by each device, by kind.");
    for (name, s) in &snaps {
        for op in DevOp::ALL {
            o.sample("superdisk_device_operations_total", &[("device", name), ("op", op.name())], s[op as usize].ops);
        }
    }
    o.family("superdisk_device_bytes_total", "counter", "Bytes moved by each device, by kind (zero: bytes zeroed).");
    for (name, s) in &snaps {
        for op in [DevOp::Read, DevOp::Write, DevOp::Zero] {
            o.sample("superdisk_device_bytes_total", &[("device", name), ("op", op.name())], s[op as usize].bytes);
        }
    }
    o.family("superdisk_device_errors_total", "counter", "Operations that failed on each device, by kind.");
    for (name, s) in &snaps {
        for op in DevOp::ALL {
            o.sample("superdisk_device_errors_total", &[("device", name), ("op", op.name())], s[op as usize].errors);
        }
    }
    o.family("superdisk_device_latency_seconds", "histogram", "Time each device took per operation.");
    for (name, s) in &snaps {
        for op in DevOp::ALL {
            o.histogram(
                "superdisk_device_latency_seconds",
                &[("device", name), ("op", op.name())],
                &s[op as usize].latency,
            );
        }
    }
}

/// What clients asked for, end to end.
fn render_requests(o: &mut Out, node: &Node) {
    let reqs: Vec<_> = ReqOp::ALL.iter().map(|op| (op.name(), node.server.request(*op).snapshot())).collect();
    o.family("superdisk_requests_total", "counter", "Client requests answered (NBD and ublk), by kind.");
    for (op, s) in &reqs {
        o.sample("superdisk_requests_total", &[("op", op)], s.ops);
    }
    o.family(
        "superdisk_request_errors_total",
        "counter",
        "Client requests (NBD and ublk) answered with an error, by kind.",
    );
    for (op, s) in &reqs {
        o.sample("superdisk_request_errors_total", &[("op", op)], s.errors);
    }
    o.family(
        "superdisk_request_bytes_total",
        "counter",
        "Bytes clients (NBD and ublk) read, wrote, trimmed or zeroed.",
    );
    for (op, s) in &reqs {
        o.sample("superdisk_request_bytes_total", &[("op", op)], s.bytes);
    }
    o.family("superdisk_request_latency_seconds", "histogram", "Time from a request's arrival to its reply, by kind.");
    for (op, s) in &reqs {
        o.histogram("superdisk_request_latency_seconds", &[("op", op)], &s.latency);
    }
}

/// The ublk device and its queues, when one is served.
fn render_ublk(o: &mut Out, node: &Node) {
    let Some(info) = node.ublk.lock().expect("ublk poisoned").clone() else { return };
    let id = info.dev_id.to_string();
    o.family(
        "superdisk_ublk_device",
        "gauge",
        "1 while the ublk device is served; recovered=1 if this process resumed it.",
    );
    let recovered = if info.recovered { "1" } else { "0" };
    o.sample("superdisk_ublk_device", &[("path", &info.path), ("dev_id", &id), ("recovered", recovered)], 1);
    let queues: Vec<_> = info.queues.iter().map(|q| (q.q_id.to_string(), q.stats())).collect();
    o.family("superdisk_ublk_in_flight", "gauge", "ublk requests being served now, by queue.");
    for (q, s) in &queues {
        o.sample("superdisk_ublk_in_flight", &[("queue", q)], s.in_flight.load(Relaxed));
    }
    o.family(
        "superdisk_ublk_requests_total",
        "counter",
        "ublk requests answered, by queue (by kind: superdisk_requests_total).",
    );
    for (q, s) in &queues {
        o.sample("superdisk_ublk_requests_total", &[("queue", q)], s.requests.load(Relaxed));
    }
    o.family("superdisk_ublk_errors_total", "counter", "ublk requests answered with an error, by queue.");
    for (q, s) in &queues {
        o.sample("superdisk_ublk_errors_total", &[("queue", q)], s.errors.load(Relaxed));
    }
}

/// Connections, page-cache sends, idle polling, registered buffers.
fn render_server(o: &mut Out, node: &Node) {
    o.family("superdisk_connections", "gauge", "NBD connections open now.");
    o.sample("superdisk_connections", &[], node.server.connections_active.load(Relaxed));
    o.family("superdisk_connections_accepted_total", "counter", "NBD connections accepted.");
    o.sample("superdisk_connections_accepted_total", &[], node.server.connections_accepted.load(Relaxed));
    o.family("superdisk_connections_refused_total", "counter", "NBD connections refused at max_connections.");
    o.sample("superdisk_connections_refused_total", &[], node.server.connections_refused.load(Relaxed));
    o.family(
        "superdisk_zero_copy_reads_total",
        "counter",
        "Read replies sent from the page cache to the socket without a copy (sendfile).",
    );
    o.sample("superdisk_zero_copy_reads_total", &[], node.server.zero_copy_reads.load(Relaxed));
    o.family("superdisk_zero_copy_read_bytes_total", "counter", "Bytes of those replies.");
    o.sample("superdisk_zero_copy_read_bytes_total", &[], node.server.zero_copy_read_bytes.load(Relaxed));
    o.family(
        "superdisk_zero_copy_fallbacks_total",
        "counter",
        "Zero-copy sends the file could not finish; the rest was read and copied.",
    );
    o.sample("superdisk_zero_copy_fallbacks_total", &[], node.server.zero_copy_fallbacks.load(Relaxed));
    o.family(
        "superdisk_idle_polls_total",
        "counter",
        "Times a connection's writer polled its idle socket after a reply (idle_poll_us), by outcome: hit when the next request arrived within the limit.",
    );
    o.sample("superdisk_idle_polls_total", &[("outcome", "hit")], node.server.idle_poll_hits.load(Relaxed));
    o.sample("superdisk_idle_polls_total", &[("outcome", "miss")], node.server.idle_poll_misses.load(Relaxed));
    let (arena_bytes, arena_misses) = crate::device::buf::registered_buffer_stats();
    o.family(
        "superdisk_registered_buffer_bytes",
        "gauge",
        "Memory registered with io_uring as fixed buffers (registered_buffer_bytes; 0: none).",
    );
    o.sample("superdisk_registered_buffer_bytes", &[], arena_bytes);
    o.family(
        "superdisk_registered_buffer_misses_total",
        "counter",
        "I/O buffers taken from ordinary memory because their size class of registered buffers was in use.",
    );
    o.sample("superdisk_registered_buffer_misses_total", &[], arena_misses);
}

/// The backing's stalls and durability.
fn render_backing(o: &mut Out, node: &Node) {
    let io = &node.backing_io;
    o.family("superdisk_backing_timeouts_total", "counter", "Backing operations that ran past backing_timeout_ms.");
    o.sample("superdisk_backing_timeouts_total", &[], io.timeouts.load(Relaxed));
    o.family("superdisk_backing_read_retries_total", "counter", "Backing reads re-issued after a stall or an error.");
    o.sample("superdisk_backing_read_retries_total", &[], io.retries.load(Relaxed));
    o.family(
        "superdisk_backing_deadline_errors_total",
        "counter",
        "Operations failed because backing_io_deadline_ms passed (client requests got EIO).",
    );
    o.sample("superdisk_backing_deadline_errors_total", &[], io.deadline_errors.load(Relaxed));
    o.family("superdisk_backing_outages_total", "counter", "Backing outages begun (an operation stalled).");
    o.sample("superdisk_backing_outages_total", &[], io.outages.load(Relaxed));
    o.family("superdisk_backing_stalled_operations", "gauge", "Backing operations stalled and not yet answered.");
    o.sample("superdisk_backing_stalled_operations", &[], io.stalled_ops.load(Relaxed));
    o.family("superdisk_backing_in_outage", "gauge", "1 while the backing has an operation stalled past its timeout.");
    o.sample("superdisk_backing_in_outage", &[], io.in_outage.load(Relaxed));
    o.family("superdisk_backing_flush_failures_total", "counter", "Backing flushes and FUA writes that failed.");
    o.sample("superdisk_backing_flush_failures_total", &[], io.durability.failures());
    o.family(
        "superdisk_backing_durability_lost",
        "gauge",
        "1 while a backing flush failure is uncleared: FLUSH and FUA writes fail (superdisk clear-flush-error).",
    );
    o.sample("superdisk_backing_durability_lost", &[], u64::from(io.durability.is_lost()));
}

/// Which device served the reads, and the cache's repairs.
fn render_mirror_reads(o: &mut Out, st: &MirrorStats) {
    let (cache_bytes, backing_bytes) = (st.read_bytes_cache.load(Relaxed), st.read_bytes_backing.load(Relaxed));
    o.family("superdisk_read_bytes_total", "counter", "Bytes of client reads, by the device that served them.");
    o.sample("superdisk_read_bytes_total", &[("source", "cache")], cache_bytes);
    o.sample("superdisk_read_bytes_total", &[("source", "backing")], backing_bytes);
    o.family("superdisk_reads_total", "counter", "Client reads (or parts of them), by the device that served them.");
    o.sample("superdisk_reads_total", &[("source", "cache")], st.reads_cache.load(Relaxed));
    o.sample("superdisk_reads_total", &[("source", "backing")], st.reads_backing.load(Relaxed));
    o.family(
        "superdisk_cache_read_ratio",
        "gauge",
        "Share of read bytes served by the cache since start (1 before any read); rate() the \
         read_bytes_total counters for a recent figure.",
    );
    let total = cache_bytes + backing_bytes;
    o.sample("superdisk_cache_read_ratio", &[], if total == 0 { 1.0 } else { cache_bytes as f64 / total as f64 });
    o.family("superdisk_cache_repairs_total", "counter", "Cache ranges rewritten from the backing after a read error.");
    o.sample("superdisk_cache_repairs_total", &[], st.repairs.load(Relaxed));
}

/// Each cache member against the backing (mirror::slow).
fn render_slow_members(o: &mut Out, st: &MirrorStats) {
    use crate::mirror::slow::MemberState;
    let members = st.slow.members.lock().expect("views poisoned").clone();
    o.family(
        "superdisk_cache_member_state",
        "gauge",
        "1 for the state each cache member is in: normal, slow (reads go to the backing) or failed.",
    );
    for (i, m) in members.iter().enumerate() {
        let member = i.to_string();
        for state in MemberState::ALL {
            o.sample(
                "superdisk_cache_member_state",
                &[("member", &member), ("state", state.as_str())],
                u8::from(m.state == state),
            );
        }
    }
    o.family(
        "superdisk_cache_member_slow_transitions_total",
        "counter",
        "State changes of a cache member: normal to slow, slow to normal, slow to failed.",
    );
    for (i, m) in members.iter().enumerate() {
        o.sample("superdisk_cache_member_slow_transitions_total", &[("member", &i.to_string())], m.transitions_total);
    }
    o.family(
        "superdisk_cache_member_mean_latency_seconds",
        "gauge",
        "Mean latency of small (<= 128 KiB) operations over the slow-member watch's last tick, per member and \
         op; member=\"backing\" is the backing's figure it is compared with.",
    );
    let mut mean = |who: &str, op: &str, v: Option<f64>| {
        if let Some(us) = v {
            o.sample("superdisk_cache_member_mean_latency_seconds", &[("member", who), ("op", op)], us / 1e6);
        }
    };
    for (i, m) in members.iter().enumerate() {
        mean(&i.to_string(), "read", m.read_latency_us);
        mean(&i.to_string(), "write", m.write_latency_us);
    }
    if let Some(m) = members.first() {
        mean("backing", "read", m.backing_read_latency_us);
        mean("backing", "write", m.backing_write_latency_us);
    }
    o.family(
        "superdisk_slow_member_routed_reads_total",
        "counter",
        "Reads of valid regions answered by the backing because a cache member they touch is slow.",
    );
    o.sample("superdisk_slow_member_routed_reads_total", &[], st.slow.routed_reads.load(Relaxed));
}

/// Hedged cache reads.
fn render_hedging(o: &mut Out, st: &MirrorStats) {
    let h = &st.hedge;
    o.family(
        "superdisk_hedged_reads_total",
        "counter",
        "Cache reads slower than the hedging threshold that were also sent to the backing.",
    );
    o.sample("superdisk_hedged_reads_total", &[], h.hedged.load(Relaxed));
    o.family(
        "superdisk_hedged_reads_backing_won_total",
        "counter",
        "Hedged reads answered by the backing before the cache.",
    );
    o.sample("superdisk_hedged_reads_backing_won_total", &[], h.backing_won.load(Relaxed));
    o.family(
        "superdisk_hedged_reads_over_budget_total",
        "counter",
        "Slow cache reads not hedged because hedge_max_percent was spent.",
    );
    o.sample("superdisk_hedged_reads_over_budget_total", &[], h.over_budget.load(Relaxed));
    o.family(
        "superdisk_hedge_threshold_seconds",
        "gauge",
        "Cache read time after which a read is hedged (0: hedging off).",
    );
    o.sample("superdisk_hedge_threshold_seconds", &[], h.threshold_us.load(Relaxed) as f64 / 1e6);
}

/// The cache time limit, errors and failures, the rebuild, write intents and verify.
fn render_mirror_state(o: &mut Out, m: &Mirror, st: &MirrorStats) {
    o.family(
        "superdisk_cache_timeouts_total",
        "counter",
        "Cache operations that ran past cache_timeout_ms (each failed its cache set).",
    );
    o.sample("superdisk_cache_timeouts_total", &[], st.cache_io.timed_out.load(Relaxed));
    o.family(
        "superdisk_cache_abandoned_ops",
        "gauge",
        "Cache operations given up on that their device has not answered yet.",
    );
    o.sample("superdisk_cache_abandoned_ops", &[], st.cache_io.abandoned_now.load(Relaxed));
    o.family("superdisk_cache_errors_total", "counter", "Cache I/O errors absorbed (never seen by clients).");
    o.sample("superdisk_cache_errors_total", &[], st.cache_errors.load(Relaxed));
    o.family("superdisk_cache_failures_total", "counter", "Times a cache set was dropped (errors or operator).");
    o.sample("superdisk_cache_failures_total", &[], st.cache_failures.load(Relaxed));
    o.family("superdisk_backing_errors_total", "counter", "Backing I/O errors (these reach clients).");
    o.sample("superdisk_backing_errors_total", &[], st.backing_errors.load(Relaxed));
    o.family("superdisk_rebuild_done_bytes", "gauge", "Bytes the current rebuild has copied.");
    o.sample("superdisk_rebuild_done_bytes", &[], st.rebuild_done_bytes.load(Relaxed));
    o.family("superdisk_rebuild_total_bytes", "gauge", "Bytes the current rebuild has had to copy.");
    o.sample("superdisk_rebuild_total_bytes", &[], st.rebuild_total_bytes.load(Relaxed));
    o.family("superdisk_rebuild_remaining_bytes", "gauge", "Bytes not yet valid in the cache set.");
    o.sample("superdisk_rebuild_remaining_bytes", &[], st.invalid_regions.load(Relaxed) * m.region_bytes());
    o.family("superdisk_rebuild_rate_bytes_per_second", "gauge", "Recent rebuild copy rate.");
    o.sample("superdisk_rebuild_rate_bytes_per_second", &[], st.rebuild_rate_bytes_per_s.load(Relaxed));
    o.family("superdisk_rebuild_paused", "gauge", "1 while an operator has paused the rebuild.");
    o.sample("superdisk_rebuild_paused", &[], u8::from(m.rebuild_paused()));
    o.family("superdisk_write_intent_commits_total", "counter", "Write-intent bitmap commits to the backing.");
    o.sample("superdisk_write_intent_commits_total", &[], st.intent_commits.load(Relaxed));
    o.family("superdisk_verify_mismatches_total", "counter", "Cache ranges verify found differing from the backing.");
    o.sample("superdisk_verify_mismatches_total", &[], st.verify_mismatches.load(Relaxed));
    o.family("superdisk_verify_running", "gauge", "1 while a verify runs.");
    o.sample("superdisk_verify_running", &[], st.verify_running.load(Relaxed));
}

const MAX_REQUEST_HEAD_BYTES: usize = 8192;

/// Serves GET /metrics until shutdown. Scrapes are rare and small: one task per connection, one
/// request per connection, a short deadline for a client that sends nothing.
pub async fn serve(listener: TcpListener, node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(Duration::from_secs(10), answer(stream, &node)).await {
                tracing::debug!(error = %e, "metrics client timed out");
            }
        });
    }
}

async fn answer(mut s: TcpStream, node: &Node) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD_BYTES {
            return respond(&mut s, "431 Request Header Fields Too Large", "text/plain", "request head too large\n")
                .await;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut first = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(node);
            let body = if method == "HEAD" { String::new() } else { body };
            respond(&mut s, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        ("GET", "/") => respond(&mut s, "200 OK", "text/plain", "superdisk: metrics at /metrics\n").await,
        ("GET" | "HEAD", _) => respond(&mut s, "404 Not Found", "text/plain", "not found: try /metrics\n").await,
        _ => respond(&mut s, "405 Method Not Allowed", "text/plain", "only GET\n").await,
    }
}

async fn respond(s: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

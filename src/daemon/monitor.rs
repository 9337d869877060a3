//! The daemon's heartbeat: mode changes in the log, the service manager's STATUS= line, watchdog
//! keep-alives, and the counter samples status rates are computed from.

use super::node::{self, Node};
use super::notify::Notifier;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Logs mode changes, keeps the service manager's STATUS= line current, sends watchdog
/// keep-alives and samples the counters for status rates.
pub(super) fn spawn_monitor(node: Arc<Node>, n: Arc<Notifier>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut last_mode: Option<&'static str> = None;
        let mut last_status = String::new();
        let mut last_sample = Instant::now() - node::SAMPLE_EVERY;
        // The watchdog keep-alive comes from this task, so a wedged runtime stops it and systemd
        // restarts the daemon.
        let watchdog = Notifier::watchdog_interval();
        let tick = watchdog.unwrap_or(Duration::from_millis(250)).min(Duration::from_millis(250));
        loop {
            if node.mirror.is_some() {
                let mode = node.mode_name();
                if last_mode != Some(mode) {
                    if last_mode == Some("rebuilding") && mode == "healthy" {
                        tracing::info!("rebuild complete");
                    }
                    tracing::info!("mode={mode}");
                    last_mode = Some(mode);
                }
            }
            let status = node.service_status();
            if status != last_status {
                n.notify(&format!("STATUS={status}"));
                last_status = status;
            }
            if watchdog.is_some() {
                n.notify("WATCHDOG=1");
            }
            if last_sample.elapsed() >= node::SAMPLE_EVERY {
                node.record_sample();
                last_sample = Instant::now();
            }
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
        }
    });
}

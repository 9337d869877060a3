//! `superdisk status` assembled from the counters: rates and percentiles over the last
//! [`super::node::WINDOW`], the mirror's state, the backing's stalls and durability.

use super::node::Node;
use super::status::{
    op_status, BackingIoStatus, CacheStatus, CacheTimeoutStatus, ConnectionStatus, DeviceStatus, ExportStatus,
    HedgeStatus, RebuildStatus, Status, UblkQueueStatus, UblkStatus, VerifyOutcome, VerifyStatus,
};
use super::Mirror;
use crate::device::layer::instrumented::DevOp;
use crate::server::stats::ReqOp;
use crate::telemetry::OpSnapshot;
use std::sync::atomic::Ordering::Relaxed;

impl Node {
    pub fn status(&self) -> Status {
        let now = self.take_sample();
        let then = {
            let q = self.samples.lock().expect("samples poisoned");
            q.front().map(|s| (s.at, s.devices.clone(), s.requests.clone()))
        };
        let (then_at, then_devices, then_requests) = then.unwrap_or((self.started, Vec::new(), Vec::new()));
        let secs = now.at.duration_since(then_at).as_secs_f64();
        let zero = OpSnapshot::default();
        let cfg = self.config();
        let requests = ReqOp::ALL
            .iter()
            .enumerate()
            .map(|(i, op)| op_status(op.name(), &now.requests[i], then_requests.get(i).unwrap_or(&zero), secs))
            .collect();
        let (cache, rebuild, verify) = match &self.mirror {
            None => (None, None, None),
            Some(m) => (Some(cache_status(m)), Some(rebuild_status(m)), Some(self.verify_status(m))),
        };
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            build: super::handover::BuildInfo::this().build,
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            mode: self.mode_name().into(),
            export: ExportStatus {
                name: cfg.export.clone(),
                size_bytes: self.export_size_bytes,
                read_only: cfg.read_only,
            },
            window_secs: secs,
            devices: self.device_statuses(&then_devices, secs),
            cache,
            rebuild,
            verify,
            connections: ConnectionStatus {
                active: self.server.connections_active.load(Relaxed),
                accepted_total: self.server.connections_accepted.load(Relaxed),
                refused_total: self.server.connections_refused.load(Relaxed),
            },
            requests,
            backing_io: self.backing_io_status(),
            ublk: self.ublk_status(),
        }
    }

    fn ublk_status(&self) -> Option<UblkStatus> {
        let info = self.ublk.lock().expect("ublk poisoned").clone()?;
        let reissue = crate::ublk::sys::F_USER_RECOVERY | crate::ublk::sys::F_USER_RECOVERY_REISSUE;
        Some(UblkStatus {
            path: info.path.clone(),
            dev_id: info.dev_id,
            flags: info.flags,
            recovery: info.flags & reissue == reissue,
            recovered: info.recovered,
            queue_depth: info.queue_depth,
            queues: info
                .queues
                .iter()
                .map(|q| UblkQueueStatus {
                    queue: q.q_id,
                    in_flight: q.stats().in_flight.load(Relaxed),
                    requests_total: q.stats().requests.load(Relaxed),
                    errors_total: q.stats().errors.load(Relaxed),
                })
                .collect(),
        })
    }

    /// Each device's rates and latencies since `then`, and its health.
    fn device_statuses(&self, then: &[((String, String), [OpSnapshot; 4])], secs: f64) -> Vec<DeviceStatus> {
        let zero = OpSnapshot::default();
        let mut devices = Vec::new();
        for (d, role) in self.devices() {
            let key = (d.name.clone(), d.path.clone());
            let before = then.iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone());
            let after = d.snapshot();
            let ops = DevOp::ALL
                .iter()
                .map(|op| {
                    let i = *op as usize;
                    op_status(op.name(), &after[i], before.as_ref().map_or(&zero, |b| &b[i]), secs)
                })
                .collect::<Vec<_>>();
            let health = if role == "backing" {
                // Errors within the window say the backing is in trouble now, not once.
                let errors_then = before.as_ref().map_or(0, |b| b.iter().map(|s| s.errors).sum::<u64>());
                if self.backing_io.in_outage.load(Relaxed) == 1 {
                    "stalled"
                } else if after.iter().map(|s| s.errors).sum::<u64>() > errors_then {
                    "erroring"
                } else {
                    "ok"
                }
            } else {
                self.health_of_cache()
            };
            devices.push(DeviceStatus {
                name: d.name.clone(),
                role: role.into(),
                path: d.path.clone(),
                size_bytes: d.size_bytes,
                health: health.into(),
                ops,
            });
        }
        devices
    }

    fn verify_status(&self, m: &Mirror) -> VerifyStatus {
        let st = m.stats();
        let last = self.last_verify.lock().expect("verify poisoned").as_ref().map(|l| VerifyOutcome {
            repair: l.repair,
            mismatches: l.outcome.as_ref().map_or(0, |v| v.len() as u64),
            error: l.outcome.as_ref().err().cloned(),
            finished_secs_ago: l.finished.elapsed().as_secs(),
        });
        VerifyStatus {
            running: self.verify_running(),
            done_regions: st.verify_done_regions.load(Relaxed),
            total_regions: st.verify_total_regions.load(Relaxed),
            last,
        }
    }

    fn backing_io_status(&self) -> BackingIoStatus {
        let io = &self.backing_io;
        BackingIoStatus {
            in_outage: io.in_outage.load(Relaxed) == 1,
            stalled_ops: io.stalled_ops.load(Relaxed),
            outages_total: io.outages.load(Relaxed),
            timeouts_total: io.timeouts.load(Relaxed),
            read_retries_total: io.retries.load(Relaxed),
            deadline_errors_total: io.deadline_errors.load(Relaxed),
            flush_failures_total: io.durability.failures(),
            durability_lost: io.durability.loss(),
        }
    }
}

fn cache_status(m: &Mirror) -> CacheStatus {
    let st = m.stats();
    let tunables = m.tunables();
    let (from_cache, from_backing) = (st.read_bytes_cache.load(Relaxed), st.read_bytes_backing.load(Relaxed));
    let total = from_cache + from_backing;
    let decision = st.attach_decision.lock().expect("decision poisoned").clone();
    let members = st.slow.members.lock().expect("views poisoned").clone();
    CacheStatus {
        reads_from_cache_total: st.reads_cache.load(Relaxed),
        reads_from_backing_total: st.reads_backing.load(Relaxed),
        cache_read_share: if total == 0 { 1.0 } else { from_cache as f64 / total as f64 },
        repairs_total: st.repairs.load(Relaxed),
        errors_total: st.cache_errors.load(Relaxed),
        failures_total: st.cache_failures.load(Relaxed),
        read_error_budget: tunables.read_error_budget,
        hedge: HedgeStatus {
            enabled: tunables.hedge.enabled,
            threshold_us: st.hedge.threshold_us.load(Relaxed),
            hedged_total: st.hedge.hedged.load(Relaxed),
            backing_won_total: st.hedge.backing_won.load(Relaxed),
            over_budget_total: st.hedge.over_budget.load(Relaxed),
            max_percent: tunables.hedge.max_percent,
        },
        timeout: CacheTimeoutStatus {
            timeout_ms: tunables.cache_timeout.as_millis() as u64,
            timed_out_total: st.cache_io.timed_out.load(Relaxed),
            abandoned_now: st.cache_io.abandoned_now.load(Relaxed),
        },
        attach_decision: decision,
        members,
        slow_policy: tunables.slow.mode.as_str().into(),
        routed_reads_total: st.slow.routed_reads.load(Relaxed),
    }
}

fn rebuild_status(m: &Mirror) -> RebuildStatus {
    let st = m.stats();
    let t = m.tunables();
    let rate = st.rebuild_rate_bytes_per_s.load(Relaxed);
    let invalid = st.invalid_regions.load(Relaxed);
    let left = invalid * m.region_bytes();
    RebuildStatus {
        done_bytes: st.rebuild_done_bytes.load(Relaxed),
        total_bytes: st.rebuild_total_bytes.load(Relaxed),
        rate_bytes_per_s: rate,
        eta_secs: (rate > 0 && left > 0).then(|| left.div_ceil(rate)).or((left == 0).then_some(0)),
        paused: m.rebuild_paused(),
        min_bytes_per_s: t.rebuild_min_bytes_per_s,
        max_bytes_per_s: (t.rebuild_max_bytes_per_s != u64::MAX).then_some(t.rebuild_max_bytes_per_s),
        invalid_regions: invalid,
        region_bytes: m.region_bytes(),
    }
}

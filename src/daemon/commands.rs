//! The admin socket's commands, run inside the daemon:
//!
//! | command | what it does |
//! |---|---|
//! | `status` | one JSON line ([`super::status::Status`]) |
//! | `rebuild pause` / `rebuild resume` | freezes / resumes the background copy (md's `frozen`) |
//! | `rebuild rate MIN [MAX]` | rate limits, sizes per second; MAX `unlimited` |
//! | `cache fail` | drops the cache set now, as if it had failed (degraded) |
//! | `cache remove` | saves its progress, then takes it out (before pulling an SSD) |
//! | `cache add [--take-over] PATH…` | attaches a set while degraded (rebuilds what it lacks) |
//! | `cache replace [--take-over] PATH…` | swaps the set for another while serving |
//! | `verify [repair] [wait]` | compares cache and backing in the background; `wait` streams progress |
//! | `clear-flush-error` | after a backing flush failed: resync what it may have lost, let FLUSH succeed again |
//! | `upgrade BINARY` | hands every device, listener and connection to BINARY, which carries on serving (`handover`) |

use super::admin::{AdminOps, BoxFuture};
use super::node::LastVerify;
use super::status::human_bytes;
use super::{open_caches, Node};
use crate::config::parse_size;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// A mismatch list longer than this is summarised (the admin client prints every line).
const MAX_REPORTED_MISMATCHES: usize = 10_000;

impl AdminOps for Node {
    fn handle(self: Arc<Self>, args: Vec<String>, out: UnboundedSender<String>) -> BoxFuture<()> {
        Box::pin(async move {
            let words: Vec<&str> = args.iter().map(String::as_str).collect();
            tracing::info!(command = %words.join(" "), "admin command");
            let result: Result<String, String> = match words.as_slice() {
                ["status"] => match serde_json::to_string(&self.status()) {
                    Ok(json) => {
                        let _ = out.send(json);
                        Ok("status".into())
                    }
                    Err(e) => Err(e.to_string()),
                },
                ["rebuild", rest @ ..] => self.rebuild_cmd(rest),
                ["cache", rest @ ..] => self.cache_cmd(rest).await,
                ["verify", rest @ ..] => self.clone().verify_cmd(rest, &out).await,
                ["clear-flush-error"] => self.clear_flush_error().await,
                ["upgrade", binary] => self.upgrade(binary.into()).await,
                _ => Err(format!(
                    "unknown command {:?}: expected status, rebuild, cache, verify, clear-flush-error or upgrade BINARY",
                    words.join(" ")
                )),
            };
            let line = match result {
                Ok(msg) => format!("ok {msg}"),
                Err(msg) => {
                    tracing::warn!(error = %msg, "admin command refused");
                    format!("error {msg}")
                }
            };
            let _ = out.send(line);
        })
    }
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim_end_matches("/s");
    if t == "unlimited" {
        return Ok(u64::MAX);
    }
    parse_size(t)
}

impl Node {
    fn mirror(&self) -> Result<&Arc<super::Mirror>, String> {
        self.mirror.as_ref().ok_or_else(|| "no cache is configured (plain mode): nothing to do".to_string())
    }

    fn rebuild_cmd(&self, args: &[&str]) -> Result<String, String> {
        let m = self.mirror()?;
        match args {
            ["pause"] => {
                m.set_rebuild_paused(true);
                tracing::warn!("rebuild paused by the operator; invalid regions are read from the backing");
                Ok("rebuild paused".into())
            }
            ["resume"] => {
                m.set_rebuild_paused(false);
                tracing::info!("rebuild resumed by the operator");
                Ok("rebuild resumed".into())
            }
            ["rate", min] | ["rate", min, _] => {
                let min_bps = parse_rate(min).map_err(|e| format!("rebuild rate MIN: {e}"))?;
                let max_bps = match args.get(2) {
                    Some(max) => parse_rate(max).map_err(|e| format!("rebuild rate MAX: {e}"))?,
                    None => m.tunables().rebuild_max_bytes_per_s.max(min_bps),
                };
                if min_bps == 0 || min_bps == u64::MAX {
                    return Err("rebuild rate MIN must be a positive rate such as 100M".into());
                }
                if max_bps < min_bps {
                    return Err(format!("rebuild rate MAX ({max_bps}) is below MIN ({min_bps})"));
                }
                let mut t = m.tunables();
                (t.rebuild_min_bytes_per_s, t.rebuild_max_bytes_per_s) = (min_bps, max_bps);
                t.validate().map_err(|r| format!("rebuild rate: {}", r.reason))?;
                m.set_tunables(t.clone());
                self.cfg.lock().expect("config poisoned").tunables = t;
                tracing::info!(min_bytes_per_s = min_bps, max_bytes_per_s = max_bps, "rebuild rate changed");
                Ok(format!(
                    "rebuild rate: min {}/s, max {}",
                    human_bytes(min_bps as f64),
                    if max_bps == u64::MAX { "unlimited".into() } else { format!("{}/s", human_bytes(max_bps as f64)) }
                ))
            }
            _ => Err("usage: rebuild pause | rebuild resume | rebuild rate MIN [MAX]".into()),
        }
    }

    async fn cache_cmd(&self, args: &[&str]) -> Result<String, String> {
        let m = self.mirror()?.clone();
        let take_over = args.contains(&"--take-over");
        let paths: Vec<std::path::PathBuf> =
            args.iter().skip(1).filter(|a| **a != "--take-over").map(std::path::PathBuf::from).collect();
        match args.first().copied() {
            Some("fail") if paths.is_empty() => {
                if m.mode() == crate::mirror::Mode::Degraded {
                    return Err("no cache set is attached".into());
                }
                m.fail_cache().await;
                Ok("cache set failed; serving degraded from the backing".into())
            }
            Some("remove") if paths.is_empty() => {
                if !m.remove_cache().await {
                    return Err("no cache set is attached".into());
                }
                self.set_cache_members(Vec::new());
                Ok("cache set removed; serving from the backing (its devices are released)".into())
            }
            Some(verb @ ("add" | "replace")) if !paths.is_empty() => {
                let attached = m.mode() != crate::mirror::Mode::Degraded;
                if verb == "add" && attached {
                    return Err("a cache set is attached: use `cache replace`, or `cache remove` first".into());
                }
                let cfg = self.config();
                if paths.contains(&cfg.backing) {
                    return Err(format!("{} is the backing device", cfg.backing.display()));
                }
                // Before opening: the old handle of a device that hung is still open (and locked)
                // while its given-up operations wait in the kernel; say so rather than "in use".
                for p in &paths {
                    if let Ok(meta) = std::fs::metadata(p) {
                        let n = m.cache_outstanding(Some(crate::device::DeviceId::of(&meta))).await;
                        if n > 0 {
                            return Err(format!(
                                "cannot attach {}: {n} operation(s) given up on when it stopped answering are still \
                                 outstanding; it can be attached again once it has answered them",
                                p.display()
                            ));
                        }
                    }
                }
                let (devs, members) = open_caches(&paths, &cfg).map_err(|e| e.to_string())?;
                match m.replace_cache_with(devs, take_over).await {
                    Ok(()) => {
                        self.set_cache_members(members);
                        let list = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ");
                        tracing::info!(devices = %list, "cache set attached by the operator");
                        Ok(format!(
                            "cache set {list} attached ({}); update `cache` in the config so a restart keeps it",
                            self.mode_name()
                        ))
                    }
                    Err(e) => {
                        if m.mode() == crate::mirror::Mode::Degraded {
                            self.set_cache_members(Vec::new());
                        }
                        Err(format!("cannot attach {}: {e}", paths[0].display()))
                    }
                }
            }
            _ => Err("usage: cache fail | cache remove | cache add [--take-over] PATH… | \
                      cache replace [--take-over] PATH…"
                .into()),
        }
    }

    /// Starts a verify in the background (one at a time); with `wait`, streams `progress DONE
    /// TOTAL` lines and then the result. A client that goes away does not stop it.
    async fn verify_cmd(self: Arc<Self>, args: &[&str], out: &UnboundedSender<String>) -> Result<String, String> {
        let m = self.mirror()?.clone();
        if args.iter().any(|a| !["repair", "wait"].contains(a)) {
            return Err("usage: verify [repair] [wait]".into());
        }
        let (repair, wait) = (args.contains(&"repair"), args.contains(&"wait"));
        let handle = {
            let mut task = self.verify_task.lock().await;
            if task.as_ref().is_some_and(|t| !t.is_finished()) {
                return Err("a verify is already running (see `superdisk status`)".into());
            }
            if m.mode() == crate::mirror::Mode::Degraded {
                return Err("no cache set is attached: nothing to verify".into());
            }
            let node = self.clone();
            let h = tokio::spawn(async move {
                tracing::info!(repair, "verify started");
                let outcome = m.verify(repair).await.map_err(|e| e.to_string());
                match &outcome {
                    Ok(v) => tracing::info!(mismatches = v.len(), repair, "verify finished"),
                    Err(e) => tracing::error!(error = %e, "verify failed"),
                }
                *node.last_verify.lock().expect("verify poisoned") =
                    Some(LastVerify { outcome, repair, finished: Instant::now() });
            });
            *task = Some(h);
            task.as_ref().map(|t| t.abort_handle())
        };
        if !wait {
            return Ok(format!(
                "verify{} started; follow it with `superdisk status`",
                if repair { " --repair" } else { "" }
            ));
        }
        let stats = self.mirror()?.stats();
        loop {
            let finished = handle.as_ref().is_none_or(|h| h.is_finished());
            let _ = out.send(format!(
                "progress {} {}",
                stats.verify_done_regions.load(Relaxed),
                stats.verify_total_regions.load(Relaxed)
            ));
            if finished {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let last = self.last_verify.lock().expect("verify poisoned");
        match last.as_ref().map(|l| &l.outcome) {
            Some(Ok(ranges)) => {
                for (offset, length) in ranges.iter().take(MAX_REPORTED_MISMATCHES) {
                    let _ = out.send(format!(
                        "mismatch offset={offset} length={length}{}",
                        if repair { " (repaired)" } else { "" }
                    ));
                }
                Ok(format!("{} mismatches", ranges.len()))
            }
            Some(Err(e)) => Err(format!("verify failed: {e}")),
            None => Err("verify ended without a result".into()),
        }
    }
}

//! The metadata cleaner and the backing's durability: persist the valid bitmap, clear idle
//! write-intent bits once both devices were flushed after their writes, and once a backing flush or
//! FUA write failed, keep every bit, record the loss on the superblock and fail client syncs until
//! the operator clears it (see `device::layer::backing_guard::Durability`).

use super::{Inner, Set};
use crate::device::layer::backing_guard as guard;
use crate::device::BlockDevice;
use crate::meta::superblock::FLAG_FLUSH_FAILED;
use crate::meta::Superblock;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub(super) async fn cleaner_loop<B: BlockDevice, C: BlockDevice>(inner: Arc<Inner<B, C>>) {
    let period = Duration::from_millis(inner.opts.metadata_interval_ms.max(1));
    loop {
        tokio::time::sleep(period).await;
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = inner.clean_pass().await {
            // While the backing is stalled the outage was logged once; a failure every period would
            // only repeat it.
            if inner.backing.in_outage() || guard::is_deadline_error(&e) {
                tracing::debug!(error = %e, "metadata cleaner pass failed during a backing stall; will retry");
            } else {
                tracing::warn!(error = %e, "metadata cleaner pass failed; will retry");
            }
        }
    }
}

/// Records a durability loss on the backing's superblock as soon as the guard sees one (a cleaner
/// flush, a rebuild flush or a metadata write may be first), so that a crash before any client
/// hears of it cannot turn it into a silent loss: the next start fails FLUSH as this one does.
pub(super) async fn durability_watch<B: BlockDevice, C: BlockDevice>(inner: Arc<Inner<B, C>>) {
    loop {
        let changed = inner.backing.durability().changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        inner.persist_loss().await;
        changed.await;
    }
}

impl<B: BlockDevice, C: BlockDevice> Inner<B, C> {
    /// At open: a loss recorded by an earlier run stays in force. The backing's page cache may
    /// still hold pages whose write-back failed (clean, so nothing will write them again): drop
    /// it, so every read from now on sees what the media holds.
    pub(super) fn recall_durability_loss(&self, sb: &Superblock) {
        if sb.flags & FLAG_FLUSH_FAILED == 0 {
            return;
        }
        self.backing.durability().record("recorded on the backing by an earlier run".into(), false);
        self.loss_persisted.store(true, Ordering::Release);
        self.backing.drop_cached(0, self.backing.size_bytes());
        tracing::error!(
            "a flush or FUA write of the backing failed in an earlier run: data acknowledged before it may be \
             lost; every FLUSH and FUA write fails until the operator runs `superdisk clear-flush-error`"
        );
    }

    /// Writes `FLAG_FLUSH_FAILED` once durability is lost (once per loss).
    pub(super) async fn persist_loss(&self) {
        if !self.backing.durability().is_lost() || self.loss_persisted.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.intents.update_sb(&self.backing, |sb| sb.flags |= FLAG_FLUSH_FAILED).await {
            self.loss_persisted.store(false, Ordering::Release);
            tracing::error!(error = %e, "cannot record the backing's lost durability on its superblock; will retry");
        }
    }

    /// Ok while the backing is trusted; else the error a client's FLUSH or FUA write gets, once
    /// the loss is on the superblock.
    pub(super) async fn check_durable(&self) -> io::Result<()> {
        if let Err(e) = self.backing.durability().check() {
            self.persist_loss().await;
            return Err(e);
        }
        Ok(())
    }

    /// A client's FLUSH: the backing's (the cache is flushed by the cleaner, which is what the
    /// valid bitmap depends on). Never Ok once a flush or FUA write failed, here or elsewhere.
    pub(super) async fn client_flush(&self) -> io::Result<()> {
        self.check_durable().await?;
        let r = self.backing.flush().await;
        // A failure this flush (or a sync beside it) just saw wins over its own answer.
        self.check_durable().await?;
        r
    }

    pub(super) async fn clear_durability_loss(&self) -> io::Result<()> {
        let _t = self.transition.lock().await;
        let Some(loss) = self.backing.durability().loss() else {
            return Ok(());
        };
        self.backing.drop_cached(0, self.backing.size_bytes());
        let intent = self.intents.intent_regions();
        if let Some(set) = self.cache_now() {
            for &r in &intent {
                self.invalidate(&set, r..r + 1);
            }
        }
        self.backing.flush().await?;
        self.backing.durability().clear();
        self.intents.update_sb(&self.backing, |sb| sb.flags &= !FLAG_FLUSH_FAILED).await?;
        self.loss_persisted.store(false, Ordering::Release);
        tracing::warn!(
            cause = %loss.cause,
            resynced_regions = intent.len(),
            "the operator cleared the backing's flush error: FLUSH and FUA writes succeed again; regions written \
             since the last good flush are copied to the cache again from what the backing holds"
        );
        Ok(())
    }

    /// One pass of the metadata cleaner: persist the valid bitmap, and clear the write-intent bits
    /// of regions idle since the previous pass once both devices were flushed after their writes.
    pub(super) async fn clean_pass(&self) -> io::Result<()> {
        let _t = self.transition.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.complete_degrade().await?;
        let set = self.cache_now();
        // A write given up on may still land in a candidate: a flush now would not cover it.
        // (One that lands before the next pass takes its candidates is covered by that pass's.)
        let cands: Vec<u64> = self
            .intents
            .clean_candidates()
            .into_iter()
            .filter(|&r| {
                let (start, len) = self.region_bounds(r);
                !self.backing.write_outstanding(start, start + len)
            })
            .collect();
        // After a failed flush no flush says anything about the writes before it: keep every bit.
        let clearing = !cands.is_empty() && !self.backing.durability().is_lost();
        let backing_flush = async {
            match clearing {
                true => self.backing.flush().await,
                false => Ok(()),
            }
        };
        let cache_flush = async {
            match (&set, clearing) {
                (Some(s), true) => s.dev.flush().await,
                _ => Ok(()),
            }
        };
        let (rb, rc) = tokio::join!(backing_flush, cache_flush);
        if let Err(e) = rb {
            self.persist_loss().await;
            return Err(e);
        }
        if let Some(set) = &set {
            if let Err(e) = rc {
                self.cache_meta_failed(set, &e);
                return Ok(());
            }
            if let Err(e) = set.persist_valid().await {
                self.cache_meta_failed(set, &e);
                return Ok(());
            }
            self.heartbeat(set).await;
        }
        if !clearing || self.degrade_pending.load(Ordering::Acquire) || self.backing.durability().is_lost() {
            // Nothing to clear, durability lost meanwhile, or a set was detached during the pass
            // (recorded first, next pass).
            return Ok(());
        }
        self.intents.clear_idle(&self.backing, &cands).await?;
        Ok(())
    }

    /// When clients wrote since the last pass: advance the backing's generation past those writes
    /// and record it on the set, so that a backing snapshot taken before them, restored later
    /// under this set, is recognised as older (see `attach::rolled_back`).
    async fn heartbeat(&self, set: &Arc<Set<C>>) {
        let writes = self.stats.writes.load(Ordering::Relaxed);
        if self.heartbeat_writes.swap(writes, Ordering::AcqRel) != writes {
            self.record_generation(set).await;
        }
    }

    pub(super) fn cache_meta_failed(&self, set: &Arc<Set<C>>, e: &io::Error) {
        if !set.is_failed() {
            tracing::error!(error = %e, "cache flush or metadata write failed");
            self.stats.cache_errors.fetch_add(1, Ordering::Relaxed);
            self.fail_set(set, "cache metadata could not be written");
        }
    }
}

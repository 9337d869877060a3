//! Attaching, detaching and replacing the cache set: the start-up cases (clean restart, crash,
//! the same set after the backing moved on, blank, foreign), a set failing while serving
//! (detach, then the backing epoch bump that makes the detach durable), and the operator's swaps.

use super::cacheset::{classify, CacheSet, Found};
use super::{Inner, MirrorOptions, Set, REATTACH_GRACE};
use crate::device::{BlockDevice, Timed, Tripwire};
use crate::meta::{Bits, Superblock};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Why a cache set could not be attached: refused (the operator must act) or an I/O error (the
/// engine degrades and serves).
/// Members to format as a new set: the devices, their superblock generations, and why.
type Formatting<C> = (Vec<Timed<C>>, Vec<u64>, String);

pub(super) enum AttachError {
    Refused(io::Error),
    Io(io::Error),
}

impl From<AttachError> for io::Error {
    fn from(e: AttachError) -> io::Error {
        match e {
            AttachError::Refused(e) | AttachError::Io(e) => e,
        }
    }
}

/// A set that recorded a backing generation above the backing's own is newer than the backing:
/// the backing was rolled back (restored from a snapshot taken before the set's last record).
/// Its valid bits describe data the backing no longer has, so it is rebuilt from the backing.
fn rolled_back<C>(found: Found<C>, backing_generation: u64) -> Found<C> {
    match found {
        Found::Existing { members, sbs, .. } if sbs.iter().any(|s| s.backing_generation_seen > backing_generation) => {
            let seen = sbs.iter().map(|s| s.backing_generation_seen).max().unwrap_or(0);
            let reason = format!(
                "the backing is older than this cache set (backing generation {backing_generation}, the set \
                 recorded {seen}): it was restored from a snapshot or otherwise rolled back, so the cache may \
                 hold newer data than the backing; rebuilding it from the backing"
            );
            tracing::warn!(backing_generation, recorded = seen, "backing rolled back under its cache set");
            let generations = sbs.iter().map(|s| s.generation).collect();
            Found::Format { members, generations, reason }
        }
        other => other,
    }
}

impl<B: BlockDevice, C: BlockDevice> Inner<B, C> {
    /// Detaches a failing set and records the degraded period on the backing in the background.
    pub(super) fn fail_set(&self, set: &Arc<Set<C>>, why: &str) {
        if self.detach(set, why) {
            if let Some(me) = self.me.upgrade() {
                tokio::spawn(async move {
                    let _t = me.transition.lock().await;
                    if let Err(e) = me.complete_degrade().await {
                        tracing::error!(error = %e, "cannot record degraded operation on the backing; will retry");
                    }
                });
            }
        }
    }

    /// Takes `set` out of service if it is the attached one. From here on no request uses it, and
    /// every region written (or possibly in flight) joins the changed record. The backing epoch
    /// is bumped by [`Inner::complete_degrade`]; until then no intent bit is cleared.
    pub(super) fn detach(&self, set: &Arc<Set<C>>, why: &str) -> bool {
        self.detach_for(set, why, true)
    }

    /// [`Inner::detach`]; `failure` says whether it counts as a cache failure (not when the
    /// operator removes the set on purpose).
    pub(super) fn detach_for(&self, set: &Arc<Set<C>>, why: &str, failure: bool) -> bool {
        let detached = self.intents.start_recording_if(|| {
            let mut cur = self.cache.write().expect("cache pointer poisoned");
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, set)) {
                *cur = None;
                set.failed.store(true, Ordering::Release);
                // Under the journal lock, so the cleaner cannot clear intent bits between the
                // detach and this mark.
                self.degrade_pending.store(true, Ordering::Release);
                true
            } else {
                false
            }
        });
        if detached {
            tracing::warn!(reason = why, "cache set detached; serving degraded from the backing");
            if failure {
                self.stats.cache_failures.fetch_add(1, Ordering::Relaxed);
                // Requests still waiting on a failed set give up now instead of at their limit.
                // Outside the journal lock: the trip callback detaches (a no-op by now).
                set.wire.trip();
            }
            self.update_invalid_gauge();
            self.settled.notify_waiters();
        }
        detached
    }

    /// Makes a detach durable: bump the backing epoch (so the detached set is known to be stale)
    /// and commit the changed record. Caller holds `transition`.
    pub(super) async fn complete_degrade(&self) -> io::Result<()> {
        if !self.degrade_pending.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let r = async {
            self.intents.update_sb(&self.backing, |sb| sb.epoch += 1).await?;
            self.intents.commit(&self.backing).await
        }
        .await;
        if r.is_err() {
            self.degrade_pending.store(true, Ordering::Release);
        }
        r
    }

    /// Start-up without a usable cache: record changes from now on, under a new epoch.
    pub(super) async fn start_degraded(&self) -> io::Result<()> {
        self.intents.start_recording_if(|| true);
        let _t = self.transition.lock().await;
        self.intents.update_sb(&self.backing, |sb| sb.epoch += 1).await?;
        self.intents.commit(&self.backing).await
    }

    /// Attaches `members` as the cache set. `backing_generation` is the backing's generation to
    /// judge a rollback against: as found on disk at start-up (this run has advanced it since),
    /// else the current one.
    pub(super) async fn attach(
        &self,
        members: Vec<C>,
        take_over: bool,
        backing_generation: Option<u64>,
    ) -> Result<(), AttachError> {
        let _t = self.transition.lock().await;
        self.refuse_outstanding(&members).await?;
        let wire = Arc::new(Tripwire::default());
        let members: Vec<Timed<C>> =
            members.into_iter().map(|m| Timed::new(m, self.stats.cache_io.clone(), wire.clone())).collect();
        self.complete_degrade().await.map_err(AttachError::Io)?;
        // Look at the new devices before letting go of the attached set: a refused or unreadable
        // replacement leaves the old set serving.
        let found = classify(members, &self.intents.sb(), take_over).await.map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                AttachError::Refused(e)
            } else {
                AttachError::Io(e)
            }
        })?;
        if let Some(cur) = self.cache_now() {
            self.detach(&cur, "replaced");
            self.complete_degrade().await.map_err(AttachError::Io)?;
        }
        // After the detach: the epoch it bumped is what the new set is judged against.
        let bsb = self.intents.sb();
        let found = rolled_back(found, backing_generation.unwrap_or(bsb.generation));
        let (members, generations, reason) = match found {
            Found::Existing { members, sbs, bitmaps, valid } => {
                match self.reattach(members, sbs, bitmaps, valid, &bsb, &wire).await? {
                    None => return Ok(()),
                    Some(format) => format,
                }
            }
            Found::Format { members, generations, reason } => (members, generations, reason),
        };
        self.format_and_pair(members, &generations, &reason, &bsb, wire).await
    }

    /// A write given up on a device that hung may still land on it; attached and resynced before
    /// that, the late write would put old bytes under a region marked valid.
    async fn refuse_outstanding(&self, members: &[C]) -> Result<(), AttachError> {
        for m in members {
            let n = self.stats.cache_io.outstanding_after(m.identity(), REATTACH_GRACE).await;
            if n > 0 {
                return Err(AttachError::Refused(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "{n} operation(s) given up on this device when it stopped answering are still outstanding; \
                         it can be attached again once it has answered them"
                    ),
                )));
            }
        }
        Ok(())
    }

    /// Installs an existing set with the regions it can be trusted for, if it can be trusted at
    /// all; otherwise gives its members back, with why, to be formatted.
    async fn reattach(
        &self,
        members: Vec<Timed<C>>,
        sbs: Vec<Superblock>,
        bitmaps: Vec<crate::meta::DiskBitmap>,
        valid: Bits,
        bsb: &Superblock,
        wire: &Arc<Tripwire>,
    ) -> Result<Option<Formatting<C>>, AttachError> {
        let set_uuid = sbs[0].cache_set_uuid;
        let set_epoch = sbs[0].epoch;
        let generations: Vec<u64> = sbs.iter().map(|s| s.generation).collect();
        let mut parts = Some((members, sbs, bitmaps, valid));
        let installed = self.intents.stop_recording_if(|intent, changed, recording| {
            let (_, _, _, persisted) = parts.as_ref().expect("parts present");
            let trusted = reusable_valid(bsb, set_uuid, set_epoch, persisted, intent, changed, recording)?;
            let (members, sbs, bitmaps, persisted) = parts.take().expect("parts present");
            let set = Arc::new(CacheSet::existing(members, sbs, bitmaps, persisted, &trusted, wire.clone()));
            *self.cache.write().expect("cache pointer poisoned") = Some(set.clone());
            Some(set)
        });
        if let Some(set) = installed {
            // Outside the intent store's lock: a wire tripped already fails the set at once, and
            // failing detaches, which takes that lock. A trip in between is seen here.
            self.arm_wire(&set);
            self.decided("the paired set, reused: regions valid on it and not marked by the write-intent or changed record are trusted".into());
            self.finish_reattach(set, bsb, set_epoch).await.map_err(AttachError::Io)?;
            return Ok(None);
        }
        let (members, _, _, _) = parts.take().expect("parts present");
        let why = if bsb.cache_set_uuid == [0; 16] {
            "the backing has no cache set paired with it yet (first use, or it was served without its cache)"
        } else if set_uuid != bsb.cache_set_uuid {
            "the cache set is not the one paired with this backing"
        } else {
            "the cache set missed writes and the record of them is gone"
        };
        Ok(Some((members, generations, why.to_string())))
    }

    /// Formats the members as a new set, pairs the backing with it and starts its full rebuild.
    async fn format_and_pair(
        &self,
        members: Vec<Timed<C>>,
        generations: &[u64],
        reason: &str,
        bsb: &Superblock,
        wire: Arc<Tripwire>,
    ) -> Result<(), AttachError> {
        tracing::info!(reason = %reason, "formatting the cache set; full rebuild");
        self.decided(format!("formatted, full rebuild: {reason}"));
        let set = CacheSet::format(members, generations, bsb, self.opts.stripe_bytes, bsb.epoch, wire).await.map_err(
            |e| {
                if e.kind() == io::ErrorKind::InvalidInput {
                    AttachError::Refused(e)
                } else {
                    AttachError::Io(e)
                }
            },
        )?;
        let set = Arc::new(set);
        self.arm_wire(&set);
        // Pair the backing with the new set; the changed record now starts from this epoch. Any
        // other set (a different uuid) is no longer paired and will be rebuilt in full.
        let pair = async {
            self.intents
                .update_sb(&self.backing, |sb| {
                    sb.cache_set_uuid = set.uuid;
                    sb.changed_since_epoch = sb.epoch;
                })
                .await?;
            self.intents.reset_changed();
            self.intents.commit(&self.backing).await
        };
        pair.await.map_err(AttachError::Io)?;
        self.intents.stop_recording_if(|_, _, _| {
            *self.cache.write().expect("cache pointer poisoned") = Some(set.clone());
            Some(())
        });
        self.record_generation(&set).await;
        self.started_rebuild(&set);
        Ok(())
    }

    fn decided(&self, what: String) {
        *self.stats.attach_decision.lock().expect("decision poisoned") = what;
    }

    /// Advances the backing's generation (durably) and records it on `set`: any write the set
    /// takes after this is newer than every backing snapshot taken before. A failure only weakens
    /// the detection of a later rollback (an older record), so it is logged, not fatal.
    pub(super) async fn record_generation(&self, set: &Arc<Set<C>>) {
        let r = async {
            self.intents.update_sb(&self.backing, |_| {}).await?;
            set.record_backing_generation(self.intents.sb().generation).await
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot record the backing generation on the cache set");
        }
    }

    /// Persists what re-attaching the paired set invalidated, then marks it in sync with the
    /// backing epoch, then drops the changed record it no longer needs — in that order, so a crash
    /// in between leaves either the old epoch (the record still applies) or the new one with the
    /// invalidations durable.
    pub(super) async fn finish_reattach(&self, set: Arc<Set<C>>, bsb: &Superblock, set_epoch: u64) -> io::Result<()> {
        let invalid = set.table.not_valid();
        tracing::info!(
            invalid_regions = invalid,
            in_sync = set_epoch == bsb.epoch,
            "cache set re-attached; resyncing only the regions it may have missed"
        );
        let r = async {
            set.persist_valid().await?;
            set.set_epoch(bsb.epoch).await
        }
        .await;
        if let Err(e) = r {
            self.detach(&set, "cannot write its metadata");
            self.complete_degrade().await?;
            return Err(e);
        }
        if self.intents.changed_count() > 0 || bsb.changed_since_epoch != bsb.epoch {
            self.intents.update_sb(&self.backing, |sb| sb.changed_since_epoch = sb.epoch).await?;
            self.intents.reset_changed();
            self.intents.commit(&self.backing).await?;
        }
        // A reused set holds writes from before this start; a backing restored to a copy from
        // before now must be told apart from this one (FORMAT.md §5a).
        self.record_generation(&set).await;
        self.started_rebuild(&set);
        Ok(())
    }

    /// A member that times out fails the set at once, whatever request was waiting on it.
    pub(super) fn arm_wire(&self, set: &Arc<Set<C>>) {
        let (me, weak_set) = (self.me.clone(), Arc::downgrade(set));
        set.wire.on_trip(move || {
            if let (Some(me), Some(set)) = (me.upgrade(), weak_set.upgrade()) {
                me.fail_set(&set, "a cache device did not answer within cache_timeout_ms");
            }
        });
        if set.wire.is_tripped() {
            self.fail_set(set, "a cache device did not answer within cache_timeout_ms");
        }
    }

    pub(super) fn started_rebuild(&self, set: &Set<C>) {
        self.stats.rebuild_total_bytes.store(set.table.not_valid() * self.region_bytes, Ordering::Relaxed);
        self.stats.rebuild_done_bytes.store(0, Ordering::Relaxed);
        self.rebuild_idle.store(false, Ordering::Release);
        self.update_invalid_gauge();
        self.work.notify_one();
    }
}

/// The regions of an existing cache set that can be trusted at attach, or None if none can (the
/// set must be formatted and rebuilt):
/// * not the set the backing is paired with → None;
/// * in sync with the backing epoch → its persisted valid regions minus write-intent regions (and
///   minus changed regions if changes were being recorded in this process);
/// * behind, but no earlier than the start of the changed record → also minus changed regions;
/// * otherwise (behind the record, or ahead of the backing: restored backing?) → None.
pub(crate) fn reusable_valid(
    bsb: &Superblock,
    set_uuid: [u8; 16],
    set_epoch: u64,
    persisted: &Bits,
    intent: &Bits,
    changed: &Bits,
    recording: bool,
) -> Option<Bits> {
    if bsb.cache_set_uuid == [0; 16] || set_uuid != bsb.cache_set_uuid {
        return None;
    }
    let since = bsb.changed_since_epoch;
    let use_changed = if set_epoch == bsb.epoch {
        recording
    } else if since != 0 && since <= set_epoch && set_epoch < bsb.epoch {
        true
    } else {
        return None;
    };
    let mut v = persisted.clone();
    v.and_not(intent);
    if use_changed {
        v.and_not(changed);
    }
    Some(v)
}

/// Checks, without writing anything, that `caches` could become the cache set of the backing
/// described by `backing_sb`: big enough, and not another superdisk's or holding unknown data
/// (unless `take_over_foreign_cache`). `create` runs it before touching the backing, so a wrong
/// cache path is refused with every device unchanged.
pub async fn preflight_cache<C: BlockDevice + Clone>(
    backing_sb: &Superblock,
    caches: &[C],
    opts: &MirrorOptions,
) -> io::Result<()> {
    if caches.is_empty() {
        return Ok(());
    }
    super::cacheset::check_capacity(caches, backing_sb, opts.stripe_bytes)?;
    classify(caches.to_vec(), backing_sb, opts.take_over_foreign_cache).await.map(|_| ())
}

/// Formats `caches` as a new cache set for the backing described by `backing_sb` (for `superdisk
/// create --cache`). Devices that already form this backing's set are left alone; a cache of
/// another superdisk or a device with unknown data is refused unless `take_over_foreign_cache`.
pub async fn create_cache<C: BlockDevice + Clone>(
    backing_sb: &Superblock,
    caches: &[C],
    opts: &MirrorOptions,
) -> io::Result<()> {
    if caches.is_empty() {
        return Ok(());
    }
    match classify(caches.to_vec(), backing_sb, opts.take_over_foreign_cache).await? {
        Found::Existing { sbs, .. } if sbs[0].cache_set_uuid == backing_sb.cache_set_uuid => Ok(()),
        Found::Existing { members, sbs, .. } => {
            let generations: Vec<u64> = sbs.iter().map(|s| s.generation).collect();
            CacheSet::format(members, &generations, backing_sb, opts.stripe_bytes, backing_sb.epoch, Arc::default())
                .await
                .map(|_| ())
        }
        Found::Format { members, generations, .. } => {
            CacheSet::format(members, &generations, backing_sb, opts.stripe_bytes, backing_sb.epoch, Arc::default())
                .await
                .map(|_| ())
        }
    }
}

//! The write path: every mutation (write, write-zeroes, trim) takes the range lock, makes its
//! regions' write-intent bits durable, writes both devices from one buffer, and settles the
//! regions' cache state from both results before the lock is released.

use super::region::RegionState;
use super::util::region_span;
use super::{enospc, out_of_range, Inner, Set};
use crate::device::layer::backing_guard as guard;
use crate::device::{AlignedBuf, BlockDevice};
use crate::telemetry::timed;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

impl<B: BlockDevice, C: BlockDevice> Inner<B, C> {
    /// The common start of every mutation (write, write-zeroes, trim), called with the range
    /// lock held (so overlapping mutations reach both devices in one order): make the regions'
    /// intent bits durable and pick the cache set the mutation goes to.
    pub(super) async fn begin(&self, offset: u64, len: u64) -> io::Result<Mutation<'_, B, C>> {
        self.fg_ops.fetch_add(1, Ordering::Relaxed);
        let rs = region_span(offset, len, self.region_bytes);
        // A stalled backing fails the commit by the request deadline; nothing was written to
        // either device yet, so the region's state stays what it was.
        let (mark, set) =
            self.intents.mark(&self.backing, rs.clone(), |_| self.cache_now()).await.inspect_err(|_| {
                self.stats.backing_errors.fetch_add(1, Ordering::Relaxed);
            })?;
        Ok(Mutation { inner: self, offset, len, rs, set, armed: false, _mark: mark })
    }

    /// Awaits `f` (a lock), but not past the request's deadline.
    pub(super) async fn bounded<F: std::future::Future>(&self, f: F) -> io::Result<F::Output> {
        guard::bounded(f).await.inspect_err(|_| {
            self.stats.backing_io.deadline_errors.fetch_add(1, Ordering::Relaxed);
            self.stats.backing_errors.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// The deadline for a client request that starts now (`backing_io_deadline_ms`).
    pub(super) fn request_deadline(&self) -> Instant {
        Instant::now() + self.backing.policy().deadline
    }

    /// Settles the regions' cache state from both results, before the range lock is released.
    pub(super) fn finish(&self, mut m: Mutation<'_, B, C>, rb: &io::Result<()>, rc: Option<io::Result<()>>) {
        m.armed = false;
        if rb.is_err() {
            self.stats.backing_errors.fetch_add(1, Ordering::Relaxed);
        }
        let (Some(set), Some(rc)) = (&m.set, rc) else { return };
        let (offset, len) = (m.offset, m.len);
        if set.is_failed() {
            // Detached meanwhile: its state no longer matters (the changed record covers us).
        } else if let Err(e) = rb {
            // A timed-out backing write may still land later (the guard keeps its range fenced
            // until it does): the backing's bytes are unspecified until then, so the cache copy
            // must not be read; the rebuild copies the region back once the backing answers.
            if guard::is_deadline_error(e) {
                tracing::debug!(offset, len, error = %e, "backing write timed out; the client gets EIO");
            } else {
                tracing::warn!(offset, len, error = %e, "backing write failed; the client gets the error");
            }
            self.invalidate(set, m.rs.clone());
        } else if let Err(e) = rc {
            tracing::warn!(offset, len, error = %e, "cache write failed; region invalidated, client unaffected");
            self.invalidate(set, m.rs.clone());
            self.cache_error(set);
        } else {
            // Regions this request overwrote entirely now hold the same bytes on both devices.
            for r in m.rs.clone() {
                let (s, l) = self.region_bounds(r);
                if s >= offset
                    && s + l <= offset + len
                    && set.table.transition(r, RegionState::Invalid, RegionState::Valid)
                {
                    self.stats.rebuild_done_bytes.fetch_add(l, Ordering::Relaxed);
                    self.update_invalid_gauge();
                }
            }
        }
    }

    pub(super) async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len() as u64;
        if len == 0 {
            return (buf, Ok(()));
        }
        if out_of_range(offset, len, self.data_bytes) {
            return (buf, Err(enospc()));
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.write_bytes.fetch_add(len, Ordering::Relaxed);
        if fua {
            if let Err(e) = self.check_durable().await {
                return (buf, Err(e));
            }
        }
        // Bounded: the holder may be a write waiting out a stalled backing.
        let _lock = match self.bounded(self.locks.lock(offset, offset + len)).await {
            Ok(g) => g,
            Err(e) => return (buf, Err(e)),
        };
        let mut m = match self.begin(offset, len).await {
            Ok(m) => m,
            Err(e) => return (buf, Err(e)),
        };
        let Some(set) = m.set.clone() else {
            let (buf, r) = self.backing.write(offset, buf, fua).await;
            self.finish(m, &r, None);
            return (buf, r);
        };
        // Both devices write from the one buffer, at once. The cache write needs no FUA: the
        // valid bitmap is only persisted after a cache flush.
        let data = Arc::new(buf);
        m.armed = true;
        let (rb, rc) = tokio::join!(
            timed(&self.stats.slow.backing.write, data.len(), self.backing.write_shared(offset, data.clone(), fua)),
            set.dev.write_shared(offset, data.clone(), false)
        );
        self.finish(m, &rb, Some(rc));
        // Still shared only when a write was given up on and is still in flight (a stalled
        // device): the caller gets a buffer of the same length, holding nothing of anyone else's.
        let buf = Arc::try_unwrap(data).unwrap_or_else(|d| AlignedBuf::zeroed(d.len()));
        (buf, rb)
    }

    pub(super) async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
        errno: i32,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if out_of_range(offset, len, self.data_bytes) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        let _lock = self.bounded(self.locks.lock(offset, offset + len)).await?;
        let mut m = self.begin(offset, len).await?;
        let rb = match m.set.clone() {
            None => {
                let rb = self.backing.write_zeroes(offset, len, may_unmap).await;
                self.finish(m, &rb, None);
                rb
            }
            Some(set) => {
                // Both copies are zeroed, so they stay identical whatever each device does with
                // the unmap hint.
                m.armed = true;
                let (rb, rc) = tokio::join!(
                    self.backing.write_zeroes(offset, len, may_unmap),
                    set.dev.write_zeroes(offset, len, true)
                );
                self.finish(m, &rb, Some(rc));
                rb
            }
        };
        rb?;
        if fua {
            self.client_flush().await?;
        }
        Ok(())
    }
}

/// A mutation in progress (its caller holds the range lock): holds its intent registration.
/// Dropped while `armed`
/// (its future was cancelled after the devices were asked to write), it invalidates its regions:
/// the two copies may differ.
pub(super) struct Mutation<'a, B: BlockDevice, C: BlockDevice> {
    inner: &'a Inner<B, C>,
    offset: u64,
    len: u64,
    rs: std::ops::Range<u64>,
    set: Option<Arc<Set<C>>>,
    armed: bool,
    // Released after `drop` settled the state, so the cleaner never sees the region idle first.
    _mark: super::intent::MarkGuard<'a>,
}

impl<B: BlockDevice, C: BlockDevice> Drop for Mutation<'_, B, C> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(set) = &self.set {
                self.inner.invalidate(set, self.rs.clone());
            }
        }
    }
}

//! A volume with only a backing device: every read and write goes to it. This is what superdisk
//! serves when no cache is configured, and the degraded mode's data path.
//!
//! The backing is behind a [`Guarded`] device: each request has `backing_io_deadline_ms` to
//! complete and then fails with EIO; a write given up that way stays fenced until the device
//! really answers, so no later write to those bytes can be overtaken by it (see `device::layer::backing_guard`).
//!
//! A failed flush or FUA write loses durability for good (`device::layer::backing_guard::Durability`): every
//! later FLUSH and FUA write fails, the loss is recorded on the superblock before the client
//! hears of it (so another connection's FLUSH after a restart fails too), and the shutdown does
//! not record a clean stop, until the operator runs `superdisk clear-flush-error`.

use super::Volume;
use crate::device::layer::backing_guard::{self as guard, BackingIoStats, DurabilityLoss, Guarded, IoPolicy};
use crate::device::{AlignedBuf, BlockDevice, Extent, FileSlice};
use crate::meta::store::{self, check_backing, read_superblock, update_superblock};
use crate::meta::superblock::{Superblock, FLAG_FLUSH_FAILED, FLAG_OPEN};
use std::io;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Mutex;

pub struct PlainVolume<D: BlockDevice> {
    backing: Guarded<D>,
    data_size_bytes: u64,
    read_only: bool,
    superblock: Mutex<Superblock>,
    /// Whether the previous run ended without a clean shutdown.
    pub recovered_from_crash: bool,
}

impl<D: BlockDevice> PlainVolume<D> {
    /// Opens a backing device prepared by `superdisk create`; marks it open unless read-only.
    /// Backing I/O gets the default [`IoPolicy`].
    pub async fn open(backing: D, read_only: bool) -> io::Result<Self> {
        Self::open_with_policy(backing, read_only, IoPolicy::default()).await
    }

    /// [`Self::open`] with the timeouts, read retries and deadline of `policy` (`backing_*` keys).
    pub async fn open_with_policy(backing: D, read_only: bool, policy: IoPolicy) -> io::Result<Self> {
        let backing = Guarded::new(backing, policy, Arc::new(BackingIoStats::default()), "backing");
        let mut sb = read_superblock(&backing).await?.map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{e}: not prepared for superdisk (run `superdisk create --backing …` first)"),
            )
        })?;
        check_backing(&sb, backing.size_bytes())?;
        let recovered_from_crash = store::was_open(&sb);
        if sb.flags & FLAG_FLUSH_FAILED != 0 {
            backing.durability().record("recorded on the backing by an earlier run".into(), false);
            // Pages whose write-back failed may still be in the page cache: read the media.
            backing.drop_cached(0, backing.size_bytes());
            tracing::error!(
                "a flush or FUA write of the backing failed in an earlier run: data acknowledged before it may be \
                 lost; every FLUSH and FUA write fails until the operator runs `superdisk clear-flush-error`"
            );
        }
        if !read_only {
            sb.flags |= FLAG_OPEN;
            update_superblock(&backing, &mut sb).await?;
        }
        Ok(PlainVolume {
            data_size_bytes: sb.data_size_bytes,
            backing,
            read_only,
            superblock: Mutex::new(sb),
            recovered_from_crash,
        })
    }

    pub fn backing(&self) -> &D {
        self.backing.inner()
    }

    /// Backing stall counters (timeouts, retries, deadline failures, outages) for status/metrics.
    pub fn io_stats(&self) -> Arc<BackingIoStats> {
        self.backing.stats().clone()
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.backing.policy().deadline
    }

    /// Backing operations still in flight that nobody waits for (see [`Guarded::ops_in_doubt`]).
    pub fn device_ops_in_doubt(&self) -> u64 {
        self.backing.ops_in_doubt()
    }

    /// Why the backing can no longer be trusted with what it acknowledged, if it cannot.
    pub fn durability_lost(&self) -> Option<DurabilityLoss> {
        self.backing.durability().loss()
    }

    /// Ok while the backing is trusted; else the error, once the loss is on the superblock.
    async fn check_durable(&self) -> io::Result<()> {
        let Err(e) = self.backing.durability().check() else { return Ok(()) };
        let mut sb = self.superblock.lock().await;
        if !self.read_only && sb.flags & FLAG_FLUSH_FAILED == 0 {
            sb.flags |= FLAG_FLUSH_FAILED;
            if let Err(we) = update_superblock(&self.backing, &mut sb).await {
                sb.flags &= !FLAG_FLUSH_FAILED;
                tracing::error!(error = %we, "cannot record the backing's lost durability on its superblock");
            }
        }
        Err(e)
    }

    /// The operator's `clear-flush-error`: reads see the media from now on (the page cache may
    /// hold pages whose write-back failed), and FLUSH and FUA writes succeed again.
    pub async fn clear_durability_loss(&self) -> io::Result<()> {
        if self.backing.durability().loss().is_none() {
            return Ok(());
        }
        self.backing.drop_cached(0, self.backing.size_bytes());
        self.backing.flush().await?;
        self.backing.durability().clear();
        let mut sb = self.superblock.lock().await;
        if sb.flags & FLAG_FLUSH_FAILED != 0 {
            sb.flags &= !FLAG_FLUSH_FAILED;
            update_superblock(&self.backing, &mut sb).await?;
        }
        tracing::warn!("the operator cleared the backing's flush error: FLUSH and FUA writes succeed again");
        Ok(())
    }
}

impl<D: BlockDevice> Volume for PlainVolume<D> {
    fn size_bytes(&self) -> u64 {
        self.data_size_bytes
    }

    fn fast_zero(&self) -> bool {
        self.backing.fast_zero()
    }

    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        self.backing.read(offset, buf).await
    }

    fn read_zero_copy(&self, offset: u64, len: u64) -> Option<FileSlice> {
        if offset.checked_add(len)? > self.data_size_bytes {
            return None;
        }
        self.backing.zero_copy_source(offset, usize::try_from(len).ok()?)
    }

    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        if fua {
            if let Err(e) = self.check_durable().await {
                return (buf, Err(e));
            }
        }
        let (buf, r) = self.backing.write(offset, buf, fua).await;
        if fua && r.is_err() {
            // A failed FUA write may have been the one to see a write-back error.
            if let Err(e) = self.check_durable().await {
                return (buf, Err(e));
            }
        }
        (buf, r)
    }

    async fn flush(&self) -> io::Result<()> {
        // Never re-issued after a failure or past the deadline (see `device::layer::backing_guard`), and never
        // Ok once any flush or FUA write failed.
        self.check_durable().await?;
        let r = self.backing.flush().await;
        self.check_durable().await?;
        r
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        // Zeroing (hole punch) rather than a bare discard keeps the contents defined, which the
        // mirror relies on: both copies must read the same after a trim.
        self.write_zeroes(offset, len, true, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> io::Result<()> {
        // Two device operations, one request: one deadline for both.
        guard::with_deadline(self.deadline(), async {
            self.backing.write_zeroes(offset, len, may_unmap).await?;
            if fua {
                self.flush().await?;
            }
            Ok(())
        })
        .await
    }

    async fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        // No faster tier to fill without a cache device.
        Ok(())
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let len = len.min(self.data_size_bytes.saturating_sub(offset));
        self.backing.allocation(offset, len).await
    }

    async fn shutdown(&self) -> io::Result<()> {
        let r = self.backing.flush().await;
        // With durability lost the stop is not clean (FLAG_OPEN stays).
        self.check_durable().await?;
        r?;
        if !self.read_only {
            let mut sb = self.superblock.lock().await;
            sb.flags &= !FLAG_OPEN;
            update_superblock(&self.backing, &mut sb).await?;
        }
        Ok(())
    }
}

//! The backing's durability: once a flush or a FUA write failed, no flush can vouch for what was
//! acknowledged before it.

use super::shared::lock;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Whether the device can still be trusted with the durability of what it acknowledged.
///
/// Linux reports a failed write-back once per open file (errseq): the `fdatasync` (or `RWF_DSYNC`
/// write) that sees it gets EIO, the dirty pages are marked clean and may be evicted, and the next
/// `fdatasync` returns 0 although the data never reached the media. A device returning an error
/// for a flush or a FUA write is the same story for any device: something acknowledged earlier may
/// be gone. So the first such failure is recorded here and never forgotten by this process: from
/// then on no client FLUSH or FUA write may succeed, and the mirror clears no write-intent bit.
/// Volumes persist the loss on the backing's superblock, so a restart keeps it too; only the
/// operator clears it (`superdisk clear-flush-error`), once the clients have dealt with it.
#[derive(Debug, Default)]
pub struct Durability {
    pub(super) lost: AtomicBool,
    pub(super) failures: AtomicU64,
    pub(super) loss: Mutex<Option<DurabilityLoss>>,
    /// Wakes whoever persists a new loss (the mirror's metadata task).
    pub(super) changed: tokio::sync::Notify,
}

/// What made the device's durability unknown, and when.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DurabilityLoss {
    pub since_unix_s: u64,
    pub cause: String,
}

impl Durability {
    /// Flush or FUA-write failures seen since start (each one is a possible loss of data).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    pub fn loss(&self) -> Option<DurabilityLoss> {
        if !self.is_lost() {
            return None;
        }
        lock(&self.loss).clone()
    }

    /// Records a failed flush or FUA write (`counted`), or a loss recorded by an earlier run.
    /// True if durability was not already lost.
    pub fn record(&self, cause: String, counted: bool) -> bool {
        if counted {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut l = lock(&self.loss);
        if l.is_some() {
            return false;
        }
        let since_unix_s =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        *l = Some(DurabilityLoss { since_unix_s, cause });
        self.lost.store(true, Ordering::Release);
        drop(l);
        self.changed.notify_waiters();
        true
    }

    /// The operator's acknowledgement (after the volume made its copies consistent again).
    pub fn clear(&self) {
        let mut l = lock(&self.loss);
        *l = None;
        self.lost.store(false, Ordering::Release);
    }

    /// Err (EIO to a client) while durability is lost.
    pub fn check(&self) -> io::Result<()> {
        match self.loss() {
            None => Ok(()),
            Some(l) => Err(io::Error::other(format!(
                "the backing lost durability ({}): an earlier flush or FUA write failed, so writes \
                 acknowledged before it may be gone; every FLUSH and FUA write fails until the \
                 operator runs `superdisk clear-flush-error`",
                l.cause
            ))),
        }
    }

    /// Resolves at the next loss recorded after it was enabled (or first polled).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

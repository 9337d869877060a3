//! Byte-range locks for async code: a holder of `[start, end)` excludes every overlapping holder.
//! Used for read-modify-write of shared edge blocks, and by the mirror to keep overlapping writes
//! in one order on both devices.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
    /// Lockers waiting for a release: a release with none skips the wake-up.
    waiting: AtomicUsize,
}

pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

/// A lock that can outlive the borrow of its [`RangeLocks`]: it moves into a background task that
/// holds a range until an operation the caller gave up on has really finished (`device::layer::backing_guard`).
pub struct OwnedRangeGuard {
    locks: Arc<RangeLocks>,
    range: (u64, u64),
}

impl RangeLocks {
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.acquire(start, end).await;
        RangeGuard { locks: self, range: (start, end) }
    }

    pub async fn lock_owned(self: &Arc<Self>, start: u64, end: u64) -> OwnedRangeGuard {
        self.acquire(start, end).await;
        OwnedRangeGuard { locks: self.clone(), range: (start, end) }
    }

    /// The lock if nothing overlapping is held right now.
    pub fn try_lock_owned(self: &Arc<Self>, start: u64, end: u64) -> Option<OwnedRangeGuard> {
        debug_assert!(start < end);
        self.try_push(start, end).then(|| OwnedRangeGuard { locks: self.clone(), range: (start, end) })
    }

    /// Registers `[start, end)` once nothing overlapping is held. Cancel-safe: the range is pushed
    /// only in the same step that returns, so a dropped wait holds nothing.
    async fn acquire(&self, start: u64, end: u64) {
        debug_assert!(start < end);
        // Uncontended (the common case): no wake-up registration at all.
        if self.try_push(start, end) {
            return;
        }
        // Counted before the check below and decremented after: a release that removes its range
        // after our check sees the count and wakes us (both sides order through `held`'s mutex).
        self.waiting.fetch_add(1, Ordering::SeqCst);
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _waiting = Waiting(&self.waiting);
        loop {
            // Register interest before checking, so a release between the check and the await is
            // not missed.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.try_push(start, end) {
                return;
            }
            notified.await;
        }
    }

    fn try_push(&self, start: u64, end: u64) -> bool {
        let mut held = self.held.lock().expect("range lock poisoned");
        if held.iter().any(|&(s, e)| s < end && start < e) {
            return false;
        }
        held.push((start, end));
        true
    }

    fn release(&self, range: (u64, u64)) {
        let mut held = self.held.lock().expect("range lock poisoned");
        if let Some(i) = held.iter().position(|&r| r == range) {
            held.swap_remove(i);
        }
        drop(held);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.released.notify_waiters();
        }
    }

    pub fn held_count(&self) -> usize {
        self.held.lock().expect("range lock poisoned").len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.locks.release(self.range);
    }
}

impl Drop for OwnedRangeGuard {
    fn drop(&mut self) {
        self.locks.release(self.range);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_exclude_and_disjoint_ones_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(0, 4096).await;
        let _disjoint = locks.lock(4096, 8192).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(100, 200).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "overlapping lock must wait");
        drop(g);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}

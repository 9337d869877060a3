//! Region states of one cache set, with the transition table they must follow.
//!
//! A region is the unit of the valid and write-intent bitmaps (1 MiB by default). Its *cache
//! state* says whether the cache copy may be read:
//!
//! ```text
//!             rebuild claims it                 copy written + cache flushed
//!   Invalid ───────────────────────► Copying ───────────────────────────────► Valid
//!      ▲  ▲                             │                                       │
//!      │  └─────────────────────────────┘ copy failed / a write to it failed    │
//!      │                                  on the cache meanwhile                │
//!      └────────────────────────────────────────────────────────────────────────┘
//!         cache write or repair failed, backing write failed, verify found a mismatch
//!   Invalid ─────────────────────────────────────────────────────────────────► Valid
//!         a write covered the whole region and succeeded on both devices
//! ```
//!
//! This is the in-memory truth that the read path consults. The *persisted* valid bitmap lags it:
//! a region is written as valid only after the cache was flushed (see `CacheSet::persist_valid`),
//! and the backing's write-intent bit covers a region whose copies may differ until the persisted
//! bitmap has caught up.

use crate::meta::Bits;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RegionState {
    /// The cache copy is not trusted: reads go to the backing.
    Invalid = 0,
    /// The rebuild is copying the region; reads still go to the backing until the copy is flushed.
    Copying = 1,
    /// The cache copy equals the backing (writes keep it so by going to both under one range lock).
    Valid = 2,
}

impl RegionState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => RegionState::Invalid,
            1 => RegionState::Copying,
            2 => RegionState::Valid,
            _ => unreachable!("region state byte {v}"),
        }
    }
}

use RegionState::{Copying, Invalid, Valid};

/// Every allowed transition, with the reason it exists. Anything else is a bug.
pub const TRANSITIONS: &[(RegionState, RegionState, &str)] = &[
    (Invalid, Copying, "the rebuild claims the region (only the rebuild task does this)"),
    (Copying, Valid, "the copy was written under the region's range lock and the cache flushed since"),
    (Copying, Invalid, "the copy failed, or a write to the region failed on the cache during the copy"),
    (Valid, Invalid, "a cache write, read repair or verify failed, or the backing write failed"),
    (Invalid, Valid, "a write covering the whole region succeeded on both devices"),
];

pub fn allowed(from: RegionState, to: RegionState) -> bool {
    TRANSITIONS.iter().any(|&(f, t, _)| f == from && t == to)
}

pub struct RegionTable {
    states: Vec<AtomicU8>,
    /// Regions not Valid (Invalid or Copying): what the rebuild still has to do.
    not_valid: AtomicU64,
}

impl RegionTable {
    /// A table with `valid`'s set bits Valid and the rest Invalid.
    pub fn new(valid: &Bits) -> Self {
        let states: Vec<AtomicU8> =
            (0..valid.len()).map(|r| AtomicU8::new(if valid.get(r) { Valid } else { Invalid } as u8)).collect();
        let not_valid = valid.len() - valid.count_ones();
        RegionTable { states, not_valid: AtomicU64::new(not_valid) }
    }

    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    pub fn get(&self, r: u64) -> RegionState {
        RegionState::from_u8(self.states[r as usize].load(Ordering::Acquire))
    }

    /// Moves region `r` from `from` to `to` if it is in `from`; false if it was not.
    pub fn transition(&self, r: u64, from: RegionState, to: RegionState) -> bool {
        assert!(allowed(from, to), "region state transition {from:?} → {to:?} is not in the table");
        let ok =
            self.states[r as usize].compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if ok {
            match (from == Valid, to == Valid) {
                (true, false) => {
                    self.not_valid.fetch_add(1, Ordering::AcqRel);
                }
                (false, true) => {
                    let before = self.not_valid.fetch_sub(1, Ordering::AcqRel);
                    debug_assert!(before > 0);
                }
                _ => {}
            }
        }
        ok
    }

    /// Makes `r` Invalid from whatever it is; true if it was not Invalid already.
    pub fn invalidate(&self, r: u64) -> bool {
        loop {
            match self.get(r) {
                Invalid => return false,
                s => {
                    if self.transition(r, s, Invalid) {
                        return true;
                    }
                }
            }
        }
    }

    pub fn not_valid(&self) -> u64 {
        self.not_valid.load(Ordering::Acquire)
    }

    /// The regions now Valid, as a bitmap (what may be persisted once the cache is flushed).
    pub fn valid_bits(&self) -> Bits {
        let mut b = Bits::new(self.len());
        for (r, s) in self.states.iter().enumerate() {
            if s.load(Ordering::Acquire) == Valid as u8 {
                b.set(r as u64);
            }
        }
        b
    }

    /// The first Invalid region at or after `from`, wrapping around once.
    pub fn next_invalid(&self, from: u64) -> Option<u64> {
        let n = self.len();
        (from..n).chain(0..from.min(n)).find(|&r| self.get(r) == Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_allows_exactly_the_listed_transitions() {
        let all = [Invalid, Copying, Valid];
        let mut n = 0;
        for f in all {
            for t in all {
                if allowed(f, t) {
                    n += 1;
                    assert_ne!(f, t, "self-transitions are not state changes");
                }
            }
        }
        assert_eq!(n, TRANSITIONS.len());
        assert!(!allowed(Valid, Copying), "a valid region is never re-copied without being invalidated");
    }

    #[test]
    fn counts_follow_transitions() {
        let mut v = Bits::new(4);
        v.set(0);
        v.set(1);
        let t = RegionTable::new(&v);
        assert_eq!(t.not_valid(), 2);
        assert!(t.invalidate(0));
        assert!(!t.invalidate(0));
        assert_eq!(t.not_valid(), 3);
        assert!(t.transition(2, Invalid, Copying));
        assert!(!t.transition(2, Invalid, Copying), "only one claimant wins");
        assert!(t.transition(2, Copying, Valid));
        assert_eq!(t.not_valid(), 2);
        assert_eq!(t.next_invalid(1), Some(3));
        assert_eq!(t.next_invalid(4), Some(0));
        assert_eq!(t.valid_bits().iter_ones().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    #[should_panic(expected = "not in the table")]
    fn illegal_transition_panics() {
        let t = RegionTable::new(&Bits::new(1));
        t.transition(0, Valid, Copying);
    }
}

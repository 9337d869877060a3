//! The shadow model of a disk under `MemDevice`'s crash semantics: for every byte, what a read
//! may legally return. Model-based tests (tests/plain_model.rs, tests/mirror_model.rs) check every
//! read against it; a test in `mem` keeps the device and the model in agreement.

use std::ops::Range;

/// A set of byte values (256 bits).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct ByteSet([u64; 4]);

impl ByteSet {
    fn insert(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] |= 1 << (v & 63);
    }
    fn remove(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] &= !(1 << (v & 63));
    }
    fn contains(&self, v: u8) -> bool {
        self.0[usize::from(v >> 6)] & (1 << (v & 63)) != 0
    }
    fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
    fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
    fn clear(&mut self) {
        self.0 = [0; 4];
    }
}

impl std::fmt::Debug for ByteSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries((0..=255u8).filter(|&v| self.contains(v)).map(|v| format!("{v:#04x}"))).finish()
    }
}

const SHADOW_CHUNK_BYTES: usize = 4096;

/// A write the model has seen since the last flush.
#[derive(Clone)]
struct Logged {
    offset: u64,
    /// None: zeroes.
    data: Option<Vec<u8>>,
    len: u64,
    fua: bool,
}

impl Logged {
    fn value(&self, i: u64) -> u8 {
        self.data.as_ref().map_or(0, |d| d[(i - self.offset) as usize])
    }
    fn range(&self) -> Range<usize> {
        self.offset as usize..(self.offset + self.len) as usize
    }
}

/// Sorted byte offsets → maximal ranges.
fn to_ranges(bytes: Vec<u64>) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for i in bytes {
        match ranges.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => ranges.push(i..i + 1),
        }
    }
    ranges
}

/// The shadow model of a disk under these crash semantics, for model-based tests of anything
/// built on block devices (a volume, the mirror): for every byte, what a read may legally return.
///
/// * While nothing crashes a disk is linearizable: a read returns exactly the last completed write.
/// * A crash may leave a byte with its durable value (last flushed or FUA-written) or with any value
///   written to it since; which one is unknown until a read shows it. What the read saw is then on
///   the media, so it is what the byte holds from then on (a second crash cannot change its mind).
/// * Concurrent overlapping writes leave each byte with one of their values: the byte is contested
///   until a read shows which, and both copies of a mirror must agree on it.
///
/// Bytes that are known cost a memcpy or memcmp per request; only undecided bytes are tracked one
/// by one, so the model stays cheap enough for many seeds in an unoptimised test build.
#[derive(Clone)]
pub struct ShadowDisk {
    /// The value a read must return, where `known`.
    cur: Vec<u8>,
    known: Vec<bool>,
    /// Per 4 KiB chunk: how many of its bytes are not known (lets reads of known data be a memcmp).
    unknown_in_chunk: Vec<u32>,
    /// A value the media holds for the byte as of the last flush (FUA writes update it at once).
    dur: Vec<u8>,
    /// Per chunk, allocated on first use: other values the media may hold for a byte that a crash
    /// left undecided. Empty for every byte that is decided.
    alts: Vec<Option<Box<[ByteSet]>>>,
    /// Writes since the last flush, in order: what a crash may or may not have kept.
    log: Vec<Logged>,
    /// Bytes whose current value is one of a set because overlapping writes raced.
    contested: std::collections::HashMap<u64, ByteSet>,
}

impl ShadowDisk {
    /// A disk whose durable contents are `image`.
    pub fn new(image: Vec<u8>) -> Self {
        let chunks = image.len().div_ceil(SHADOW_CHUNK_BYTES);
        ShadowDisk {
            known: vec![true; image.len()],
            unknown_in_chunk: vec![0; chunks],
            dur: image.clone(),
            cur: image,
            alts: (0..chunks).map(|_| None).collect(),
            log: Vec::new(),
            contested: Default::default(),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.cur.len() as u64
    }

    fn alts_mut(&mut self, i: usize) -> &mut ByteSet {
        let chunk = self.alts[i / SHADOW_CHUNK_BYTES]
            .get_or_insert_with(|| vec![ByteSet::default(); SHADOW_CHUNK_BYTES].into_boxed_slice());
        &mut chunk[i % SHADOW_CHUNK_BYTES]
    }

    fn alts_of(&self, i: usize) -> ByteSet {
        self.alts[i / SHADOW_CHUNK_BYTES].as_ref().map_or_else(ByteSet::default, |c| c[i % SHADOW_CHUNK_BYTES])
    }

    /// Forgets the alternatives of every byte in `r` (they are decided).
    fn clear_alts(&mut self, r: Range<usize>) {
        let mut i = r.start;
        while i < r.end {
            let c = i / SHADOW_CHUNK_BYTES;
            let end = r.end.min((c + 1) * SHADOW_CHUNK_BYTES);
            if let Some(chunk) = self.alts[c].as_mut() {
                chunk[i % SHADOW_CHUNK_BYTES..(end - 1) % SHADOW_CHUNK_BYTES + 1].fill(ByteSet::default());
            }
            i = end;
        }
    }

    fn set_known(&mut self, i: usize, known: bool) {
        if self.known[i] != known {
            self.known[i] = known;
            let n = &mut self.unknown_in_chunk[i / SHADOW_CHUNK_BYTES];
            if known {
                *n -= 1;
            } else {
                *n += 1;
            }
        }
    }

    /// Marks every byte of `r` known, touching one by one only chunks with unknown bytes.
    fn mark_known(&mut self, r: Range<usize>) {
        let mut i = r.start;
        while i < r.end {
            let c = i / SHADOW_CHUNK_BYTES;
            let end = r.end.min((c + 1) * SHADOW_CHUNK_BYTES);
            if self.unknown_in_chunk[c] > 0 {
                for j in i..end {
                    self.set_known(j, true);
                    if !self.contested.is_empty() {
                        self.contested.remove(&(j as u64));
                    }
                }
            }
            i = end;
        }
    }

    fn record(&mut self, entry: Logged) {
        let r = entry.range();
        assert!(r.end <= self.cur.len(), "model write past the end");
        match &entry.data {
            Some(d) => self.cur[r.clone()].copy_from_slice(d),
            None => self.cur[r.clone()].fill(0),
        }
        self.mark_known(r.clone());
        if entry.fua {
            self.dur[r.clone()].copy_from_slice(&self.cur[r.clone()]);
            self.clear_alts(r);
        }
        self.log.push(entry);
    }

    /// An acknowledged write (with FUA: durable at once).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        self.record(Logged { offset, data: Some(data.to_vec()), len: data.len() as u64, fua });
    }

    /// An acknowledged write_zeroes or trim (superdisk zeroes trimmed ranges).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, fua: bool) {
        self.record(Logged { offset, data: None, len, fua });
    }

    /// A write that failed: any byte of it may now hold the new value or what it held before (a
    /// failed write can land in part). Returns the ranges that became uncertain: read them next
    /// (with [`Self::check_read`]) to learn what they hold, and both copies of a mirror must agree.
    pub fn write_failed(&mut self, offset: u64, data: &[u8]) -> Vec<Range<u64>> {
        let r = offset as usize..offset as usize + data.len();
        assert!(r.end <= self.cur.len(), "model write past the end");
        let mut uncertain: Vec<u64> = Vec::new();
        for (k, &v) in data.iter().enumerate() {
            let i = r.start + k;
            let mut set = if self.known[i] {
                let mut one = ByteSet::default();
                one.insert(self.cur[i]);
                one
            } else if let Some(set) = self.contested.get(&(i as u64)) {
                *set
            } else {
                let mut set = self.alts_of(i);
                set.insert(self.dur[i]);
                set
            };
            if set.len() == 1 && set.contains(v) {
                continue;
            }
            set.insert(v);
            self.contested.insert(i as u64, set);
            self.set_known(i, false);
            uncertain.push(i as u64);
        }
        // Whatever landed is unflushed: a crash may keep or drop it.
        self.log.push(Logged { offset, data: Some(data.to_vec()), len: data.len() as u64, fua: false });
        to_ranges(uncertain)
    }

    /// Writes that were in flight together and all acknowledged, none with FUA. Returns the
    /// ranges where they overlap with different data: read them next (with [`Self::check_read`])
    /// to learn which write won.
    pub fn write_racing(&mut self, writes: &[(u64, &[u8])]) -> Vec<Range<u64>> {
        let mut overlaps: Vec<Range<u64>> = Vec::new();
        for (a, (oa, da)) in writes.iter().enumerate() {
            for (ob, db) in &writes[a + 1..] {
                let start = (*oa).max(*ob);
                let end = (oa + da.len() as u64).min(ob + db.len() as u64);
                if start < end {
                    overlaps.push(start..end);
                }
            }
        }
        for (o, d) in writes {
            self.write(*o, d, false);
        }
        let mut contested_bytes: Vec<u64> = Vec::new();
        for r in &overlaps {
            for i in r.clone() {
                let mut set = ByteSet::default();
                for (o, d) in writes {
                    if (*o..o + d.len() as u64).contains(&i) {
                        set.insert(d[(i - o) as usize]);
                    }
                }
                if set.len() >= 2 && self.contested.insert(i, set).is_none() {
                    self.set_known(i as usize, false);
                    contested_bytes.push(i);
                }
            }
        }
        contested_bytes.sort_unstable();
        to_ranges(contested_bytes)
    }

    /// An acknowledged flush: everything written is durable.
    pub fn flush(&mut self) {
        assert!(self.contested.is_empty(), "model: read the contested ranges before the next step");
        // Every logged byte is known (a write makes it so, and only a crash undoes that).
        for entry in std::mem::take(&mut self.log) {
            let r = entry.range();
            self.dur[r.clone()].copy_from_slice(&self.cur[r.clone()]);
            self.clear_alts(r);
        }
    }

    /// Power loss: every byte that may hold something other than its durable value is undecided.
    pub fn crash(&mut self) {
        // A contested byte's candidates are all in the log.
        for i in std::mem::take(&mut self.contested).into_keys() {
            self.set_known(i as usize, true);
        }
        // Replay the log in order: a FUA write supersedes what came before it, as on the device.
        for entry in std::mem::take(&mut self.log) {
            let r = entry.range();
            if entry.fua {
                self.clear_alts(r);
                continue;
            }
            for i in r {
                let v = entry.value(i as u64);
                self.alts_mut(i).insert(v);
            }
        }
        for c in 0..self.alts.len() {
            let Some(mut chunk) = self.alts[c].take() else { continue };
            let mut any = false;
            for (j, set) in chunk.iter_mut().enumerate() {
                if set.is_empty() {
                    continue;
                }
                let i = c * SHADOW_CHUNK_BYTES + j;
                // Rewriting the durable value changes nothing: such a byte is decided.
                set.remove(self.dur[i]);
                if set.is_empty() {
                    self.cur[i] = self.dur[i];
                    self.set_known(i, true);
                } else {
                    self.set_known(i, false);
                    any = true;
                }
            }
            if any {
                self.alts[c] = Some(chunk);
            }
        }
    }

    /// Checks what a read of `offset` returned and learns from it what undecided bytes hold.
    pub fn check_read(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let r = offset as usize..offset as usize + data.len();
        assert!(r.end <= self.cur.len(), "model read past the end");
        let mut bad: Vec<String> = Vec::new();
        let mut bad_count = 0usize;
        let mut i = r.start;
        while i < r.end {
            let c = i / SHADOW_CHUNK_BYTES;
            let end = r.end.min((c + 1) * SHADOW_CHUNK_BYTES);
            let got = &data[i - r.start..end - r.start];
            if self.unknown_in_chunk[c] == 0 && got == &self.cur[i..end] {
                i = end;
                continue;
            }
            for (k, &x) in got.iter().enumerate() {
                let j = i + k;
                let contested = if self.contested.is_empty() { None } else { self.contested.get(&(j as u64)) };
                let legal = if self.known[j] {
                    x == self.cur[j]
                } else if let Some(set) = contested {
                    set.contains(x)
                } else {
                    x == self.dur[j] || self.alts_of(j).contains(x)
                };
                if !legal {
                    bad_count += 1;
                    if bad.len() < 4 {
                        bad.push(format!("byte {j}: read {x:#04x}, legal {}", self.describe(j as u64)));
                    }
                    continue;
                }
                if self.known[j] {
                    continue;
                }
                self.cur[j] = x;
                self.set_known(j, true);
                if self.contested.is_empty() || self.contested.remove(&(j as u64)).is_none() {
                    // Undecided since a crash: the media holds `x`, the only candidate now.
                    self.dur[j] = x;
                    self.alts_mut(j).clear();
                }
            }
            i = end;
        }
        if bad_count > 0 {
            return Err(format!(
                "read of [{offset}, +{}) returned {bad_count} illegal byte(s); first: {}",
                data.len(),
                bad.join("; ")
            ));
        }
        Ok(())
    }

    /// What the model allows for byte `i`, for failure messages.
    pub fn describe(&self, i: u64) -> String {
        let i = i as usize;
        if self.known[i] {
            return format!("exactly {:#04x}", self.cur[i]);
        }
        if let Some(set) = self.contested.get(&(i as u64)) {
            return format!("one of the racing writes' {set:?}");
        }
        let mut set = self.alts_of(i);
        set.insert(self.dur[i]);
        format!("one of {set:?} (undecided since a crash)")
    }

    /// Bytes whose value is not determined (undecided since a crash, or contested).
    pub fn undecided_bytes(&self) -> usize {
        self.unknown_in_chunk.iter().map(|&n| n as usize).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_allows_exactly_what_a_crash_can_leave() {
        let mut m = ShadowDisk::new(vec![0; 8192]);
        m.write(0, &[1; 10], false);
        assert!(m.check_read(0, &[1; 10]).is_ok());
        assert!(m.check_read(0, &[0; 1]).is_err(), "a stale read before any crash is illegal");
        m.flush();
        m.write(0, &[2; 5], false);
        m.write(5, &[3; 5], true);
        m.crash();
        assert_eq!(m.undecided_bytes(), 5);
        // Byte 0: flushed 1 or unflushed 2. Bytes 5..10: FUA 3 only.
        assert!(m.check_read(5, &[1]).is_err(), "a FUA write cannot be lost");
        assert!(m.check_read(0, &[0]).is_err(), "a flushed write cannot be lost");
        assert!(m.check_read(0, &[2, 1, 2]).is_ok());
        assert!(m.check_read(0, &[1]).is_err(), "a byte read after a crash stays what it was read as");
        m.crash();
        assert!(m.check_read(0, &[1]).is_err(), "what a read saw after a crash is on the media");
        assert!(m.check_read(0, &[2, 1, 2, 1, 1, 3]).is_ok(), "bytes 3 and 4 were still undecided");
        assert_eq!(m.undecided_bytes(), 0);
    }

    #[test]
    fn shadow_undecided_bytes_survive_writes_and_flushes_correctly() {
        let mut m = ShadowDisk::new(vec![0; 100]);
        m.write(0, &[9; 4], false);
        m.crash();
        m.write(0, &[7], false); // byte 0 known again, but its media value is 0, 9 or 7
        m.flush(); // now byte 0 is durably 7; bytes 1..4 remain 0-or-9
        assert_eq!(m.undecided_bytes(), 3);
        m.crash();
        assert!(m.check_read(0, &[9]).is_err());
        assert!(m.check_read(0, &[7, 0, 9, 0]).is_ok());
        m.write(50, &[5; 2], false);
        m.write(50, &[5; 2], false);
        m.flush();
        m.crash();
        assert_eq!(m.undecided_bytes(), 0);
    }

    #[test]
    fn shadow_failed_write_leaves_old_or_new_per_byte() {
        let mut m = ShadowDisk::new(vec![0; 100]);
        m.write(0, &[1; 10], false);
        m.flush();
        assert_eq!(m.write_failed(0, &[2, 2, 2, 1, 1]), vec![0..3]);
        assert!(m.check_read(0, &[3]).is_err(), "neither old nor new");
        assert!(m.check_read(0, &[2, 1, 2, 1, 1, 1]).is_ok(), "any mix of old and new bytes");
        assert!(m.check_read(1, &[2]).is_err(), "once read, the byte is what it was read as");
        // The failed write is not durable, and not lost for certain either. (The model does not
        // narrow a byte that read as old to "old" for the crash: lenient, never wrong.)
        m.crash();
        assert_eq!(m.undecided_bytes(), 3);
        assert!(m.check_read(0, &[2, 1, 1]).is_ok());
        // After a crash a failed write over undecided bytes widens their candidates.
        m.write(50, &[5], false);
        m.crash();
        assert_eq!(m.write_failed(50, &[6]), vec![50..51]);
        assert!(m.check_read(50, &[7]).is_err());
        assert!(m.check_read(50, &[0]).is_ok(), "the durable value is still a candidate");
    }

    #[test]
    fn shadow_racing_writes_must_agree_once_read() {
        let mut m = ShadowDisk::new(vec![0; 100]);
        let contested = m.write_racing(&[(0, &[1; 10]), (5, &[2; 10]), (40, &[3; 2]), (41, &[3; 2])]);
        assert_eq!(contested, vec![5..10]);
        assert!(m.check_read(0, &[1; 5]).is_ok());
        assert!(m.check_read(5, &[0]).is_err(), "neither write's value is stale data");
        assert!(m.check_read(5, &[1, 2, 1, 2, 2]).is_ok());
        assert!(m.check_read(5, &[2]).is_err(), "once read, the winner is fixed");
        assert!(m.check_read(10, &[2; 5]).is_ok());
        assert!(m.check_read(40, &[3; 3]).is_ok());
        m.flush();
        m.crash();
        assert_eq!(m.undecided_bytes(), 0);
    }
}

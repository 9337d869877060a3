//! The superblock: 4 KiB, little-endian, CRC32C-protected, two slots at the end of the device.

use std::io;

pub const SUPERBLOCK_BYTES: usize = 4096;
pub const MAGIC: [u8; 8] = *b"SPRDISK\x01";
pub const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DeviceRole {
    Backing = 1,
    Cache = 2,
}

/// Set while a daemon has the device open; a superblock that still has it at start-up means the
/// previous run did not stop cleanly.
pub const FLAG_OPEN: u32 = 1 << 0;
/// Backing only: the write-intent and changed-regions bitmaps have been formatted. `create` leaves
/// the metadata area zeroed and the mirror engine formats the bitmaps on first open; until then a
/// missing bitmap page means "never formatted", afterwards it means "lost" (and is treated as
/// all-dirty).
pub const FLAG_BITMAPS: u32 = 1 << 1;
/// Backing only: a flush or FUA write of the backing failed, so data acknowledged before it may
/// not be durable (see `device::layer::backing_guard::Durability`). Every later start keeps failing client
/// FLUSH and FUA writes until the operator clears it (`superdisk clear-flush-error`): a restart
/// must not turn an error the clients may not have seen yet into a silent loss.
pub const FLAG_FLUSH_FAILED: u32 = 1 << 2;
/// Every flag this version knows; others are refused (a newer superdisk set them).
pub const KNOWN_FLAGS: u32 = FLAG_OPEN | FLAG_BITMAPS | FLAG_FLUSH_FAILED;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub role: DeviceRole,
    /// Bumped on every superblock write; picks the newer slot and orders updates.
    pub generation: u64,
    /// Identifies the exported disk; every device of one superdisk carries the same value.
    pub array_uuid: [u8; 16],
    /// Identifies this device.
    pub device_uuid: [u8; 16],
    pub data_size_bytes: u64,
    /// Size of the device when the superblock was written: a device that shrank is refused.
    pub device_size_bytes: u64,
    pub meta_bytes: u64,
    pub region_bytes: u32,
    pub flags: u32,
    /// Backing: advanced whenever the backing disk may be written without the paired cache set
    /// seeing the write (degraded operation), so that a cache from an older epoch is known to have
    /// missed writes. Cache: the backing epoch this cache was last known to be in sync with.
    pub epoch: u64,
    pub created_unix_s: u64,
    /// Backing: the cache set the changed-regions bitmap is kept for (all zero: none).
    /// Cache: the set this device is a member of (shared by every member of one stripe set).
    pub cache_set_uuid: [u8; 16],
    /// Backing: the changed-regions bitmap records every region written since this epoch while
    /// the paired cache set was away; 0 means the record is missing (any stale cache needs a full
    /// rebuild). Cache: unused (0).
    pub changed_since_epoch: u64,
    /// Backing: the `generation` of the last superblock the mirror engine itself wrote. Anything
    /// else that rewrote the superblock (the plain, cache-less volume) may have written the disk
    /// without recording changed regions, which this mismatch reveals. Cache: unused (0).
    pub mirror_generation: u64,
    /// Cache: size of the exported disk this cache set mirrors (the backing's data_size_bytes).
    /// Backing: unused (0).
    pub array_data_bytes: u64,
    /// Cache: this device's position in the stripe set, and the number of members.
    pub member_index: u32,
    pub member_count: u32,
    /// Cache: the stripe unit of the set (0 for a single member).
    pub stripe_bytes: u32,
    /// Cache: the backing superblock's `generation` when this set last recorded it, after the
    /// backing was made to advance past every write the set may hold (see `mirror::attach`). A
    /// backing whose generation is lower was rolled back (restored from a snapshot): the set is
    /// newer than it. 0: never recorded (a set from before this field). Backing: unused (0).
    pub backing_generation_seen: u64,
}

impl Default for Superblock {
    fn default() -> Self {
        Superblock {
            role: DeviceRole::Backing,
            generation: 0,
            array_uuid: [0; 16],
            device_uuid: [0; 16],
            data_size_bytes: 0,
            device_size_bytes: 0,
            meta_bytes: 0,
            region_bytes: super::DEFAULT_REGION_BYTES,
            flags: 0,
            epoch: 0,
            created_unix_s: 0,
            cache_set_uuid: [0; 16],
            changed_since_epoch: 0,
            mirror_generation: 0,
            array_data_bytes: 0,
            member_index: 0,
            member_count: 0,
            stripe_bytes: 0,
            backing_generation_seen: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuperblockError {
    #[error("no superdisk superblock (magic mismatch)")]
    NoMagic,
    #[error("superblock checksum mismatch (torn or corrupted write)")]
    BadChecksum,
    #[error("superblock version {0} is not supported by this superdisk (expects {VERSION})")]
    UnsupportedVersion(u32),
    #[error("superblock field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

const CRC_OFFSET: usize = SUPERBLOCK_BYTES - 4;
/// Bytes used by the fields; the rest up to the CRC is reserved and written as zeroes.
const ENCODED_FIELDS_BYTES: usize = 164;

impl Superblock {
    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES] {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        let mut w = Writer { buf: &mut b, pos: 0 };
        w.put(&MAGIC);
        w.put(&VERSION.to_le_bytes());
        w.put(&(self.role as u32).to_le_bytes());
        w.put(&self.generation.to_le_bytes());
        w.put(&self.array_uuid);
        w.put(&self.device_uuid);
        w.put(&self.data_size_bytes.to_le_bytes());
        w.put(&self.device_size_bytes.to_le_bytes());
        w.put(&self.meta_bytes.to_le_bytes());
        w.put(&self.region_bytes.to_le_bytes());
        w.put(&self.flags.to_le_bytes());
        w.put(&self.epoch.to_le_bytes());
        w.put(&self.created_unix_s.to_le_bytes());
        w.put(&self.cache_set_uuid);
        w.put(&self.changed_since_epoch.to_le_bytes());
        w.put(&self.mirror_generation.to_le_bytes());
        w.put(&self.array_data_bytes.to_le_bytes());
        w.put(&self.member_index.to_le_bytes());
        w.put(&self.member_count.to_le_bytes());
        w.put(&self.stripe_bytes.to_le_bytes());
        w.put(&self.backing_generation_seen.to_le_bytes());
        debug_assert_eq!(w.pos, ENCODED_FIELDS_BYTES);
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, SuperblockError> {
        if b.len() < SUPERBLOCK_BYTES || b[..8] != MAGIC {
            return Err(SuperblockError::NoMagic);
        }
        let crc = u32::from_le_bytes(b[CRC_OFFSET..SUPERBLOCK_BYTES].try_into().expect("4 bytes"));
        if crc32c::crc32c(&b[..CRC_OFFSET]) != crc {
            return Err(SuperblockError::BadChecksum);
        }
        let mut r = Reader { buf: b, pos: 8 };
        let version = r.u32();
        if version != VERSION {
            return Err(SuperblockError::UnsupportedVersion(version));
        }
        let role = match r.u32() {
            1 => DeviceRole::Backing,
            2 => DeviceRole::Cache,
            other => return Err(SuperblockError::Invalid { field: "role", reason: format!("unknown role {other}") }),
        };
        let sb = Superblock {
            role,
            generation: r.u64(),
            array_uuid: r.array(),
            device_uuid: r.array(),
            data_size_bytes: r.u64(),
            device_size_bytes: r.u64(),
            meta_bytes: r.u64(),
            region_bytes: r.u32(),
            flags: r.u32(),
            epoch: r.u64(),
            created_unix_s: r.u64(),
            cache_set_uuid: r.array(),
            changed_since_epoch: r.u64(),
            mirror_generation: r.u64(),
            array_data_bytes: r.u64(),
            member_index: r.u32(),
            member_count: r.u32(),
            stripe_bytes: r.u32(),
            // Zero in superblocks written before the field existed: the bytes were padding.
            backing_generation_seen: r.u64(),
        };
        debug_assert_eq!(r.pos, ENCODED_FIELDS_BYTES);
        sb.check()?;
        Ok(sb)
    }

    /// What a decoded superblock must satisfy before anything is built on it.
    fn check(&self) -> Result<(), SuperblockError> {
        // Counters this high cannot come from counting (2^63 updates); only corruption or a crafted
        // device gets there, and believing them would overflow the next update.
        for (field, value) in [
            ("generation", self.generation),
            ("epoch", self.epoch),
            ("changed_since_epoch", self.changed_since_epoch),
            ("mirror_generation", self.mirror_generation),
            ("backing_generation_seen", self.backing_generation_seen),
        ] {
            if value >= crate::meta::bitmap::MAX_COUNTER {
                return Err(SuperblockError::Invalid { field, reason: format!("{value} is beyond any real count") });
            }
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(SuperblockError::Invalid {
                field: "flags",
                reason: format!("unknown flags {:#x} (written by a newer superdisk?)", self.flags & !KNOWN_FLAGS),
            });
        }
        if self.role == DeviceRole::Cache {
            if self.member_count == 0 || self.member_index >= self.member_count {
                return Err(SuperblockError::Invalid {
                    field: "member_index",
                    reason: format!("member {} of {}", self.member_index, self.member_count),
                });
            }
            if self.member_count > 1 && (!self.stripe_bytes.is_power_of_two() || self.stripe_bytes < 4096) {
                return Err(SuperblockError::Invalid {
                    field: "stripe_bytes",
                    reason: format!("{} is not a power of two ≥ 4096", self.stripe_bytes),
                });
            }
            if self.array_data_bytes == 0 {
                return Err(SuperblockError::Invalid { field: "array_data_bytes", reason: "zero".into() });
            }
        }
        if !self.region_bytes.is_power_of_two() || self.region_bytes < 4096 {
            return Err(SuperblockError::Invalid {
                field: "region_bytes",
                reason: format!("{} is not a power of two ≥ 4096", self.region_bytes),
            });
        }
        if self.data_size_bytes.checked_add(self.meta_bytes).is_none_or(|end| end > self.device_size_bytes) {
            return Err(SuperblockError::Invalid {
                field: "data_size_bytes",
                reason: "data and metadata do not fit the recorded device size".into(),
            });
        }
        Ok(())
    }

    /// Offsets of the two slots on a device of `device_bytes`.
    pub fn slot_offsets(device_bytes: u64) -> [u64; 2] {
        let s = SUPERBLOCK_BYTES as u64;
        [device_bytes - 2 * s, device_bytes - s]
    }

    /// Picks the newest valid slot. `Err` is the first slot's error when neither is valid (so a
    /// blank device reports NoMagic rather than a checksum error from stale bytes).
    pub fn pick(a: Result<Self, SuperblockError>, b: Result<Self, SuperblockError>) -> Result<Self, SuperblockError> {
        match (a, b) {
            (Ok(x), Ok(y)) => Ok(if y.generation > x.generation { y } else { x }),
            (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
            (Err(SuperblockError::NoMagic), Err(e)) | (Err(e), Err(_)) => Err(e),
        }
    }
}

pub fn to_io(e: SuperblockError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}
impl Writer<'_> {
    fn put(&mut self, v: &[u8]) {
        self.buf[self.pos..self.pos + v.len()].copy_from_slice(v);
        self.pos += v.len();
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}
impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let v: [u8; N] = self.buf[self.pos..self.pos + N].try_into().expect("within superblock");
        self.pos += N;
        v
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

#[cfg(test)]
// Tests build small, known values; a lossy cast there is not a wire or disk bug.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_sb() -> impl Strategy<Value = Superblock> {
        (
            (
                0..crate::meta::bitmap::MAX_COUNTER,
                any::<[u8; 16]>(),
                any::<[u8; 16]>(),
                0u64..1 << 50,
                12u32..30,
                0u32..=KNOWN_FLAGS,
                0..crate::meta::bitmap::MAX_COUNTER,
            ),
            (
                any::<bool>(),
                any::<[u8; 16]>(),
                0..crate::meta::bitmap::MAX_COUNTER,
                0..crate::meta::bitmap::MAX_COUNTER,
                1u64..1 << 50,
                1u32..64,
                12u32..24,
            ),
        )
            .prop_map(
                |((generation, a, d, data, shift, flags, epoch), (cache, set, since, mgen, array, count, stripe))| {
                    Superblock {
                        role: if cache { DeviceRole::Cache } else { DeviceRole::Backing },
                        generation,
                        array_uuid: a,
                        device_uuid: d,
                        data_size_bytes: data,
                        device_size_bytes: data + (8 << 20),
                        meta_bytes: 8 << 20,
                        region_bytes: 1 << shift,
                        flags,
                        epoch,
                        created_unix_s: 1_700_000_000,
                        cache_set_uuid: set,
                        changed_since_epoch: since,
                        mirror_generation: mgen,
                        array_data_bytes: array,
                        member_index: count - 1,
                        member_count: count,
                        stripe_bytes: 1 << stripe,
                        backing_generation_seen: generation / 2,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(sb in arb_sb()) {
            prop_assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
        }

        // Any single corrupted byte is caught (CRC32C detects all single-byte errors).
        #[test]
        fn corruption_is_detected(sb in arb_sb(), at in 8usize..SUPERBLOCK_BYTES, x in 1u8..=255) {
            let mut b = sb.encode();
            b[at] ^= x;
            prop_assert!(Superblock::decode(&b).is_err());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..SUPERBLOCK_BYTES + 8)) {
            let _ = Superblock::decode(&bytes);
        }
    }

    #[test]
    fn newest_valid_slot_wins() {
        let mut a = Superblock::decode(&arb_sb_fixed().encode()).unwrap();
        let mut b = a.clone();
        a.generation = 5;
        b.generation = 6;
        assert_eq!(Superblock::pick(Ok(a.clone()), Ok(b.clone())).unwrap().generation, 6);
        assert_eq!(Superblock::pick(Ok(a.clone()), Err(SuperblockError::BadChecksum)).unwrap().generation, 5);
        assert_eq!(
            Superblock::pick(Err(SuperblockError::NoMagic), Err(SuperblockError::NoMagic)),
            Err(SuperblockError::NoMagic)
        );
    }

    fn arb_sb_fixed() -> Superblock {
        Superblock {
            role: DeviceRole::Backing,
            generation: 1,
            array_uuid: [1; 16],
            device_uuid: [2; 16],
            data_size_bytes: 1 << 30,
            device_size_bytes: (1 << 30) + (1 << 20),
            meta_bytes: 1 << 20,
            region_bytes: 1 << 20,
            flags: 0,
            epoch: 0,
            created_unix_s: 0,
            ..Superblock::default()
        }
    }
}

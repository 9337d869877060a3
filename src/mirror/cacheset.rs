//! A cache set: one or more cache devices striped together, with their metadata.
//!
//! Each member carries, at its tail, a superblock (role Cache) and a full replica of the set's
//! valid-region bitmap. The superblock pairs it with the backing (`array_uuid`), names the set and
//! the member's place in it (`cache_set_uuid`, `member_index`, `member_count`, `stripe_bytes`), and
//! records the backing epoch the set was last in sync with (`epoch`).

use super::region::RegionTable;
use crate::device::layer::striped::Striped;
use crate::device::BlockDevice;
use crate::device::Tripwire;
use crate::meta::store::{inspect_tail, new_uuid, read_superblock, unix_now_s, write_superblock, TailState};
use crate::meta::superblock::DeviceRole;
use crate::meta::{meta_bytes, BitmapKind, Bits, DiskBitmap, MetaLayout, Superblock, SuperblockError};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

struct SetMeta {
    sbs: Vec<Superblock>,
    bitmaps: Vec<DiskBitmap>,
    /// What the valid bitmap on every member says (as far as this process knows).
    persisted: Bits,
}

pub(crate) struct CacheSet<C> {
    pub dev: Striped<C>,
    pub uuid: [u8; 16],
    pub table: RegionTable,
    /// Set when the engine gave up on this set; its results are ignored from then on.
    pub failed: AtomicBool,
    /// Read and write errors seen on this set.
    pub errors: AtomicU64,
    /// Shared by the members' time limits: tripped when one of them timed out, or when the set
    /// is failed, so nothing keeps waiting on it.
    pub wire: Arc<Tripwire>,
    /// A bit per member found slower than the backing (`mirror::slow`): reads touching it go to
    /// the backing.
    pub slow_members: AtomicU64,
    meta: tokio::sync::Mutex<SetMeta>,
}

/// What was found on the devices offered as a cache set.
pub(crate) enum Found<C> {
    /// A complete set of this array, members in stripe order, with the valid bitmap they persist
    /// (the AND of the replicas: a region counts as valid only if every member says so).
    Existing { members: Vec<C>, sbs: Vec<Superblock>, bitmaps: Vec<DiskBitmap>, valid: Bits },
    /// Nothing reusable: the devices must be formatted as a new set. `generations` are the
    /// members' current superblock generations (0 if none), so the new superblock supersedes them.
    Format { members: Vec<C>, generations: Vec<u64>, reason: String },
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Bytes of each member striped into the set, given the export geometry.
pub(crate) fn member_data_bytes(
    member_bytes: u64,
    export_bytes: u64,
    region_bytes: u32,
    n: usize,
    stripe_bytes: u32,
) -> u64 {
    let usable = member_bytes.saturating_sub(meta_bytes(export_bytes, region_bytes));
    let unit = if n > 1 { u64::from(stripe_bytes) } else { 4096 };
    usable / unit * unit
}

/// Checks that `members` can hold the export, and returns each member's data bytes.
pub(crate) fn check_capacity<C: BlockDevice>(members: &[C], bsb: &Superblock, stripe_bytes: u32) -> io::Result<u64> {
    let n = members.len();
    if n > 1 && (!stripe_bytes.is_power_of_two() || stripe_bytes < 4096) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("stripe size {stripe_bytes} must be a power of two ≥ 4096"),
        ));
    }
    let per = members
        .iter()
        .map(|m| member_data_bytes(m.size_bytes(), bsb.data_size_bytes, bsb.region_bytes, n, stripe_bytes))
        .min()
        .unwrap_or(0);
    // Only whole stripes of the smallest member are used, and the set must cover the export.
    let need_per = if n > 1 {
        bsb.data_size_bytes.div_ceil(n as u64).div_ceil(u64::from(stripe_bytes)) * u64::from(stripe_bytes)
    } else {
        bsb.data_size_bytes.div_ceil(4096) * 4096
    };
    if per < need_per {
        let have: u64 = per * n as u64;
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the cache device(s) are too small: the exported disk is {} bytes but {} cache device(s) of {} hold only {} bytes \
                 after their metadata ({} bytes each); each member needs at least {} bytes",
                bsb.data_size_bytes,
                n,
                members.iter().map(|m| m.size_bytes().to_string()).collect::<Vec<_>>().join(" + "),
                have,
                meta_bytes(bsb.data_size_bytes, bsb.region_bytes),
                need_per + meta_bytes(bsb.data_size_bytes, bsb.region_bytes)
            ),
        ));
    }
    Ok(need_per)
}

/// Looks at the devices offered as the cache set of the backing described by `bsb` and tells the
/// start-up cases apart. Refuses (Err) devices that must not be overwritten: a backing device, a
/// cache of another superdisk, or a device holding something else — the last two unless
/// `take_over` (the operator said so).
pub(crate) async fn classify<C: BlockDevice>(
    members: Vec<C>,
    bsb: &Superblock,
    take_over: bool,
) -> io::Result<Found<C>> {
    let n = members.len();
    let mut sbs: Vec<Option<Superblock>> = Vec::with_capacity(n);
    let mut generations = Vec::with_capacity(n);
    let mut format_reason: Option<String> = None;
    for (i, m) in members.iter().enumerate() {
        let (sb, generation, reason) = look_at_member(i, m, bsb, take_over).await?;
        sbs.push(sb);
        generations.push(generation);
        if let Some(r) = reason {
            format_reason.get_or_insert(r);
        }
    }
    if let Some(reason) = format_reason {
        return Ok(Found::Format { members, generations, reason });
    }
    let sbs: Vec<Superblock> = sbs.into_iter().map(|s| s.expect("every member has a superblock")).collect();
    if let Some(reason) = set_mismatch(&sbs, &members, bsb) {
        return Ok(Found::Format { members, generations, reason });
    }
    // Put the members in stripe order, whatever order they were given in.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| sbs[i].member_index);
    let mut slots: Vec<Option<C>> = members.into_iter().map(Some).collect();
    let members: Vec<C> = order.iter().map(|&i| slots[i].take().expect("each member once")).collect();
    let sbs: Vec<Superblock> = order.iter().map(|&i| sbs[i].clone()).collect();
    let (bitmaps, valid) = load_valid(&members, &sbs, bsb).await?;
    Ok(Found::Existing { members, sbs, bitmaps, valid })
}

/// One member: its superblock if it is a usable member of this array's set, its generation, and
/// why the set must be formatted if it must; Err for a device that must not be overwritten.
async fn look_at_member<C: BlockDevice>(
    i: usize,
    m: &C,
    bsb: &Superblock,
    take_over: bool,
) -> io::Result<(Option<Superblock>, u64, Option<String>)> {
    match read_superblock(m).await? {
        Ok(sb) if sb.role == DeviceRole::Backing => Err(invalid_data(format!(
            "cache device #{i} is a superdisk backing device, not a cache; refusing to overwrite it"
        ))),
        Ok(sb) if sb.array_uuid != bsb.array_uuid => {
            if !take_over {
                return Err(invalid_data(format!(
                    "cache device #{i} belongs to another superdisk (array {}); refusing to take it over \
                     (allow it with take_over_foreign_cache / --take-over-cache)",
                    uuid::Uuid::from_bytes(sb.array_uuid)
                )));
            }
            tracing::warn!(member = i, "taking over a cache of another superdisk");
            Ok((None, sb.generation, Some(format!("cache device #{i} belonged to another array"))))
        }
        Ok(sb) => {
            let generation = sb.generation;
            Ok((Some(sb), generation, None))
        }
        Err(SuperblockError::NoMagic) => {
            // No superblock: format only a blank device (a new SSD), never one holding something
            // unknown — unless told to.
            let blank = matches!(inspect_tail(m, bsb.region_bytes).await?, TailState::Blank);
            if !blank && !take_over {
                return Err(invalid_data(format!(
                    "cache device #{i} is not blank and holds no superdisk metadata; it may hold data. Refusing to \
                     overwrite it (allow it with take_over_foreign_cache / --take-over-cache)"
                )));
            }
            Ok((None, 0, Some(format!("cache device #{i} is blank"))))
        }
        Err(SuperblockError::UnsupportedVersion(v)) if !take_over => Err(invalid_data(format!(
            "cache device #{i} has superdisk metadata version {v}, which this version does not know; refusing to \
             overwrite it (allow it with take_over_foreign_cache / --take-over-cache)"
        ))),
        Err(e) => {
            // Our magic but a damaged superblock: the cache is disposable, rebuild it.
            tracing::warn!(member = i, error = %e, "cache superblock damaged; reformatting the cache");
            Ok((None, 0, Some(format!("cache device #{i} has a damaged superblock ({e})"))))
        }
    }
}

/// The members' valid bitmaps, and the regions every one of them calls valid (an unreadable
/// page's regions are not).
async fn load_valid<C: BlockDevice>(
    members: &[C],
    sbs: &[Superblock],
    bsb: &Superblock,
) -> io::Result<(Vec<DiskBitmap>, Bits)> {
    let regions = crate::meta::regions(bsb.data_size_bytes, bsb.region_bytes);
    let mut valid = Bits::new(regions);
    valid.set_all();
    let mut bitmaps = Vec::with_capacity(members.len());
    for (m, sb) in members.iter().zip(sbs) {
        let layout = MetaLayout::new(m.size_bytes(), bsb.data_size_bytes, bsb.region_bytes);
        let mut l = DiskBitmap::load(m, layout, BitmapKind::Valid, sb.device_uuid, regions).await?;
        for &p in &l.missing_pages {
            let mut page = Bits::new(regions);
            page.set_page(p);
            l.bits.and_not(&page);
        }
        valid.and_with(&l.bits);
        bitmaps.push(l.disk);
    }
    Ok((bitmaps, valid))
}

/// Why a group of our own cache superblocks is not one complete, usable set (None if it is).
fn set_mismatch<C: BlockDevice>(sbs: &[Superblock], members: &[C], bsb: &Superblock) -> Option<String> {
    let n = sbs.len();
    let first = &sbs[0];
    let mut seen = vec![false; n];
    for (i, (sb, m)) in sbs.iter().zip(members).enumerate() {
        if sb.cache_set_uuid != first.cache_set_uuid {
            return Some("the cache devices come from different cache sets".into());
        }
        if sb.member_count as usize != n {
            return Some(format!("the cache set had {} member(s), {} given", sb.member_count, n));
        }
        let idx = sb.member_index as usize;
        if idx >= n || seen[idx] {
            return Some("the cache set's member indices are inconsistent".into());
        }
        seen[idx] = true;
        if sb.stripe_bytes != first.stripe_bytes || sb.data_size_bytes != first.data_size_bytes {
            return Some("the cache set's members disagree on their geometry".into());
        }
        if sb.region_bytes != bsb.region_bytes || sb.array_data_bytes != bsb.data_size_bytes {
            return Some("the cache set was made for another geometry of this disk".into());
        }
        if m.size_bytes() < sb.device_size_bytes {
            return Some(format!("cache device #{i} shrank since it was formatted"));
        }
        let layout_ok = sb.data_size_bytes + meta_bytes(bsb.data_size_bytes, bsb.region_bytes) <= m.size_bytes();
        if !layout_ok || sb.data_size_bytes * (n as u64) < bsb.data_size_bytes {
            return Some("the cache set's recorded geometry does not fit".into());
        }
    }
    None
}

impl<C: BlockDevice> CacheSet<C> {
    /// Writes a new set's metadata on `members`: valid bitmap all clear, superblocks naming a new
    /// set, in sync with backing epoch `epoch` (it is: nothing in it is valid).
    pub async fn format(
        members: Vec<C>,
        generations: &[u64],
        bsb: &Superblock,
        stripe_bytes: u32,
        epoch: u64,
        wire: Arc<Tripwire>,
    ) -> io::Result<Self> {
        let n = members.len();
        let per = check_capacity(&members, bsb, stripe_bytes)?;
        let uuid = new_uuid();
        let regions = crate::meta::regions(bsb.data_size_bytes, bsb.region_bytes);
        let none = Bits::new(regions);
        let mut sbs = Vec::with_capacity(n);
        let mut bitmaps = Vec::with_capacity(n);
        for (i, m) in members.iter().enumerate() {
            let sb = Superblock {
                role: DeviceRole::Cache,
                // Above whatever either slot holds, so the new identity wins the slot pick.
                generation: generations[i] + 1,
                array_uuid: bsb.array_uuid,
                device_uuid: new_uuid(),
                data_size_bytes: per,
                device_size_bytes: m.size_bytes(),
                meta_bytes: meta_bytes(bsb.data_size_bytes, bsb.region_bytes),
                region_bytes: bsb.region_bytes,
                flags: 0,
                epoch,
                created_unix_s: unix_now_s(),
                cache_set_uuid: uuid,
                changed_since_epoch: 0,
                mirror_generation: 0,
                array_data_bytes: bsb.data_size_bytes,
                member_index: i as u32,
                member_count: n as u32,
                stripe_bytes: if n > 1 { stripe_bytes } else { 0 },
                // Nothing in a new set is valid yet, so it cannot be newer than the backing.
                backing_generation_seen: bsb.generation,
            };
            // Bitmap first, superblock last: until the superblock lands, the old identity (if any)
            // stays in force, and its bitmap pages no longer match (new owner uuid) — all invalid.
            let layout = MetaLayout::new(m.size_bytes(), bsb.data_size_bytes, bsb.region_bytes);
            bitmaps.push(DiskBitmap::format(m, layout, BitmapKind::Valid, sb.device_uuid, &none).await?);
            write_superblock(m, &sb).await?;
            sbs.push(sb);
        }
        Ok(CacheSet {
            dev: Striped::new(members, per, stripe_bytes),
            uuid,
            table: RegionTable::new(&none),
            failed: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            wire,
            slow_members: AtomicU64::new(0),
            meta: tokio::sync::Mutex::new(SetMeta { sbs, bitmaps, persisted: none }),
        })
    }

    /// An existing set with `valid` as its in-memory valid regions (the persisted ones minus what
    /// start-up invalidated; [`CacheSet::persist_valid`] then writes the difference).
    pub fn existing(
        members: Vec<C>,
        sbs: Vec<Superblock>,
        bitmaps: Vec<DiskBitmap>,
        persisted: Bits,
        valid: &Bits,
        wire: Arc<Tripwire>,
    ) -> Self {
        let first = sbs[0].clone();
        let stripe = if members.len() > 1 { first.stripe_bytes } else { 4096 };
        CacheSet {
            dev: Striped::new(members, first.data_size_bytes, stripe),
            uuid: first.cache_set_uuid,
            table: RegionTable::new(valid),
            failed: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            wire,
            slow_members: AtomicU64::new(0),
            meta: tokio::sync::Mutex::new(SetMeta { sbs, bitmaps, persisted }),
        }
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Persists the valid bitmap: snapshot the Valid regions, flush the cache (so every copy and
    /// write that made a region Valid before the snapshot is durable), then write the pages that
    /// differ on every member (FUA). A region is thus persisted as valid only after its data was
    /// flushed; a region that went invalid is persisted as such by the first call after.
    pub async fn persist_valid(&self) -> io::Result<()> {
        let mut meta = self.meta.lock().await;
        let snap = self.table.valid_bits();
        let pages: Vec<u64> = (0..meta.bitmaps[0].pages())
            .filter(|&p| snap.page_payload_vec(p) != meta.persisted.page_payload_vec(p))
            .collect();
        if pages.is_empty() {
            return Ok(());
        }
        self.dev.flush().await?;
        let SetMeta { bitmaps, persisted, .. } = &mut *meta;
        for (m, bm) in self.dev.members().iter().zip(bitmaps.iter_mut()) {
            bm.store(m, &pages, &snap).await?;
        }
        *persisted = snap;
        Ok(())
    }

    /// Records on every member that the backing has reached `generation`, which the caller made
    /// durable after every write this set may hold: a backing found older later was rolled back.
    pub async fn record_backing_generation(&self, generation: u64) -> io::Result<()> {
        let mut meta = self.meta.lock().await;
        for (m, sb) in self.dev.members().iter().zip(meta.sbs.iter_mut()) {
            if sb.backing_generation_seen < generation {
                let mut next = sb.clone();
                next.backing_generation_seen = generation;
                next.generation += 1;
                write_superblock(m, &next).await?;
                *sb = next;
            }
        }
        Ok(())
    }

    /// Records on every member that the set is in sync with backing epoch `epoch`. Only after the
    /// valid bitmap reflects every region the set missed before that epoch.
    pub async fn set_epoch(&self, epoch: u64) -> io::Result<()> {
        let mut meta = self.meta.lock().await;
        for (m, sb) in self.dev.members().iter().zip(meta.sbs.iter_mut()) {
            if sb.epoch != epoch {
                let mut next = sb.clone();
                next.epoch = epoch;
                next.generation += 1;
                write_superblock(m, &next).await?;
                *sb = next;
            }
        }
        Ok(())
    }
}

//! `superdisk create`: prepare a backing device or image file (metadata at its tail) and,
//! optionally, format cache devices for it. Nothing is written before every device was checked,
//! and a file this call created or extended is put back as it was if a check refuses.

use super::open_device;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use superdisk::daemon::AnyError;
use superdisk::device::{BlockDevice, EngineKind, FileDevice};
use superdisk::meta::store::{self, TailState};
use superdisk::meta::Superblock;
use superdisk::mirror::{self, MirrorOptions};

/// Create-time geometry: recorded on the devices, fixed for their life.
pub struct Geometry {
    pub region_size: u64,
    pub stripe_size: u64,
    pub take_over_cache: bool,
}

impl Geometry {
    fn validate(&self) -> Result<(u32, u32), AnyError> {
        let region =
            u32::try_from(self.region_size).ok().filter(|r| r.is_power_of_two() && (64 << 10..=64 << 20).contains(r));
        let region = region
            .ok_or_else(|| format!("--region-size {}: must be a power of two from 64K to 64M", self.region_size))?;
        let stripe = u32::try_from(self.stripe_size).ok().filter(|s| s.is_power_of_two() && *s >= 4096);
        let stripe = stripe
            .ok_or_else(|| format!("--stripe-size {}: must be a power of two of at least 4K", self.stripe_size))?;
        Ok((region, stripe))
    }
}

/// What this call did to the backing file before any check could refuse: undone on refusal.
#[derive(Default)]
struct FileChange {
    created: bool,
    extended_from: Option<u64>,
}

impl FileChange {
    fn undo(&self, backing: &Path) {
        if self.created {
            let _ = std::fs::remove_file(backing);
        } else if let Some(len) = self.extended_from {
            let _ = std::fs::OpenOptions::new().write(true).open(backing).and_then(|f| f.set_len(len));
        }
    }
}

/// Creates or extends a regular file to hold `export_bytes` plus metadata; never truncates.
fn size_file(backing: &Path, export_bytes: u64, region_bytes: u32) -> Result<FileChange, AnyError> {
    if export_bytes == 0 || export_bytes % 4096 != 0 {
        return Err(format!("--size {export_bytes}: must be a non-zero multiple of 4096").into());
    }
    let want = export_bytes + superdisk::meta::meta_bytes(export_bytes, region_bytes);
    match std::fs::metadata(backing) {
        Ok(m) if m.file_type().is_file() => {
            if m.len() > want {
                return Err(format!(
                    "{}: is {} bytes, larger than --size {} needs ({} with metadata); refusing to truncate it",
                    backing.display(),
                    m.len(),
                    export_bytes,
                    want
                )
                .into());
            }
            if m.len() < want {
                // The old tail may hold data; it becomes part of the export and the new tail is blank.
                std::fs::OpenOptions::new().write(true).open(backing)?.set_len(want)?;
                return Ok(FileChange { created: false, extended_from: Some(m.len()) });
            }
            Ok(FileChange::default())
        }
        Ok(_) => Err(format!("{}: --size only applies to regular files", backing.display()).into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::OpenOptions::new().write(true).create_new(true).open(backing)?.set_len(want)?;
            Ok(FileChange { created: true, extended_from: None })
        }
        Err(e) => Err(format!("{}: {e}", backing.display()).into()),
    }
}

/// The superblock to write, or the one already there (`Ok((sb, true))`: keep it).
async fn decide_tail(
    dev: &FileDevice,
    backing: &Path,
    region_bytes: u32,
    force: bool,
) -> Result<(Superblock, bool), AnyError> {
    let mut sb = store::new_backing_superblock(dev.size_bytes(), region_bytes)?;
    match store::inspect_tail(dev, region_bytes).await? {
        TailState::Ours(old) if !force => {
            println!(
                "{}: already prepared for superdisk (export size {} bytes); keeping it (use --force to reinitialise)",
                backing.display(),
                old.data_size_bytes
            );
            Ok((*old, true))
        }
        TailState::Foreign if !force => Err(format!(
            "{}: the last {} bytes are not blank and hold no superdisk metadata; they may be data. \
             Refusing to overwrite them (use --force if you are sure)",
            backing.display(),
            superdisk::meta::meta_bytes(dev.size_bytes(), region_bytes)
        )
        .into()),
        TailState::Ours(old) => {
            sb.generation = old.generation + 1;
            Ok((sb, false))
        }
        _ => Ok((sb, false)),
    }
}

/// Zeroes the metadata area (stale bitmap bytes must never be read as ours), then writes `sb`.
async fn write_tail(dev: &FileDevice, backing: &Path, sb: &Superblock) -> Result<(), AnyError> {
    let meta_start = sb.data_size_bytes;
    dev.write_zeroes(meta_start, dev.size_bytes() - meta_start, false).await?;
    store::write_superblock(dev, sb).await?;
    dev.flush().await?;
    println!(
        "{}: prepared for superdisk: export size {} bytes ({} MiB), metadata {} bytes at the tail",
        backing.display(),
        sb.data_size_bytes,
        sb.data_size_bytes >> 20,
        dev.size_bytes() - sb.data_size_bytes
    );
    Ok(())
}

pub async fn create(
    backing: &Path,
    size: Option<u64>,
    force: bool,
    caches: &[PathBuf],
    geo: &Geometry,
) -> Result<(), AnyError> {
    let (region_bytes, stripe_bytes) = geo.validate()?;
    // Open every cache before touching anything, so a wrong path fails with nothing written.
    let cache_devs: Vec<Arc<FileDevice>> = caches
        .iter()
        .map(|c| open_device(c, None, EngineKind::Psync).map(Arc::new).map_err(|e| format!("cache: {e}").into()))
        .collect::<Result<_, AnyError>>()?;
    let change = match size {
        Some(export_bytes) => size_file(backing, export_bytes, region_bytes)?,
        None => FileChange::default(),
    };
    let dev = open_device(backing, None, EngineKind::Psync)?;
    let (sb, reuse) = match decide_tail(&dev, backing, region_bytes, force).await {
        Ok(d) => d,
        Err(e) => {
            drop(dev);
            change.undo(backing);
            return Err(e);
        }
    };
    let opts = MirrorOptions {
        region_bytes: sb.region_bytes,
        stripe_bytes,
        take_over_foreign_cache: geo.take_over_cache,
        ..MirrorOptions::default()
    };
    // Refuse an unfit cache before anything is written to any device.
    if let Err(e) = mirror::preflight_cache(&sb, &cache_devs, &opts).await {
        drop(dev);
        change.undo(backing);
        return Err(format!("cache: {e}").into());
    }
    if !reuse {
        write_tail(&dev, backing, &sb).await?;
    }
    if !cache_devs.is_empty() {
        mirror::create_cache(&sb, &cache_devs, &opts).await?;
        println!(
            "cache set ready: {} device(s), stripe {} KiB; the first serve fills it",
            cache_devs.len(),
            stripe_bytes >> 10
        );
    }
    Ok(())
}

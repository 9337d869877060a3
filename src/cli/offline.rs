//! The offline commands that read or edit a stopped daemon's devices: `verify --backing` and
//! `forget-cache`. Each takes the devices' locks, so a running daemon makes them fail instead of
//! racing it.

use super::open_device;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use superdisk::daemon::AnyError;
use superdisk::device::{EngineKind, FileDevice};
use superdisk::meta::store;
use superdisk::mirror;

pub async fn forget_cache(backing: &Path) -> Result<(), AnyError> {
    // The open takes the backing's lock: a running daemon makes this fail instead of racing it.
    let dev = open_device(backing, None, EngineKind::Psync)?;
    let mut sb = store::read_superblock(&dev)
        .await?
        .map_err(|e| format!("{}: {e}: not prepared for superdisk", backing.display()))?;
    // A new epoch with no changed-regions record and no paired set: every cache is judged stale
    // and rebuilt from the backing, whatever its own metadata says.
    sb.cache_set_uuid = [0; 16];
    sb.changed_since_epoch = 0;
    sb.epoch += 1;
    store::update_superblock(&dev, &mut sb).await?;
    println!(
        "{}: unpaired from its cache set (epoch {}); the next serve formats the cache and rebuilds it in full",
        backing.display(),
        sb.epoch
    );
    Ok(())
}

pub async fn verify(backing: &Path, caches: &[PathBuf], repair: bool) -> Result<(), AnyError> {
    let b = Arc::new(open_device(backing, None, EngineKind::Psync)?);
    let cs: Vec<Arc<FileDevice>> =
        caches.iter().map(|c| open_device(c, None, EngineKind::Psync).map(Arc::new)).collect::<Result<_, _>>()?;
    let report = mirror::verify_offline_report(b, cs, repair).await?;
    let (regions, mismatches) = (report.regions_checked, report.mismatches);
    for (offset, length) in &mismatches {
        println!("mismatch offset={offset} length={length}{}", if repair { " (repaired)" } else { "" });
    }
    println!("verify: {regions} regions checked, {} mismatches", mismatches.len());
    if !mismatches.is_empty() && !repair {
        return Err(
            format!("{} mismatching ranges between cache and backing (rerun with --repair)", mismatches.len()).into()
        );
    }
    Ok(())
}

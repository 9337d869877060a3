//! Opening what the config names (or what the previous process handed over) and building the
//! volume on it: plain without a cache, the mirror with one.

use super::handover::Inherited;
use super::node::{self, Node};
use super::run::{self, Inherit};
use super::{AnyError, Dev, Outcome, Reloader};
use crate::config::ServeConfig;
use crate::device::layer::injected_stall::{ReadStall, Stalled};
use crate::device::layer::instrumented::{DeviceStats, Instrumented};
use crate::device::{BlockDevice, FileDevice, OpenFile, OpenOptions};
use crate::mirror::{MirrorOptions, MirrorVolume};
use crate::server::stats::ServerStats;
use crate::volume::{PlainVolume, Volume};
use std::path::PathBuf;
use std::sync::Arc;

/// Wraps `dev` in its counters, with the read stall `SUPERDISK_INJECT_READ_STALL` names for it.
fn instrument(name: &str, dev: FileDevice) -> Result<(Dev, Arc<DeviceStats>), AnyError> {
    let stats = Arc::new(DeviceStats::new(name, &dev.path().display().to_string(), dev.size_bytes()));
    let mut stall = None;
    if let Some(spec) = std::env::var(ReadStall::ENV).ok().filter(|s| !s.is_empty()) {
        let (target, s) = ReadStall::parse(&spec)?;
        if target == name {
            tracing::warn!(device = name, spec = %spec, "INJECTING READ STALLS (benchmark/test only)");
            stall = Some(Arc::new(s));
        }
    }
    Ok((Instrumented::new(Stalled::new(dev, stall), stats.clone()), stats))
}

/// Opens `path`, or adopts the descriptor the previous process handed over for it.
fn open_or_adopt(path: &std::path::Path, handed: Option<OpenFile>, opts: &OpenOptions) -> std::io::Result<FileDevice> {
    match handed {
        Some(f) => FileDevice::adopt(path, f.fd, opts),
        None => FileDevice::open(path, opts),
    }
}

/// Opens the devices, builds the volume and serves it until a stop or a handover.
pub(super) async fn serve_once(
    cfg: ServeConfig,
    reload: Option<Reloader>,
    stdio: bool,
    inherited: Option<Inherited>,
    on_ready: impl FnOnce(&[String]),
) -> Result<Outcome, AnyError> {
    // Before any device opens: the first io_uring engine creates the arena with this size.
    if !crate::device::buf::set_registered_buffer_bytes(cfg.registered_buffer_bytes) {
        tracing::debug!("registered-buffer arena already exists (an earlier serve in this process); keeping its size");
    }
    let (handed_backing, handed_caches, inherit) = match inherited {
        Some(i) => split_inherited(i, &cfg)?,
        None => (None, None, Inherit::default()),
    };
    // With a mirror the daemon writes metadata to the backing even for a read-only export.
    let backing_read_only = cfg.read_only && cfg.cache.is_empty() && handed_caches.is_none();
    let opts = OpenOptions { read_only: backing_read_only, direct: cfg.direct, engine: cfg.io_engine };
    let dev = open_or_adopt(&cfg.backing, handed_backing, &opts).map_err(|e| e.to_string())?;
    tracing::info!(
        backing = %cfg.backing.display(),
        engine = dev.engine_name(),
        registered_buffers = dev.registered_buffers(),
        direct = dev.is_direct(),
        block_device = dev.is_block_device(),
        "opened backing device"
    );
    let backing_file = OpenFile { path: cfg.backing.clone(), fd: dev.dup_fd()? };
    let rotational = dev.rotational();
    let (dev, backing_stats) = instrument("backing", dev)?;
    let server_stats = Arc::new(ServerStats::default());
    let node = |volume: node::VolumeRef, caches: Vec<Arc<DeviceStats>>, size: u64, cfg: &ServeConfig| {
        let parts = node::Parts { backing: backing_stats.clone(), server: server_stats.clone(), caches };
        Arc::new(Node::new(volume, parts, size, cfg.clone(), reload))
    };
    let base = run::Base { cfg: &cfg, rotational, stdio, inherit, backing_file };
    if cfg.cache.is_empty() && handed_caches.is_none() {
        let volume = PlainVolume::open_with_policy(dev, cfg.read_only, cfg.backing_io.clone())
            .await
            .map_err(|e| format!("{}: {e}", cfg.backing.display()))?;
        if volume.recovered_from_crash {
            tracing::warn!("the previous run did not shut down cleanly");
        }
        let volume = Arc::new(volume);
        let node = node(node::VolumeRef::Plain(volume.clone()), Vec::new(), volume.size_bytes(), &cfg);
        return run::run(volume, node, base, on_ready).await;
    }
    let (caches, members) = open_cache_set(&cfg, handed_caches);
    let opts = MirrorOptions {
        tunables: cfg.tunables.clone(),
        take_over_foreign_cache: cfg.take_over_foreign_cache,
        metadata_interval_ms: cfg.metadata_interval_ms,
        backing_io: cfg.backing_io.clone(),
        ..MirrorOptions::default()
    };
    let volume =
        Arc::new(MirrorVolume::open(dev, caches, opts).await.map_err(|e| format!("{}: {e}", cfg.backing.display()))?);
    let node = node(node::VolumeRef::Mirror(volume.clone()), members, volume.size_bytes(), &cfg);
    run::run(volume, node, base, on_ready).await
}

type HandedFiles = (Option<OpenFile>, Option<Vec<OpenFile>>, Inherit);

/// The devices the previous process handed over, apart from the sockets; refused if its backing
/// is not the one this configuration names.
fn split_inherited(i: Inherited, cfg: &ServeConfig) -> Result<HandedFiles, AnyError> {
    if i.backing.path != cfg.backing {
        return Err(format!(
            "the running daemon serves {} and this configuration names {}",
            i.backing.path.display(),
            cfg.backing.display()
        )
        .into());
    }
    let inherit = Inherit {
        nbd_tcp: i.nbd_tcp,
        nbd_unix: i.nbd_unix,
        admin: i.admin,
        metrics: i.metrics,
        connections: i.connections,
    };
    Ok((Some(i.backing), i.caches, inherit))
}

/// The cache set: the members handed over, or those the config names. A missing SSD (a migrated
/// VM, a dead device) must not stop the disk: the set is left out and the mirror serves degraded.
fn open_cache_set(cfg: &ServeConfig, handed: Option<Vec<OpenFile>>) -> (Vec<Dev>, Vec<Arc<DeviceStats>>) {
    let opened = match handed {
        Some(files) => adopt_caches(files, cfg),
        None => open_caches(&cfg.cache, cfg),
    };
    opened.unwrap_or_else(|e| {
        tracing::error!(error = %e, "cache device unavailable; the whole cache set is left out");
        (Vec::new(), Vec::new())
    })
}

fn adopt_caches(files: Vec<OpenFile>, cfg: &ServeConfig) -> Result<(Vec<Dev>, Vec<Arc<DeviceStats>>), AnyError> {
    let opts = OpenOptions { read_only: false, direct: cfg.cache_direct, engine: cfg.io_engine };
    let mut devs = Vec::new();
    let mut members = Vec::new();
    for (i, f) in files.into_iter().enumerate() {
        let path: PathBuf = f.path.clone();
        let d = FileDevice::adopt(&path, f.fd, &opts).map_err(|e| format!("cache {}: {e}", path.display()))?;
        let (d, s) = instrument(&format!("cache{i}"), d)?;
        members.push(s);
        devs.push(d);
    }
    Ok((devs, members))
}

/// Opens cache devices as the config says (O_DIRECT, engine), each counted under `cacheN`.
pub fn open_caches(
    paths: &[std::path::PathBuf],
    cfg: &ServeConfig,
) -> Result<(Vec<Dev>, Vec<Arc<DeviceStats>>), AnyError> {
    let mut devs = Vec::new();
    let mut members = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let d =
            FileDevice::open(path, &OpenOptions { read_only: false, direct: cfg.cache_direct, engine: cfg.io_engine })
                .map_err(|e| format!("cache {}: {e}", path.display()))?;
        tracing::info!(
            cache = %path.display(),
            engine = d.engine_name(),
            registered_buffers = d.registered_buffers(),
            direct = d.is_direct(),
            "opened cache device"
        );
        let (d, s) = instrument(&format!("cache{i}"), d)?;
        members.push(s);
        devs.push(d);
    }
    Ok((devs, members))
}

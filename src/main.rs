//! The `superdisk` command: create, serve, demo.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use superdisk::admin::{AdminOps, BoxFuture};
use superdisk::config::{parse_size, FileConfig, ServeConfig};
use superdisk::device::{BlockDevice, EngineKind, FileDevice, OpenOptions};
use superdisk::meta::store::{self, TailState};
use superdisk::mirror::{self, MirrorOptions, MirrorVolume, Mode};
use superdisk::nbd::ExportParams;
use superdisk::server::{self, ServerConfig};
use superdisk::service::Notifier;
use superdisk::volume::{PlainVolume, Volume};

#[derive(Parser)]
#[command(
    name = "superdisk",
    version,
    about = "Serve a disk over NBD: reads from a local-SSD mirror, writes through to a durable network disk"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare a backing device or image file (metadata goes at its tail).
    Create {
        #[arg(long)]
        backing: PathBuf,
        /// Size of the exported disk; creates or extends a regular file to hold it plus metadata.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Overwrite a tail that holds something other than superdisk metadata.
        #[arg(long)]
        force: bool,
        /// A local SSD (device or file) to hold the mirror; repeat to stripe several.
        #[arg(long)]
        cache: Vec<PathBuf>,
        /// Unit of the valid and write-intent bitmaps (a power of two, 64K..=64M).
        #[arg(long, value_parser = parse_size, default_value = "1M")]
        region_size: u64,
        /// Stripe unit across several caches (a power of two ≥ 4K).
        #[arg(long, value_parser = parse_size, default_value = "512K")]
        stripe_size: u64,
        /// Format caches that belong to another superdisk or hold unknown data.
        #[arg(long)]
        take_over_cache: bool,
    },
    /// Compare the cache with the backing for every region the cache calls valid: offline
    /// (--backing and --cache, daemon stopped) or inside a running daemon (--socket).
    Verify {
        #[arg(long, required_unless_present = "socket", requires = "cache")]
        backing: Option<PathBuf>,
        #[arg(long)]
        cache: Vec<PathBuf>,
        /// The running daemon's admin socket (its `admin_socket` setting).
        #[arg(long, conflicts_with_all = ["backing", "cache"])]
        socket: Option<PathBuf>,
        /// Rewrite mismatching ranges from the backing.
        #[arg(long)]
        repair: bool,
    },
    /// Serve the disk over NBD.
    Serve(ServeArgs),
    /// Create demo images in DIR (default ./superdisk-demo) and serve them.
    Demo {
        dir: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        #[arg(long, value_parser = parse_size, default_value = "1G")]
        size: u64,
        /// Serve without a cache (backing only).
        #[arg(long)]
        no_cache: bool,
    },
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// TOML configuration file; flags given here override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    backing: Option<PathBuf>,
    /// TCP address (HOST:PORT; "" disables TCP). Default 127.0.0.1:10809.
    #[arg(long)]
    listen: Option<String>,
    /// Also listen on this Unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Export name (the empty name also selects it).
    #[arg(long)]
    export: Option<String>,
    #[arg(long)]
    read_only: bool,
    /// I/O engine: uring (default, falls back to psync) or psync.
    #[arg(long)]
    io_engine: Option<String>,
    /// O_DIRECT on the backing (default: on for block devices, off for files).
    #[arg(long)]
    direct: Option<bool>,
    #[arg(long)]
    log_level: Option<String>,
    /// A local SSD holding the mirror; repeat to stripe several.
    #[arg(long)]
    cache: Vec<PathBuf>,
    /// Format a cache that belongs to another superdisk (or holds unknown data) and rebuild it.
    #[arg(long)]
    take_over_cache: bool,
    /// Local control socket (mode 0600), e.g. for `superdisk verify --socket`.
    #[arg(long)]
    admin_socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Create { backing, size, force, cache, region_size, stripe_size, take_over_cache } => {
            init_logging("info");
            let geometry = Geometry { region_size, stripe_size, take_over_cache };
            runtime().and_then(|rt| rt.block_on(create(&backing, size, force, &cache, &geometry)))
        }
        Command::Verify { backing, cache, socket, repair } => {
            init_logging("info");
            runtime().and_then(|rt| {
                rt.block_on(async {
                    match (socket, backing) {
                        (Some(sock), _) => verify_online(&sock, repair).await,
                        (None, Some(b)) => verify(&b, &cache, repair).await,
                        (None, None) => Err("give --socket, or --backing with --cache".into()),
                    }
                })
            })
        }
        Command::Serve(args) => serve_cmd(args),
        Command::Demo { dir, listen, size, no_cache } => demo(dir, listen, size, no_cache),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("superdisk: error: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

fn runtime() -> Result<tokio::runtime::Runtime, AnyError> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("superdisk").build()?)
}

fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SUPERDISK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("superdisk={level},warn")));
    // One line per event; colour only on a terminal (journald and log files get plain text).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Create-time geometry: recorded on the devices, fixed for their life.
struct Geometry {
    region_size: u64,
    stripe_size: u64,
    take_over_cache: bool,
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

fn open_device(path: &Path, direct: Option<bool>, engine: EngineKind) -> Result<FileDevice, AnyError> {
    Ok(FileDevice::open(path, &OpenOptions { read_only: false, direct, engine })?)
}

async fn create(
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
    // What this call did to the backing file before any check could refuse: undone on refusal.
    let mut created_file = false;
    let mut extended_from: Option<u64> = None;
    if let Some(export_bytes) = size {
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
                    extended_from = Some(m.len());
                }
            }
            Ok(_) => return Err(format!("{}: --size only applies to regular files", backing.display()).into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::OpenOptions::new().write(true).create_new(true).open(backing)?.set_len(want)?;
                created_file = true;
            }
            Err(e) => return Err(format!("{}: {e}", backing.display()).into()),
        }
    }
    let dev = open_device(backing, None, EngineKind::Psync)?;
    let mut sb = store::new_backing_superblock(dev.size_bytes(), region_bytes)?;
    let reuse = match store::inspect_tail(&dev, region_bytes).await? {
        TailState::Ours(old) if !force => {
            println!(
                "{}: already prepared for superdisk (export size {} bytes); keeping it (use --force to reinitialise)",
                backing.display(),
                old.data_size_bytes
            );
            sb = *old;
            true
        }
        TailState::Foreign if !force => {
            return Err(format!(
                "{}: the last {} bytes are not blank and hold no superdisk metadata; they may be data. \
                 Refusing to overwrite them (use --force if you are sure)",
                backing.display(),
                superdisk::meta::meta_bytes(dev.size_bytes(), region_bytes)
            )
            .into());
        }
        TailState::Ours(old) => {
            sb.generation = old.generation + 1;
            false
        }
        _ => false,
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
        if created_file {
            let _ = std::fs::remove_file(backing);
        } else if let Some(len) = extended_from {
            let _ = std::fs::OpenOptions::new().write(true).open(backing).and_then(|f| f.set_len(len));
        }
        return Err(format!("cache: {e}").into());
    }
    if !reuse {
        // Zero the metadata area first: stale bitmap bytes must never be read as ours.
        let meta_start = sb.data_size_bytes;
        dev.write_zeroes(meta_start, dev.size_bytes() - meta_start, false).await?;
        store::write_superblock(&dev, &sb).await?;
        dev.flush().await?;
        println!(
            "{}: prepared for superdisk: export size {} bytes ({} MiB), metadata {} bytes at the tail",
            backing.display(),
            sb.data_size_bytes,
            sb.data_size_bytes >> 20,
            dev.size_bytes() - sb.data_size_bytes
        );
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

async fn verify_online(socket: &Path, repair: bool) -> Result<(), AnyError> {
    let lines = superdisk::admin::request(socket, if repair { "verify repair" } else { "verify" }).await?;
    let last = lines.last().cloned().unwrap_or_default();
    let mismatches = lines.iter().filter(|l| l.starts_with("mismatch")).count();
    for l in lines.iter().filter(|l| l.starts_with("mismatch")) {
        println!("{l}");
    }
    if let Some(err) = last.strip_prefix("error ") {
        return Err(format!("daemon: {err}").into());
    }
    println!("verify: {mismatches} mismatches (checked by the running daemon)");
    if mismatches > 0 && !repair {
        return Err(format!("{mismatches} mismatching ranges between cache and backing (rerun with --repair)").into());
    }
    Ok(())
}

async fn verify(backing: &Path, caches: &[PathBuf], repair: bool) -> Result<(), AnyError> {
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

fn serve_cmd(args: ServeArgs) -> Result<(), AnyError> {
    let mut f = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    if args.backing.is_some() {
        f.backing = args.backing;
    }
    if args.listen.is_some() {
        f.listen = args.listen;
    }
    if args.unix.is_some() {
        f.unix = args.unix;
    }
    if args.export.is_some() {
        f.export = args.export;
    }
    if args.read_only {
        f.read_only = Some(true);
    }
    if args.io_engine.is_some() {
        f.io_engine = args.io_engine;
    }
    if args.direct.is_some() {
        f.direct = args.direct;
    }
    if args.log_level.is_some() {
        f.log_level = args.log_level;
    }
    if !args.cache.is_empty() {
        f.cache = Some(args.cache);
    }
    if args.take_over_cache {
        f.take_over_foreign_cache = Some(true);
    }
    if args.admin_socket.is_some() {
        f.admin_socket = args.admin_socket;
    }
    let cfg = ServeConfig::from_file_config(f)?;
    init_logging(&cfg.log_level);
    runtime()?.block_on(serve(cfg, |_| {}))
}

async fn serve(cfg: ServeConfig, on_ready: impl FnOnce(&[String])) -> Result<(), AnyError> {
    // With a mirror the daemon writes metadata to the backing even for a read-only export.
    let backing_read_only = cfg.read_only && cfg.cache.is_empty();
    let dev = FileDevice::open(
        &cfg.backing,
        &OpenOptions { read_only: backing_read_only, direct: cfg.direct, engine: cfg.io_engine },
    )?;
    tracing::info!(
        backing = %cfg.backing.display(),
        engine = dev.engine_name(),
        direct = dev.is_direct(),
        block_device = dev.is_block_device(),
        "opened backing device"
    );
    let rotational = dev.rotational();
    if cfg.cache.is_empty() {
        let volume =
            PlainVolume::open(dev, cfg.read_only).await.map_err(|e| format!("{}: {e}", cfg.backing.display()))?;
        if volume.recovered_from_crash {
            tracing::warn!("the previous run did not shut down cleanly");
        }
        return serve_volume(Arc::new(volume), Arc::new(PlainAdmin), &cfg, rotational, on_ready, |_| None).await;
    }
    let mut caches = Vec::new();
    for path in &cfg.cache {
        // A missing SSD (a migrated VM, a dead device) must not stop the disk: serve degraded.
        match FileDevice::open(path, &OpenOptions { read_only: false, direct: cfg.cache_direct, engine: cfg.io_engine })
        {
            Ok(c) => caches.push(c),
            Err(e) => {
                tracing::error!(cache = %path.display(), error = %e, "cache device unavailable; the whole cache set is left out");
                caches.clear();
                break;
            }
        }
    }
    let opts = MirrorOptions {
        read_error_budget: cfg.read_error_budget,
        rebuild_min_bytes_per_s: cfg.rebuild_min_bytes_per_s,
        rebuild_max_bytes_per_s: cfg.rebuild_max_bytes_per_s,
        take_over_foreign_cache: cfg.take_over_foreign_cache,
        metadata_interval_ms: cfg.metadata_interval_ms,
        ..MirrorOptions::default()
    };
    let volume =
        Arc::new(MirrorVolume::open(dev, caches, opts).await.map_err(|e| format!("{}: {e}", cfg.backing.display()))?);
    let watched = volume.clone();
    let admin = Arc::new(MirrorAdmin(volume.clone()));
    serve_volume(volume, admin, &cfg, rotational, on_ready, move |last| {
        let mode = watched.mode();
        (Some(mode) != last).then_some(mode)
    })
    .await
}

struct PlainAdmin;

impl AdminOps for PlainAdmin {
    fn status(&self) -> String {
        "mode=plain (no cache configured)".into()
    }
    fn verify(&self, _repair: bool) -> BoxFuture<std::io::Result<Vec<(u64, u64)>>> {
        Box::pin(async { Err(std::io::Error::other("no cache device is configured: nothing to verify")) })
    }
}

struct MirrorAdmin(Arc<MirrorVolume<FileDevice, FileDevice>>);

impl AdminOps for MirrorAdmin {
    fn status(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let st = self.0.stats();
        format!(
            "mode={} reads_cache={} reads_backing={} repairs={} cache_errors={}",
            mode_name(self.0.mode()),
            st.reads_cache.load(Relaxed),
            st.reads_backing.load(Relaxed),
            st.repairs.load(Relaxed),
            st.cache_errors.load(Relaxed)
        )
    }
    fn verify(&self, repair: bool) -> BoxFuture<std::io::Result<Vec<(u64, u64)>>> {
        let v = self.0.clone();
        Box::pin(async move { v.verify(repair).await })
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Healthy => "healthy",
        Mode::Degraded => "degraded",
        Mode::Rebuilding => "rebuilding",
    }
}

/// Runs the NBD server over `volume` until SIGTERM/SIGINT, then flushes it. `mode_changed` is
/// polled to log mirror mode changes (None: unchanged, or no mirror).
async fn serve_volume<V: Volume>(
    volume: Arc<V>,
    admin: Arc<dyn AdminOps>,
    cfg: &ServeConfig,
    rotational: bool,
    on_ready: impl FnOnce(&[String]),
    mut mode_changed: impl FnMut(Option<Mode>) -> Option<Mode> + Send + 'static,
) -> Result<(), AnyError> {
    let export = ExportParams {
        name: cfg.export.clone(),
        description: cfg.description.clone(),
        size_bytes: volume.size_bytes(),
        read_only: cfg.read_only,
        fast_zero: volume.fast_zero(),
        rotational,
        min_block_bytes: 1,
        preferred_block_bytes: 4096,
        max_payload_bytes: 32 << 20,
    };
    let server_cfg = ServerConfig {
        listen: cfg.listen,
        unix: cfg.unix.clone(),
        unix_mode: cfg.unix_mode,
        export,
        max_connections: cfg.max_connections,
        max_inflight_bytes_per_connection: cfg.max_inflight_bytes_per_connection,
        handshake_timeout: std::time::Duration::from_secs(cfg.handshake_timeout_secs),
        idle_timeout: std::time::Duration::from_secs(cfg.idle_timeout_secs),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Install the handlers now, before READY=1: a SIGTERM that arrives between READY and the
    // first poll of a spawned task must still drain, not kill the process.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        tracing::info!(signal = name, "shutting down: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let notifier = Arc::new(Notifier::from_env());
    let mut stop_watch = stop_rx.clone();
    let n = notifier.clone();
    tokio::spawn(async move {
        let mut last: Option<Mode> = None;
        // The watchdog keep-alive comes from this task, so a wedged runtime stops it and systemd
        // restarts the daemon.
        let watchdog = Notifier::watchdog_interval();
        let tick = watchdog.unwrap_or(std::time::Duration::from_millis(250)).min(std::time::Duration::from_millis(250));
        loop {
            if let Some(mode) = mode_changed(last) {
                if last == Some(Mode::Rebuilding) && mode == Mode::Healthy {
                    tracing::info!("rebuild complete");
                }
                tracing::info!("mode={}", mode_name(mode));
                n.notify(&format!("STATUS=serving, mode {}", mode_name(mode)));
                last = Some(mode);
            }
            if watchdog.is_some() {
                n.notify("WATCHDOG=1");
            }
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop_watch.changed() => return,
            }
        }
    });
    if let Some(path) = cfg.admin_socket.clone() {
        let listener = superdisk::admin::bind(&path)?;
        let admin_task = superdisk::admin::serve_admin(listener, path, admin, stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = admin_task.await {
                tracing::error!(error = %e, "admin socket failed");
            }
        });
    }
    let ready_notifier = notifier.clone();
    server::run(volume.clone(), server_cfg, stop_rx, |endpoints| {
        // READY only now: recovery (superblock, bitmaps) is done and every listener is bound.
        ready_notifier.notify(&format!("READY=1\nSTATUS=serving on {}", endpoints.join(", ")));
        on_ready(endpoints)
    })
    .await?;
    if let Some(path) = &cfg.admin_socket {
        // The admin task also removes it, but the process may exit before that task runs.
        let _ = std::fs::remove_file(path);
    }
    notifier.notify("STOPPING=1\nSTATUS=flushing");
    volume.shutdown().await.map_err(|e| format!("flush at shutdown failed: {e}"))?;
    tracing::info!("flushed; clean shutdown recorded");
    Ok(())
}

fn demo(dir: Option<PathBuf>, listen: String, size: u64, no_cache: bool) -> Result<(), AnyError> {
    init_logging("info");
    let dir = dir.unwrap_or_else(|| PathBuf::from("superdisk-demo"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let backing = dir.join("backing.img");
    let cache = dir.join("cache.img");
    let caches = if no_cache { vec![] } else { vec![cache.clone()] };
    if !no_cache && !cache.exists() {
        // The cache needs room for the export plus its own metadata; a sparse file costs nothing.
        let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&cache)?;
        f.set_len(size + 2 * superdisk::meta::meta_bytes(size, superdisk::meta::DEFAULT_REGION_BYTES))?;
    }
    let rt = runtime()?;
    let geo = Geometry {
        region_size: superdisk::meta::DEFAULT_REGION_BYTES.into(),
        stripe_size: 512 << 10,
        take_over_cache: false,
    };
    rt.block_on(create(&backing, if backing.exists() { None } else { Some(size) }, false, &caches, &geo))?;
    let cfg = ServeConfig::from_file_config(FileConfig {
        backing: Some(backing.clone()),
        listen: Some(listen),
        cache: Some(caches),
        ..Default::default()
    })?;
    rt.block_on(serve(cfg, |endpoints| {
        let uri = endpoints.first().cloned().unwrap_or_default();
        println!("\nsuperdisk demo is serving {} — try, from another terminal:", dir.display());
        println!("  nbdinfo {uri}");
        println!("  nbdinfo --map {uri}");
        println!("  mkdir -p /tmp/sd && nbdfuse /tmp/sd/disk {uri} &   # then: losetup -f --show /tmp/sd/disk");
        println!(
            "  fio --name=demo --ioengine=nbd --uri={uri} --rw=randrw --bs=4k --iodepth=16 --size=64M --verify=crc32c"
        );
        println!("Stop with Ctrl-C (SIGINT) or SIGTERM; it drains, flushes and exits 0.\n");
    }))
}

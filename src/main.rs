//! The `superdisk` command: create, serve, demo.

mod ctl;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use superdisk::config::{parse_size, BoolOrWord, ByteSize, FileConfig, ServeConfig};
use superdisk::daemon::{self, AnyError};
use superdisk::device::{BlockDevice, EngineKind, FileDevice, OpenOptions};
use superdisk::meta::store::{self, TailState};
use superdisk::mirror::{self, MirrorOptions};

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
        #[arg(long, required_unless_present_any = ["socket", "instance"], requires = "cache")]
        backing: Option<PathBuf>,
        #[arg(long)]
        cache: Vec<PathBuf>,
        /// The running daemon's admin socket (its `admin_socket` setting).
        #[arg(long, conflicts_with_all = ["backing", "cache"])]
        socket: Option<PathBuf>,
        /// The running daemon by systemd instance name (/run/superdisk/NAME/admin.sock).
        #[arg(long, short = 'i', conflicts_with_all = ["backing", "cache", "socket"])]
        instance: Option<String>,
        /// Rewrite mismatching ranges from the backing.
        #[arg(long)]
        repair: bool,
        /// Online: wait for the result, showing progress (otherwise it runs in the background).
        #[arg(long)]
        wait: bool,
    },
    /// Unpair the backing from its cache set (daemon stopped): the next serve formats the cache
    /// and rebuilds it in full. Run it after the backing was written without superdisk (a
    /// read-write emergency mount) or restored from a snapshot, so no cache can serve old data.
    ForgetCache {
        #[arg(long)]
        backing: PathBuf,
    },
    /// Show the running daemon's mode, devices, rates, latencies, rebuild and connections.
    Status {
        #[command(flatten)]
        target: ctl::Target,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Pause, resume or pace the running daemon's cache rebuild.
    Rebuild {
        #[command(flatten)]
        target: ctl::Target,
        #[command(subcommand)]
        action: RebuildAction,
    },
    /// Fail, remove, add or replace the running daemon's cache SSD(s) while the disk stays online.
    Cache {
        #[command(flatten)]
        target: ctl::Target,
        #[command(subcommand)]
        action: CacheAction,
    },
    /// After a backing flush (or FUA write) failed: acknowledge it, once the filesystem on top
    /// has been checked. The daemon re-reads what the backing really holds, resyncs every region
    /// written since the last good flush, and lets FLUSH and FUA writes succeed again.
    ClearFlushError {
        #[command(flatten)]
        target: ctl::Target,
    },
    /// Serve the disk over NBD (boxed: its flags outweigh every other command).
    Serve(Box<ServeArgs>),
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

#[derive(Subcommand)]
enum RebuildAction {
    /// Freeze the copy; invalid regions keep being read from the backing.
    Pause,
    Resume,
    /// Set the rate limits, e.g. `rate 50M` or `rate 50M 500M` (bytes per second).
    Rate {
        /// While clients are busy (md's speed_limit_min).
        min: String,
        /// While idle (md's speed_limit_max); `unlimited` allowed.
        max: Option<String>,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Drop the cache set now, as if it had failed; the disk is served from the backing.
    Fail,
    /// Save the set's progress and release its devices (before pulling an SSD).
    Remove,
    /// Attach a cache set while none is attached; it is rebuilt in the background.
    Add {
        #[arg(required = true)]
        devices: Vec<PathBuf>,
        /// Format devices that belong to another superdisk or hold unknown data.
        #[arg(long)]
        take_over: bool,
    },
    /// Swap the attached set for another while serving.
    Replace {
        #[arg(required = true)]
        devices: Vec<PathBuf>,
        #[arg(long)]
        take_over: bool,
    },
}

#[derive(clap::Args, Default, Clone)]
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
    /// Memory registered with io_uring as fixed buffers, e.g. 36M; 0 turns them off (config key
    /// registered_buffer_bytes).
    #[arg(long, value_parser = parse_size)]
    registered_buffer_bytes: Option<u64>,
    /// O_DIRECT on the backing (default: on for block devices, off for files).
    #[arg(long)]
    direct: Option<bool>,
    /// O_DIRECT on the cache devices (config key cache_direct; default: on for block devices).
    #[arg(long)]
    cache_direct: Option<bool>,
    /// Send large reads from the page cache: auto, mapped, sendfile (or true) or false (config
    /// key zero_copy_reads; default auto: sendfile with 4 or more CPUs, else mapped; docs/CONFIG.md).
    #[arg(long)]
    zero_copy_reads: Option<String>,
    /// Microseconds a connection polls for the next request after its last reply, 0 for never
    /// (config key idle_poll_us; default 50).
    #[arg(long)]
    idle_poll_us: Option<u64>,
    #[arg(long)]
    log_level: Option<String>,
    /// A local SSD holding the mirror; repeat to stripe several.
    #[arg(long)]
    cache: Vec<PathBuf>,
    /// Format a cache that belongs to another superdisk (or holds unknown data) and rebuild it.
    #[arg(long)]
    take_over_cache: bool,
    /// Local control socket (mode 0600) for `superdisk status`, `cache`, `rebuild`, `verify`.
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://[HOST:]PORT/metrics (loopback without a host).
    #[arg(long, value_name = "[HOST:]PORT")]
    metrics: Option<String>,
    /// Serve one client on stdin/stdout, then exit (as `nbdkit -s`: for a parent that hands us one
    /// end of a socketpair, e.g. libnbd's nbd_connect_command). Logs stay on stderr.
    #[arg(long, conflicts_with_all = ["listen", "unix"])]
    stdio: bool,
    /// Allow TCP clients from this network only (CIDR, e.g. 10.0.0.0/8); repeat for several.
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    // Boxed: `Command` holds ServeArgs inline, and clippy limits how much larger one variant may be.
    #[command(flatten)]
    tls: Box<TlsArgs>,
}

#[derive(clap::Args, Default, Clone)]
struct TlsArgs {
    /// TLS: off (default), on (clients may use STARTTLS) or require.
    #[arg(long = "tls", value_name = "off|on|require")]
    mode: Option<String>,
    /// PEM certificate chain for TLS (server certificate first).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate signed by one (mutual TLS).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Create { backing, size, force, cache, region_size, stripe_size, take_over_cache } => {
            init_logging("info");
            let geometry = Geometry { region_size, stripe_size, take_over_cache };
            runtime().and_then(|rt| rt.block_on(create(&backing, size, force, &cache, &geometry)))
        }
        Command::Verify { backing, cache, socket, instance, repair, wait } => {
            init_logging("info");
            runtime().and_then(|rt| {
                rt.block_on(async {
                    match backing {
                        Some(b) => verify(&b, &cache, repair).await,
                        None => ctl::verify(&ctl::Target { socket, instance }, repair, wait).await,
                    }
                })
            })
        }
        Command::ForgetCache { backing } => {
            init_logging("info");
            runtime().and_then(|rt| rt.block_on(forget_cache(&backing)))
        }
        Command::Status { target, json } => runtime().and_then(|rt| rt.block_on(ctl::status(&target, json))),
        Command::Rebuild { target, action } => {
            let args: Vec<String> = match action {
                RebuildAction::Pause => vec!["pause".into()],
                RebuildAction::Resume => vec!["resume".into()],
                RebuildAction::Rate { min, max } => ["rate".to_string(), min].into_iter().chain(max).collect(),
            };
            let mut words = vec!["rebuild"];
            words.extend(args.iter().map(String::as_str));
            runtime().and_then(|rt| rt.block_on(ctl::simple(&target, &words)))
        }
        Command::Cache { target, action } => {
            let (verb, devices, take_over) = match action {
                CacheAction::Fail => ("fail", vec![], false),
                CacheAction::Remove => ("remove", vec![], false),
                CacheAction::Add { devices, take_over } => ("add", devices, take_over),
                CacheAction::Replace { devices, take_over } => ("replace", devices, take_over),
            };
            // The daemon opens the paths itself: make them absolute from here.
            let devices: Vec<String> = devices
                .iter()
                .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()).display().to_string())
                .collect();
            let mut words = vec!["cache", verb];
            if take_over {
                words.push("--take-over");
            }
            words.extend(devices.iter().map(String::as_str));
            runtime().and_then(|rt| rt.block_on(ctl::simple(&target, &words)))
        }
        Command::ClearFlushError { target } => {
            runtime().and_then(|rt| rt.block_on(ctl::simple(&target, &["clear-flush-error"])))
        }
        Command::Serve(args) => serve_cmd(*args),
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

fn runtime() -> Result<tokio::runtime::Runtime, AnyError> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("superdisk").build()?)
}

fn init_logging(level: &str) {
    daemon::logging::init(level);
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

async fn forget_cache(backing: &Path) -> Result<(), AnyError> {
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
    let cfg_of = |args: &ServeArgs| -> Result<ServeConfig, AnyError> {
        let f = match &args.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        Ok(ServeConfig::from_file_config(merge_flags(f, args))?)
    };
    let cfg = cfg_of(&args)?;
    let stdio = args.stdio;
    // SIGHUP re-reads the file; the command line still wins over it.
    let reload: Option<daemon::Reloader> = match args.config.is_some() {
        true => Some(Box::new(move || cfg_of(&args))),
        false => None,
    };
    init_logging(&cfg.log_level);
    runtime()?.block_on(daemon::serve_with(cfg, reload, stdio, |_| {}))
}

/// Writes the flags given on the command line over the file's keys.
fn merge_flags(mut f: FileConfig, args: &ServeArgs) -> FileConfig {
    let args = args.clone();
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
    if let Some(v) = args.registered_buffer_bytes {
        f.registered_buffer_bytes = Some(ByteSize(v));
    }
    if args.direct.is_some() {
        f.direct = args.direct;
    }
    if args.cache_direct.is_some() {
        f.cache_direct = args.cache_direct;
    }
    if let Some(v) = args.zero_copy_reads {
        f.zero_copy_reads = Some(BoolOrWord::Word(v));
    }
    if args.idle_poll_us.is_some() {
        f.idle_poll_us = args.idle_poll_us;
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
    if args.metrics.is_some() {
        f.metrics = args.metrics;
    }
    let tls = *args.tls;
    if tls.mode.is_some() {
        f.tls = tls.mode;
    }
    if tls.tls_cert.is_some() {
        f.tls_cert = tls.tls_cert;
    }
    if tls.tls_key.is_some() {
        f.tls_key = tls.tls_key;
    }
    if tls.tls_ca.is_some() {
        f.tls_ca = tls.tls_ca;
    }
    if !args.allow.is_empty() {
        f.allow = Some(args.allow);
    }
    f
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
    rt.block_on(daemon::serve(cfg, None, |endpoints| {
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

//! The `superdisk` command: create, serve, demo.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use superdisk::config::{parse_size, FileConfig, ServeConfig};
use superdisk::device::{BlockDevice, EngineKind, FileDevice, OpenOptions};
use superdisk::meta::store::{self, TailState};
use superdisk::meta::DEFAULT_REGION_BYTES;
use superdisk::nbd::ExportParams;
use superdisk::server::{self, ServerConfig};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Create { backing, size, force } => {
            init_logging("info");
            runtime().and_then(|rt| rt.block_on(create(&backing, size, force)))
        }
        Command::Serve(args) => serve_cmd(args),
        Command::Demo { dir, listen, size } => demo(dir, listen, size),
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

async fn create(backing: &Path, size: Option<u64>, force: bool) -> Result<(), AnyError> {
    if let Some(export_bytes) = size {
        if export_bytes == 0 || export_bytes % 4096 != 0 {
            return Err(format!("--size {export_bytes}: must be a non-zero multiple of 4096").into());
        }
        let meta = superdisk::meta::meta_bytes(export_bytes, DEFAULT_REGION_BYTES);
        let want = export_bytes + meta;
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
                }
            }
            Ok(_) => return Err(format!("{}: --size only applies to regular files", backing.display()).into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::OpenOptions::new().write(true).create_new(true).open(backing)?.set_len(want)?;
            }
            Err(e) => return Err(format!("{}: {e}", backing.display()).into()),
        }
    }
    let dev = FileDevice::open(backing, &OpenOptions { read_only: false, direct: None, engine: EngineKind::Psync })?;
    let mut sb = store::new_backing_superblock(dev.size_bytes(), DEFAULT_REGION_BYTES)?;
    match store::inspect_tail(&dev, DEFAULT_REGION_BYTES).await? {
        TailState::Ours(old) if !force => {
            println!(
                "{}: already prepared for superdisk (export size {} bytes); nothing to do (use --force to reinitialise)",
                backing.display(),
                old.data_size_bytes
            );
            return Ok(());
        }
        TailState::Foreign if !force => {
            return Err(format!(
                "{}: the last {} bytes are not blank and hold no superdisk metadata; they may be data. \
                 Refusing to overwrite them (use --force if you are sure)",
                backing.display(),
                superdisk::meta::meta_bytes(dev.size_bytes(), DEFAULT_REGION_BYTES)
            )
            .into());
        }
        TailState::Ours(old) => sb.generation = old.generation + 1,
        _ => {}
    }
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
    let cfg = ServeConfig::from_file_config(f)?;
    init_logging(&cfg.log_level);
    runtime()?.block_on(serve(cfg, |_| {}))
}

async fn serve(cfg: ServeConfig, on_ready: impl FnOnce(&[String])) -> Result<(), AnyError> {
    let dev = FileDevice::open(
        &cfg.backing,
        &OpenOptions { read_only: cfg.read_only, direct: cfg.direct, engine: cfg.io_engine },
    )?;
    tracing::info!(
        backing = %cfg.backing.display(),
        engine = dev.engine_name(),
        direct = dev.is_direct(),
        block_device = dev.is_block_device(),
        "opened backing device"
    );
    let rotational = dev.rotational();
    let volume =
        Arc::new(PlainVolume::open(dev, cfg.read_only).await.map_err(|e| format!("{}: {e}", cfg.backing.display()))?);
    if volume.recovered_from_crash {
        tracing::warn!("the previous run did not shut down cleanly");
    }
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
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        tracing::info!(signal = name, "shutting down: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    server::run(volume.clone(), server_cfg, stop_rx, on_ready).await?;
    volume.shutdown().await.map_err(|e| format!("flush at shutdown failed: {e}"))?;
    tracing::info!("flushed; clean shutdown recorded");
    Ok(())
}

fn demo(dir: Option<PathBuf>, listen: String, size: u64) -> Result<(), AnyError> {
    init_logging("info");
    let dir = dir.unwrap_or_else(|| PathBuf::from("superdisk-demo"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let backing = dir.join("backing.img");
    let rt = runtime()?;
    rt.block_on(create(&backing, if backing.exists() { None } else { Some(size) }, false))?;
    let cfg = ServeConfig::from_file_config(FileConfig {
        backing: Some(backing.clone()),
        listen: Some(listen),
        ..Default::default()
    })?;
    rt.block_on(serve(cfg, |endpoints| {
        let uri = endpoints.first().cloned().unwrap_or_default();
        println!("\nsuperdisk demo is serving {} — try, from another terminal:", backing.display());
        println!("  nbdinfo {uri}");
        println!("  nbdinfo --map {uri}");
        println!("  mkdir -p /tmp/sd && nbdfuse /tmp/sd/disk {uri} &   # then: losetup -f --show /tmp/sd/disk");
        println!(
            "  fio --name=demo --ioengine=nbd --uri={uri} --rw=randrw --bs=4k --iodepth=16 --size=64M --verify=crc32c"
        );
        println!("Stop with Ctrl-C (SIGINT) or SIGTERM; it drains, flushes and exits 0.\n");
    }))
}

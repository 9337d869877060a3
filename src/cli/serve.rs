//! `superdisk serve` (its flags, merged over the config file, where the command line wins) and
//! `superdisk demo` (images of its own, served with the embedded defaults).

use super::create::{create, Geometry};
use super::{init_logging, runtime};
use std::path::PathBuf;
use superdisk::config::{parse_size, BoolOrWord, ByteSize, FileConfig, ServeConfig};
use superdisk::daemon::handover::takeover::Takeover;
use superdisk::daemon::{self, AnyError};

#[derive(clap::Args, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file; flags given here override its keys [command line only].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The durable device or image file, prepared by `superdisk create` [config: backing].
    #[arg(long)]
    backing: Option<PathBuf>,
    /// TCP address (HOST:PORT; "" disables TCP). Default 127.0.0.1:10809 [config: listen].
    #[arg(long)]
    listen: Option<String>,
    /// Also listen on this Unix socket [config: unix].
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Export name (the empty name also selects it) [config: export].
    #[arg(long)]
    export: Option<String>,
    /// Refuse writes with EPERM [config: read_only].
    #[arg(long)]
    read_only: bool,
    /// I/O engine: uring (default, falls back to psync) or psync [config: io_engine].
    #[arg(long)]
    io_engine: Option<String>,
    /// Memory registered with io_uring as fixed buffers, e.g. 36M; 0 turns them off (config key
    /// registered_buffer_bytes).
    #[arg(long, value_parser = parse_size)]
    registered_buffer_bytes: Option<u64>,
    /// O_DIRECT on the backing (default: on for block devices, off for files) [config: direct].
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
    /// error, warn, info (default), debug or trace [config: log_level].
    #[arg(long)]
    log_level: Option<String>,
    /// A local SSD holding the mirror; repeat to stripe several [config: cache].
    #[arg(long)]
    cache: Vec<PathBuf>,
    /// Format a cache that belongs to another superdisk (or holds unknown data) and rebuild it
    /// [config: take_over_foreign_cache].
    #[arg(long)]
    take_over_cache: bool,
    /// Local control socket (mode 0600) for `superdisk status`, `cache`, `rebuild`, `verify`
    /// [config: admin_socket].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://[HOST:]PORT/metrics (loopback without a host)
    /// [config: metrics].
    #[arg(long, value_name = "[HOST:]PORT")]
    metrics: Option<String>,
    /// Serve one client on stdin/stdout, then exit (as `nbdkit -s`: for a parent that hands us one
    /// end of a socketpair, e.g. libnbd's nbd_connect_command). Logs stay on stderr
    /// [command line only].
    #[arg(long, conflicts_with_all = ["listen", "unix"])]
    stdio: bool,
    /// Allow TCP clients from this network only (CIDR, e.g. 10.0.0.0/8); repeat for several
    /// [config: allow].
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    // Boxed: `Command` holds ServeArgs inline, and clippy limits how much larger one variant may be.
    #[command(flatten)]
    tls: Box<TlsArgs>,
    /// Also serve the volume as /dev/ublkbN through the kernel's ublk driver (Linux 6.0+ with
    /// ublk_drv); the daemon refuses to start if it cannot [config: ublk].
    #[arg(long, conflicts_with = "stdio")]
    ublk: bool,
    /// The ublk device number N (default: the kernel picks) [config: ublk_id].
    #[arg(long)]
    ublk_id: Option<u32>,
    /// Internal: take over from the running daemon through this socket (`superdisk upgrade`).
    #[arg(long, hide = true, conflicts_with = "stdio")]
    takeover_fd: Option<i32>,
}

#[derive(clap::Args, Default, Clone)]
pub struct TlsArgs {
    /// TLS: off (default), on (clients may use STARTTLS) or require [config: tls].
    #[arg(long = "tls", value_name = "off|on|require")]
    mode: Option<String>,
    /// PEM certificate chain for TLS (server certificate first) [config: tls_cert].
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [config: tls_key].
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate signed by one (mutual TLS)
    /// [config: tls_ca].
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

pub fn serve_cmd(args: ServeArgs) -> Result<(), AnyError> {
    let cfg_of = |args: &ServeArgs| -> Result<ServeConfig, AnyError> {
        let f = match &args.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        Ok(ServeConfig::from_file_config(merge_flags(f, args))?)
    };
    // Taken first: whatever fails from here on is told to the daemon waiting for us.
    let mut takeover = args.takeover_fd.map(Takeover::from_fd).transpose()?;
    let cfg = match cfg_of(&args) {
        Ok(c) => c,
        Err(e) => {
            if let Some(t) = takeover.take() {
                t.refuse(&e.to_string());
            }
            return Err(e);
        }
    };
    let stdio = args.stdio;
    // SIGHUP re-reads the file; the command line still wins over it.
    let reload: Option<daemon::Reloader> = match args.config.is_some() {
        true => Some(std::sync::Arc::new(move || cfg_of(&args))),
        false => None,
    };
    init_logging(&cfg.log_level);
    let rt = runtime()?;
    let r = rt.block_on(daemon::serve_with(cfg, reload, stdio, takeover, |_| {}));
    if let Err(e) = &r {
        if e.is::<daemon::UncleanStop>() {
            // Operations the backing never answered still sit in the kernel; tearing the runtime
            // down would wait for them (blocking threads, ring threads) for as long as the outage
            // lasts. Nothing is left to do: the metadata that could be written was.
            eprintln!("superdisk: error: {e}");
            std::process::exit(i32::from(daemon::UncleanStop::EXIT_CODE));
        }
    }
    // A bounded wait for blocking threads that are still busy (a stalled file): the work is done.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    r
}

/// Writes the flags given on the command line over the file's keys.
pub(super) fn merge_flags(mut f: FileConfig, args: &ServeArgs) -> FileConfig {
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
    if args.ublk {
        f.ublk = Some(true);
    }
    if args.ublk_id.is_some() {
        f.ublk_id = args.ublk_id;
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

pub fn demo(dir: Option<PathBuf>, listen: String, size: u64, no_cache: bool) -> Result<(), AnyError> {
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

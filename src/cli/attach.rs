//! `superdisk attach` and `superdisk detach`: the kernel NBD device, supervised (see
//! `superdisk::kernel`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use superdisk::daemon::notify::Notifier;
use superdisk::daemon::AnyError;
use superdisk::kernel::dial::Endpoint;
use superdisk::kernel::{self, AttachOptions, DEFAULT_DEAD_TIMEOUT_SECS, DEFAULT_IO_TIMEOUT_SECS};

#[derive(clap::Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("server").required(true).args(["unix", "connect"])))]
pub struct AttachArgs {
    /// The daemon's Unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// The daemon's TCP address, HOST:PORT.
    #[arg(long)]
    connect: Option<String>,
    #[arg(long, default_value = "superdisk")]
    export: String,
    /// The device to connect, /dev/nbdN (default: the kernel picks a free one).
    #[arg(long)]
    device: Option<String>,
    /// Connections the kernel spreads requests over (the server must allow several).
    #[arg(long, default_value_t = 2)]
    connections: u32,
    /// Logical block size of the device: 512, 1024, 2048 or 4096.
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// Seconds before the kernel resends an unanswered request on another connection: what a
    /// daemon crash costs the requests it had in flight.
    #[arg(long, default_value_t = DEFAULT_IO_TIMEOUT_SECS)]
    io_timeout_secs: u64,
    /// Seconds I/O waits for a live connection (a daemon restarting) before it fails.
    #[arg(long, default_value_t = DEFAULT_DEAD_TIMEOUT_SECS)]
    dead_timeout_secs: u64,
    /// Seconds the first connections may take to reach the daemon (it may still be starting).
    #[arg(long, default_value_t = 30)]
    connect_timeout_secs: u64,
    /// On SIGTERM, disconnect the device too (default: leave it attached; it needs no supervisor
    /// to carry I/O, only to reconnect).
    #[arg(long)]
    detach_on_exit: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn attach(args: AttachArgs) -> Result<(), AnyError> {
    let endpoint = match (args.unix, args.connect) {
        (Some(p), None) => Endpoint::Unix(p),
        (None, Some(a)) => Endpoint::Tcp(a),
        _ => return Err("give exactly one of --unix PATH and --connect HOST:PORT".into()),
    };
    if !matches!(args.block_size, 512 | 1024 | 2048 | 4096) {
        return Err(format!("--block-size {}: must be 512, 1024, 2048 or 4096", args.block_size).into());
    }
    if args.connections == 0 || args.io_timeout_secs == 0 || args.dead_timeout_secs == 0 {
        return Err("--connections, --io-timeout-secs and --dead-timeout-secs must be at least 1".into());
    }
    let device = args.device.as_deref().map(kernel::device_index).transpose()?;
    let opts = AttachOptions {
        endpoint,
        export: args.export,
        device,
        connections: args.connections,
        block_size: args.block_size,
        io_timeout_secs: args.io_timeout_secs,
        dead_timeout_secs: args.dead_timeout_secs,
        connect_timeout_secs: args.connect_timeout_secs,
        detach_on_exit: args.detach_on_exit,
    };
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let notifier = Notifier::from_env();
    let mut ready = |dev: &str| {
        println!("{dev}");
        notifier.notify(&format!("READY=1\nSTATUS=attached {dev} to {}", opts.endpoint));
    };
    kernel::supervisor::run(&opts, &STOP, &mut ready)?;
    Ok(())
}

pub fn detach(device: &str) -> Result<(), AnyError> {
    let name = device.strip_prefix("/dev/").unwrap_or(device);
    if let Some(n) = name.strip_prefix("ublkb") {
        let id = n.parse::<u32>().map_err(|_| format!("{device}: not a ublk device (expected /dev/ublkbN)"))?;
        superdisk::ublk::delete_device(id)?;
        println!("{device} removed");
        return Ok(());
    }
    kernel::detach(device)?;
    println!("{device} detached");
    Ok(())
}

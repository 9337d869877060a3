//! The `superdisk` command: its arguments, and a dispatch to the code that does each command
//! (`cli/` for the command line's own work, the library for the daemon).

mod cli;

use cli::admin_client as ctl;
use cli::create::{create, Geometry};
use cli::offline::{forget_cache, verify};
use cli::serve::{demo, serve_cmd, ServeArgs};
use cli::{init_logging, runtime};

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use superdisk::config::parse_size;

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
    /// Replace the running daemon's binary without a disconnect: it hands its devices, listening
    /// sockets and every client connection to BINARY, which carries on serving. If BINARY cannot
    /// take over, the running daemon carries on and this says why.
    Upgrade {
        #[command(flatten)]
        target: ctl::Target,
        /// The new binary (default: this superdisk, as installed at this path).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Connect a kernel block device (/dev/nbdN) to the daemon and supervise it: every connection
    /// that dies (a daemon crash, restart or upgrade) is replaced, so the filesystem on the device
    /// sees a pause, not I/O errors. Prints the device; stays in the foreground.
    Attach(cli::attach::AttachArgs),
    /// Disconnect a kernel NBD device (the kernel finishes its in-flight requests first), or
    /// remove a ublk device no daemon serves.
    Detach {
        /// The device: /dev/nbdN, or /dev/ublkbN that no daemon serves any more (one a stopped
        /// or crashed daemon left waiting for recovery; its waiting I/O fails).
        device: String,
    },
    /// Print what a running daemon checks before handing over to this binary (JSON).
    #[command(hide = true)]
    HandoverInfo,
    /// Write the man pages and shell completions (for packaging: scripts/package.sh).
    #[command(hide = true)]
    GenerateDocs(cli::gendocs::GenDocsArgs),
    /// Serve the disk over NBD, from the local-SSD mirror, writing through to the backing.
    // Boxed: its flags outweigh every other command.
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
    /// Carry on with a paused copy.
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

fn main() -> ExitCode {
    superdisk::daemon::handover::set_build_id(option_env!("SUPERDISK_BUILD_ID").unwrap_or("dev"));
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
        Command::Upgrade { target, binary } => {
            runtime().and_then(|rt| rt.block_on(ctl::upgrade(&target, binary.as_deref())))
        }
        Command::Attach(args) => {
            init_logging("info");
            cli::attach::attach(args)
        }
        Command::Detach { device } => cli::attach::detach(&device),
        Command::HandoverInfo => {
            println!("{}", serde_json::to_string(&superdisk::daemon::handover::BuildInfo::this()).unwrap_or_default());
            Ok(())
        }
        Command::GenerateDocs(args) => cli::gendocs::generate_docs(args),
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

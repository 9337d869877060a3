//! Logging through `tracing`: one line per event on stderr (journald adds the timestamp and unit
//! under systemd), colour only on a terminal, and a level that SIGHUP can change while serving.

use std::sync::OnceLock;
use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// `SUPERDISK_LOG` (an EnvFilter directive) wins over `level`, so a developer can look inside one
/// module without editing the config.
fn filter_for(level: &str) -> EnvFilter {
    EnvFilter::try_from_env("SUPERDISK_LOG").unwrap_or_else(|_| EnvFilter::new(format!("superdisk={level},warn")))
}

/// Installs the subscriber once per process; later calls only change the level.
pub fn init(level: &str) {
    use std::io::IsTerminal;
    if HANDLE.get().is_some() {
        set_level(level);
        return;
    }
    let (filter, handle) = reload::Layer::new(filter_for(level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if tracing_subscriber::registry().with(filter).with(fmt).try_init().is_ok() {
        let _ = HANDLE.set(handle);
    }
}

/// Changes the level of a running process (SIGHUP). False if logging was not set up here.
pub fn set_level(level: &str) -> bool {
    HANDLE.get().is_some_and(|h| h.reload(filter_for(level)).is_ok())
}

//! The command line's own work: the offline commands (`create`, `verify`, `forget-cache`,
//! `demo`), the flags of `serve`, and the client of the running daemon's admin socket.
//! `main.rs` only parses the arguments and dispatches here.

pub mod admin_client;
pub mod attach;
pub mod create;
pub mod gendocs;
pub mod offline;
pub mod serve;

use std::path::Path;
use superdisk::daemon::{self, AnyError};
use superdisk::device::{EngineKind, FileDevice, OpenOptions};

pub fn runtime() -> Result<tokio::runtime::Runtime, AnyError> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("superdisk").build()?)
}

pub fn init_logging(level: &str) {
    daemon::logging::init(level);
}

fn open_device(path: &Path, direct: Option<bool>, engine: EngineKind) -> Result<FileDevice, AnyError> {
    Ok(FileDevice::open(path, &OpenOptions { read_only: false, direct, engine })?)
}

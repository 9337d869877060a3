//! The NBD front end's own counters: what clients see, end to end.

use crate::telemetry::OpStats;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The NBD front end's own counters: what clients see, end to end.
#[derive(Default)]
pub struct ServerStats {
    pub connections_active: AtomicU64,
    pub connections_accepted: AtomicU64,
    /// Refused at the connection limit.
    pub connections_refused: AtomicU64,
    /// Read replies whose data went from the page cache to the socket (`sendfile`), and bytes.
    pub zero_copy_reads: AtomicU64,
    pub zero_copy_read_bytes: AtomicU64,
    /// Of those, sends the file could not finish, completed by reading the rest.
    pub zero_copy_fallbacks: AtomicU64,
    /// Idle polls (`idle_poll_us`) that saw the client's next request arrive, and those that
    /// gave up at the limit.
    pub idle_poll_hits: AtomicU64,
    pub idle_poll_misses: AtomicU64,
    /// Per request kind; see [`ReqOp`].
    requests: [OpStats; 6],
}

/// Request kinds the front end counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqOp {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    /// CACHE and BLOCK_STATUS.
    Other,
}

impl ReqOp {
    pub const ALL: [ReqOp; 6] =
        [ReqOp::Read, ReqOp::Write, ReqOp::Flush, ReqOp::Trim, ReqOp::WriteZeroes, ReqOp::Other];
    pub fn name(self) -> &'static str {
        match self {
            ReqOp::Read => "read",
            ReqOp::Write => "write",
            ReqOp::Flush => "flush",
            ReqOp::Trim => "trim",
            ReqOp::WriteZeroes => "write_zeroes",
            ReqOp::Other => "other",
        }
    }
}

impl std::fmt::Debug for ServerStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerStats")
            .field("connections_active", &self.connections_active.load(Relaxed))
            .field("connections_accepted", &self.connections_accepted.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl ServerStats {
    pub fn request(&self, op: ReqOp) -> &OpStats {
        &self.requests[op as usize]
    }
}

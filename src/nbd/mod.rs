//! The NBD protocol, sans I/O: bytes in, decisions and bytes out.
//!
//! Nothing in this module touches a socket, a device or an async runtime, so the whole protocol can be
//! property-tested and fuzzed on its own (`fuzz/`), and a future ublk front end shares none of it.
//!
//! ```text
//!   socket bytes ──► handshake::Handshake ──► Session (flags, structured?, contexts)
//!                                 │
//!   socket bytes ──► request::decode_header ──► request::validate ──► Request for the engine
//!                                                                         │
//!   socket bytes ◄── reply::* encoders ◄───────────── result / error ◄────┘
//! ```
//!
//! # Why the protocol is our own code
//! The Rust NBD server crates that exist break the spec's baseline rules (unknown options answered
//! by disconnecting, OS errnos on the wire, no structured replies or block status), and the
//! `nbdkit` crate would make superdisk a plugin inside nbdkit's process, giving up our own
//! connection handling, in-flight limits and shutdown. nbdkit and qemu-nbd are our peers in tests
//! and benchmarks instead. This module follows `shared/reference/nbd-proto.md`.
//!
//! # Where the spec leaves room
//! | situation | what superdisk does |
//! |---|---|
//! | unknown option | `NBD_REP_ERR_UNSUP`, negotiation continues |
//! | option data > 64 KiB | hard disconnect (denial-of-service guard) |
//! | unknown client flags, bad magic | hard disconnect (spec: MUST) |
//! | `NBD_OPT_STARTTLS` | `tls = off`: `NBD_REP_ERR_POLICY`; `on`: upgrade, plain clients still served; `require`: every option but STARTTLS/ABORT gets `NBD_REP_ERR_TLS_REQD`, EXPORT_NAME before TLS closes. An upgrade forgets what was negotiated before it; bytes pipelined behind STARTTLS go to TLS |
//! | `NBD_OPT_INFO` / `GO` | `INFO_EXPORT`, `INFO_BLOCK_SIZE` always (min 1, preferred 4096, max 32 MiB), `NAME` and `DESCRIPTION` when asked; INFO and GO answer identically |
//! | read > 32 MiB | `EOVERFLOW` with structured replies, `EINVAL` without |
//! | out of bounds | `EINVAL` (read, trim, cache, block status), `ENOSPC` (write, write zeroes) |
//! | writes on a read-only export | `EPERM`, payload drained |
//! | zero-length requests | success (block status of 0 bytes: `EINVAL`, since success needs an extent) |
//! | `FAST_ZERO` | advertised; fails fast with `ENOTSUP` when the volume cannot zero cheaply |
//! | replies without payload | simple replies, even with structured replies negotiated (allowed) |
//! | errors | only the spec's values, mapped from errno (`EDQUOT`/`EFBIG` → `ENOSPC`, …); structured error chunks carry a message |
//! | `CAN_MULTI_CONN` | advertised and true: all connections share one volume, and FLUSH flushes the devices |
//! | `NBD_CMD_DISC`, SIGTERM | stop reading, finish every in-flight request, write its reply, close; then flush the volume and record a clean shutdown |

#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod client;
pub mod consts;
pub mod handshake;
pub mod reply;
pub mod request;

use std::io;

/// The error values the spec allows on the wire. Any OS error is mapped into one of these before it
/// leaves the server: clients treat unknown values as EINVAL, which would hide the real cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdError {
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Maps an OS error to the closest NBD value (spec, "Error values": EDQUOT and EFBIG are ENOSPC).
    pub fn from_io(err: &io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NbdError::Perm,
            Some(libc::ENOMEM) => NbdError::NoMem,
            Some(libc::EINVAL) => NbdError::Inval,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NbdError::NoSpc,
            Some(libc::EOVERFLOW) => NbdError::Overflow,
            Some(libc::EOPNOTSUPP) => NbdError::NotSup,
            Some(libc::ESHUTDOWN) => NbdError::Shutdown,
            _ => NbdError::Io,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            NbdError::Perm => "operation not permitted",
            NbdError::Io => "input/output error",
            NbdError::NoMem => "cannot allocate memory",
            NbdError::Inval => "invalid argument",
            NbdError::NoSpc => "no space left on device",
            NbdError::Overflow => "value too large",
            NbdError::NotSup => "operation not supported",
            NbdError::Shutdown => "server is shutting down",
        }
    }
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (NBD error {})", self.message(), self.code())
    }
}

/// What the server offers for one export; fixed for the life of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportParams {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub read_only: bool,
    /// Whether the engine can zero quickly (hole punch / zero range), so FAST_ZERO can succeed.
    pub fast_zero: bool,
    pub rotational: bool,
    pub min_block_bytes: u32,
    pub preferred_block_bytes: u32,
    pub max_payload_bytes: u32,
}

impl ExportParams {
    /// Transmission flags for a session; DF only exists once structured replies were negotiated.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        use consts::*;
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO
            | FLAG_SEND_CACHE
            // Every connection shares one engine and one set of devices, and FLUSH flushes the
            // devices, not a per-connection buffer: what one connection flushed is durable for all.
            | FLAG_CAN_MULTI_CONN;
        if structured {
            flags |= FLAG_SEND_DF;
        }
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        }
        if self.rotational {
            flags |= FLAG_ROTATIONAL;
        }
        flags
    }
}

/// What the handshake agreed on; the transmission phase is driven by this alone (and it is what an
/// in-place upgrade carries to the next process for each connection).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Session {
    pub structured_replies: bool,
    pub base_allocation: bool,
    pub transmission_flags: u16,
    /// The client asked for block sizes with OPT_GO, so it promised to respect them.
    pub block_size_agreed: bool,
}

//! Configuration: a TOML file (`serve --config FILE`) and command-line flags, merged into one
//! validated [`ServeConfig`]. Every option has a key; an unknown key or a bad value is an error
//! that names the key and the reason.

use crate::device::{EngineKind, IoPolicy};
use crate::mirror::slow::{SlowCachePolicy, SlowPolicy};
use crate::mirror::{HedgePolicy, Tunables};
pub use crate::server::tls::{TlsMode, TlsSettings, TlsVersion};
pub use crate::server::{Cidr, Policy, ZeroCopyReads, DEFAULT_IDLE_POLL_US, MAX_IDLE_POLL_US};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

/// A switch written as a TOML boolean or a word (`"auto"`, or a boolean spelled as a string).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BoolOrWord {
    Bool(bool),
    Word(String),
}

/// `zero_copy_reads = "auto"` picks `sendfile` with at least this many CPUs and the mapped send
/// below. Why: with the client on the same machine, `sendfile` costs the client more than it saves
/// the server (the receiver's copy out of page-cache pages is slower); on 2 CPUs, where the two
/// share the CPUs, 1 MiB reads ran at half the throughput, while the mapped send ran at 1.18× the
/// copying path's; on 16 CPUs four `sendfile` connections (the kernel client's set-up) kept their
/// throughput and eight doubled it, with a third of the server's CPU (docs/PERFORMANCE.md).
pub const ZERO_COPY_AUTO_MIN_CPUS: usize = 4;

fn zero_copy_auto() -> ZeroCopyReads {
    if std::thread::available_parallelism().is_ok_and(|n| n.get() >= ZERO_COPY_AUTO_MIN_CPUS) {
        ZeroCopyReads::Sendfile
    } else {
        ZeroCopyReads::Mapped
    }
}

/// A byte size written as an integer or a string with a binary suffix ("64M", "1GiB", "4096").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => parse_size(&s).map(ByteSize).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses "512", "4K", "64M", "1G", "2T", with optional "B"/"iB" ("1GiB"); powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (expected e.g. 4096, 64M, 1G)"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("unknown size suffix {other:?} in {s:?} (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// The file format. `deny_unknown_fields` makes a typo an error rather than a silently ignored key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub backing: Option<PathBuf>,
    pub listen: Option<String>,
    pub unix: Option<PathBuf>,
    pub unix_mode: Option<String>,
    pub export: Option<String>,
    pub description: Option<String>,
    pub read_only: Option<bool>,
    pub io_engine: Option<String>,
    /// Memory registered with every io_uring ring as fixed buffers (0: none).
    pub registered_buffer_bytes: Option<ByteSize>,
    pub direct: Option<bool>,
    pub max_connections: Option<u64>,
    pub max_inflight_bytes_per_connection: Option<ByteSize>,
    pub handshake_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    /// How long a connection polls for the client's next request after its last reply, in µs.
    pub idle_poll_us: Option<u64>,
    /// Large reads sent from the page cache with `sendfile` (buffered devices, plain sockets):
    /// true, false or "auto" (the default: on with at least `ZERO_COPY_AUTO_MIN_CPUS` CPUs).
    pub zero_copy_reads: Option<BoolOrWord>,
    pub log_level: Option<String>,
    /// Local SSDs holding the mirror; several are striped. Empty: no mirror.
    pub cache: Option<Vec<PathBuf>>,
    pub cache_direct: Option<bool>,
    pub take_over_foreign_cache: Option<bool>,
    pub read_error_budget: Option<u32>,
    pub rebuild_min_bytes_per_s: Option<ByteSize>,
    pub rebuild_max_bytes_per_s: Option<ByteSize>,
    /// Local control socket (mode 0600) for `superdisk verify --socket` and other commands.
    pub admin_socket: Option<PathBuf>,
    /// Period of the mirror's metadata cleaner (persists the valid bitmap, clears idle intent bits).
    pub metadata_interval_ms: Option<u64>,
    /// Prometheus endpoint, `[HOST:]PORT` (loopback without a host). Off when absent.
    pub metrics: Option<String>,
    /// `"off"` (default), `"on"` (clients may upgrade with STARTTLS) or `"require"`.
    pub tls: Option<String>,
    /// PEM certificate chain, server certificate first.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): when set, clients must present a certificate signed by one of them.
    pub tls_ca: Option<PathBuf>,
    /// `"1.2"` (default) or `"1.3"`.
    pub tls_min_version: Option<String>,
    /// Client networks allowed on the TCP listener, in CIDR notation. Absent: every client.
    pub allow: Option<Vec<String>>,
    /// Owner and group given to the Unix socket after bind (names or numeric ids).
    pub unix_owner: Option<String>,
    pub unix_group: Option<String>,
    /// Request bytes in flight across all connections together.
    pub max_inflight_bytes_total: Option<ByteSize>,
    // Backing I/O under a stall (device::layer::backing_guard): per-attempt timeout, read retries, the backoff
    // between them, and the request deadline after which the client gets EIO.
    pub backing_timeout_ms: Option<u64>,
    pub backing_read_retries: Option<u32>,
    pub backing_retry_backoff_ms: Option<u64>,
    pub backing_io_deadline_ms: Option<u64>,
    // Hedged cache reads (mirror::hedge): on/off, the threshold's bounds, the budget.
    pub hedge_reads: Option<bool>,
    pub hedge_min_us: Option<u64>,
    pub hedge_max_us: Option<u64>,
    pub hedge_max_percent: Option<u32>,
    // How long a cache device may take before the cache set is given up on (device::layer::cache_time_limit).
    pub cache_timeout_ms: Option<u64>,
    // A cache member slower than the backing (mirror::slow): what it gets, and when.
    pub slow_cache_policy: Option<String>,
    pub slow_cache_factor: Option<u32>,
    pub slow_cache_min_latency_us: Option<u64>,
    pub slow_cache_window_ms: Option<u64>,
    pub slow_cache_fail_after_ms: Option<u64>,
    /// Serve the volume as /dev/ublkbN through the kernel's ublk driver too (src/ublk).
    pub ublk: Option<bool>,
    /// The device number N of /dev/ublkbN; absent: the kernel picks a free one.
    pub ublk_id: Option<u32>,
    /// ublk hardware queues (one thread each) and requests in flight per queue.
    pub ublk_queues: Option<u16>,
    pub ublk_queue_depth: Option<u16>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.display().to_string(), message: e.to_string() })
    }
}

/// Everything `serve` needs, validated.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub backing: PathBuf,
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub unix_mode: u32,
    pub export: String,
    pub description: String,
    pub read_only: bool,
    pub io_engine: EngineKind,
    pub registered_buffer_bytes: usize,
    pub direct: Option<bool>,
    pub max_connections: usize,
    pub max_inflight_bytes_per_connection: usize,
    pub handshake_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub idle_poll_us: u64,
    pub zero_copy_reads: ZeroCopyReads,
    pub log_level: String,
    pub cache: Vec<PathBuf>,
    pub cache_direct: Option<bool>,
    pub take_over_foreign_cache: bool,
    pub admin_socket: Option<PathBuf>,
    pub metadata_interval_ms: u64,
    pub metrics: Option<SocketAddr>,
    pub tls: TlsSettings,
    /// Empty: every client address is allowed.
    pub allow: Vec<Cidr>,
    /// Resolved uid and gid for the Unix socket.
    pub unix_owner: Option<u32>,
    pub unix_group: Option<u32>,
    pub max_inflight_bytes_total: usize,
    pub backing_io: IoPolicy,
    /// `ublk = true`: the device to add (or recover) beside the NBD listeners.
    pub ublk: Option<crate::ublk::UblkOptions>,
    /// The keys SIGHUP applies to a running mirror (`rebuild_*`, `read_error_budget`, `hedge_*`,
    /// `cache_timeout_ms`): validated in one place, [`Tunables::validate`].
    pub tunables: Tunables,
}

impl ServeConfig {
    /// Whether SIGHUP can apply a new value of `key` to a running daemon.
    pub fn is_live(key: &str) -> bool {
        key == "log_level" || Tunables::KEYS.contains(&key)
    }

    /// The keys whose values differ between `self` and `other`, by name.
    pub fn changed_keys(&self, other: &ServeConfig) -> Vec<&'static str> {
        let mut out = Vec::new();
        macro_rules! cmp {
            ($($field:ident),*) => {
                $(if self.$field != other.$field { out.push(stringify!($field)); })*
            };
        }
        cmp!(
            backing,
            listen,
            unix,
            unix_mode,
            export,
            description,
            read_only,
            io_engine,
            registered_buffer_bytes,
            direct,
            max_connections,
            max_inflight_bytes_per_connection,
            handshake_timeout_secs,
            idle_timeout_secs,
            idle_poll_us,
            zero_copy_reads,
            log_level,
            cache,
            cache_direct,
            take_over_foreign_cache,
            admin_socket,
            metadata_interval_ms,
            metrics,
            allow,
            unix_owner,
            unix_group,
            max_inflight_bytes_total,
            ublk
        );
        let (t, u) = (&self.tls, &other.tls);
        for (key, differs) in [
            ("tls", t.mode != u.mode),
            ("tls_cert", t.cert != u.cert),
            ("tls_key", t.key != u.key),
            ("tls_ca", t.ca != u.ca),
            ("tls_min_version", t.min_version != u.min_version),
        ] {
            if differs {
                out.push(key);
            }
        }
        let (b, c) = (&self.backing_io, &other.backing_io);
        for (key, differs) in [
            ("backing_timeout_ms", b.attempt_timeout != c.attempt_timeout),
            ("backing_read_retries", b.read_retries != c.read_retries),
            ("backing_retry_backoff_ms", b.retry_backoff != c.retry_backoff),
            ("backing_io_deadline_ms", b.deadline != c.deadline),
        ] {
            if differs {
                out.push(key);
            }
        }
        out.extend(self.tunables.changed_keys(&other.tunables));
        out.sort_by_key(|k| FIELD_ORDER.iter().position(|f| f == k));
        out
    }

    /// Who may connect and what they may hold; reads the TLS files (errors name the key).
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        Ok(Policy {
            tls_mode: self.tls.mode,
            tls: crate::server::tls::acceptor(&self.tls).map_err(|e| invalid(e.key, e.reason))?,
            client_certificates: self.tls.mode != TlsMode::Off && self.tls.ca.is_some(),
            allow: self.allow.clone(),
            unix_owner: self.unix_owner,
            unix_group: self.unix_group,
            max_inflight_bytes_total: self.max_inflight_bytes_total,
        })
    }
}

/// The keys in the order the file documents them (changed keys are reported in this order).
const FIELD_ORDER: [&str; 51] = [
    "backing",
    "listen",
    "unix",
    "unix_mode",
    "export",
    "description",
    "read_only",
    "io_engine",
    "registered_buffer_bytes",
    "direct",
    "max_connections",
    "max_inflight_bytes_per_connection",
    "handshake_timeout_secs",
    "idle_timeout_secs",
    "idle_poll_us",
    "zero_copy_reads",
    "log_level",
    "cache",
    "cache_direct",
    "take_over_foreign_cache",
    "read_error_budget",
    "rebuild_min_bytes_per_s",
    "rebuild_max_bytes_per_s",
    "admin_socket",
    "metadata_interval_ms",
    "metrics",
    "tls",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "tls_min_version",
    "allow",
    "unix_owner",
    "unix_group",
    "max_inflight_bytes_total",
    "backing_timeout_ms",
    "backing_read_retries",
    "backing_retry_backoff_ms",
    "backing_io_deadline_ms",
    "hedge_reads",
    "hedge_min_us",
    "hedge_max_us",
    "hedge_max_percent",
    "cache_timeout_ms",
    "slow_cache_policy",
    "slow_cache_factor",
    "slow_cache_min_latency_us",
    "slow_cache_window_ms",
    "slow_cache_fail_after_ms",
    "ublk",
    "",
];

pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_EXPORT: &str = "superdisk";

/// The listeners and the export's identity.
struct Endpoints {
    listen: Option<SocketAddr>,
    unix_mode: u32,
    export: String,
    description: String,
    metrics: Option<SocketAddr>,
}

fn endpoints(f: &FileConfig) -> Result<Endpoints, ConfigError> {
    let listen = match f.listen.as_deref() {
        None => Some(DEFAULT_LISTEN.parse().expect("valid default")),
        // An empty string turns TCP off (Unix socket only).
        Some("") => None,
        Some(s) => Some(parse_listen(s).map_err(|r| invalid("listen", r))?),
    };
    if listen.is_none() && f.unix.is_none() && f.ublk != Some(true) {
        return Err(invalid("listen", "is empty, and neither a `unix` socket nor `ublk` is set: nothing to serve on"));
    }
    let unix_mode = match f.unix_mode.as_deref() {
        None => 0o660,
        Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| invalid("unix_mode", format!("{s:?} is not an octal permission such as \"0660\"")))?,
    };
    let export = f.export.clone().unwrap_or_else(|| DEFAULT_EXPORT.to_owned());
    if export.len() > 4096 || export.contains('\0') {
        return Err(invalid("export", "must be at most 4096 bytes with no NUL"));
    }
    let description = f.description.clone().unwrap_or_default();
    if description.len() > 4096 {
        return Err(invalid("description", "must be at most 4096 bytes"));
    }
    let metrics = match f.metrics.as_deref() {
        None | Some("") => None,
        Some(s) => Some(parse_listen(s).map_err(|r| invalid("metrics", r))?),
    };
    Ok(Endpoints { listen, unix_mode, export, description, metrics })
}

/// How devices are opened and I/O issued.
fn io_engine(f: &FileConfig) -> Result<(EngineKind, usize), ConfigError> {
    let io_engine = match f.io_engine.as_deref() {
        None => EngineKind::Uring,
        Some(s) => s.parse().map_err(|r: String| invalid("io_engine", r))?,
    };
    let registered =
        f.registered_buffer_bytes.map_or(crate::device::buf::DEFAULT_REGISTERED_BUFFER_BYTES as u64, |b| b.0);
    if registered != 0 && !(1 << 20..=1 << 30).contains(&registered) {
        return Err(invalid(
            "registered_buffer_bytes",
            format!("{registered} is neither 0 (off) nor within 1 MiB ..= 1 GiB"),
        ));
    }
    Ok((io_engine, registered as usize))
}

/// What one connection and all of them together may hold, and how long they may idle.
struct Limits {
    max_connections: usize,
    per_connection: usize,
    total: usize,
    handshake_timeout_secs: u64,
    idle_poll_us: u64,
}

fn limits(f: &FileConfig) -> Result<Limits, ConfigError> {
    let max_connections = f.max_connections.unwrap_or(256);
    if max_connections == 0 || max_connections > 65536 {
        return Err(invalid("max_connections", format!("{max_connections} is outside 1..=65536")));
    }
    let per_connection = f.max_inflight_bytes_per_connection.map_or(64 << 20, |b| b.0);
    if !(1 << 20..=1 << 32).contains(&per_connection) {
        return Err(invalid(
            "max_inflight_bytes_per_connection",
            format!("{per_connection} is outside 1 MiB ..= 4 GiB (it must admit one 32 MiB request to be useful)"),
        ));
    }
    let total = f.max_inflight_bytes_total.map_or(1 << 30, |b| b.0);
    if total < per_connection || total > 1 << 40 {
        return Err(invalid(
            "max_inflight_bytes_total",
            format!(
                "{total} is outside max_inflight_bytes_per_connection ({per_connection}) ..= 1 TiB \
                 (every connection must be able to reach its own limit)"
            ),
        ));
    }
    let idle_poll_us = f.idle_poll_us.unwrap_or(DEFAULT_IDLE_POLL_US);
    if idle_poll_us > MAX_IDLE_POLL_US {
        return Err(invalid("idle_poll_us", format!("must be between 0 (off) and {MAX_IDLE_POLL_US}")));
    }
    let handshake_timeout_secs = f.handshake_timeout_secs.unwrap_or(30);
    if handshake_timeout_secs == 0 || handshake_timeout_secs > 3600 {
        return Err(invalid("handshake_timeout_secs", "must be between 1 and 3600"));
    }
    Ok(Limits {
        max_connections: max_connections as usize,
        per_connection: per_connection as usize,
        total: total as usize,
        handshake_timeout_secs,
        idle_poll_us,
    })
}

fn zero_copy_reads(f: &FileConfig) -> Result<ZeroCopyReads, ConfigError> {
    Ok(match &f.zero_copy_reads {
        None => zero_copy_auto(),
        // `true` predates the mapped send and always meant `sendfile`.
        Some(BoolOrWord::Bool(true)) => ZeroCopyReads::Sendfile,
        Some(BoolOrWord::Bool(false)) => ZeroCopyReads::Off,
        Some(BoolOrWord::Word(w)) => match w.as_str() {
            "auto" => zero_copy_auto(),
            "sendfile" | "true" | "on" => ZeroCopyReads::Sendfile,
            "mapped" => ZeroCopyReads::Mapped,
            "false" | "off" => ZeroCopyReads::Off,
            _ => {
                return Err(invalid(
                    "zero_copy_reads",
                    format!("{w:?} is not \"auto\", \"mapped\", \"sendfile\" (or true) or false"),
                ))
            }
        },
    })
}

/// Default ublk queues: one per CPU (the runtime's worker count), at most this many.
const MAX_DEFAULT_UBLK_QUEUES: usize = 8;
/// Default requests in flight per ublk queue: the depth an NVMe or cloud disk is benchmarked at.
const DEFAULT_UBLK_QUEUE_DEPTH: u16 = 64;

fn ublk(f: &FileConfig) -> Result<Option<crate::ublk::UblkOptions>, ConfigError> {
    if f.ublk != Some(true) {
        for (key, set) in [
            ("ublk_id", f.ublk_id.is_some()),
            ("ublk_queues", f.ublk_queues.is_some()),
            ("ublk_queue_depth", f.ublk_queue_depth.is_some()),
        ] {
            if set {
                return Err(invalid(key, "is set but `ublk` is not true"));
            }
        }
        return Ok(None);
    }
    if let Some(id) = f.ublk_id.filter(|id| *id >= 1 << 20) {
        return Err(invalid("ublk_id", format!("{id} is outside 0..=1048575 (the kernel's device numbers)")));
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queues = f.ublk_queues.unwrap_or(cpus.min(MAX_DEFAULT_UBLK_QUEUES) as u16);
    if !(1..=64).contains(&queues) {
        return Err(invalid("ublk_queues", format!("{queues} is outside 1..=64")));
    }
    let queue_depth = f.ublk_queue_depth.unwrap_or(DEFAULT_UBLK_QUEUE_DEPTH);
    if !(1..=1024).contains(&queue_depth) {
        return Err(invalid(
            "ublk_queue_depth",
            format!("{queue_depth} is outside 1..=1024 (each request slot holds a 512 KiB buffer)"),
        ));
    }
    Ok(Some(crate::ublk::UblkOptions { id: f.ublk_id, queues, queue_depth, read_only: f.read_only.unwrap_or(false) }))
}

/// The cache devices, and the mirror's metadata period.
fn cache_keys(f: &FileConfig, backing: &Path) -> Result<(Vec<PathBuf>, u64), ConfigError> {
    let cache = f.cache.clone().unwrap_or_default();
    if cache.iter().any(|c| c == backing) {
        return Err(invalid("cache", "lists the backing device itself"));
    }
    if let Some(dup) = cache.iter().enumerate().find_map(|(i, c)| cache[..i].contains(c).then_some(c)) {
        return Err(invalid("cache", format!("lists {} twice", dup.display())));
    }
    let metadata_interval_ms = f.metadata_interval_ms.unwrap_or(5000);
    if !(100..=600_000).contains(&metadata_interval_ms) {
        return Err(invalid("metadata_interval_ms", format!("{metadata_interval_ms} is outside 100..=600000")));
    }
    Ok((cache, metadata_interval_ms))
}

fn tls(f: &FileConfig) -> Result<TlsSettings, ConfigError> {
    let mode = match f.tls.as_deref() {
        None | Some("off") => TlsMode::Off,
        Some("on") => TlsMode::Optional,
        Some("require") => TlsMode::Required,
        Some(other) => return Err(invalid("tls", format!("{other:?} is not one of \"off\", \"on\", \"require\""))),
    };
    if mode == TlsMode::Off {
        // A certificate without TLS on is most likely a forgotten `tls = "require"`: serving
        // plain text while the operator believes otherwise is the worse failure.
        for (key, set) in [
            ("tls_cert", f.tls_cert.is_some()),
            ("tls_key", f.tls_key.is_some()),
            ("tls_ca", f.tls_ca.is_some()),
            ("tls_min_version", f.tls_min_version.is_some()),
        ] {
            if set {
                return Err(invalid(key, "is set but `tls` is \"off\" (set tls = \"on\" or \"require\")"));
            }
        }
    } else if f.tls_cert.is_none() {
        return Err(invalid("tls_cert", "is required when `tls` is on (a PEM certificate chain)"));
    } else if f.tls_key.is_none() {
        return Err(invalid("tls_key", "is required when `tls` is on (the certificate's PEM private key)"));
    }
    let min_version = match f.tls_min_version.as_deref() {
        None | Some("1.2") => TlsVersion::V1_2,
        Some("1.3") => TlsVersion::V1_3,
        Some(other) => return Err(invalid("tls_min_version", format!("{other:?} is not \"1.2\" or \"1.3\""))),
    };
    Ok(TlsSettings { mode, cert: f.tls_cert.clone(), key: f.tls_key.clone(), ca: f.tls_ca.clone(), min_version })
}

/// Client networks, and the Unix socket's owner and group.
type Access = (Vec<Cidr>, Option<u32>, Option<u32>);

fn access(f: &FileConfig) -> Result<Access, ConfigError> {
    let allow = match &f.allow {
        None => Vec::new(),
        Some(list) if list.is_empty() => {
            return Err(invalid("allow", "is empty, which would refuse every TCP client; remove it to allow all"));
        }
        Some(list) => list.iter().map(|s| Cidr::parse(s)).collect::<Result<_, _>>().map_err(|r| invalid("allow", r))?,
    };
    if f.unix.is_none() {
        for (key, set) in [("unix_owner", f.unix_owner.is_some()), ("unix_group", f.unix_group.is_some())] {
            if set {
                return Err(invalid(key, "is set but no `unix` socket is"));
            }
        }
    }
    let owner = f.unix_owner.as_deref().map(lookup_user).transpose().map_err(|r| invalid("unix_owner", r))?;
    let group = f.unix_group.as_deref().map(lookup_group).transpose().map_err(|r| invalid("unix_group", r))?;
    Ok((allow, owner, group))
}

fn backing_io(f: &FileConfig) -> Result<IoPolicy, ConfigError> {
    let d = IoPolicy::default();
    let timeout_ms = f.backing_timeout_ms.unwrap_or(d.attempt_timeout.as_millis() as u64);
    if !(100..=3_600_000).contains(&timeout_ms) {
        return Err(invalid("backing_timeout_ms", format!("{timeout_ms} is outside 100..=3600000")));
    }
    let read_retries = f.backing_read_retries.unwrap_or(d.read_retries);
    if read_retries > 100 {
        return Err(invalid("backing_read_retries", format!("{read_retries} is above 100")));
    }
    let backoff_ms = f.backing_retry_backoff_ms.unwrap_or(d.retry_backoff.as_millis() as u64);
    if backoff_ms > 600_000 {
        return Err(invalid("backing_retry_backoff_ms", format!("{backoff_ms} is above 600000")));
    }
    let deadline_ms = f.backing_io_deadline_ms.unwrap_or(d.deadline.as_millis() as u64);
    if deadline_ms > 86_400_000 {
        return Err(invalid("backing_io_deadline_ms", format!("{deadline_ms} is above 86400000 (a day)")));
    }
    if deadline_ms < timeout_ms {
        return Err(invalid(
            "backing_io_deadline_ms",
            format!(
                "{deadline_ms} is below backing_timeout_ms ({timeout_ms}): a request must be allowed at least one \
                 whole attempt"
            ),
        ));
    }
    Ok(IoPolicy {
        attempt_timeout: Duration::from_millis(timeout_ms),
        read_retries,
        retry_backoff: Duration::from_millis(backoff_ms),
        deadline: Duration::from_millis(deadline_ms),
    })
}

fn slow_policy(f: &FileConfig) -> Result<SlowPolicy, ConfigError> {
    let d = SlowPolicy::default();
    let mode = match f.slow_cache_policy.as_deref() {
        None => d.mode,
        Some(s) => SlowCachePolicy::parse(s)
            .ok_or_else(|| invalid("slow_cache_policy", format!("{s:?} is not one of \"route\", \"fail\", \"off\"")))?,
    };
    Ok(SlowPolicy {
        mode,
        factor: f.slow_cache_factor.unwrap_or(d.factor),
        min_latency: f.slow_cache_min_latency_us.map_or(d.min_latency, Duration::from_micros),
        window: f.slow_cache_window_ms.map_or(d.window, Duration::from_millis),
        fail_after: f.slow_cache_fail_after_ms.map_or(d.fail_after, Duration::from_millis),
    })
}

/// The live keys, defaulted and checked by [`Tunables::validate`].
fn tunables(f: &FileConfig) -> Result<Tunables, ConfigError> {
    let d = Tunables::default();
    let hedge_min = f.hedge_min_us.map_or(d.hedge.min, Duration::from_micros);
    let t = Tunables {
        rebuild_min_bytes_per_s: f.rebuild_min_bytes_per_s.map_or(d.rebuild_min_bytes_per_s, |b| b.0),
        rebuild_max_bytes_per_s: f.rebuild_max_bytes_per_s.map_or(d.rebuild_max_bytes_per_s, |b| b.0),
        read_error_budget: f.read_error_budget.unwrap_or(d.read_error_budget),
        hedge: HedgePolicy {
            enabled: f.hedge_reads.unwrap_or(d.hedge.enabled),
            min: hedge_min,
            // A minimum above the default maximum raises the maximum with it.
            max: f.hedge_max_us.map_or(d.hedge.max.max(hedge_min), Duration::from_micros),
            max_percent: f.hedge_max_percent.unwrap_or(d.hedge.max_percent),
        },
        cache_timeout: f.cache_timeout_ms.map_or(d.cache_timeout, Duration::from_millis),
        slow: slow_policy(f)?,
    };
    t.validate().map_err(|r| invalid(r.key, r.reason))?;
    Ok(t)
}

impl ServeConfig {
    /// Validates a merged file config (command-line flags already written over it).
    pub fn from_file_config(f: FileConfig) -> Result<Self, ConfigError> {
        let backing =
            f.backing.clone().ok_or_else(|| invalid("backing", "is required (the durable device or image file)"))?;
        let ends = endpoints(&f)?;
        let (io_engine, registered_buffer_bytes) = io_engine(&f)?;
        let limits = limits(&f)?;
        let log_level = f.log_level.clone().unwrap_or_else(|| "info".to_owned());
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            return Err(invalid("log_level", format!("{log_level:?} is not one of error, warn, info, debug, trace")));
        }
        let (cache, metadata_interval_ms) = cache_keys(&f, &backing)?;
        let (allow, unix_owner, unix_group) = access(&f)?;
        let cfg = ServeConfig {
            ublk: ublk(&f)?,
            zero_copy_reads: zero_copy_reads(&f)?,
            tls: tls(&f)?,
            backing_io: backing_io(&f)?,
            tunables: tunables(&f)?,
            backing,
            listen: ends.listen,
            unix: f.unix,
            unix_mode: ends.unix_mode,
            export: ends.export,
            description: ends.description,
            read_only: f.read_only.unwrap_or(false),
            io_engine,
            registered_buffer_bytes,
            direct: f.direct,
            max_connections: limits.max_connections,
            max_inflight_bytes_per_connection: limits.per_connection,
            handshake_timeout_secs: limits.handshake_timeout_secs,
            idle_timeout_secs: f.idle_timeout_secs.unwrap_or(0),
            idle_poll_us: limits.idle_poll_us,
            log_level,
            cache,
            cache_direct: f.cache_direct,
            take_over_foreign_cache: f.take_over_foreign_cache.unwrap_or(false),
            admin_socket: f.admin_socket,
            metadata_interval_ms,
            metrics: ends.metrics,
            allow,
            unix_owner,
            unix_group,
            max_inflight_bytes_total: limits.total,
        };
        // Read the certificate files now, so that a bad one stops the daemon before any device
        // is opened (and a SIGHUP with a broken one is reported as a config error).
        cfg.policy()?;
        Ok(cfg)
    }
}

/// A user name or numeric uid, resolved to a uid that exists.
fn lookup_user(name: &str) -> Result<u32, String> {
    lookup_id(name, "user", |n, buf| {
        // SAFETY: passwd is a plain C struct; all zeroes is a valid value of it.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: getpwnam_r with a NUL-terminated name, a zeroed passwd struct, and a scratch
        // buffer of the given length; the result pointer is only read when non-null.
        let r = unsafe { libc::getpwnam_r(n.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
        (r, (!found.is_null()).then_some(pw.pw_uid))
    })
}

/// A group name or numeric gid, resolved to a gid that exists.
fn lookup_group(name: &str) -> Result<u32, String> {
    lookup_id(name, "group", |n, buf| {
        // SAFETY: group is a plain C struct; all zeroes is a valid value of it.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in lookup_user, for getgrnam_r.
        let r = unsafe { libc::getgrnam_r(n.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut found) };
        (r, (!found.is_null()).then_some(gr.gr_gid))
    })
}

fn lookup_id(
    name: &str,
    what: &str,
    get: impl Fn(&std::ffi::CStr, &mut [libc::c_char]) -> (i32, Option<u32>),
) -> Result<u32, String> {
    // A numeric id is taken as is: the socket may be meant for an id that has no name here (a
    // container's user namespace), and chown accepts any id.
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("{name:?} contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    match get(&c, &mut buf) {
        (0, Some(id)) => Ok(id),
        (0, None) => Err(format!("no {what} named {name:?} on this system")),
        (e, _) => Err(format!("cannot look up {what} {name:?}: {}", std::io::Error::from_raw_os_error(e))),
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    // "PORT" alone and ":PORT" mean loopback: never expose a block device to the network by accident.
    let with_host = if let Some(port) = s.strip_prefix(':') {
        format!("127.0.0.1:{port}")
    } else if s.chars().all(|c| c.is_ascii_digit()) {
        format!("127.0.0.1:{s}")
    } else {
        s.to_owned()
    };
    with_host
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeConfig, ConfigError> {
        let f: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: "t".into(), message: e.to_string() })?;
        ServeConfig::from_file_config(f)
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn defaults() {
        let c = parse("backing = \"/tmp/x\"").unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(c.export, "superdisk");
        assert_eq!(c.io_engine, EngineKind::Uring);
        assert_eq!(c.max_inflight_bytes_per_connection, 64 << 20);
        // "auto": on only where the client and the server need not share two CPUs.
        let cpus = std::thread::available_parallelism().unwrap().get();
        let auto = if cpus >= ZERO_COPY_AUTO_MIN_CPUS { ZeroCopyReads::Sendfile } else { ZeroCopyReads::Mapped };
        assert_eq!(c.zero_copy_reads, auto);
        let with = |v: &str| parse(&format!("backing = \"/tmp/x\"\nzero_copy_reads = {v}")).map(|c| c.zero_copy_reads);
        for (v, want) in [
            ("true", ZeroCopyReads::Sendfile),
            ("\"on\"", ZeroCopyReads::Sendfile),
            ("\"sendfile\"", ZeroCopyReads::Sendfile),
            ("\"mapped\"", ZeroCopyReads::Mapped),
            ("false", ZeroCopyReads::Off),
            ("\"off\"", ZeroCopyReads::Off),
            ("\"auto\"", auto),
        ] {
            assert_eq!(with(v).unwrap(), want, "{v}");
        }
        for bad in ["\"yes\"", "3", "\"mmap\""] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("zero_copy_reads"), "{bad}: {e}");
        }
        assert_eq!(c.idle_poll_us, DEFAULT_IDLE_POLL_US);
        let poll = |v: &str| parse(&format!("backing = \"/tmp/x\"\nidle_poll_us = {v}")).map(|c| c.idle_poll_us);
        assert_eq!(poll("0").unwrap(), 0);
        assert_eq!(poll("1000").unwrap(), 1000);
        for bad in ["1001", "-1", "\"50us\""] {
            let e = poll(bad).unwrap_err().to_string();
            assert!(e.contains("idle_poll_us"), "{bad}: {e}");
        }
        assert_eq!(c.registered_buffer_bytes, 36 << 20);
        let reg = |v: &str| parse(&format!("backing = \"/tmp/x\"\nregistered_buffer_bytes = {v}"));
        assert_eq!(reg("0").unwrap().registered_buffer_bytes, 0);
        assert_eq!(reg("\"64M\"").unwrap().registered_buffer_bytes, 64 << 20);
        for bad in ["\"512K\"", "\"2G\"", "\"lots\""] {
            let e = reg(bad).unwrap_err().to_string();
            assert!(e.contains("registered_buffer_bytes"), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("backing = \"/x\"\nlisten = \"nonsense\"").unwrap_err().to_string();
        assert!(e.contains("`listen`"), "{e}");
        let e = parse("backing = \"/x\"\nio_engine = \"aio\"").unwrap_err().to_string();
        assert!(e.contains("`io_engine`") && e.contains("aio"), "{e}");
        let e = parse("backing = \"/x\"\nlisten_addr = \"1.2.3.4:5\"").unwrap_err().to_string();
        assert!(e.contains("listen_addr"), "{e}");
        let e = parse("backing = \"/x\"\nmax_connections = \"many\"").unwrap_err().to_string();
        assert!(e.contains("max_connections"), "{e}");
        let e = parse("backing = \"/x\"\ncache = [\"/c\", \"/c\"]").unwrap_err().to_string();
        assert!(e.contains("`cache`") && e.contains("twice"), "{e}");
        let e = parse("backing = \"/x\"\nrebuild_max_bytes_per_s = \"1M\"").unwrap_err().to_string();
        assert!(e.contains("rebuild_max_bytes_per_s"), "{e}");
        let e = parse("backing = \"/x\"\nmetrics = \"localhost:notaport\"").unwrap_err().to_string();
        assert!(e.contains("`metrics`"), "{e}");
        let e = parse("listen = \"1.2.3.4:5\"").unwrap_err().to_string();
        assert!(e.contains("`backing`"), "{e}");
        let e = parse("backing = \"/x\"\nmax_inflight_bytes_per_connection = \"12Q\"").unwrap_err().to_string();
        assert!(e.contains("max_inflight_bytes_per_connection"), "{e}");
    }

    #[test]
    fn ublk_keys() {
        assert_eq!(parse("backing = \"/x\"").unwrap().ublk, None);
        let u = parse("backing = \"/x\"\nublk = true\nlisten = \"\"").unwrap().ublk.expect("ublk on");
        assert_eq!((u.id, u.queue_depth), (None, DEFAULT_UBLK_QUEUE_DEPTH));
        assert!((1..=MAX_DEFAULT_UBLK_QUEUES as u16).contains(&u.queues));
        let u = parse(
            "backing = \"/x\"\nublk = true\nublk_id = 3\nublk_queues = 4\nublk_queue_depth = 128\nread_only = true",
        )
        .unwrap()
        .ublk
        .unwrap();
        assert_eq!(u, crate::ublk::UblkOptions { id: Some(3), queues: 4, queue_depth: 128, read_only: true });
        for (bad, key) in [
            ("ublk_id = 3", "`ublk_id`"),
            ("ublk = true\nublk_queues = 0", "`ublk_queues`"),
            ("ublk = true\nublk_queues = 65", "`ublk_queues`"),
            ("ublk = true\nublk_queue_depth = 0", "`ublk_queue_depth`"),
            ("ublk = true\nublk_queue_depth = 4096", "`ublk_queue_depth`"),
            ("ublk = true\nublk_id = 2000000", "`ublk_id`"),
            ("listen = \"\"", "`listen`"),
        ] {
            let e = parse(&format!("backing = \"/x\"\n{bad}")).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn changed_keys_names_what_differs() {
        let a = parse("backing = \"/x\"").unwrap();
        let b = parse("backing = \"/x\"\nlog_level = \"debug\"\nlisten = \"127.0.0.1:1\"").unwrap();
        assert_eq!(a.changed_keys(&a), Vec::<&str>::new());
        assert_eq!(a.changed_keys(&b), vec!["listen", "log_level"]);
        assert_eq!(
            parse("backing = \"/x\"\nmetrics = \"9100\"").unwrap().metrics,
            Some("127.0.0.1:9100".parse().unwrap())
        );
    }

    #[test]
    fn cache_timeout_key() {
        let c = parse("backing = \"/x\"").unwrap();
        assert_eq!(c.tunables.cache_timeout.as_millis(), 10_000);
        assert_eq!(parse("backing = \"/x\"\ncache_timeout_ms = 0").unwrap().tunables.cache_timeout.as_millis(), 0);
        for bad in ["cache_timeout_ms = 50", "cache_timeout_ms = 3600001", "cache_timeout_ms = -1"] {
            let e = parse(&format!("backing = \"/x\"\n{bad}")).unwrap_err().to_string();
            assert!(e.contains("cache_timeout_ms"), "{bad}: {e}");
        }
        let b = parse("backing = \"/x\"\ncache_timeout_ms = 2000").unwrap();
        assert_eq!(c.changed_keys(&b), vec!["cache_timeout_ms"]);
        assert!(ServeConfig::is_live("cache_timeout_ms"));
    }

    #[test]
    fn hedge_keys() {
        let c = parse("backing = \"/x\"").unwrap();
        assert_eq!(c.tunables.hedge, HedgePolicy::default());
        let c = parse("backing = \"/x\"\nhedge_reads = false\nhedge_min_us = 30000\nhedge_max_percent = 1").unwrap();
        let p = c.tunables.hedge;
        assert!(!p.enabled);
        assert_eq!((p.min, p.max, p.max_percent), (Duration::from_millis(30), Duration::from_millis(30), 1));
        for (text, key) in [
            ("hedge_min_us = 5", "`hedge_min_us`"),
            ("hedge_min_us = 2000\nhedge_max_us = 1000", "`hedge_max_us`"),
            ("hedge_max_percent = 101", "`hedge_max_percent`"),
            ("hedge_reads = \"yes\"", "hedge_reads"),
        ] {
            let e = parse(&format!("backing = \"/x\"\n{text}")).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let a = parse("backing = \"/x\"").unwrap();
        let b = parse("backing = \"/x\"\nhedge_max_percent = 10").unwrap();
        assert_eq!(a.changed_keys(&b), vec!["hedge_max_percent"]);
        assert!(ServeConfig::is_live("hedge_max_percent"));
    }

    #[test]
    fn tls_keys() {
        let c = parse("backing = \"/x\"").unwrap();
        assert_eq!((c.tls.mode, c.tls.min_version), (TlsMode::Off, TlsVersion::V1_2));
        // The files are read at validation: a missing one is an error naming its key and path.
        let e = parse("backing = \"/x\"\ntls = \"require\"\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/k\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`tls_cert`") && e.contains("/nonexistent/c.pem"), "{e}");
        let e = parse("backing = \"/x\"\ntls = \"on\"\ntls_key = \"/k\"").unwrap_err().to_string();
        assert!(e.contains("`tls_cert`"), "{e}");
        let e = parse("backing = \"/x\"\ntls = \"on\"\ntls_cert = \"/c\"").unwrap_err().to_string();
        assert!(e.contains("`tls_key`"), "{e}");
        let e = parse("backing = \"/x\"\ntls = \"yes\"").unwrap_err().to_string();
        assert!(e.contains("`tls`"), "{e}");
        let e = parse("backing = \"/x\"\ntls_ca = \"/ca\"").unwrap_err().to_string();
        assert!(e.contains("`tls_ca`") && e.contains("off"), "{e}");
        let e = parse("backing = \"/x\"\ntls = \"on\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\ntls_min_version = \"1.1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`tls_min_version`"), "{e}");
    }

    #[test]
    fn allow_networks() {
        let c = parse("backing = \"/x\"\nallow = [\"10.0.0.0/8\", \"127.0.0.1\", \"::1/128\", \"fd00::/8\"]").unwrap();
        let has = |ip: &str| c.allow.iter().any(|n| n.contains(ip.parse().unwrap()));
        assert!(has("10.200.3.4") && has("127.0.0.1") && has("::1") && has("fd12::5") && has("::ffff:10.1.1.1"));
        assert!(!has("127.0.0.2") && !has("11.0.0.1") && !has("::2") && !has("fe80::1"));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        assert!(!Cidr::parse("0.0.0.0/0").unwrap().contains("2001:db8::1".parse().unwrap()));
        assert!(Cidr::parse("::/0").unwrap().contains("2001:db8::1".parse().unwrap()));
        for bad in ["[\"10.0.0.1/8\"]", "[\"10.0.0.0/33\"]", "[\"nonsense\"]", "[]", "[\"::1/129\"]"] {
            let e = parse(&format!("backing = \"/x\"\nallow = {bad}")).unwrap_err().to_string();
            assert!(e.contains("`allow`"), "{bad}: {e}");
        }
    }

    #[test]
    fn backing_io_keys_have_defaults_and_are_validated() {
        let c = parse("backing = \"/x\"").unwrap();
        assert_eq!(c.backing_io, IoPolicy::default());
        let c = parse(
            "backing = \"/x\"\nbacking_timeout_ms = 1000\nbacking_read_retries = 0\nbacking_retry_backoff_ms = 10\n\
             backing_io_deadline_ms = 3000",
        )
        .unwrap();
        let p = c.backing_io.clone();
        assert_eq!(
            (p.attempt_timeout, p.read_retries, p.retry_backoff, p.deadline),
            (Duration::from_secs(1), 0, Duration::from_millis(10), Duration::from_secs(3))
        );
        for (text, key) in [
            ("backing_timeout_ms = 5", "`backing_timeout_ms`"),
            ("backing_read_retries = 1000", "`backing_read_retries`"),
            ("backing_retry_backoff_ms = 9999999", "`backing_retry_backoff_ms`"),
            ("backing_timeout_ms = 5000\nbacking_io_deadline_ms = 1000", "`backing_io_deadline_ms`"),
            ("backing_io_deadline_ms = -1", "backing_io_deadline_ms"),
        ] {
            let e = parse(&format!("backing = \"/x\"\n{text}")).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn unix_ownership_and_total_inflight() {
        let c = parse("backing = \"/x\"\nunix = \"/s\"\nunix_owner = \"root\"\nunix_group = \"12345\"").unwrap();
        assert_eq!((c.unix_owner, c.unix_group), (Some(0), Some(12345)));
        let e =
            parse("backing = \"/x\"\nunix = \"/s\"\nunix_owner = \"no-such-user-superdisk\"").unwrap_err().to_string();
        assert!(e.contains("`unix_owner`") && e.contains("no-such-user-superdisk"), "{e}");
        let e =
            parse("backing = \"/x\"\nunix = \"/s\"\nunix_group = \"no-such-group-superdisk\"").unwrap_err().to_string();
        assert!(e.contains("`unix_group`"), "{e}");
        let e = parse("backing = \"/x\"\nunix_owner = \"root\"").unwrap_err().to_string();
        assert!(e.contains("`unix_owner`"), "{e}");
        assert_eq!(parse("backing = \"/x\"").unwrap().max_inflight_bytes_total, 1 << 30);
        let e = parse("backing = \"/x\"\nmax_inflight_bytes_total = \"16M\"").unwrap_err().to_string();
        assert!(e.contains("`max_inflight_bytes_total`"), "{e}");
    }

    #[test]
    fn port_only_means_loopback() {
        assert_eq!(parse_listen(":7000"), Ok("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(parse_listen("7000"), Ok("127.0.0.1:7000".parse().unwrap()));
    }
}

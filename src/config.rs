//! Configuration: a TOML file (`serve --config FILE`) and command-line flags, merged into one
//! validated [`ServeConfig`]. Every option has a key; an unknown key or a bad value is an error
//! that names the key and the reason.

use crate::device::{EngineKind, IoPolicy};
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
    pub direct: Option<bool>,
    pub max_connections: Option<u64>,
    pub max_inflight_bytes_per_connection: Option<ByteSize>,
    pub handshake_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
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
    // Backing I/O under a stall (device::guard): per-attempt timeout, read retries, the backoff
    // between them, and the request deadline after which the client gets EIO.
    pub backing_timeout_ms: Option<u64>,
    pub backing_read_retries: Option<u32>,
    pub backing_retry_backoff_ms: Option<u64>,
    pub backing_io_deadline_ms: Option<u64>,
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
    pub direct: Option<bool>,
    pub max_connections: usize,
    pub max_inflight_bytes_per_connection: usize,
    pub handshake_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub log_level: String,
    pub cache: Vec<PathBuf>,
    pub cache_direct: Option<bool>,
    pub take_over_foreign_cache: bool,
    pub read_error_budget: u32,
    pub rebuild_min_bytes_per_s: u64,
    pub rebuild_max_bytes_per_s: u64,
    pub admin_socket: Option<PathBuf>,
    pub metadata_interval_ms: u64,
    pub metrics: Option<SocketAddr>,
    pub backing_timeout_ms: u64,
    pub backing_read_retries: u32,
    pub backing_retry_backoff_ms: u64,
    pub backing_io_deadline_ms: u64,
}

impl ServeConfig {
    /// Keys whose new value SIGHUP can apply to a running daemon.
    pub const LIVE_KEYS: [&'static str; 4] =
        ["log_level", "rebuild_min_bytes_per_s", "rebuild_max_bytes_per_s", "read_error_budget"];

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
            direct,
            max_connections,
            max_inflight_bytes_per_connection,
            handshake_timeout_secs,
            idle_timeout_secs,
            log_level,
            cache,
            cache_direct,
            take_over_foreign_cache,
            read_error_budget,
            rebuild_min_bytes_per_s,
            rebuild_max_bytes_per_s,
            admin_socket,
            metadata_interval_ms,
            metrics,
            backing_timeout_ms,
            backing_read_retries,
            backing_retry_backoff_ms,
            backing_io_deadline_ms
        );
        out
    }

    /// The backing I/O policy these keys describe.
    pub fn backing_io_policy(&self) -> IoPolicy {
        IoPolicy {
            attempt_timeout: Duration::from_millis(self.backing_timeout_ms),
            read_retries: self.backing_read_retries,
            retry_backoff: Duration::from_millis(self.backing_retry_backoff_ms),
            deadline: Duration::from_millis(self.backing_io_deadline_ms),
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_EXPORT: &str = "superdisk";

impl ServeConfig {
    /// Validates a merged file config (command-line flags already written over it).
    pub fn from_file_config(f: FileConfig) -> Result<Self, ConfigError> {
        let backing = f.backing.ok_or_else(|| invalid("backing", "is required (the durable device or image file)"))?;
        let listen = match f.listen.as_deref() {
            None => Some(DEFAULT_LISTEN.parse().expect("valid default")),
            // An empty string turns TCP off (Unix socket only).
            Some("") => None,
            Some(s) => Some(parse_listen(s).map_err(|r| invalid("listen", r))?),
        };
        let unix_mode = match f.unix_mode.as_deref() {
            None => 0o660,
            Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| invalid("unix_mode", format!("{s:?} is not an octal permission such as \"0660\"")))?,
        };
        let export = f.export.unwrap_or_else(|| DEFAULT_EXPORT.to_owned());
        if export.len() > 4096 || export.contains('\0') {
            return Err(invalid("export", "must be at most 4096 bytes with no NUL"));
        }
        let description = f.description.unwrap_or_default();
        if description.len() > 4096 {
            return Err(invalid("description", "must be at most 4096 bytes"));
        }
        let io_engine = match f.io_engine.as_deref() {
            None => EngineKind::Uring,
            Some(s) => s.parse().map_err(|r: String| invalid("io_engine", r))?,
        };
        let max_connections = f.max_connections.unwrap_or(256);
        if max_connections == 0 || max_connections > 65536 {
            return Err(invalid("max_connections", format!("{max_connections} is outside 1..=65536")));
        }
        let inflight = f.max_inflight_bytes_per_connection.map_or(64 << 20, |b| b.0);
        if !(1 << 20..=1 << 32).contains(&inflight) {
            return Err(invalid(
                "max_inflight_bytes_per_connection",
                format!("{inflight} is outside 1 MiB ..= 4 GiB (it must admit one 32 MiB request to be useful)"),
            ));
        }
        let handshake_timeout_secs = f.handshake_timeout_secs.unwrap_or(30);
        if handshake_timeout_secs == 0 || handshake_timeout_secs > 3600 {
            return Err(invalid("handshake_timeout_secs", "must be between 1 and 3600"));
        }
        let log_level = f.log_level.unwrap_or_else(|| "info".to_owned());
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            return Err(invalid("log_level", format!("{log_level:?} is not one of error, warn, info, debug, trace")));
        }
        let rebuild_min_bytes_per_s = f.rebuild_min_bytes_per_s.map_or(100 << 20, |b| b.0);
        let rebuild_max_bytes_per_s = f.rebuild_max_bytes_per_s.map_or(u64::MAX, |b| b.0);
        if rebuild_min_bytes_per_s == 0 {
            return Err(invalid("rebuild_min_bytes_per_s", "must be positive, or a busy disk would never be rebuilt"));
        }
        if rebuild_max_bytes_per_s < rebuild_min_bytes_per_s {
            return Err(invalid(
                "rebuild_max_bytes_per_s",
                format!("{rebuild_max_bytes_per_s} is below rebuild_min_bytes_per_s ({rebuild_min_bytes_per_s})"),
            ));
        }
        let metadata_interval_ms = f.metadata_interval_ms.unwrap_or(5000);
        if !(100..=600_000).contains(&metadata_interval_ms) {
            return Err(invalid("metadata_interval_ms", format!("{metadata_interval_ms} is outside 100..=600000")));
        }
        let cache = f.cache.unwrap_or_default();
        if cache.iter().any(|c| c == &backing) {
            return Err(invalid("cache", "lists the backing device itself"));
        }
        if let Some(dup) = cache.iter().enumerate().find_map(|(i, c)| cache[..i].contains(c).then_some(c)) {
            return Err(invalid("cache", format!("lists {} twice", dup.display())));
        }
        let metrics = match f.metrics.as_deref() {
            None | Some("") => None,
            Some(s) => Some(parse_listen(s).map_err(|r| invalid("metrics", r))?),
        };
        if listen.is_none() && f.unix.is_none() {
            return Err(invalid("listen", "is empty and no `unix` socket is set: nothing to serve on"));
        }
        let io_default = IoPolicy::default();
        let backing_timeout_ms = f.backing_timeout_ms.unwrap_or(io_default.attempt_timeout.as_millis() as u64);
        if !(100..=3_600_000).contains(&backing_timeout_ms) {
            return Err(invalid("backing_timeout_ms", format!("{backing_timeout_ms} is outside 100..=3600000")));
        }
        let backing_read_retries = f.backing_read_retries.unwrap_or(io_default.read_retries);
        if backing_read_retries > 100 {
            return Err(invalid("backing_read_retries", format!("{backing_read_retries} is above 100")));
        }
        let backing_retry_backoff_ms =
            f.backing_retry_backoff_ms.unwrap_or(io_default.retry_backoff.as_millis() as u64);
        if backing_retry_backoff_ms > 600_000 {
            return Err(invalid("backing_retry_backoff_ms", format!("{backing_retry_backoff_ms} is above 600000")));
        }
        let backing_io_deadline_ms = f.backing_io_deadline_ms.unwrap_or(io_default.deadline.as_millis() as u64);
        if backing_io_deadline_ms > 86_400_000 {
            return Err(invalid(
                "backing_io_deadline_ms",
                format!("{backing_io_deadline_ms} is above 86400000 (a day)"),
            ));
        }
        if backing_io_deadline_ms < backing_timeout_ms {
            return Err(invalid(
                "backing_io_deadline_ms",
                format!(
                    "{backing_io_deadline_ms} is below backing_timeout_ms ({backing_timeout_ms}): a request must be \
                     allowed at least one whole attempt"
                ),
            ));
        }
        Ok(ServeConfig {
            backing,
            listen,
            unix: f.unix,
            unix_mode,
            export,
            description,
            read_only: f.read_only.unwrap_or(false),
            io_engine,
            direct: f.direct,
            max_connections: max_connections as usize,
            max_inflight_bytes_per_connection: inflight as usize,
            handshake_timeout_secs,
            idle_timeout_secs: f.idle_timeout_secs.unwrap_or(0),
            log_level,
            cache,
            cache_direct: f.cache_direct,
            take_over_foreign_cache: f.take_over_foreign_cache.unwrap_or(false),
            read_error_budget: f.read_error_budget.unwrap_or(20),
            rebuild_min_bytes_per_s,
            rebuild_max_bytes_per_s,
            admin_socket: f.admin_socket,
            metadata_interval_ms,
            metrics,
            backing_timeout_ms,
            backing_read_retries,
            backing_retry_backoff_ms,
            backing_io_deadline_ms,
        })
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
    fn backing_io_keys_have_defaults_and_are_validated() {
        let c = parse("backing = \"/x\"").unwrap();
        assert_eq!(c.backing_io_policy(), IoPolicy::default());
        let c = parse(
            "backing = \"/x\"\nbacking_timeout_ms = 1000\nbacking_read_retries = 0\nbacking_retry_backoff_ms = 10\n\
             backing_io_deadline_ms = 3000",
        )
        .unwrap();
        let p = c.backing_io_policy();
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
    fn port_only_means_loopback() {
        assert_eq!(parse_listen(":7000"), Ok("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(parse_listen("7000"), Ok("127.0.0.1:7000".parse().unwrap()));
    }
}

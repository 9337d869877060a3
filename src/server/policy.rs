//! Who may connect and what they may hold: TLS, client networks, Unix socket ownership and the
//! server-wide in-flight budget.

use super::tls::TlsMode;
use std::net::IpAddr;

/// Who may connect and what they may hold: TLS, client networks, Unix socket ownership and the
/// server-wide in-flight budget. Built once at start-up by the daemon (which reads the
/// certificate files with [`super::tls::acceptor`]); `Policy::default()` is the open, plain-text policy tests start from.
#[derive(Clone)]
pub struct Policy {
    pub tls_mode: TlsMode,
    /// Present whenever `tls_mode` is not `Off`.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Whether the TLS configuration demands client certificates (for the log).
    pub client_certificates: bool,
    /// TCP client networks allowed in; empty allows every address.
    pub allow: Vec<Cidr>,
    pub unix_owner: Option<u32>,
    pub unix_group: Option<u32>,
    /// Request bytes in flight across all connections together.
    pub max_inflight_bytes_total: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            tls_mode: TlsMode::Off,
            tls: None,
            client_certificates: false,
            allow: Vec::new(),
            unix_owner: None,
            unix_group: None,
            max_inflight_bytes_total: 1 << 30,
        }
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("tls_mode", &self.tls_mode)
            .field("client_certificates", &self.client_certificates)
            .field("allow", &self.allow)
            .field("unix_owner", &self.unix_owner)
            .field("unix_group", &self.unix_group)
            .field("max_inflight_bytes_total", &self.max_inflight_bytes_total)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Whether a TCP client at `ip` may connect.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(ip))
    }
}

/// A client network: an address and how many leading bits must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN` or a bare address (a single host). Host bits set under the mask are an
    /// error: `10.0.0.1/8` is more likely a typo for a host than a wish for the whole network.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("{s:?} is not an address or ADDR/LEN network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        let c = Cidr { addr, prefix_len };
        if c.masked(addr) != addr {
            return Err(format!(
                "{s:?} has bits set past the /{prefix_len} prefix (the network is {}/{prefix_len})",
                c.masked(addr)
            ));
        }
        Ok(c)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                IpAddr::V4((u32::from(v) & mask).into())
            }
            IpAddr::V6(v) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                IpAddr::V6((u128::from(v) & mask).into())
            }
        }
    }

    /// Whether `ip` is inside the network. An IPv4 client reaching a dual-stack `[::]` listener
    /// arrives as `::ffff:a.b.c.d` and is matched as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

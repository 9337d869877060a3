//! Fixed-newstyle option haggling as a state machine: the driver reads one option, hands its bytes
//! here, writes out whatever this appends to `out`, and acts on the returned [`Next`].

use super::consts::*;
use super::reply::truncate_utf8;
use super::{ExportParams, Session};

/// Option data above this is refused with a hard disconnect: the largest legitimate option (GO with
/// a 4 KiB name, or a few meta-context queries) is far smaller, and skipping gigabytes a client
/// claims to send is a denial-of-service lever.
pub const MAX_OPTION_DATA_BYTES: u32 = 64 * 1024;

/// The server's opening: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("client sent unknown flags {0:#x}")]
pub struct UnknownClientFlags(pub u32);

/// Checks the client flags; returns whether the client asked for NO_ZEROES.
pub fn client_flags(flags: u32) -> Result<bool, UnknownClientFlags> {
    // The spec: "the server MUST drop the TCP connection if the client sets an unknown flag".
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(UnknownClientFlags(flags));
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

/// Parses an option header; `Err` is the bad magic.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_BYTES]) -> Result<(u32, u32), u64> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(magic);
    }
    let option = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    let length = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
    Ok((option, length))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Send `out` and read the next option.
    Continue,
    /// Send `out`, then switch to the transmission phase.
    Transmission(Session),
    /// Send `out` (the ACK to ABORT), then close.
    Close,
    /// Close without sending anything more; the reason is for the log.
    HardDisconnect(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MetaSelection {
    export: String,
    base_allocation: bool,
}

/// How the server treats TLS (spec, "TLS support"), fixed for the life of a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// NOTLS: STARTTLS is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// SELECTIVETLS with no TLS-only export: a client may upgrade, nothing requires it.
    Optional,
    /// FORCEDTLS: every option before the upgrade but STARTTLS and ABORT gets
    /// `NBD_REP_ERR_TLS_REQD`, and EXPORT_NAME (which cannot carry an error) ends the session.
    Required,
}

pub struct Handshake<'a> {
    export: &'a ExportParams,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    shutting_down: bool,
    tls_mode: TlsMode,
    /// STARTTLS was acknowledged: everything after it travels inside TLS.
    tls_active: bool,
    /// Set by an acknowledged STARTTLS until the driver takes it (see [`Handshake::take_tls_upgrade`]).
    upgrade_pending: bool,
}

/// A cursor over option data that never panics on short input.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_first_chunk::<2>()?;
        self.0 = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    fn string(&mut self, n: usize) -> Option<&'a str> {
        if n > MAX_STRING_BYTES {
            return None;
        }
        std::str::from_utf8(self.bytes(n)?).ok()
    }
}

pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).expect("option replies are small").to_be_bytes());
    out.extend_from_slice(data);
}

fn option_error(out: &mut Vec<u8>, option: u32, kind: u32, message: &str) {
    option_reply(out, option, kind, truncate_utf8(message, MAX_STRING_BYTES).as_bytes());
}

impl<'a> Handshake<'a> {
    /// A handshake without TLS (NOTLS); see [`Handshake::with_tls`].
    pub fn new(export: &'a ExportParams, no_zeroes: bool) -> Self {
        Handshake {
            export,
            no_zeroes,
            structured: false,
            meta: None,
            shutting_down: false,
            tls_mode: TlsMode::Off,
            tls_active: false,
            upgrade_pending: false,
        }
    }

    /// Sets the TLS mode. The driver must then check [`Handshake::take_tls_upgrade`] after every
    /// option, since an acknowledged STARTTLS returns [`Next::Continue`].
    pub fn with_tls(mut self, mode: TlsMode) -> Self {
        self.tls_mode = mode;
        self
    }

    /// True once, right after an option whose reply was the ACK to STARTTLS: the driver sends
    /// `out`, then runs the TLS handshake on the socket before reading the next option. (A flag
    /// rather than a `Next` variant keeps `Next` matchable by code that only knows NOTLS.)
    pub fn take_tls_upgrade(&mut self) -> bool {
        std::mem::take(&mut self.upgrade_pending)
    }

    /// Whether STARTTLS has been acknowledged on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// From now on every option but ABORT is answered with ERR_SHUTDOWN.
    pub fn shutting_down(&mut self) {
        self.shutting_down = true;
    }

    fn is_our_export(&self, name: &str) -> bool {
        // The empty name is the default export (spec, NBD_OPT_EXPORT_NAME).
        name.is_empty() || name == self.export.name
    }

    fn session(&self, export_name: &str, block_size_agreed: bool) -> Session {
        let base_allocation = self.structured
            && self
                .meta
                .as_ref()
                .is_some_and(|m| m.base_allocation && self.is_our_export(&m.export) && self.is_our_export(export_name));
        Session {
            structured_replies: self.structured,
            base_allocation,
            transmission_flags: self.export.transmission_flags(self.structured),
            block_size_agreed,
        }
    }

    pub fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Next {
        if self.shutting_down && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Next::HardDisconnect("shutting down during EXPORT_NAME");
            }
            option_error(out, option, REP_ERR_SHUTDOWN, "server is shutting down");
            return Next::Continue;
        }
        if self.tls_mode == TlsMode::Required && !self.tls_active {
            match option {
                OPT_STARTTLS | OPT_ABORT => {}
                // EXPORT_NAME cannot carry an error: the spec says to terminate the session.
                OPT_EXPORT_NAME => return Next::HardDisconnect("EXPORT_NAME before STARTTLS on a TLS-only server"),
                _ => {
                    option_error(out, option, REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
                    return Next::Continue;
                }
            }
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, out),
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Next::Close
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_error(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Next::Continue;
                }
                let name = self.export.name.as_bytes();
                let mut payload = Vec::with_capacity(4 + name.len() + self.export.description.len());
                payload.extend_from_slice(&u32::try_from(name.len()).expect("name ≤ 4096").to_be_bytes());
                payload.extend_from_slice(name);
                payload.extend_from_slice(self.export.description.as_bytes());
                option_reply(out, option, REP_SERVER, &payload);
                option_reply(out, option, REP_ACK, &[]);
                Next::Continue
            }
            OPT_STARTTLS => self.starttls(data, out),
            OPT_INFO | OPT_GO => self.info_or_go(option, data, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_error(out, option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if self.structured {
                    option_error(out, option, REP_ERR_INVALID, "structured replies already negotiated");
                } else {
                    self.structured = true;
                    option_reply(out, option, REP_ACK, &[]);
                }
                Next::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            _ => {
                option_error(out, option, REP_ERR_UNSUP, "option not supported");
                Next::Continue
            }
        }
    }

    fn starttls(&mut self, data: &[u8], out: &mut Vec<u8>) -> Next {
        let option = OPT_STARTTLS;
        if self.tls_mode == TlsMode::Off {
            option_error(out, option, REP_ERR_POLICY, "TLS is not enabled on this server");
        } else if !data.is_empty() {
            option_error(out, option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        } else if self.tls_active {
            option_error(out, option, REP_ERR_INVALID, "TLS is already negotiated");
        } else {
            // "the server MUST NOT preserve any negotiation state ... issued before this command":
            // an attacker in the middle may have sent those options.
            self.structured = false;
            self.meta = None;
            self.tls_active = true;
            self.upgrade_pending = true;
            option_reply(out, option, REP_ACK, &[]);
        }
        Next::Continue
    }

    fn export_name(&mut self, data: &[u8], out: &mut Vec<u8>) -> Next {
        let Ok(name) = std::str::from_utf8(data) else {
            return Next::HardDisconnect("EXPORT_NAME is not UTF-8");
        };
        if !self.is_our_export(name) {
            // EXPORT_NAME cannot carry an error: the spec requires the session to end.
            return Next::HardDisconnect("EXPORT_NAME names an unknown export");
        }
        let session = self.session(name, false);
        out.extend_from_slice(&self.export.size_bytes.to_be_bytes());
        out.extend_from_slice(&session.transmission_flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Next::Transmission(session)
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Next {
        let mut c = Cursor(data);
        let parsed = (|| {
            let name_len = c.u32()? as usize;
            let name = c.string(name_len)?;
            let count = c.u16()?;
            let mut infos = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                infos.push(c.u16()?);
            }
            c.0.is_empty().then_some((name, infos))
        })();
        let Some((name, infos)) = parsed else {
            option_error(out, option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO data");
            return Next::Continue;
        };
        if !self.is_our_export(name) {
            option_error(out, option, REP_ERR_UNKNOWN, "no such export");
            return Next::Continue;
        }
        let block_size_asked = infos.contains(&INFO_BLOCK_SIZE);
        let session = self.session(name, option == OPT_GO && block_size_asked);
        let e = self.export;
        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&e.size_bytes.to_be_bytes());
        info.extend_from_slice(&session.transmission_flags.to_be_bytes());
        option_reply(out, option, REP_INFO, &info);
        if infos.contains(&INFO_NAME) {
            let mut info = INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(e.name.as_bytes());
            option_reply(out, option, REP_INFO, &info);
        }
        if infos.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            let mut info = INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(truncate_utf8(&e.description, MAX_STRING_BYTES).as_bytes());
            option_reply(out, option, REP_INFO, &info);
        }
        // Always sent, asked or not (the spec allows unrequested infos), so that INFO and GO agree and
        // clients that ignore it lose nothing: our minimum is 1, the default.
        let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        info.extend_from_slice(&e.min_block_bytes.to_be_bytes());
        info.extend_from_slice(&e.preferred_block_bytes.to_be_bytes());
        info.extend_from_slice(&e.max_payload_bytes.to_be_bytes());
        option_reply(out, option, REP_INFO, &info);
        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Next::Transmission(session)
        } else {
            Next::Continue
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Next {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // "Issuing this command replaces all previously-set metadata contexts (including when
            // this command fails)".
            self.meta = None;
        }
        if set && !self.structured {
            option_error(out, option, REP_ERR_INVALID, "negotiate structured replies first");
            return Next::Continue;
        }
        let mut c = Cursor(data);
        let parsed = (|| {
            let name_len = c.u32()? as usize;
            let name = c.string(name_len)?;
            let count = c.u32()?;
            let mut queries = Vec::new();
            for _ in 0..count {
                let len = c.u32()? as usize;
                queries.push(c.string(len)?);
            }
            c.0.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            option_error(out, option, REP_ERR_INVALID, "malformed meta context request");
            return Next::Continue;
        };
        if queries.iter().any(|q| !q.contains(':')) {
            option_error(out, option, REP_ERR_INVALID, "a meta context query lacks its namespace");
            return Next::Continue;
        }
        if !self.is_our_export(name) {
            option_error(out, option, REP_ERR_UNKNOWN, "no such export");
            return Next::Continue;
        }
        let selects = |q: &str| q == META_BASE_ALLOCATION || (!set && q == "base:");
        // LIST with no queries lists everything; SET with no queries selects nothing.
        let matched = if queries.is_empty() { !set } else { queries.iter().any(|q| selects(q)) };
        if matched {
            let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &payload);
        }
        if set {
            self.meta = Some(MetaSelection { export: name.to_owned(), base_allocation: matched });
        }
        option_reply(out, option, REP_ACK, &[]);
        Next::Continue
    }
}

#[cfg(test)]
// Tests build small, known values; a lossy cast there is not a wire or disk bug.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn export() -> ExportParams {
        ExportParams {
            name: "disk".into(),
            description: "test disk".into(),
            size_bytes: 1 << 20,
            read_only: false,
            fast_zero: true,
            rotational: false,
            min_block_bytes: 1,
            preferred_block_bytes: 4096,
            max_payload_bytes: 32 << 20,
        }
    }

    /// Splits `out` into (option, reply type, data) triples, asserting the framing is whole.
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(u64::from_be_bytes(out[0..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
            let opt = u32::from_be_bytes(out[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(out[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
            v.push((opt, kind, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn unknown_client_flags_are_refused() {
        assert_eq!(client_flags(3), Ok(true));
        assert_eq!(client_flags(1), Ok(false));
        assert_eq!(client_flags(4), Err(UnknownClientFlags(4)));
    }

    #[test]
    fn unknown_option_gets_unsup_and_haggling_continues() {
        let e = export();
        let mut h = Handshake::new(&e, true);
        let mut out = Vec::new();
        assert_eq!(h.option(0xdead, b"xyz", &mut out), Next::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
    }

    #[test]
    fn info_and_go_agree_and_go_enters_transmission() {
        let e = export();
        let mut h = Handshake::new(&e, true);
        let mut out = Vec::new();
        h.option(OPT_STRUCTURED_REPLY, &[], &mut out);
        let mut info_out = Vec::new();
        assert_eq!(h.option(OPT_INFO, &go_data("disk", &[INFO_BLOCK_SIZE]), &mut info_out), Next::Continue);
        let mut go_out = Vec::new();
        let Next::Transmission(s) = h.option(OPT_GO, &go_data("disk", &[INFO_BLOCK_SIZE]), &mut go_out) else {
            panic!("GO must enter transmission")
        };
        assert_eq!(
            replies(&info_out),
            replies(&go_out).into_iter().map(|(_, k, d)| (OPT_INFO, k, d)).collect::<Vec<_>>()
        );
        assert!(s.structured_replies && s.block_size_agreed && !s.base_allocation);
        assert_ne!(s.transmission_flags & FLAG_SEND_DF, 0);
        let export_info = &replies(&go_out)[0];
        assert_eq!(export_info.1, REP_INFO);
        assert_eq!(&export_info.2[2..10], &e.size_bytes.to_be_bytes());
    }

    #[test]
    fn go_for_unknown_export_is_an_error_not_a_disconnect() {
        let e = export();
        let mut h = Handshake::new(&e, true);
        let mut out = Vec::new();
        assert_eq!(h.option(OPT_GO, &go_data("other", &[]), &mut out), Next::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        out.clear();
        assert!(matches!(h.option(OPT_GO, &go_data("", &[]), &mut out), Next::Transmission(_)));
    }

    #[test]
    fn export_name_sends_zeroes_unless_no_zeroes() {
        let e = export();
        let mut out = Vec::new();
        assert!(matches!(Handshake::new(&e, false).option(OPT_EXPORT_NAME, b"disk", &mut out), Next::Transmission(_)));
        assert_eq!(out.len(), 8 + 2 + 124);
        out.clear();
        Handshake::new(&e, true).option(OPT_EXPORT_NAME, b"", &mut out);
        assert_eq!(out.len(), 10);
        assert_eq!(
            Handshake::new(&e, true).option(OPT_EXPORT_NAME, b"nope", &mut out),
            Next::HardDisconnect("EXPORT_NAME names an unknown export")
        );
    }

    #[test]
    fn meta_context_selection() {
        let e = export();
        let mut h = Handshake::new(&e, true);
        let mut out = Vec::new();
        h.option(OPT_SET_META_CONTEXT, &meta_data("disk", &[META_BASE_ALLOCATION]), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "SET before structured replies");
        out.clear();
        h.option(OPT_STRUCTURED_REPLY, &[], &mut out);
        out.clear();
        h.option(OPT_LIST_META_CONTEXT, &meta_data("disk", &["base:", "qemu:dirty-bitmap:x"]), &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].1, &r[0].2[4..]), (REP_META_CONTEXT, META_BASE_ALLOCATION.as_bytes()));
        out.clear();
        h.option(OPT_SET_META_CONTEXT, &meta_data("disk", &[META_BASE_ALLOCATION]), &mut out);
        assert_eq!(replies(&out)[0].2[0..4], META_BASE_ALLOCATION_ID.to_be_bytes());
        out.clear();
        let Next::Transmission(s) = h.option(OPT_GO, &go_data("disk", &[]), &mut out) else { panic!() };
        assert!(s.base_allocation);
    }

    #[test]
    fn abort_is_acknowledged_then_closes() {
        let e = export();
        let mut out = Vec::new();
        assert_eq!(Handshake::new(&e, true).option(OPT_ABORT, &[], &mut out), Next::Close);
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    #[test]
    fn starttls_is_refused_by_policy() {
        let e = export();
        let mut out = Vec::new();
        Handshake::new(&e, true).option(OPT_STARTTLS, &[], &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_POLICY);
    }

    #[test]
    fn starttls_with_optional_tls_resets_negotiation_state() {
        let e = export();
        let mut h = Handshake::new(&e, true).with_tls(TlsMode::Optional);
        let mut out = Vec::new();
        h.option(OPT_STRUCTURED_REPLY, &[], &mut out);
        h.option(OPT_SET_META_CONTEXT, &meta_data("disk", &[META_BASE_ALLOCATION]), &mut out);
        assert!(!h.take_tls_upgrade());
        out.clear();
        h.option(OPT_STARTTLS, b"x", &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "STARTTLS with data");
        assert!(!h.take_tls_upgrade() && !h.tls_active());
        out.clear();
        assert_eq!(h.option(OPT_STARTTLS, &[], &mut out), Next::Continue);
        assert_eq!(replies(&out), vec![(OPT_STARTTLS, REP_ACK, vec![])]);
        assert!(h.take_tls_upgrade() && h.tls_active());
        assert!(!h.take_tls_upgrade(), "the upgrade is taken once");
        out.clear();
        h.option(OPT_STARTTLS, &[], &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "a second STARTTLS");
        assert!(!h.take_tls_upgrade());
        // Structured replies and the meta context chosen in plain text are forgotten.
        out.clear();
        let Next::Transmission(s) = h.option(OPT_GO, &go_data("disk", &[]), &mut out) else { panic!() };
        assert!(!s.structured_replies && !s.base_allocation);
        assert_eq!(s.transmission_flags & FLAG_SEND_DF, 0);
    }

    #[test]
    fn optional_tls_serves_plain_clients() {
        let e = export();
        let mut h = Handshake::new(&e, true).with_tls(TlsMode::Optional);
        let mut out = Vec::new();
        h.option(OPT_LIST, &[], &mut out);
        assert_eq!(replies(&out).last().unwrap().1, REP_ACK);
        out.clear();
        assert!(matches!(h.option(OPT_GO, &go_data("disk", &[]), &mut out), Next::Transmission(_)));
        let mut out = Vec::new();
        assert!(matches!(
            Handshake::new(&e, true).with_tls(TlsMode::Optional).option(OPT_EXPORT_NAME, b"", &mut out),
            Next::Transmission(_)
        ));
    }

    #[test]
    fn required_tls_refuses_everything_before_starttls() {
        let e = export();
        let mut h = Handshake::new(&e, true).with_tls(TlsMode::Required);
        for (option, data) in [
            (OPT_LIST, vec![]),
            (OPT_INFO, go_data("disk", &[])),
            (OPT_GO, go_data("disk", &[])),
            (OPT_STRUCTURED_REPLY, vec![]),
            (OPT_LIST_META_CONTEXT, meta_data("disk", &[])),
            (OPT_SET_META_CONTEXT, meta_data("disk", &[])),
            (0xdead, vec![1, 2, 3]),
        ] {
            let mut out = Vec::new();
            assert_eq!(h.option(option, &data, &mut out), Next::Continue, "option {option}");
            assert_eq!(replies(&out), vec![(option, REP_ERR_TLS_REQD, replies(&out)[0].2.clone())]);
        }
        let mut out = Vec::new();
        assert!(matches!(h.option(OPT_EXPORT_NAME, b"disk", &mut out), Next::HardDisconnect(_)));
        assert!(out.is_empty());
        let mut out = Vec::new();
        assert_eq!(Handshake::new(&e, true).with_tls(TlsMode::Required).option(OPT_ABORT, &[], &mut out), Next::Close);
        // After the upgrade, nothing is TLS_REQD any more and the export is served.
        let mut h = Handshake::new(&e, true).with_tls(TlsMode::Required);
        let mut out = Vec::new();
        h.option(OPT_STARTTLS, &[], &mut out);
        assert!(h.take_tls_upgrade());
        for option in [OPT_LIST, OPT_STRUCTURED_REPLY, 0xdead] {
            out.clear();
            h.option(option, &[], &mut out);
            assert_ne!(replies(&out).last().unwrap().1, REP_ERR_TLS_REQD, "option {option} after TLS");
        }
        out.clear();
        let Next::Transmission(s) = h.option(OPT_GO, &go_data("disk", &[]), &mut out) else { panic!() };
        assert!(s.structured_replies);
    }

    proptest! {
        // Whatever options arrive in whatever TLS mode, TLS_REQD is only ever sent in FORCEDTLS
        // before the upgrade, and never to STARTTLS or ABORT (spec, "TLS support").
        #[test]
        fn tls_reqd_only_before_upgrade_in_required_mode(
            mode in prop_oneof![Just(TlsMode::Off), Just(TlsMode::Optional), Just(TlsMode::Required)],
            options in proptest::collection::vec((0u32..12, proptest::collection::vec(any::<u8>(), 0..8)), 1..12),
        ) {
            let e = export();
            let mut h = Handshake::new(&e, true).with_tls(mode);
            for (option, data) in options {
                let before = h.tls_active();
                let mut out = Vec::new();
                let next = h.option(option, &data, &mut out);
                if h.take_tls_upgrade() {
                    prop_assert!(mode != TlsMode::Off && option == OPT_STARTTLS && !before);
                    prop_assert_eq!(replies(&out), vec![(OPT_STARTTLS, REP_ACK, vec![])]);
                }
                let tls_reqd = !out.is_empty() && option != OPT_EXPORT_NAME
                    && replies(&out).iter().any(|r| r.1 == REP_ERR_TLS_REQD);
                prop_assert_eq!(tls_reqd, mode == TlsMode::Required && !before
                    && ![OPT_STARTTLS, OPT_ABORT, OPT_EXPORT_NAME].contains(&option));
                if !matches!(next, Next::Continue) {
                    break;
                }
            }
        }
    }

    proptest! {
        // Whatever option bytes arrive, the handshake answers with whole, well-framed replies.
        #[test]
        fn arbitrary_options_never_panic(option in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let e = export();
            let mut h = Handshake::new(&e, true);
            let mut out = Vec::new();
            let next = h.option(option, &data, &mut out);
            if option != OPT_EXPORT_NAME && !matches!(next, Next::HardDisconnect(_)) {
                prop_assert!(!replies(&out).is_empty());
            }
        }

        #[test]
        fn option_header_round_trip(option: u32, length: u32) {
            let mut b = [0u8; OPTION_HEADER_BYTES];
            b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
            b[8..12].copy_from_slice(&option.to_be_bytes());
            b[12..16].copy_from_slice(&length.to_be_bytes());
            prop_assert_eq!(decode_option_header(&b), Ok((option, length)));
        }
    }
}

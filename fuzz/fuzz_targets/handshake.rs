//! Drives one `Handshake` through a sequence of options decoded from the fuzz input and checks that
//! everything it answers is well framed and consistent with what was negotiated so far.
//!
//! Input layout (chosen so that short inputs reach deep states; seeds in corpus/handshake/):
//!   byte 0            export/config bits (see `Config`)
//!   bytes 1..5        client flags, checked with `client_flags` (an error ends the input)
//!   then repeated:    selector byte
//!                       0xff        → `shutting_down()`
//!                       0xf0..0xfe  → a raw u32 option number follows
//!                       otherwise   → option `selector % 12` (every assigned option and a few more)
//!                     u16 data length (clamped to what is left), then the data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use superdisk::nbd::consts::*;
use superdisk::nbd::handshake::{client_flags, decode_option_header, greeting, Handshake, Next};
use superdisk::nbd::{ExportParams, Session};

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn export(config: u8) -> ExportParams {
    ExportParams {
        // An empty configured name is legal and must not confuse "" meaning the default export.
        name: if config & 4 != 0 { String::new() } else { "superdisk".into() },
        description: if config & 8 != 0 { String::new() } else { "fuzz disk ✓".into() },
        size_bytes: if config & 16 != 0 { u64::MAX } else { 64 << 20 },
        read_only: config & 2 != 0,
        fast_zero: config & 32 != 0,
        rotational: config & 64 != 0,
        min_block_bytes: 1,
        preferred_block_bytes: 4096,
        max_payload_bytes: 32 << 20,
    }
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
}

/// Splits `out` into (reply type, data), asserting each reply is whole and answers `option`.
fn replies(mut out: &[u8], option: u32) -> Vec<(u32, &[u8])> {
    let mut v = Vec::new();
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated option reply header");
        assert_eq!(be_u64(out), OPTION_REPLY_MAGIC, "option reply magic");
        assert_eq!(be_u32(&out[8..]), option, "option reply must echo its option");
        let kind = be_u32(&out[12..]);
        let len = be_u32(&out[16..]) as usize;
        assert!(out.len() >= 20 + len, "option reply length {len} runs past the bytes produced");
        v.push((kind, &out[20..20 + len]));
        out = &out[20 + len..];
    }
    v
}

fn is_error(kind: u32) -> bool {
    kind & (1 << 31) != 0
}

fn check_session(s: &Session, e: &ExportParams, structured: bool) {
    assert_eq!(s.structured_replies, structured, "session disagrees with STRUCTURED_REPLY history");
    assert!(!s.base_allocation || s.structured_replies, "base:allocation needs structured replies");
    assert_eq!(s.transmission_flags, e.transmission_flags(structured));
    let f = s.transmission_flags;
    assert_ne!(f & FLAG_HAS_FLAGS, 0);
    assert_eq!(f & FLAG_SEND_DF != 0, structured, "DF exactly when structured replies are on");
    assert_eq!(f & FLAG_READ_ONLY != 0, e.read_only);
}

/// Content checks for the reply kinds whose layout the spec fixes.
fn check_reply(kind: u32, data: &[u8], e: &ExportParams) {
    match kind {
        REP_ACK => assert!(data.is_empty(), "ACK with data"),
        REP_SERVER => {
            assert!(data.len() >= 4);
            let name_len = be_u32(data) as usize;
            assert!(4 + name_len <= data.len(), "SERVER reply name runs past the reply");
            assert_eq!(&data[4..4 + name_len], e.name.as_bytes());
        }
        REP_INFO => {
            assert!(data.len() >= 2, "INFO without a type");
            match be_u16(data) {
                INFO_EXPORT => {
                    assert_eq!(data.len(), 12);
                    assert_eq!(be_u64(&data[2..]), e.size_bytes);
                }
                INFO_NAME | INFO_DESCRIPTION => {
                    assert!(data.len() - 2 <= MAX_STRING_BYTES);
                    assert!(std::str::from_utf8(&data[2..]).is_ok());
                }
                INFO_BLOCK_SIZE => {
                    assert_eq!(data.len(), 14);
                    let (min, pref, max) = (be_u32(&data[2..]), be_u32(&data[6..]), be_u32(&data[10..]));
                    assert!(min.is_power_of_two() && pref.is_power_of_two() && min <= pref && pref <= max);
                }
                other => panic!("unknown info type {other}"),
            }
        }
        REP_META_CONTEXT => {
            assert!(data.len() > 4, "META_CONTEXT without a name");
            assert_eq!(&data[4..], META_BASE_ALLOCATION.as_bytes());
        }
        k if is_error(k) => {
            assert!(data.len() <= MAX_STRING_BYTES, "error message over 4096 bytes");
            assert!(std::str::from_utf8(data).is_ok(), "error message is not UTF-8");
        }
        other => panic!("unknown reply type {other:#x}"),
    }
}

const KNOWN: [u32; 9] = [
    OPT_EXPORT_NAME,
    OPT_ABORT,
    OPT_LIST,
    OPT_STARTTLS,
    OPT_INFO,
    OPT_GO,
    OPT_STRUCTURED_REPLY,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
];

fuzz_target!(|data: &[u8]| {
    let g = greeting();
    assert_eq!((be_u64(&g), be_u64(&g[8..])), (NBDMAGIC, IHAVEOPT));

    let mut input = Input(data);
    let Some(&[config]) = input.take(1) else { return };
    let Some(flags) = input.take(4) else { return };
    let flags = be_u32(flags);
    let known_flags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let no_zeroes = match client_flags(flags) {
        Ok(nz) => {
            assert_eq!(flags & !known_flags, 0, "unknown client flags accepted");
            assert_eq!(nz, flags & FLAG_C_NO_ZEROES != 0);
            nz
        }
        Err(_) => {
            assert_ne!(flags & !known_flags, 0, "known client flags refused");
            return;
        }
    };

    let e = export(config);
    let mut h = Handshake::new(&e, no_zeroes);
    let mut structured = false;
    let mut shutting_down = false;
    let mut out = Vec::new();
    while let Some(&[selector]) = input.take(1) {
        let option = match selector {
            0xff => {
                h.shutting_down();
                shutting_down = true;
                continue;
            }
            0xf0..=0xfe => match input.take(4) {
                Some(b) => be_u32(b),
                None => return,
            },
            s => u32::from(s % 12),
        };
        let Some(len) = input.take(2) else { return };
        let len = usize::from(be_u16(len)).min(input.0.len());
        let payload = input.take(len).expect("clamped");

        // The option header the driver would have decoded must round-trip.
        let mut header = [0u8; OPTION_HEADER_BYTES];
        header[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        header[8..12].copy_from_slice(&option.to_be_bytes());
        header[12..16].copy_from_slice(&(len as u32).to_be_bytes());
        assert_eq!(decode_option_header(&header), Ok((option, len as u32)));

        out.clear();
        let next = h.option(option, payload, &mut out);
        if let Next::HardDisconnect(_) = next {
            assert!(out.is_empty(), "hard disconnect must not send anything");
            assert_eq!(option, OPT_EXPORT_NAME, "only EXPORT_NAME has no way to report an error");
            return;
        }
        if option == OPT_EXPORT_NAME {
            let Next::Transmission(s) = next else { panic!("EXPORT_NAME must end negotiation: {next:?}") };
            assert!(!shutting_down);
            assert_eq!(out.len(), if no_zeroes { 10 } else { 134 }, "EXPORT_NAME reply size");
            assert_eq!(be_u64(&out), e.size_bytes);
            assert_eq!(be_u16(&out[8..]), s.transmission_flags);
            assert!(out[10..].iter().all(|&b| b == 0));
            assert!(!s.block_size_agreed, "EXPORT_NAME cannot agree block sizes");
            check_session(&s, &e, structured);
            return;
        }

        let r = replies(&out, option);
        assert!(!r.is_empty(), "option {option:#x} got no reply");
        let (last_kind, _) = *r.last().unwrap();
        assert!(last_kind == REP_ACK || is_error(last_kind), "a reply sequence must end in ACK or an error");
        for &(kind, data) in &r {
            check_reply(kind, data, &e);
        }
        for &(kind, _) in &r[..r.len() - 1] {
            assert!(kind != REP_ACK && !is_error(kind), "ACK or error before the end of a reply sequence");
        }
        if is_error(last_kind) {
            // Every refusal here is decided before any INFO or META_CONTEXT is produced, so a
            // client never sees half an answer followed by an error.
            assert_eq!(r.len(), 1, "an error reply comes alone");
        }
        if shutting_down && option != OPT_ABORT {
            assert_eq!(last_kind, REP_ERR_SHUTDOWN, "options after shutdown began");
        }
        if !KNOWN.contains(&option) && !shutting_down {
            assert_eq!(last_kind, REP_ERR_UNSUP, "unknown option {option:#x}");
        }
        if option == OPT_STARTTLS && !shutting_down {
            assert_eq!(last_kind, REP_ERR_POLICY);
        }
        if option == OPT_STRUCTURED_REPLY && last_kind == REP_ACK {
            assert!(!structured, "structured replies negotiated twice");
            structured = true;
        }
        match next {
            Next::Transmission(s) => {
                assert_eq!((option, last_kind), (OPT_GO, REP_ACK), "only a successful GO enters transmission");
                check_session(&s, &e, structured);
                return;
            }
            Next::Close => {
                assert_eq!((option, last_kind), (OPT_ABORT, REP_ACK));
                return;
            }
            Next::Continue => {
                assert!(option != OPT_ABORT, "ABORT must close");
                assert!(!(option == OPT_GO && last_kind == REP_ACK), "an acknowledged GO must enter transmission");
            }
            Next::HardDisconnect(_) => unreachable!("handled above"),
        }
    }
});

//! Decodes request headers from the fuzz input and validates them against one of a few fixed
//! exports and sessions, checking that whatever `validate` accepts is safe to hand to the engine
//! (in bounds without overflow, permitted, within the payload limit) and that every refusal carries
//! an error value the spec allows for that command.
//!
//! Input layout: byte 0 picks the export, byte 1 the session, then 28-byte request headers. A header
//! whose magic is wrong is checked for rejection and then retried with the magic patched in, so the
//! fuzzer does not need to discover the magic to reach `validate`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use superdisk::nbd::consts::*;
use superdisk::nbd::request::{decode_header, encode_header, validate, BadMagic, Op, RequestHeader};
use superdisk::nbd::{ExportParams, NbdError, Session};

const SIZES: [u64; 8] = [0, 1, 511, 1 << 20, (1 << 30) + 7, 4 << 40, u64::MAX - 4096, u64::MAX];
const MIN_BLOCKS: [u32; 4] = [1, 512, 4096, 1];

fn export(b: u8) -> ExportParams {
    ExportParams {
        name: "superdisk".into(),
        description: String::new(),
        size_bytes: SIZES[usize::from(b & 7)],
        read_only: b & 8 != 0,
        fast_zero: b & 16 != 0,
        rotational: false,
        min_block_bytes: MIN_BLOCKS[usize::from(b >> 5 & 3)],
        preferred_block_bytes: 4096,
        max_payload_bytes: if b & 128 != 0 { 1 << 20 } else { 32 << 20 },
    }
}

fn session(b: u8, e: &ExportParams) -> Session {
    let structured = b & 1 != 0;
    Session {
        structured_replies: structured,
        // The handshake only grants base:allocation with structured replies; validate must be safe
        // for any combination anyway, so bit 2 can force the inconsistent one.
        base_allocation: b & 2 != 0 && (structured || b & 4 != 0),
        transmission_flags: e.transmission_flags(structured),
        block_size_agreed: b & 8 != 0,
    }
}

fn allowed_flags(command: u16) -> u16 {
    CMD_FLAG_FUA
        | match command {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

fn check(h: &RequestHeader, e: &ExportParams, s: &Session) {
    assert_eq!(h.payload_bytes(), if h.command == CMD_WRITE { h.length } else { 0 });
    let fua = h.flags & CMD_FLAG_FUA != 0;
    match validate(h, e, s) {
        Ok(op) => {
            // DISC has no reply to carry an error in, so it is honoured whatever its flags.
            if h.command != CMD_DISC {
                assert_eq!(h.flags & !allowed_flags(h.command), 0, "unknown flag accepted: {h:?}");
                assert!(h.flags & CMD_FLAG_DF == 0 || s.structured_replies, "DF accepted without structured replies");
            }
            let range = match op {
                Op::Disconnect => {
                    assert_eq!(h.command, CMD_DISC);
                    None
                }
                Op::Flush => {
                    assert_eq!(h.command, CMD_FLUSH);
                    None
                }
                Op::Read { offset, length } => {
                    assert_eq!(h.command, CMD_READ);
                    assert!(length <= e.max_payload_bytes, "read over the payload limit accepted");
                    Some((offset, length))
                }
                Op::Write { offset, length, fua: f } => {
                    assert_eq!((h.command, f), (CMD_WRITE, fua));
                    assert!(length <= e.max_payload_bytes, "write over the payload limit accepted");
                    Some((offset, length))
                }
                Op::Trim { offset, length, fua: f } => {
                    assert_eq!((h.command, f), (CMD_TRIM, fua));
                    Some((offset, length))
                }
                Op::WriteZeroes { offset, length, fua: f, may_trim, fast_only } => {
                    assert_eq!((h.command, f), (CMD_WRITE_ZEROES, fua));
                    assert_eq!(may_trim, h.flags & CMD_FLAG_NO_HOLE == 0);
                    assert_eq!(fast_only, h.flags & CMD_FLAG_FAST_ZERO != 0);
                    assert!(!fast_only || e.fast_zero, "FAST_ZERO accepted by an export that cannot");
                    Some((offset, length))
                }
                Op::Cache { offset, length } => {
                    assert_eq!(h.command, CMD_CACHE);
                    Some((offset, length))
                }
                Op::BlockStatus { offset, length, req_one } => {
                    assert_eq!(h.command, CMD_BLOCK_STATUS);
                    assert!(s.base_allocation, "BLOCK_STATUS without a negotiated context");
                    assert_eq!(req_one, h.flags & CMD_FLAG_REQ_ONE != 0);
                    Some((offset, length))
                }
            };
            if matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }) {
                assert!(!e.read_only, "modification accepted on a read-only export");
            }
            if let Some((offset, length)) = range {
                assert_eq!((offset, length), (h.offset, h.length), "op does not carry the request's range");
                let end = offset.checked_add(u64::from(length)).expect("accepted range overflows u64");
                assert!(end <= e.size_bytes, "accepted range {offset}+{length} ends past {}", e.size_bytes);
                if s.block_size_agreed {
                    let m = u64::from(e.min_block_bytes);
                    assert!(offset % m == 0 && u64::from(length) % m == 0, "misaligned request accepted");
                }
            }
        }
        Err(err) => {
            assert_ne!(h.command, CMD_DISC, "DISC cannot be refused");
            let writes = matches!(h.command, CMD_WRITE | CMD_WRITE_ZEROES);
            match err {
                NbdError::Inval => {}
                NbdError::NoSpc => assert!(writes, "ENOSPC for command {}", h.command),
                NbdError::Perm => {
                    assert!(e.read_only && (writes || h.command == CMD_TRIM), "EPERM for {h:?}")
                }
                NbdError::Overflow => {
                    assert!(h.command == CMD_READ && s.structured_replies, "EOVERFLOW for {h:?}")
                }
                NbdError::NotSup => {
                    assert!(h.command == CMD_WRITE_ZEROES && h.flags & CMD_FLAG_FAST_ZERO != 0, "ENOTSUP for {h:?}")
                }
                other => panic!("validate returned {other:?}, which no bad request should get"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [e_byte, s_byte, rest @ ..] = data else { return };
    let e = export(*e_byte);
    let s = session(*s_byte, &e);
    for chunk in rest.chunks_exact(REQUEST_HEADER_BYTES) {
        let mut raw: [u8; REQUEST_HEADER_BYTES] = chunk.try_into().unwrap();
        let magic = u32::from_be_bytes(raw[..4].try_into().unwrap());
        match decode_header(&raw) {
            Ok(_) => assert_eq!(magic, REQUEST_MAGIC),
            Err(BadMagic(m)) => {
                assert_eq!(m, magic);
                assert_ne!(magic, REQUEST_MAGIC);
                raw[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
        }
        let h = decode_header(&raw).expect("magic is right now");
        assert_eq!(encode_header(&h), raw, "encode(decode(x)) != x");
        check(&h, &e, &s);
    }
});

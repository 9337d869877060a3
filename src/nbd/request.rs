//! Transmission-phase requests: decoding the fixed 28-byte header and deciding, before any I/O,
//! whether a request is acceptable and what the engine must do with it.

use super::consts::*;
use super::{ExportParams, NbdError, Session};

/// A request header exactly as the client sent it (fields still raw, so that errors can name them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// The 4 bytes that should have been `NBD_REQUEST_MAGIC`; the stream cannot be resynchronised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

pub fn decode_header(buf: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, BadMagic> {
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        command: u16::from_be_bytes([buf[6], buf[7]]),
        cookie: u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(buf[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(buf[24..28].try_into().expect("4 bytes")),
    })
}

/// The inverse of [`decode_header`]; used by tests, fuzzers and the bad-input suite.
pub fn encode_header(h: &RequestHeader) -> [u8; REQUEST_HEADER_BYTES] {
    let mut b = [0u8; REQUEST_HEADER_BYTES];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.command.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.length.to_be_bytes());
    b
}

impl RequestHeader {
    /// Bytes of payload that follow the header on the wire, whether or not the request is accepted:
    /// a rejected WRITE's data must still be read off the socket or the stream desynchronises.
    pub fn payload_bytes(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A validated request, in the terms the engine understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
        fast_only: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
    /// Soft disconnect: no reply, finish what is in flight, close.
    Disconnect,
}

fn allowed_flags(command: u16) -> u16 {
    // FUA is valid on every command (spec: "the server MUST accept all commands with this bit set").
    CMD_FLAG_FUA
        | match command {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Decides what to do with a request. `Err` carries the error the client must get; the caller
/// still has to consume [`RequestHeader::payload_bytes`] from the socket either way.
pub fn validate(h: &RequestHeader, export: &ExportParams, session: &Session) -> Result<Op, NbdError> {
    use NbdError::*;
    let known = matches!(
        h.command,
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    );
    if !known {
        return Err(Inval);
    }
    if h.command == CMD_DISC {
        return Ok(Op::Disconnect);
    }
    if h.flags & !allowed_flags(h.command) != 0 {
        return Err(Inval);
    }
    if h.flags & CMD_FLAG_DF != 0 && !session.structured_replies {
        return Err(Inval);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only {
        return Err(Perm);
    }
    if h.command == CMD_FLUSH {
        // The spec reserves offset and length of a flush as zero; anything else is a confused client.
        return if h.offset == 0 && h.length == 0 { Ok(Op::Flush) } else { Err(Inval) };
    }
    if h.command == CMD_BLOCK_STATUS && !session.base_allocation {
        return Err(Inval);
    }
    // Bounds without overflow: offset + length is computed in u128-free checked arithmetic.
    let in_bounds = h.offset.checked_add(u64::from(h.length)).is_some_and(|end| end <= export.size_bytes);
    if !in_bounds {
        return Err(if matches!(h.command, CMD_WRITE | CMD_WRITE_ZEROES) { NoSpc } else { Inval });
    }
    if session.block_size_agreed && export.min_block_bytes > 1 {
        let mask = u64::from(export.min_block_bytes) - 1;
        if h.offset & mask != 0 || u64::from(h.length) & mask != 0 {
            return Err(Inval);
        }
    }
    let (offset, length) = (h.offset, h.length);
    match h.command {
        CMD_READ => {
            if length > export.max_payload_bytes {
                // Structured replies could split it, but the payload would be ours to buffer; the
                // spec lets us refuse up front, and clients retry smaller.
                return Err(if session.structured_replies { Overflow } else { Inval });
            }
            Ok(Op::Read { offset, length })
        }
        CMD_WRITE => {
            if length > export.max_payload_bytes {
                return Err(Inval);
            }
            Ok(Op::Write { offset, length, fua })
        }
        CMD_TRIM => Ok(Op::Trim { offset, length, fua }),
        CMD_WRITE_ZEROES => {
            let fast_only = h.flags & CMD_FLAG_FAST_ZERO != 0;
            if fast_only && !export.fast_zero {
                return Err(NotSup);
            }
            Ok(Op::WriteZeroes { offset, length, fua, may_trim: h.flags & CMD_FLAG_NO_HOLE == 0, fast_only })
        }
        CMD_CACHE => Ok(Op::Cache { offset, length }),
        CMD_BLOCK_STATUS => Ok(Op::BlockStatus { offset, length, req_one: h.flags & CMD_FLAG_REQ_ONE != 0 }),
        _ => unreachable!("unknown commands were rejected above"),
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
            name: String::new(),
            description: String::new(),
            size_bytes: 1 << 30,
            read_only: false,
            fast_zero: true,
            rotational: false,
            min_block_bytes: 1,
            preferred_block_bytes: 4096,
            max_payload_bytes: 32 << 20,
        }
    }

    fn session(structured: bool) -> Session {
        Session {
            structured_replies: structured,
            base_allocation: structured,
            transmission_flags: 0,
            block_size_agreed: false,
        }
    }

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, command, cookie: 7, offset, length }
    }

    proptest! {
        // Expected-result-first: pick the header, build its bytes, the decoder must give it back.
        #[test]
        fn decode_returns_what_was_encoded(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let want = RequestHeader { flags, command, cookie, offset, length };
            prop_assert_eq!(decode_header(&encode_header(&want)), Ok(want));
        }

        #[test]
        fn any_other_magic_is_rejected(magic: u32, rest: [u8; 24]) {
            prop_assume!(magic != REQUEST_MAGIC);
            let mut b = [0u8; REQUEST_HEADER_BYTES];
            b[..4].copy_from_slice(&magic.to_be_bytes());
            b[4..].copy_from_slice(&rest);
            prop_assert_eq!(decode_header(&b), Err(BadMagic(magic)));
        }

        // Whatever the fields, validation never panics and an accepted I/O lies inside the export.
        #[test]
        fn accepted_requests_are_in_bounds(flags: u16, command in 0u16..10, offset: u64, length: u32, structured: bool) {
            let e = export();
            let h = header(command, flags, offset, length);
            if let Ok(op) = validate(&h, &e, &session(structured)) {
                let range = match op {
                    Op::Read { offset, length } | Op::Write { offset, length, .. } | Op::Trim { offset, length, .. }
                    | Op::WriteZeroes { offset, length, .. } | Op::Cache { offset, length }
                    | Op::BlockStatus { offset, length, .. } => Some((offset, length)),
                    Op::Flush | Op::Disconnect => None,
                };
                if let Some((o, l)) = range {
                    prop_assert!(o + u64::from(l) <= e.size_bytes);
                }
            }
        }
    }

    #[test]
    fn bounds_errors_follow_the_spec() {
        let (e, s) = (export(), session(false));
        let end = e.size_bytes;
        assert_eq!(validate(&header(CMD_READ, 0, end - 1, 2), &e, &s), Err(NbdError::Inval));
        assert_eq!(validate(&header(CMD_WRITE, 0, end, 1), &e, &s), Err(NbdError::NoSpc));
        assert_eq!(validate(&header(CMD_WRITE_ZEROES, 0, end, 1), &e, &s), Err(NbdError::NoSpc));
        assert_eq!(validate(&header(CMD_TRIM, 0, u64::MAX, 2), &e, &s), Err(NbdError::Inval));
        assert_eq!(validate(&header(CMD_READ, 0, 0, 1 << 30), &e, &s), Err(NbdError::Inval));
        assert_eq!(validate(&header(CMD_READ, 0, end, 0), &e, &s), Ok(Op::Read { offset: end, length: 0 }));
    }

    #[test]
    fn flags_are_checked_per_command() {
        let e = export();
        assert_eq!(validate(&header(CMD_READ, CMD_FLAG_DF, 0, 1), &e, &session(false)), Err(NbdError::Inval));
        assert!(validate(&header(CMD_READ, CMD_FLAG_DF, 0, 1), &e, &session(true)).is_ok());
        assert_eq!(validate(&header(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &e, &session(true)), Err(NbdError::Inval));
        assert!(validate(&header(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &e, &session(true)).is_ok());
        assert_eq!(validate(&header(CMD_FLUSH, 0, 1, 0), &e, &session(true)), Err(NbdError::Inval));
        assert_eq!(validate(&header(99, 0, 0, 0), &e, &session(true)), Err(NbdError::Inval));
        assert_eq!(validate(&header(CMD_BLOCK_STATUS, 0, 0, 1), &e, &session(false)), Err(NbdError::Inval));
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let mut e = export();
        e.read_only = true;
        let s = session(true);
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(validate(&header(cmd, 0, 0, 512), &e, &s), Err(NbdError::Perm));
        }
        assert!(validate(&header(CMD_READ, 0, 0, 512), &e, &s).is_ok());
    }

    #[test]
    fn write_payload_is_counted_even_when_rejected() {
        let h = header(CMD_WRITE, 0xffff, u64::MAX, 4096);
        assert_eq!(h.payload_bytes(), 4096);
        assert_eq!(header(CMD_READ, 0, 0, 4096).payload_bytes(), 0);
    }
}

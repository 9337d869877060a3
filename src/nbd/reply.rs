//! Transmission-phase reply encoders. Each function appends one whole message (or message header,
//! for data that the caller sends from its own buffer) to `out`, so the writer can batch several
//! replies into one `write` without interleaving them.

use super::consts::*;
use super::NbdError;

pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const CHUNK_HEADER_BYTES: usize = 20;
/// Structured OFFSET_DATA header: the chunk header plus the 8-byte offset.
pub const OFFSET_DATA_HEADER_BYTES: usize = CHUNK_HEADER_BYTES + 8;

pub fn simple(out: &mut Vec<u8>, cookie: u64, error: Option<NbdError>) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.map_or(0, NbdError::code).to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

pub fn chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// The header of a final OFFSET_DATA chunk; `data_bytes` of payload must follow.
pub fn offset_data_header(out: &mut Vec<u8>, cookie: u64, offset: u64, data_bytes: u32, done: bool) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_DATA, data_bytes + 8);
    out.extend_from_slice(&offset.to_be_bytes());
}

pub fn none_done(out: &mut Vec<u8>, cookie: u64) {
    chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// A final error chunk carrying a human-readable message (spec: SHOULD prefer structured errors).
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: NbdError, message: &str) {
    let msg = truncate_utf8(message, MAX_STRING_BYTES);
    let msg_len = u16::try_from(msg.len()).expect("message truncated to 4096 bytes");
    chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + u32::from(msg_len));
    out.extend_from_slice(&error.code().to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// One BLOCK_STATUS chunk for one metadata context; `extents` are (length, flags), all nonzero.
pub fn block_status(out: &mut Vec<u8>, cookie: u64, context_id: u32, extents: &[(u32, u32)], done: bool) {
    debug_assert!(!extents.is_empty() && extents.iter().all(|&(len, _)| len > 0));
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let payload = 4 + 8 * u32::try_from(extents.len()).expect("extent count bounded by caller");
    chunk_header(out, cookie, flags, REPLY_TYPE_BLOCK_STATUS, payload);
    out.extend_from_slice(&context_id.to_be_bytes());
    for &(len, state) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&state.to_be_bytes());
    }
}

/// Any reply that carries an error, in whichever form the session negotiated.
pub fn error(out: &mut Vec<u8>, cookie: u64, structured: bool, error: NbdError, message: &str) {
    if structured {
        error_chunk(out, cookie, error, message);
    } else {
        simple(out, cookie, Some(error));
    }
}

/// A successful reply without payload.
pub fn ok(out: &mut Vec<u8>, cookie: u64, structured: bool) {
    // A simple reply is allowed for payload-less replies even with structured replies negotiated,
    // and is 4 bytes shorter; qemu and libnbd accept it.
    let _ = structured;
    simple(out, cookie, None);
}

pub(crate) fn truncate_utf8(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
// Tests build small, known values; a lossy cast there is not a wire or disk bug.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_layout() {
        let mut out = Vec::new();
        simple(&mut out, 0x0102_0304_0506_0708, Some(NbdError::NoSpc));
        assert_eq!(&out[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &28u32.to_be_bytes());
        assert_eq!(&out[8..16], &0x0102_0304_0506_0708u64.to_be_bytes());
    }

    #[test]
    fn error_chunk_length_covers_message() {
        let mut out = Vec::new();
        error_chunk(&mut out, 1, NbdError::Inval, "bad");
        assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 9);
        assert_eq!(out.len(), CHUNK_HEADER_BYTES + 9);
        let long = "é".repeat(3000);
        let mut out = Vec::new();
        error_chunk(&mut out, 1, NbdError::Inval, &long);
        let msg_len = u16::from_be_bytes(out[24..26].try_into().unwrap()) as usize;
        assert!(msg_len <= MAX_STRING_BYTES);
        assert!(std::str::from_utf8(&out[26..]).is_ok());
    }
}

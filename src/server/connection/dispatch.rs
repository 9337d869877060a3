//! Running one validated request against the volume and answering it, through the
//! [`Pending`] that consumes itself doing so.

use super::reply::{Payload, Pending, ReplyBody};
use crate::device::AlignedBuf;
use crate::nbd::consts::*;
use crate::nbd::request::{Op, RequestHeader};
use crate::nbd::{reply, NbdError, Session};
use crate::server::stats::{ReqOp, ServerStats};
use crate::volume::Volume;
use std::io;

/// A block-status reply is capped at this many extents (spec SHOULD NOT exceed 2^20).
const MAX_STATUS_EXTENTS: usize = 1024;

pub(super) fn refusal_message(h: &RequestHeader, err: NbdError) -> String {
    format!(
        "request refused: command {} flags {:#x} offset {} length {}: {}",
        h.command,
        h.flags,
        h.offset,
        h.length,
        err.message()
    )
}

fn io_failure(what: &str, e: &io::Error) -> (NbdError, String) {
    let err = NbdError::from_io(e);
    tracing::warn!(op = what, error = %e, "I/O failed");
    (err, format!("{what} failed: {e}"))
}

/// Runs one validated request against the volume and answers it.
pub(super) async fn execute<V: Volume>(
    volume: &V,
    session: &Session,
    stats: &ServerStats,
    pending: Pending,
    op: Op,
    payload: Option<AlignedBuf>,
    zero_copy_min: Option<u32>,
) {
    let started = std::time::Instant::now();
    let (kind, bytes) = match op {
        Op::Read { length, .. } => (ReqOp::Read, u64::from(length)),
        Op::Write { length, .. } => (ReqOp::Write, u64::from(length)),
        Op::Flush => (ReqOp::Flush, 0),
        Op::Trim { length, .. } => (ReqOp::Trim, u64::from(length)),
        Op::WriteZeroes { length, .. } => (ReqOp::WriteZeroes, u64::from(length)),
        _ => (ReqOp::Other, 0),
    };
    let body = match op {
        Op::BlockStatus { offset, length, req_one } => {
            block_status(volume, pending.cookie(), offset, length, req_one).await
        }
        _ => {
            let outcome = run(volume, op, payload, zero_copy_min).await;
            encode(session.structured_replies, pending.cookie(), &op, outcome)
        }
    };
    stats.request(kind).record(bytes, !body.failed, started);
    pending.answer(body);
}

type Outcome = Result<Option<Payload>, (NbdError, String)>;

/// The volume call a request makes: a read's data (in memory or a page-cache file), or nothing.
async fn run<V: Volume>(volume: &V, op: Op, payload: Option<AlignedBuf>, zero_copy_min: Option<u32>) -> Outcome {
    match op {
        Op::Read { offset, length } => {
            let from_file = zero_copy_min
                .filter(|min| length >= *min)
                .and_then(|_| volume.read_zero_copy(offset, u64::from(length)));
            match from_file {
                Some(slice) => Ok(Some(Payload::File { slice, volume_offset: offset })),
                None => {
                    let (buf, r) = volume.read(offset, AlignedBuf::uninit_for_fill(length as usize)).await;
                    r.map(|()| Some(Payload::Buf(buf))).map_err(|e| io_failure("read", &e))
                }
            }
        }
        Op::Write { offset, fua, .. } => {
            let buf = payload.expect("write carries its payload");
            let (_, r) = volume.write(offset, buf, fua).await;
            r.map(|()| None).map_err(|e| io_failure("write", &e))
        }
        Op::Flush => volume.flush().await.map(|()| None).map_err(|e| io_failure("flush", &e)),
        Op::Trim { offset, length, fua } => {
            volume.trim(offset, u64::from(length), fua).await.map(|()| None).map_err(|e| io_failure("trim", &e))
        }
        Op::WriteZeroes { offset, length, fua, may_trim, fast_only: _ } => volume
            .write_zeroes(offset, u64::from(length), may_trim, fua)
            .await
            .map(|()| None)
            .map_err(|e| io_failure("write zeroes", &e)),
        Op::Cache { offset, length } => {
            volume.cache(offset, u64::from(length)).await.map(|()| None).map_err(|e| io_failure("cache", &e))
        }
        Op::BlockStatus { .. } => unreachable!("block status is answered by block_status"),
        Op::Disconnect => unreachable!("DISC is handled by the reader"),
    }
}

/// The reply for a request's outcome: with structured replies a read answers with one data chunk.
fn encode(structured: bool, cookie: u64, op: &Op, outcome: Outcome) -> ReplyBody {
    let mut head = Vec::with_capacity(64);
    match outcome {
        Ok(Some(data)) => {
            match (structured, op) {
                // OFFSET_DATA must carry at least one byte; an empty read is just "done".
                (true, _) if data.len() == 0 => {
                    reply::none_done(&mut head, cookie);
                    return ReplyBody { head, data: None, failed: false };
                }
                (true, Op::Read { offset, .. }) => {
                    reply::offset_data_header(&mut head, cookie, *offset, data.len() as u32, true);
                }
                _ => reply::simple(&mut head, cookie, None),
            }
            ReplyBody { head, data: Some(data), failed: false }
        }
        Ok(None) => {
            reply::ok(&mut head, cookie, structured);
            ReplyBody { head, data: None, failed: false }
        }
        Err((err, msg)) => {
            reply::error(&mut head, cookie, structured, err, &msg);
            ReplyBody { head, data: None, failed: true }
        }
    }
}

/// `base:allocation` for the range (only negotiated with structured replies).
async fn block_status<V: Volume>(volume: &V, cookie: u64, offset: u64, length: u32, req_one: bool) -> ReplyBody {
    let mut head = Vec::with_capacity(64);
    let failure = if length == 0 {
        (NbdError::Inval, "block status of zero bytes".to_string())
    } else {
        match volume.allocation(offset, u64::from(length)).await {
            Ok(extents) => {
                let list = status_extents(&extents, length, req_one);
                reply::block_status(&mut head, cookie, META_BASE_ALLOCATION_ID, &list, true);
                return ReplyBody { head, data: None, failed: false };
            }
            Err(e) => io_failure("block status", &e),
        }
    };
    reply::error(&mut head, cookie, true, failure.0, &failure.1);
    ReplyBody { head, data: None, failed: true }
}

/// Converts device extents to wire descriptors: clipped to the request, adjacent equal states
/// merged, at most one with REQ_ONE, never more than MAX_STATUS_EXTENTS.
fn status_extents(extents: &[crate::device::Extent], length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = u64::from(length);
    for e in extents {
        if left == 0 || out.len() >= MAX_STATUS_EXTENTS {
            break;
        }
        let len = e.length_bytes.min(left);
        if len == 0 {
            continue;
        }
        let state = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        let len32 = len as u32; // len ≤ left ≤ u32 length
        match out.last_mut() {
            Some(last) if last.1 == state => last.0 += len32,
            _ => out.push((len32, state)),
        }
        left -= len;
    }
    if out.is_empty() {
        // A device that could not say anything: "allocated, contents unknown" is always true.
        out.push((length, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Extent;

    #[test]
    fn status_extents_clip_merge_and_req_one() {
        let ex = [
            Extent { length_bytes: 4096, hole: false },
            Extent { length_bytes: 4096, hole: false },
            Extent { length_bytes: 1 << 40, hole: true },
        ];
        assert_eq!(status_extents(&ex, 10000, false), vec![(8192, 0), (1808, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(status_extents(&ex, 10000, true), vec![(8192, 0)]);
        assert_eq!(status_extents(&[], 512, false), vec![(512, 0)]);
    }
}

//! A request's answer. The reader admits a request as a [`Pending`], which holds the request's
//! in-flight budget and the way to the writer; the only way to make a [`Reply`] is
//! [`Pending::answer`], which consumes the `Pending`: a request is answered at most once by
//! construction. One dropped unanswered (its task panicked, or was torn down mid-flight) still
//! answers, with EIO, from its `Drop`: at least once too, so no client ever waits for a reply
//! that will never come.

use crate::device::{AlignedBuf, FileSlice};
use crate::nbd::{reply, NbdError};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// The in-flight budget a request holds: its connection's share and, for admitted requests, the
/// server-wide total. Released when the reply's bytes are handed to the socket.
pub(super) struct Budget {
    pub(super) _conn: OwnedSemaphorePermit,
    pub(super) _total: Option<OwnedSemaphorePermit>,
}

/// A read reply's data: in memory, or bytes of a file the writer sends from the page cache.
pub(super) enum Payload {
    Buf(AlignedBuf),
    /// `volume_offset` is where the bytes are on the export, for reading whatever part of them
    /// the socket did not take from the file.
    File {
        slice: FileSlice,
        volume_offset: u64,
    },
}

impl Payload {
    pub(super) fn len(&self) -> usize {
        match self {
            Payload::Buf(b) => b.len(),
            Payload::File { slice, .. } => slice.len,
        }
    }
}

/// What a request's answer says: its encoded header (and small payloads), the read data, and
/// whether it failed (for the statistics).
pub(super) struct ReplyBody {
    pub head: Vec<u8>,
    pub data: Option<Payload>,
    pub failed: bool,
}

/// One whole reply, as the writer sends it; it carries its request's budget.
pub(super) struct Reply {
    head: Vec<u8>,
    data: Option<Payload>,
    _budget: Budget,
}

impl Reply {
    pub(super) fn head(&self) -> &[u8] {
        &self.head
    }

    pub(super) fn data(&self) -> Option<&Payload> {
        self.data.as_ref()
    }
}

pub(super) type ReplyTx = mpsc::UnboundedSender<Reply>;

/// A request admitted and not yet answered.
pub(super) struct Pending {
    cookie: u64,
    structured: bool,
    /// Taken by `answer`; still here in `Drop` only if nothing answered.
    parts: Option<(Budget, ReplyTx)>,
}

impl Pending {
    pub(super) fn new(cookie: u64, structured: bool, budget: Budget, tx: ReplyTx) -> Pending {
        Pending { cookie, structured, parts: Some((budget, tx)) }
    }

    pub(super) fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Answers the request. The writer may be gone (the connection is closing): then there is
    /// nobody to tell, and the budget is released here.
    pub(super) fn answer(mut self, body: ReplyBody) {
        let (budget, tx) = self.parts.take().expect("a pending request holds its parts until answered");
        let _ = tx.send(Reply { head: body.head, data: body.data, _budget: budget });
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some((budget, tx)) = self.parts.take() else { return };
        tracing::warn!(cookie = self.cookie, "a request ended without an answer; answering it with EIO");
        let mut head = Vec::with_capacity(64);
        reply::error(&mut head, self.cookie, self.structured, NbdError::Io, "the request was abandoned");
        let _ = tx.send(Reply { head, data: None, _budget: budget });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    fn budget(sem: &Arc<Semaphore>) -> Budget {
        Budget { _conn: sem.clone().try_acquire_owned().unwrap(), _total: None }
    }

    #[test]
    fn a_request_is_answered_exactly_once_even_when_dropped() {
        let sem = Arc::new(Semaphore::new(2));
        let (tx, mut rx) = mpsc::unbounded_channel();
        Pending::new(7, false, budget(&sem), tx.clone()).answer(ReplyBody {
            head: vec![1, 2, 3],
            data: None,
            failed: false,
        });
        drop(Pending::new(8, false, budget(&sem), tx));
        let first = rx.try_recv().unwrap();
        assert_eq!(first.head(), &[1, 2, 3]);
        let second = rx.try_recv().unwrap();
        // A simple error reply: magic, error EIO (5), the cookie.
        assert_eq!(&second.head()[4..8], &5u32.to_be_bytes());
        assert_eq!(&second.head()[8..16], &8u64.to_be_bytes());
        assert!(rx.try_recv().is_err(), "each request answered once");
        assert_eq!(sem.available_permits(), 0, "the replies hold their budget");
        drop((first, second));
        assert_eq!(sem.available_permits(), 2, "and release it once written");
    }
}

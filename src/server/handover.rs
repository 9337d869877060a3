//! Parking connections for an in-place upgrade, and adopting parked ones.
//!
//! A connection parks only at a request boundary, with nothing in flight: its reader stops taking
//! requests, every request it started is answered, and the writer flushes the last reply. What is
//! left is the socket, the bytes the reader had already taken off it but not yet decoded (a client
//! that pipelines may have sent its next requests), and what the handshake agreed ([`Session`]).
//! That is all the next process needs to carry on as if nothing happened: the client never sees
//! the socket close, and no request is answered twice or lost, because none is in flight.
//!
//! ```text
//!   serving ── handover requested + stop ──► reader stops at a request boundary
//!              (handshakes in progress are closed)   │ writer answers what is in flight
//!                                                    ▼
//!                         parked: (socket fd, unread bytes, Session) ──► next process adopts
//! ```
//!
//! TLS connections cannot park: their session keys live in this process's rustls state. The
//! daemon refuses an upgrade while any is open (see `daemon::upgrade`).

use crate::nbd::Session;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// The socket family of a parked connection, so the adopter rebuilds the right stream type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SocketKind {
    Tcp,
    Unix,
}

/// One connection between requests, ready for another process to carry on.
pub struct ParkedConnection {
    pub fd: OwnedFd,
    pub kind: SocketKind,
    pub session: Session,
    /// Bytes already read from the socket but not yet decoded: the start of the next requests.
    pub unread: Vec<u8>,
}

/// Shared by the daemon and every connection: whether a stop is a handover (park) or a shutdown
/// (close), and where parked connections are collected.
#[derive(Default)]
pub struct Handover {
    requested: AtomicBool,
    requested_at: Mutex<Option<std::time::Instant>>,
    parked: Mutex<Vec<ParkedConnection>>,
    /// Connections in the transmission phase over TLS right now (they cannot park).
    tls_open: AtomicUsize,
}

impl Handover {
    /// Makes the next stop a handover. Set before the stop signal, so every connection sees it.
    pub fn request(&self) {
        *self.requested_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
        self.requested.store(true, Ordering::SeqCst);
    }

    /// When the handover was requested: the moment clients stopped being served.
    pub fn requested_at(&self) -> Option<std::time::Instant> {
        *self.requested_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub fn tls_connections(&self) -> usize {
        self.tls_open.load(Ordering::SeqCst)
    }

    pub(crate) fn tls_opened(&self) -> TlsOpen<'_> {
        self.tls_open.fetch_add(1, Ordering::SeqCst);
        TlsOpen(self)
    }

    pub(crate) fn deposit(&self, c: ParkedConnection) {
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// The connections parked so far; called once every connection has ended.
    pub fn take_parked(&self) -> Vec<ParkedConnection> {
        std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Counts a TLS connection as open while it lives.
pub(crate) struct TlsOpen<'a>(&'a Handover);

impl Drop for TlsOpen<'_> {
    fn drop(&mut self) {
        self.0.tls_open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A socket's read half that first yields bytes an earlier process had already read from it.
/// Empty for a freshly accepted connection, where it costs one branch per read.
pub struct Prefixed<R> {
    prefix: Vec<u8>,
    pos: usize,
    inner: R,
}

impl<R> Prefixed<R> {
    pub fn new(prefix: Vec<u8>, inner: R) -> Self {
        Prefixed { prefix, pos: 0, inner }
    }

    /// The socket half and the prefix bytes nobody has read yet.
    pub fn into_parts(mut self) -> (R, Vec<u8>) {
        let rest = self.prefix.split_off(self.pos);
        (self.inner, rest)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_prefix_comes_first_then_the_stream_and_what_is_left_is_returned() {
        let mut r = Prefixed::new(b"abc".to_vec(), &b"def"[..]);
        let mut two = [0u8; 2];
        r.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"ab");
        let (inner, rest) = r.into_parts();
        assert_eq!(rest, b"c");
        assert_eq!(inner, b"def");
        let mut all = Vec::new();
        Prefixed::new(b"xy".to_vec(), &b"z"[..]).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"xyz");
    }
}

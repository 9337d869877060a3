//! The connection's writer: every reply whole and in order, batched into as few `writev` calls as
//! the socket allows, large reads sent from the page cache when the socket can, and idle polling
//! for the client's next request once everything is out.

use super::reply::{Payload, Reply};
use super::REPLY_STALL_TIMEOUT;
use crate::device::{AlignedBuf, FileSlice};
use crate::server::stats::ServerStats;
use crate::server::zerocopy::ReplySink;
use crate::server::ZeroCopyReads;
use crate::volume::Volume;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

/// Most replies gathered into one `writev`: enough to empty a deep queue of small replies in one
/// syscall, well under IOV_MAX (two iovecs per reply).
const MAX_BATCH_REPLIES: usize = 128;

pub(super) async fn write_replies<W: ReplySink, V: Volume>(
    mut writer: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    volume: Arc<V>,
    stats: Arc<ServerStats>,
    send_mode: ZeroCopyReads,
    mut idle_poll: IdlePoll,
    park: Arc<AtomicBool>,
) -> io::Result<Option<W>> {
    // The handshake's buffered bytes are all flushed; replies are written with writev from their
    // own buffers (header and data in one syscall, no copy into a staging buffer).
    writer.flush().await?;
    let mut sock = writer.into_inner();
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH_REPLIES);
    while let Some(r) = rx.recv().await {
        batch.push(r);
        while batch.len() < MAX_BATCH_REPLIES {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        write_batch(&mut sock, &batch, &*volume, &stats, send_mode).await?;
        // A no-op on a plain socket; TLS may hold the last record until flushed.
        within_reply_stall(sock.flush()).await?;
        // Dropping the replies releases their in-flight budget only now that the bytes are out.
        batch.clear();
        if rx.is_empty() {
            idle_poll.wait(&sock, &rx);
        }
    }
    sock.flush().await?;
    // Parking: every reply is out and the socket stays open for the next process.
    if park.load(Ordering::SeqCst) {
        return Ok(Some(sock));
    }
    sock.shutdown().await?;
    Ok(None)
}

/// Polling for the client's next request after the last reply is out, before the writer's
/// thread goes back to the runtime and may sleep.
///
/// Why: a client at queue depth 1 sends its next request a few tens of microseconds after it gets
/// a reply. If the thread that will read it is asleep by then, it is woken through the kernel and,
/// on a VM whose idle vCPUs halt, through the hypervisor too, which costs more than the request
/// itself (docs/PERFORMANCE.md, "Idle polling"). Polling a bounded time keeps the thread awake
/// across that gap, as Seastar's reactor (ScyllaDB's) does with `--idle-poll-time-us`. The poll is
/// a non-blocking one-byte `MSG_PEEK`: once bytes are there the writer returns, the runtime finds
/// the socket readable without sleeping and the reader takes the request as usual. A poll that
/// reaches its limit sets polling aside for a few idle moments, more after each miss in a row (up
/// to 15), so a client that pauses between bursts costs a poll now and then, not one per reply.
///
/// Only while the open connections are at most half the CPUs: a polling thread holds a CPU, and
/// with more clients than that the CPUs are wanted for their requests (four connections at queue
/// depth 1 on 2 CPUs ran at 0.60× with polling), while the runtime's threads rarely sleep anyway.
/// On one CPU it never polls: the client needs that CPU to send what we would wait for.
pub(super) struct IdlePoll {
    limit: Duration,
    reader_idle: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    skip: u32,
    /// Polls in a row that reached the limit; a hit resets it.
    misses_in_row: u32,
    max_connections: u64,
}

/// After this many misses in a row, polling is set aside for `2^IDLE_POLL_MAX_BACKOFF_SHIFT - 1`
/// idle moments between polls, so a client that is simply slow costs one poll in 16.
const IDLE_POLL_MAX_BACKOFF_SHIFT: u32 = 4;

impl IdlePoll {
    pub(super) fn new(limit: Duration, reader_idle: Arc<AtomicBool>, stats: Arc<ServerStats>) -> Self {
        // Asked once per process: on Linux the answer reads cgroup files, not worth per connection.
        static CPUS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) as u64);
        IdlePoll { limit, reader_idle, stats, skip: 0, misses_in_row: 0, max_connections: cpus / 2 }
    }

    /// Returns once the client has sent something, the limit is reached, or polling would not
    /// help: the reader has requests buffered (it is not waiting), or a reply is queued.
    fn wait<W: ReplySink>(&mut self, sock: &W, rx: &mpsc::UnboundedReceiver<Reply>) {
        if self.limit.is_zero()
            || !self.reader_idle.load(Ordering::Relaxed)
            || self.stats.connections_active.load(Ordering::Relaxed) > self.max_connections
        {
            return;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return;
        }
        let deadline = Instant::now() + self.limit;
        loop {
            match sock.peer_has_sent() {
                None => return,
                Some(true) => {
                    self.stats.idle_poll_hits.fetch_add(1, Ordering::Relaxed);
                    self.misses_in_row = 0;
                    return;
                }
                Some(false) => {}
            }
            if !rx.is_empty() || !self.reader_idle.load(Ordering::Relaxed) {
                return;
            }
            if Instant::now() >= deadline {
                self.stats.idle_poll_misses.fetch_add(1, Ordering::Relaxed);
                // Backs off exponentially: 0, 1, 3, 7, then 15 idle moments without polling. A
                // steady client that is late once (a timer tick, a preemption) is polled again at
                // once; a fixed 16-moment pause after every miss left 16 requests each to pay the
                // cross-CPU wake-up, and those made the p99 of queue-depth-1 reads.
                self.skip = (1 << self.misses_in_row.min(IDLE_POLL_MAX_BACKOFF_SHIFT)) - 1;
                self.misses_in_row = self.misses_in_row.saturating_add(1);
                return;
            }
            // Not a bare spin: the client may be waiting for this very CPU to send its request,
            // and yielding lets it run now; with nothing else runnable it returns at once.
            std::thread::yield_now();
        }
    }
}

async fn within_reply_stall<T>(io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(REPLY_STALL_TIMEOUT, io).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client read no reply bytes for {} s", REPLY_STALL_TIMEOUT.as_secs()),
        ))
    })
}

/// Writes every reply of the batch whole and in order: runs of in-memory parts with `writev`,
/// resuming after partial writes; file parts in between, sent from the page cache as `send_mode`
/// says.
async fn write_batch<W: ReplySink, V: Volume>(
    sock: &mut W,
    batch: &[Reply],
    volume: &V,
    stats: &ServerStats,
    send_mode: ZeroCopyReads,
) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
    for r in batch {
        parts.push(r.head());
        match r.data() {
            Some(Payload::Buf(d)) => parts.push(d),
            Some(Payload::File { slice, volume_offset }) => {
                write_parts(sock, &parts).await?;
                parts.clear();
                send_file(sock, slice, *volume_offset, volume, stats, send_mode).await?;
            }
            None => {}
        }
    }
    write_parts(sock, &parts).await
}

/// Sends a reply's data from the page cache. Whatever the socket did not take from the file (the
/// file failed to read, or ended early) is read through the volume and written from memory: the
/// header already promised these bytes, and the volume's own read path (the backing, when the
/// cache fails) still has them. Only when that read fails too must the connection close, since
/// a reply cannot be taken back half-sent.
async fn send_file<W: ReplySink, V: Volume>(
    sock: &mut W,
    slice: &FileSlice,
    volume_offset: u64,
    volume: &V,
    stats: &ServerStats,
    send_mode: ZeroCopyReads,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering::Relaxed;
    stats.zero_copy_reads.fetch_add(1, Relaxed);
    stats.zero_copy_read_bytes.fetch_add(slice.len as u64, Relaxed);
    let mut offset = slice.offset;
    let end = slice.offset + slice.len as u64;
    while offset < end {
        let left = (end - offset) as usize;
        let sent = match send_mode {
            ZeroCopyReads::Mapped => match slice.file.window(offset) {
                Ok(window) => {
                    let sent =
                        within_reply_stall(std::future::poll_fn(|cx| sock.poll_send_mapped(cx, &window, offset, left)))
                            .await;
                    if let Ok(n) = sent {
                        offset += n as u64;
                    }
                    sent
                }
                Err(e) => Err(io::Error::new(e.kind(), format!("mapping the file: {e}"))),
            },
            _ => {
                let fd = slice.file.fd().as_raw_fd();
                within_reply_stall(std::future::poll_fn(|cx| sock.poll_sendfile(cx, fd, &mut offset, left))).await
            }
        };
        let why = match sent {
            Ok(0) => "the file ended early".to_owned(),
            Ok(_) => continue,
            Err(e) if is_socket_error(&e) => return Err(e),
            Err(e) => e.to_string(),
        };
        let done = offset - slice.offset;
        stats.zero_copy_fallbacks.fetch_add(1, Relaxed);
        tracing::warn!(error = %why, sent_bytes = done, left_bytes = left, "sending a read from the page cache failed; reading the rest");
        let (rest, r) = volume.read(volume_offset + done, AlignedBuf::uninit_for_fill(left)).await;
        r.map_err(|e| {
            io::Error::new(e.kind(), format!("a read reply was half sent, then reading the rest failed: {e}"))
        })?;
        return write_parts(sock, &[&rest]).await;
    }
    Ok(())
}

/// Errors that belong to the socket (the client went away, or stopped reading), as opposed to the
/// file being sent from.
fn is_socket_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::TimedOut
    )
}

/// Writes `parts` whole and in order with as few `writev` calls as the socket allows.
async fn write_parts<W: AsyncWrite + Unpin>(sock: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let (mut part, mut skip) = (0usize, 0usize);
    while part < parts.len() {
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&parts[part][skip..])
            .chain(parts[part + 1..].iter().copied())
            .map(std::io::IoSlice::new)
            .collect();
        let mut n = within_reply_stall(sock.write_vectored(&slices)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Advance (part, skip) past the n bytes written.
        while n > 0 && part < parts.len() {
            let left = parts[part].len() - skip;
            if n >= left {
                n -= left;
                part += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
        while part < parts.len() && parts[part].len() == skip {
            part += 1;
            skip = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket whose client has sent something or not, as the test says.
    struct PeekSink(AtomicBool);

    impl AsyncWrite for PeekSink {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl ReplySink for PeekSink {
        fn peer_has_sent(&self) -> Option<bool> {
            Some(self.0.load(Ordering::Relaxed))
        }
    }

    /// The moments (of `n` idle moments) at which the writer polled a client that never sends.
    fn polled_moments(poll: &mut IdlePoll, sink: &PeekSink, rx: &mpsc::UnboundedReceiver<Reply>, n: u32) -> Vec<u32> {
        let mut moments = Vec::new();
        for i in 0..n {
            let before = poll.stats.idle_poll_misses.load(Ordering::Relaxed);
            poll.wait(sink, rx);
            if poll.stats.idle_poll_misses.load(Ordering::Relaxed) > before {
                moments.push(i);
            }
        }
        moments
    }

    #[test]
    fn idle_polling_backs_off_exponentially_and_a_hit_resets_it() {
        let stats = Arc::new(ServerStats::default());
        let reader_idle = Arc::new(AtomicBool::new(true));
        let mut poll = IdlePoll::new(Duration::from_micros(20), reader_idle.clone(), stats.clone());
        // The limit is per CPU count; the test is about the schedule, whatever this machine has.
        poll.max_connections = 1;
        let (_tx, rx) = mpsc::unbounded_channel::<Reply>();
        let sink = PeekSink(AtomicBool::new(false));

        // A late client is polled again at once, then after 1, 3, 7 and at most 15 idle moments.
        assert_eq!(polled_moments(&mut poll, &sink, &rx, 64), [0, 1, 3, 7, 15, 31, 47, 63]);

        // Skipped moments cost nothing; once the client is back, a hit resets the backoff.
        let mut waited = 0;
        sink.0.store(true, Ordering::Relaxed);
        while stats.idle_poll_hits.load(Ordering::Relaxed) == 0 {
            poll.wait(&sink, &rx);
            waited += 1;
        }
        assert_eq!(waited, 16, "after the last miss, 15 moments were skipped and the 16th polled");
        sink.0.store(false, Ordering::Relaxed);
        assert_eq!(polled_moments(&mut poll, &sink, &rx, 4), [0, 1, 3]);

        // A reader that has requests buffered, or more connections than allowed: no poll at all.
        reader_idle.store(false, Ordering::Relaxed);
        let misses = stats.idle_poll_misses.load(Ordering::Relaxed);
        for _ in 0..32 {
            poll.wait(&sink, &rx);
        }
        reader_idle.store(true, Ordering::Relaxed);
        stats.connections_active.store(2, Ordering::Relaxed);
        for _ in 0..32 {
            poll.wait(&sink, &rx);
        }
        assert_eq!(stats.idle_poll_misses.load(Ordering::Relaxed), misses);
    }
}

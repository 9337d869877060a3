//! Sending read data from the page cache to the client's socket without reading it into a buffer
//! first. Two ways (`zero_copy_reads`): `sendfile`, where the kernel hands the file's pages to the
//! socket and the server copies nothing; and `send` from a read-only mapping of the file
//! (`device::file::page_cache`), one copy from the page cache into the socket's buffer instead of the
//! copying path's two (into our buffer, then into the socket's). Which is faster depends on the
//! receiver: on loopback the client's copy out of page-cache pages costs it more than out of the
//! socket's own buffers, and where client and server share the CPUs that decides it (see
//! `config::ZERO_COPY_AUTO_MIN_CPUS`). Only a plain TCP or Unix stream socket can do either; TLS
//! must encrypt every byte in user space, and a stream the tests or `--stdio` give us may be
//! anything.
//!
//! Why not always: for small reads the copy is cheap and the header and data of many replies go
//! out together in one `writev`, one syscall per batch instead of two per reply; sending from the
//! file only pays off once the copy it saves outweighs that (see `ZERO_COPY_MIN_BYTES` and `MAPPED_MIN_BYTES`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncWrite, Interest};

use super::ZeroCopyReads;
use crate::device::file::page_cache::Window;

/// Reads at least this long are sent with `sendfile` when they can be: below it the copy saved is
/// smaller than the cost of a separate header write and `sendfile` call.
pub(crate) const ZERO_COPY_MIN_BYTES: u32 = 64 * 1024;
/// The same for the mapped send, which still copies once: measured on 2 CPUs against the copying
/// path, 1 MiB and 512 KiB reads ran at 1.16–1.19× with 0.82–0.86× the server CPU, 256 KiB at
/// 0.90–1.06× and 64 KiB at 0.91× with 1.18× the CPU (a `cachestat`, a header write and a send
/// per reply, where copied replies share one `writev`).
pub(crate) const MAPPED_MIN_BYTES: u32 = 512 * 1024;

/// The smallest read sent from the page cache in `mode`; None when nothing is.
pub(crate) fn zero_copy_min_bytes(mode: ZeroCopyReads) -> Option<u32> {
    match mode {
        ZeroCopyReads::Off => None,
        ZeroCopyReads::Mapped => Some(MAPPED_MIN_BYTES),
        ZeroCopyReads::Sendfile => Some(ZERO_COPY_MIN_BYTES),
    }
}

/// The write half of a connection, as the reply writer uses it.
pub(crate) trait ReplySink: AsyncWrite + Unpin + Send + 'static {
    /// Whether `poll_sendfile` and `poll_send_mapped` work on this stream.
    fn can_sendfile(&self) -> bool {
        false
    }
    /// Sends up to `len` bytes of the file from `offset` out of `window`, a mapping that user space
    /// must never read (`device::file::page_cache`): only the kernel touches it, so a page it cannot supply
    /// is an `EFAULT` here rather than a `SIGBUS`. Only called when `can_sendfile` said yes.
    fn poll_send_mapped(
        &mut self,
        _cx: &mut Context<'_>,
        _window: &Window,
        _offset: u64,
        _len: usize,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "send from a mapping on a stream that is not a socket",
        )))
    }
    /// Whether the peer has sent bytes we have not read yet (or closed its side), asked without
    /// waiting and without touching tokio's readiness state; `None` where the stream cannot tell
    /// (TLS, stdio), which turns idle polling off for it.
    fn peer_has_sent(&self) -> Option<bool> {
        None
    }
    /// Sends up to `len` bytes of `fd` from `*offset` (advanced by what was sent); Ok(0) means the
    /// file ended. Only called when `can_sendfile` said yes.
    fn poll_sendfile(
        &mut self,
        _cx: &mut Context<'_>,
        _fd: RawFd,
        _offset: &mut u64,
        _len: usize,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(io::ErrorKind::Unsupported, "sendfile on a stream that is not a socket")))
    }
}

/// One send system call (`call`, returning bytes sent or -1) on a nonblocking socket registered
/// with tokio, waiting for room as any write would: `poll_ready` and `try_io` are the socket's own.
fn poll_send_on(
    cx: &mut Context<'_>,
    poll_ready: impl Fn(&mut Context<'_>) -> Poll<io::Result<()>>,
    try_io: impl Fn(&mut dyn FnMut() -> io::Result<usize>) -> io::Result<usize>,
    mut call: impl FnMut() -> isize,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(poll_ready(cx))?;
        let mut once = || {
            let n = call();
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        };
        match try_io(&mut once) {
            Ok(n) => return Poll::Ready(Ok(n)),
            // Readiness was stale: tokio cleared it, so the next poll_ready waits for room.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

macro_rules! sendfile_socket {
    ($half:ty, $stream:ty) => {
        impl ReplySink for $half {
            fn can_sendfile(&self) -> bool {
                true
            }
            fn peer_has_sent(&self) -> Option<bool> {
                let s: &$stream = self.as_ref();
                let mut byte = 0u8;
                // SAFETY: a one-byte peek into our own byte; MSG_DONTWAIT never blocks.
                let n = unsafe {
                    libc::recv(s.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
                };
                // 0 is the peer's EOF and any error other than "nothing yet" is for the reader to
                // find: either way there is something to wake up for.
                Some(n != -1 || io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN))
            }
            fn poll_sendfile(
                &mut self,
                cx: &mut Context<'_>,
                fd: RawFd,
                offset: &mut u64,
                len: usize,
            ) -> Poll<io::Result<usize>> {
                let s: &$stream = self.as_ref();
                let sock = s.as_raw_fd();
                let mut off =
                    libc::off_t::try_from(*offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
                // SAFETY: both descriptors are open for the duration of the call; `off` is ours.
                let call = || unsafe { libc::sendfile(sock, fd, &mut off, len) };
                let n =
                    ready!(poll_send_on(cx, |cx| s.poll_write_ready(cx), |f| s.try_io(Interest::WRITABLE, f), call))?;
                *offset += n as u64;
                Poll::Ready(Ok(n))
            }
            fn poll_send_mapped(
                &mut self,
                cx: &mut Context<'_>,
                window: &Window,
                offset: u64,
                len: usize,
            ) -> Poll<io::Result<usize>> {
                let s: &$stream = self.as_ref();
                let sock = s.as_raw_fd();
                let (ptr, len) = window.span(offset, len);
                // SAFETY: `window` keeps `ptr..ptr + len` mapped for the call; only the kernel
                // reads it. MSG_NOSIGNAL: a closed peer is an EPIPE error, never a signal.
                let call = || unsafe { libc::send(sock, ptr.cast(), len, libc::MSG_NOSIGNAL) };
                poll_send_on(cx, |cx| s.poll_write_ready(cx), |f| s.try_io(Interest::WRITABLE, f), call)
            }
        }
    };
}

sendfile_socket!(tokio::net::tcp::OwnedWriteHalf, tokio::net::TcpStream);
sendfile_socket!(tokio::net::unix::OwnedWriteHalf, tokio::net::UnixStream);

/// Inside TLS every byte is encrypted in user space.
impl<T: AsyncWrite + Send + 'static> ReplySink for tokio::io::WriteHalf<T> {}

/// Any other stream (a pipe, a file, an in-memory duplex): replies are copied.
pub(crate) struct CopyOnly<W>(pub W);

impl<W: AsyncWrite + Unpin + Send + 'static> ReplySink for CopyOnly<W> {}

impl<W: AsyncWrite + Unpin> AsyncWrite for CopyOnly<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::connection::{serve_connection, ConnLimits, Sock, Transport};
    use super::super::testing::{negotiate_export_name, request};
    use super::zero_copy_min_bytes;
    use super::ZeroCopyReads;
    use crate::device::{AlignedBuf, Extent, FileSlice, PageCacheFile};
    use crate::nbd::consts::*;
    use crate::nbd::ExportParams;
    use crate::server::stats::ServerStats;
    use crate::volume::Volume;
    use std::io;
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::sync::watch;

    const DATA_BYTES: u64 = 8 << 20;

    /// Where `read_zero_copy` points the writer.
    #[derive(Clone, Copy, PartialEq)]
    enum Source {
        /// The export's own file: every byte is sent from the page cache.
        Whole,
        /// A copy holding only the first half of the export: a read past it is sent in part, then
        /// the file ends and the rest must be read.
        Short,
        /// A directory: `sendfile` and `mmap` refuse it at once and the whole read falls back.
        Unsendable,
    }

    /// A volume over one file whose zero-copy answers a test chooses.
    struct FileVolume {
        file: std::fs::File,
        data_fd: Arc<PageCacheFile>,
        short_fd: Arc<PageCacheFile>,
        dir_fd: Arc<PageCacheFile>,
        source: Source,
        /// `read` fails, as when the backing is gone too.
        fail_reads: bool,
        zero_copied: AtomicU64,
        read_bytes: AtomicU64,
        _dir: tempfile::TempDir,
    }

    impl FileVolume {
        fn new(source: Source, fail_reads: bool) -> (Self, Vec<u8>) {
            let dir = tempfile::tempdir().unwrap();
            let mut content = vec![0u8; DATA_BYTES as usize];
            crate::device::sim::fault::SimRng::new(7).fill(&mut content);
            let path = dir.path().join("data");
            std::fs::write(&path, &content).unwrap();
            std::fs::write(dir.path().join("short"), &content[..content.len() / 2]).unwrap();
            // Each claims the export's size: a mapping of the short file past its end is what an
            // unreadable page looks like to the mapped send.
            let file = |f: std::fs::File| Arc::new(PageCacheFile::new(Arc::new(OwnedFd::from(f)), DATA_BYTES));
            let open = |name: &str| file(std::fs::File::open(dir.path().join(name)).unwrap());
            let v = FileVolume {
                file: std::fs::File::open(&path).unwrap(),
                data_fd: open("data"),
                short_fd: open("short"),
                dir_fd: file(std::fs::File::open(dir.path()).unwrap()),
                source,
                fail_reads,
                zero_copied: AtomicU64::new(0),
                read_bytes: AtomicU64::new(0),
                _dir: dir,
            };
            (v, content)
        }
    }

    impl Volume for FileVolume {
        fn size_bytes(&self) -> u64 {
            DATA_BYTES
        }
        fn fast_zero(&self) -> bool {
            false
        }
        fn read_zero_copy(&self, offset: u64, len: u64) -> Option<FileSlice> {
            self.zero_copied.fetch_add(1, Ordering::Relaxed);
            let fd = match self.source {
                Source::Whole => &self.data_fd,
                Source::Short => &self.short_fd,
                Source::Unsendable => &self.dir_fd,
            };
            Some(FileSlice { file: fd.clone(), offset, len: len as usize })
        }
        async fn read(&self, offset: u64, mut buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
            self.read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            if self.fail_reads {
                return (buf, Err(io::Error::from_raw_os_error(libc::EIO)));
            }
            let r = self.file.read_exact_at(&mut buf, offset);
            (buf, r)
        }
        async fn write(&self, _offset: u64, buf: AlignedBuf, _fua: bool) -> (AlignedBuf, io::Result<()>) {
            (buf, Err(io::Error::from_raw_os_error(libc::EROFS)))
        }
        async fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        async fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool, _fua: bool) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EROFS))
        }
        async fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        async fn allocation(&self, _offset: u64, len: u64) -> io::Result<Vec<Extent>> {
            Ok(vec![Extent { length_bytes: len, hole: false }])
        }
        async fn shutdown(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn limits(mode: ZeroCopyReads) -> Arc<ConnLimits> {
        // On, so that every test here also runs the writer's idle polling between replies.
        limits_polling(mode, Duration::from_micros(50))
    }

    fn limits_polling(mode: ZeroCopyReads, idle_poll: Duration) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            zero_copy_reads: mode,
            export: ExportParams {
                name: "superdisk".into(),
                description: String::new(),
                size_bytes: DATA_BYTES,
                read_only: true,
                fast_zero: false,
                rotational: false,
                min_block_bytes: 1,
                preferred_block_bytes: 4096,
                max_payload_bytes: 32 << 20,
            },
            max_inflight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::ZERO,
            idle_poll,
            stats: Arc::default(),
            tls_mode: crate::nbd::handshake::TlsMode::Off,
            tls: None,
            total_budget: Arc::new(tokio::sync::Semaphore::new((256 << 20) / 4096)),
            handover: Arc::default(),
        })
    }

    async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(c: &mut S) {
        assert_eq!(negotiate_export_name(c).await, DATA_BYTES);
    }

    fn read_request(cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        request(CMD_READ, cookie, offset, length)
    }

    /// Small and large reads at odd offsets, pipelined, so sends from the file sit between
    /// in-memory replies in one batch; some end past the short file's end.
    const READS: [(u64, u32); 8] = [
        (4096, 4096),
        (1 << 20, 1 << 20),
        (3 * 4096 + 17, 65536),
        (5 << 20, 512),
        ((4 << 20) - 300_000, 1_000_000),
        (123, (2 << 20) + 5),
        (7 << 20, 1 << 20),
        (0, 65536),
    ];

    /// Serves one connection of `transport` and checks every reply's bytes against `content`;
    /// returns the server's counters.
    async fn check_reads<T, C>(
        mode: ZeroCopyReads,
        server_side: T,
        mut client: C,
        vol: Arc<FileVolume>,
        content: &[u8],
    ) -> Arc<ServerStats>
    where
        T: Transport,
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let (_stop_tx, stop_rx) = watch::channel(false);
        let limits = limits(mode);
        let stats = limits.stats.clone();
        let server = tokio::spawn(serve_connection(server_side, vol, limits, stop_rx));
        negotiate(&mut client).await;
        let mut batch = Vec::new();
        for (i, &(offset, length)) in READS.iter().enumerate() {
            batch.extend_from_slice(&read_request(i as u64, offset, length));
        }
        client.write_all(&batch).await.unwrap();
        for _ in READS {
            let mut head = [0u8; 16];
            client.read_exact(&mut head).await.unwrap();
            assert_eq!(u32::from_be_bytes(head[..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
            assert_eq!(u32::from_be_bytes(head[4..8].try_into().unwrap()), 0, "read failed");
            let cookie = u64::from_be_bytes(head[8..].try_into().unwrap()) as usize;
            let (offset, length) = READS[cookie];
            let mut data = vec![0u8; length as usize];
            client.read_exact(&mut data).await.unwrap();
            let want = &content[offset as usize..offset as usize + length as usize];
            assert!(data == want, "read {cookie} [{offset}, +{length}) came back wrong");
        }
        client.write_all(&request(CMD_DISC, 99, 0, 0)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), server).await.unwrap().unwrap();
        stats
    }

    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (server, client)
    }

    /// The smallest read `mode` sends from the file.
    fn min(mode: ZeroCopyReads) -> u32 {
        zero_copy_min_bytes(mode).unwrap()
    }

    fn large_reads(mode: ZeroCopyReads) -> u64 {
        READS.iter().filter(|r| r.1 >= min(mode)).count() as u64
    }

    const MODES: [ZeroCopyReads; 2] = [ZeroCopyReads::Sendfile, ZeroCopyReads::Mapped];

    #[tokio::test]
    async fn large_reads_are_sent_from_the_file_over_tcp_and_unix_sockets() {
        for mode in MODES {
            large_reads_are_sent_from_the_file(mode).await;
        }
    }

    async fn large_reads_are_sent_from_the_file(mode: ZeroCopyReads) {
        let (vol, content) = FileVolume::new(Source::Whole, false);
        let vol = Arc::new(vol);
        let (server, client) = tcp_pair().await;
        let over_tcp = check_reads(mode, Sock(server, Vec::new()), client, vol.clone(), &content).await;
        let (server, client) = tokio::net::UnixStream::pair().unwrap();
        let over_unix = check_reads(mode, Sock(server, Vec::new()), client, vol.clone(), &content).await;
        for stats in [over_tcp, over_unix] {
            assert_eq!(stats.zero_copy_reads.load(Ordering::Relaxed), large_reads(mode));
            let large: u64 = READS.iter().filter(|r| r.1 >= min(mode)).map(|r| u64::from(r.1)).sum();
            assert_eq!(stats.zero_copy_read_bytes.load(Ordering::Relaxed), large);
            assert_eq!(stats.zero_copy_fallbacks.load(Ordering::Relaxed), 0);
        }
        // Only large reads asked for a file; only the small ones were read into memory.
        assert_eq!(vol.zero_copied.load(Ordering::Relaxed), 2 * large_reads(mode));
        let small: u64 = READS.iter().filter(|r| r.1 < min(mode)).map(|r| u64::from(r.1)).sum();
        assert_eq!(vol.read_bytes.load(Ordering::Relaxed), 2 * small);
    }

    /// A client at queue depth 1 (a request, its reply, the next request) over TCP and a Unix
    /// socket: the writer's idle poll sees next requests arrive (hits), every reply is right, and
    /// when the client pauses past the limit the poll gives up (a miss) without harm to the
    /// request that comes after. The client is a thread of its own with blocking sockets, as a
    /// real client is another process: a client task on the server's runtime could sit behind the
    /// polling writer on its thread. The limit is the largest allowed, so that even a loaded
    /// machine answers within it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_polls_for_the_next_request_of_a_queue_depth_1_client() {
        let (vol, content) = FileVolume::new(Source::Whole, false);
        let vol = Arc::new(vol);
        let (server, client) = tcp_pair().await;
        let over_tcp = queue_depth_1(Sock(server, Vec::new()), client, vol.clone(), &content).await;
        let (server, client) = tokio::net::UnixStream::pair().unwrap();
        let over_unix = queue_depth_1(Sock(server, Vec::new()), client, vol, &content).await;
        // A single CPU never polls: the client needs it to send what the poll would wait for.
        let polls = std::thread::available_parallelism().unwrap().get() >= 2;
        for stats in [over_tcp, over_unix] {
            let (hits, misses) =
                (stats.idle_poll_hits.load(Ordering::Relaxed), stats.idle_poll_misses.load(Ordering::Relaxed));
            if polls {
                assert!(hits >= 1, "no poll saw a request arrive ({misses} misses)");
                assert!(misses >= 1, "the pause was not counted as a miss ({hits} hits)");
            } else {
                assert_eq!((hits, misses), (0, 0));
            }
        }
    }

    /// A connected client socket that can go on as a blocking std one.
    trait IntoBlocking: AsyncRead + AsyncWrite + Unpin {
        fn into_blocking(self) -> Box<dyn BlockingRw>;
    }
    trait BlockingRw: std::io::Read + std::io::Write + Send {}
    impl<T: std::io::Read + std::io::Write + Send> BlockingRw for T {}
    impl IntoBlocking for tokio::net::TcpStream {
        fn into_blocking(self) -> Box<dyn BlockingRw> {
            let s = self.into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            Box::new(s)
        }
    }
    impl IntoBlocking for tokio::net::UnixStream {
        fn into_blocking(self) -> Box<dyn BlockingRw> {
            let s = self.into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            Box::new(s)
        }
    }

    async fn queue_depth_1<T, C>(
        server_side: T,
        mut client: C,
        vol: Arc<FileVolume>,
        content: &[u8],
    ) -> Arc<ServerStats>
    where
        T: Transport,
        C: IntoBlocking,
    {
        let (_stop_tx, stop_rx) = watch::channel(false);
        let limits = limits_polling(ZeroCopyReads::Off, Duration::from_micros(crate::server::MAX_IDLE_POLL_US));
        let stats = limits.stats.clone();
        let server = tokio::spawn(serve_connection(server_side, vol, limits, stop_rx));
        negotiate(&mut client).await;
        let mut client = client.into_blocking();
        let content = content.to_vec();
        let client_thread = std::thread::spawn(move || {
            use std::io::{Read, Write};
            for i in 0..200u64 {
                if i == 100 {
                    // Longer than the limit: the poll after reply 99 gives up.
                    std::thread::sleep(Duration::from_millis(20));
                }
                let (offset, length) = ((i * 7919 * 4096) % (DATA_BYTES - 4096), 4096u32);
                client.write_all(&read_request(i, offset, length)).unwrap();
                let mut head = [0u8; 16];
                client.read_exact(&mut head).unwrap();
                assert_eq!(u32::from_be_bytes(head[4..8].try_into().unwrap()), 0, "read {i} failed");
                assert_eq!(u64::from_be_bytes(head[8..].try_into().unwrap()), i);
                let mut data = vec![0u8; length as usize];
                client.read_exact(&mut data).unwrap();
                assert!(data == content[offset as usize..][..length as usize], "read {i} came back wrong");
            }
            client.write_all(&request(CMD_DISC, 999, 0, 0)).unwrap();
        });
        tokio::time::timeout(Duration::from_secs(30), server).await.unwrap().unwrap();
        client_thread.join().unwrap();
        stats
    }

    /// For the mapped send, the short file's missing pages fail the kernel's copy (EFAULT): what a
    /// page the device cannot read looks like.
    #[tokio::test]
    async fn a_file_that_ends_or_refuses_mid_reply_is_finished_by_reading() {
        for (mode, source) in MODES.into_iter().flat_map(|m| [(m, Source::Short), (m, Source::Unsendable)]) {
            let (vol, content) = FileVolume::new(source, false);
            let vol = Arc::new(vol);
            let (server, client) = tcp_pair().await;
            let stats = check_reads(mode, Sock(server, Vec::new()), client, vol.clone(), &content).await;
            assert_eq!(vol.zero_copied.load(Ordering::Relaxed), large_reads(mode));
            let half = DATA_BYTES / 2;
            let unfinished = READS
                .iter()
                .filter(|&&(o, l)| l >= min(mode) && (source == Source::Unsendable || o + u64::from(l) > half))
                .count() as u64;
            assert_eq!(stats.zero_copy_fallbacks.load(Ordering::Relaxed), unfinished);
            // The fallback read only what the file did not send.
            let fell_back = vol.read_bytes.load(Ordering::Relaxed);
            let small: u64 = READS.iter().filter(|r| r.1 < min(mode)).map(|r| u64::from(r.1)).sum();
            let past_half: u64 = READS
                .iter()
                .filter(|r| r.1 >= min(mode))
                .map(|&(o, l)| {
                    let end = o + u64::from(l);
                    if source == Source::Unsendable {
                        u64::from(l)
                    } else {
                        end - o.max(half).min(end)
                    }
                })
                .sum();
            if mode == ZeroCopyReads::Sendfile {
                assert_eq!(fell_back, small + past_half);
            } else {
                // TCP copies from user memory a chunk at a time and keeps only whole chunks when
                // the copy faults, so the send may stop short of the unreadable page; the rest is
                // read. The client's bytes were checked exact above either way.
                let at_most = small + past_half + unfinished * (64 << 10);
                assert!((small + past_half..=at_most).contains(&fell_back), "{fell_back} read back");
            }
        }
    }

    #[tokio::test]
    async fn a_reply_that_cannot_be_finished_closes_the_connection() {
        for mode in MODES {
            a_reply_that_cannot_be_finished_closes(mode).await;
        }
    }

    async fn a_reply_that_cannot_be_finished_closes(mode: ZeroCopyReads) {
        let (vol, _) = FileVolume::new(Source::Unsendable, true);
        let (server, mut client) = tcp_pair().await;
        let (_stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve_connection(Sock(server, Vec::new()), Arc::new(vol), limits(mode), stop_rx));
        negotiate(&mut client).await;
        client.write_all(&read_request(1, 0, 1 << 20)).await.unwrap();
        // The header went out claiming a whole MiB; none of it can follow, so the server hangs
        // up rather than let the client take later bytes for this reply's data.
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut got)).await.unwrap().unwrap();
        assert_eq!(got.len(), 16, "only the reply header");
        tokio::time::timeout(Duration::from_secs(30), server).await.unwrap().unwrap();
    }
}

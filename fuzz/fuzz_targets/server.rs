//! The whole server, one connection: the fuzz input is the client's byte stream, fed through
//! in-memory pipes (`tokio::io::duplex`, one per direction, so each has its own size; dropping an
//! end closes it, as closing a socket does) to `serve_stream` over a real volume (plain, or a
//! mirror of a backing and a cache, all in memory). Whatever the client sends, the server must not panic, must finish once the client
//! has sent everything and closed its side (no hang), and its heap must stay within the bound its
//! in-flight limit implies.
//!
//! Input: byte 0 configures the run (see `Setup`), the rest is sent as the client. Seeds are real
//! client sessions (nbdinfo, qemu-io, nbdcopy, fio) recorded by fuzz/make_corpus.py.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use superdisk::device::sim::mem::MemDevice;
use superdisk::device::BlockDevice;
use superdisk::meta::store;
use superdisk::mirror::{create_cache, MirrorOptions, MirrorVolume};
use superdisk::nbd::ExportParams;
use superdisk::server::{serve_stream, StreamConfig};
use superdisk::volume::{PlainVolume, Volume};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counts live heap bytes and their high-water mark, so a run that buffers without bound fails
/// here rather than being noticed only as a slow creep in RSS.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Small, so that what one input can ask for stays small: a few KiB of read requests may ask for
/// gigabytes of replies on a bigger disk, and a run must finish in well under FINISH_LIMIT.
const DATA_BYTES: u64 = 256 << 10;
const MAX_PAYLOAD_BYTES: u32 = 32 << 20;
const SLOW_READ_BYTES: usize = 256 << 10;
/// The server's own timeouts are far longer (30 s handshake, 60 s for a started request), so only
/// a server that waits on nothing it could ever get runs into this.
const FINISH_LIMIT: Duration = Duration::from_secs(25);

struct Setup {
    mirror: bool,
    read_only: bool,
    /// A tight in-flight budget makes the reader wait for the writer (the budget path).
    max_inflight_bytes: usize,
    /// How much the client-to-server pipe holds: small values split every request across many
    /// reads. The reply pipe holds at least 4 KiB, so the reply volume an input can ask for (every
    /// read request a reply of up to DATA_BYTES) cannot make an honest run take seconds.
    pipe_bytes: usize,
    /// The client reads the first replies 3 bytes at a time, so the server meets a full pipe.
    slow_reader: bool,
    min_block_bytes: u32,
}

impl Setup {
    fn from(b: u8) -> Setup {
        Setup {
            mirror: b & 1 != 0,
            read_only: b & 2 != 0,
            max_inflight_bytes: if b & 4 != 0 { 1 << 20 } else { 64 << 20 },
            pipe_bytes: [64 << 10, 7, 4096, 1 << 20][usize::from(b >> 3 & 3)],
            slow_reader: b & 32 != 0,
            min_block_bytes: if b & 64 != 0 { 512 } else { 1 },
        }
    }

    /// Live heap the run may reach: the in-flight budget (which always admits one request of the
    /// largest size, so it is at least that), the request being read into before it is admitted,
    /// the volume's devices (image and durable copy each, twice for a mirror, plus write logs no
    /// bigger than what the client sent), and fixed slack for buffers, tasks and the runtime.
    fn heap_bound(&self, input_bytes: usize) -> usize {
        let budget = self.max_inflight_bytes.max(MAX_PAYLOAD_BYTES as usize + 4096);
        let devices = 4 * 3 * (2 << 20) + 4 * input_bytes;
        budget + MAX_PAYLOAD_BYTES as usize + devices + (16 << 20)
    }
}

fn export(size_bytes: u64, s: &Setup, fast_zero: bool) -> ExportParams {
    ExportParams {
        name: "superdisk".into(),
        description: "fuzz".into(),
        size_bytes,
        read_only: s.read_only,
        fast_zero,
        rotational: false,
        min_block_bytes: s.min_block_bytes,
        preferred_block_bytes: 4096,
        max_payload_bytes: MAX_PAYLOAD_BYTES,
    }
}

async fn backing() -> MemDevice {
    let region_bytes = superdisk::meta::DEFAULT_REGION_BYTES;
    let dev = MemDevice::new(DATA_BYTES + superdisk::meta::meta_bytes(DATA_BYTES, region_bytes));
    let sb = store::new_backing_superblock(dev.size_bytes(), region_bytes).expect("backing superblock");
    store::write_superblock(&dev, &sb).await.expect("write superblock");
    dev
}

/// Sends `input` as the client, closes the sending side, and reads replies until the server closes.
async fn client(
    mut rx: tokio::io::DuplexStream,
    mut tx: tokio::io::DuplexStream,
    input: &[u8],
    slow_reader: bool,
) -> usize {
    let send = async {
        // The server may close first (a protocol error); the rest of the input is then unwanted.
        let _ = tx.write_all(input).await;
        let _ = tx.shutdown().await;
    };
    let recv = async {
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0usize;
        loop {
            // Slowly for the first 256 KiB only: enough to stall the writer, bounded in time.
            let slow = slow_reader && total < SLOW_READ_BYTES;
            let chunk = if slow { 3 } else { buf.len() };
            match rx.read(&mut buf[..chunk]).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
            if slow {
                tokio::task::yield_now().await;
            }
        }
    };
    let ((), got) = tokio::join!(send, recv);
    got
}

async fn run<V: Volume>(volume: Arc<V>, s: &Setup, input: &[u8]) {
    let mut cfg = StreamConfig::new(export(volume.size_bytes(), s, volume.fast_zero()));
    cfg.max_inflight_bytes = s.max_inflight_bytes;
    let (client_tx, r) = tokio::io::duplex(s.pipe_bytes);
    let (client_rx, w) = tokio::io::duplex(s.pipe_bytes.max(4096));
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve_stream(r, w, volume.clone(), cfg, stop_rx));
    let finished = tokio::time::timeout(FINISH_LIMIT, async {
        client(client_rx, client_tx, input, s.slow_reader).await;
        server.await.expect("the connection task panicked");
    })
    .await;
    assert!(finished.is_ok(), "the server did not finish within {FINISH_LIMIT:?} of the client closing");
    volume.shutdown().await.expect("volume shutdown");
}

fuzz_target!(|data: &[u8]| {
    let [setup, input @ ..] = data else { return };
    let s = Setup::from(*setup);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    rt.block_on(async {
        let backing = backing().await;
        if s.mirror {
            let opts = MirrorOptions {
                tunables: superdisk::mirror::Tunables {
                    rebuild_min_bytes_per_s: 1 << 40,
                    rebuild_max_bytes_per_s: 1 << 40,
                    ..Default::default()
                },
                metadata_interval_ms: 3_600_000,
                ..MirrorOptions::default()
            };
            let cache = MemDevice::new(DATA_BYTES + superdisk::meta::meta_bytes(DATA_BYTES, opts.region_bytes));
            let sb = store::read_superblock(&backing).await.expect("read").expect("valid");
            create_cache(&sb, std::slice::from_ref(&cache), &opts).await.expect("create_cache");
            let vol = MirrorVolume::open(backing, vec![cache], opts).await.expect("open mirror");
            run(Arc::new(vol), &s, input).await;
        } else {
            let vol = PlainVolume::open(backing, s.read_only).await.expect("open plain");
            run(Arc::new(vol), &s, input).await;
        }
    });
    drop(rt);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let bound = s.heap_bound(input.len());
    assert!(peak <= bound, "heap peaked at {peak} bytes, over the bound of {bound}");
});

use super::*;
use crate::device::sim::fault::{FaultDevice, FaultOp};
use crate::device::sim::mem::MemDevice;

const SIZE: u64 = 1 << 20;

fn policy() -> IoPolicy {
    IoPolicy {
        attempt_timeout: Duration::from_millis(20),
        read_retries: 2,
        retry_backoff: Duration::from_millis(5),
        deadline: Duration::from_millis(150),
    }
}

fn filled(len: usize, v: u8) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    b.fill(v);
    b
}

/// Fails the test instead of hanging it if something is never bounded.
async fn bounded_test<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f).await.expect("the test hung: a wait is not bounded")
}

fn guarded(dev: FaultDevice<MemDevice>) -> Guarded<FaultDevice<MemDevice>> {
    Guarded::new(dev, policy(), Arc::new(BackingIoStats::default()), "test")
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_stalled_write_fails_at_the_deadline_stays_fenced_and_lands_before_the_next() {
    bounded_test(async {
        let dev = FaultDevice::new(MemDevice::new(SIZE), 1);
        let h = dev.handle();
        let g = guarded(dev.clone());
        h.hang(&[FaultOp::Write]);
        let (_, r) = g.write(4096, filled(8192, 0xa), false).await;
        let e = r.expect_err("a write the device never answers must fail");
        assert!(is_deadline_error(&e), "{e}");
        assert_eq!(load(&g.stats().deadline_errors), 1);
        assert!(load(&g.stats().timeouts) >= 1);
        assert!(g.in_outage());
        assert_eq!(h.held(), 1, "the given-up write is still pending at the device");

        // A second write to overlapping bytes waits behind the first and is never issued.
        let (_, r) = g.write(8192, filled(4096, 0xb), false).await;
        assert!(is_deadline_error(&r.unwrap_err()));
        assert_eq!(h.ops(FaultOp::Write), 1, "no write may be issued over one that may still land");
        // A read of those bytes waits for the given-up write too; a disjoint read does not.
        let (_, r) = g.read(0, AlignedBuf::zeroed(8192)).await;
        assert!(is_deadline_error(&r.unwrap_err()));
        let (b, r) = g.read(65536, AlignedBuf::zeroed(4096)).await;
        r.unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // A disjoint write is issued (and hangs like the first).
        let (_, r) = g.write(65536, filled(4096, 0xc), false).await;
        assert!(r.is_err());
        assert_eq!(h.ops(FaultOp::Write), 2);

        // The device answers again: the given-up writes land, late, and the fence opens.
        h.resume();
        g.wait_answering(Duration::from_secs(10)).await;
        assert!(!g.in_outage());
        assert_eq!(load(&g.stats().stalled_ops), 0);
        let (b, r) = g.read(4096, AlignedBuf::zeroed(8192)).await;
        r.unwrap();
        assert!(b.iter().all(|&x| x == 0xa), "the late write landed");
        let (_, r) = g.write(8192, filled(4096, 0xd), false).await;
        r.unwrap();
        let img = dev.inner().contents();
        assert!(img[4096..8192].iter().all(|&x| x == 0xa));
        assert!(img[8192..12288].iter().all(|&x| x == 0xd), "the acknowledged write is last");
        assert!(img[65536..69632].iter().all(|&x| x == 0xc));
    })
    .await;
}

/// A zero-copy source is a read like any other: while a write whose caller gave up may still
/// land on the range, it is not offered (the read path waits for the write instead), so two
/// reads after the failed write never tell different stories.
#[tokio::test]
async fn no_zero_copy_source_over_a_write_that_may_still_land() {
    bounded_test(async {
        let dev = FaultDevice::new(MemDevice::new(SIZE), 7);
        let h = dev.handle();
        let g = guarded(dev.clone());
        assert!(g.zero_copy_source(8192, 4096).is_some(), "MemDevice offers its bytes");
        h.hang(&[FaultOp::Write]);
        let (_, r) = g.write(8192, filled(4096, 0xe), false).await;
        assert!(is_deadline_error(&r.unwrap_err()));
        assert!(g.zero_copy_source(8192, 4096).is_none(), "offered bytes a late write may still replace");
        assert!(g.zero_copy_source(10240, 100).is_none());
        assert!(g.zero_copy_source(65536, 4096).is_some(), "a disjoint range is still offered");
        h.resume();
        g.wait_answering(Duration::from_secs(10)).await;
        let slice = g.zero_copy_source(8192, 4096).expect("offered again once the write landed");
        let mut got = vec![0u8; 4096];
        let file = std::fs::File::from(slice.file.fd().try_clone_to_owned().unwrap());
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, 8192).unwrap();
        assert!(got.iter().all(|&b| b == 0xe), "the landed write");
    })
    .await;
}

/// A flush (or FUA write) the device fails loses durability for good; another flush beside
/// it cannot overlap it (so it cannot report success for what the failed one lost), and
/// concurrent flush calls share one device flush.
#[tokio::test]
async fn a_failed_flush_is_recorded_and_flushes_never_overlap() {
    bounded_test(async {
        let dev = FaultDevice::new(MemDevice::new(SIZE), 8);
        let h = dev.handle();
        let g = Arc::new(guarded(dev.clone()));
        assert!(!g.durability().is_lost());
        h.set_latency(Duration::from_millis(5), Duration::from_millis(6));
        let flushes: Vec<_> = (0..8)
            .map(|_| {
                let g = g.clone();
                tokio::spawn(async move { g.flush().await })
            })
            .collect();
        for f in flushes {
            f.await.unwrap().unwrap();
        }
        assert!(h.ops(FaultOp::Flush) <= 3, "8 concurrent flushes took {} device flushes", h.ops(FaultOp::Flush));
        h.set_latency(Duration::ZERO, Duration::ZERO);
        g.write(0, filled(4096, 1), false).await.1.unwrap();
        h.set_error_ppm(FaultOp::Flush, 1_000_000);
        assert!(g.flush().await.is_err());
        h.heal();
        let loss = g.durability().loss().expect("the failed flush is remembered");
        assert!(loss.cause.contains("flush"), "{loss:?}");
        assert!(g.durability().check().is_err());
        // The device flushes fine again (errseq reports once); the loss stays until cleared.
        g.flush().await.unwrap();
        assert!(g.durability().is_lost());
        // A FUA write the device fails loses durability as well.
        g.durability().clear();
        h.set_error_ppm(FaultOp::Write, 1_000_000);
        assert!(g.write(0, filled(4096, 2), true).await.1.is_err());
        h.heal();
        assert!(g.durability().is_lost(), "a failed FUA write");
        assert_eq!(g.durability().failures(), 2);
    })
    .await;
}

/// A device whose first read never answers; later ones do.
struct FirstReadHangs {
    inner: MemDevice,
    reads: AtomicU64,
}

impl BlockDevice for FirstReadHangs {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn logical_block_bytes(&self) -> u32 {
        1
    }
    fn fast_zero(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
            std::future::pending::<()>().await;
        }
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        self.inner.write(offset, buf, fua).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, may_unmap).await
    }
    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.allocation(offset, len).await
    }
}

#[tokio::test]
async fn a_stalled_read_is_reissued_and_the_second_answer_serves() {
    bounded_test(async {
        let dev = FirstReadHangs { inner: MemDevice::new(SIZE), reads: AtomicU64::new(0) };
        dev.inner.write(0, filled(4096, 7), false).await.1.unwrap();
        let g = Guarded::new(dev, policy(), Arc::new(BackingIoStats::default()), "test");
        let (b, r) = g.read(0, AlignedBuf::zeroed(4096)).await;
        r.unwrap();
        assert!(b.iter().all(|&x| x == 7));
        assert_eq!(load(&g.stats().retries), 1);
        assert_eq!(load(&g.stats().timeouts), 1);
        assert_eq!(load(&g.stats().deadline_errors), 0);
        assert!(g.in_outage(), "the first read is still unanswered");
    })
    .await;
}

#[tokio::test]
async fn a_failing_read_is_retried_and_then_reports_the_device_error() {
    bounded_test(async {
        let dev = FaultDevice::new(MemDevice::new(SIZE), 2);
        let h = dev.handle();
        let g = guarded(dev);
        h.set_error_ppm(FaultOp::Read, 1_000_000);
        let (_, r) = g.read(0, AlignedBuf::zeroed(512)).await;
        let e = r.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "the device's own error, not a deadline: {e}");
        assert_eq!(h.ops(FaultOp::Read), 3, "one attempt and two retries");
        assert_eq!(load(&g.stats().retries), 2);
        // Writes are not retried: the error is the client's to see.
        h.set_error_ppm(FaultOp::Write, 1_000_000);
        assert!(g.write(0, filled(512, 1), false).await.1.is_err());
        assert_eq!(h.ops(FaultOp::Write), 1);
    })
    .await;
}

#[tokio::test]
async fn a_flush_past_its_deadline_fails_and_is_not_reissued() {
    bounded_test(async {
        let dev = FaultDevice::new(MemDevice::new(SIZE), 3);
        let h = dev.handle();
        let g = guarded(dev);
        h.hang(&[FaultOp::Flush]);
        assert!(is_deadline_error(&g.flush().await.unwrap_err()));
        assert_eq!(h.ops(FaultOp::Flush), 1);
        h.resume();
        g.wait_answering(Duration::from_secs(10)).await;
        g.flush().await.unwrap();
        assert_eq!(h.ops(FaultOp::Flush), 2);
    })
    .await;
}

#[tokio::test]
async fn past_the_stall_cap_requests_wait_instead_of_issuing() {
    bounded_test(async {
        let dev = FaultDevice::new(MemDevice::new(SIZE), 4);
        let h = dev.handle();
        let g = Arc::new(guarded(dev));
        h.hang(&[FaultOp::Write]);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..MAX_STALLED_OPS {
            let g = g.clone();
            tasks.spawn(async move { g.write(i * 4096, filled(4096, 1), false).await.1 });
        }
        while let Some(r) = tasks.join_next().await {
            assert!(r.unwrap().is_err());
        }
        assert_eq!(load(&g.stats().stalled_ops), MAX_STALLED_OPS);
        let (_, r) = g.write(MAX_STALLED_OPS * 4096, filled(4096, 1), false).await;
        assert!(is_deadline_error(&r.unwrap_err()));
        assert_eq!(h.ops(FaultOp::Write), MAX_STALLED_OPS, "nothing more was issued");
        h.resume();
        g.wait_answering(Duration::from_secs(10)).await;
        g.write(0, filled(4096, 2), false).await.1.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_cancelled_operation_is_a_stall_only_once_it_passes_the_attempt_timeout() {
    bounded_test(async {
        let dev = FaultDevice::new(MemDevice::new(SIZE), 6);
        let h = dev.handle();
        let mut p = policy();
        // Long enough that a loaded machine cannot pass it between the drop and the check.
        p.attempt_timeout = Duration::from_secs(1);
        p.deadline = Duration::from_secs(10);
        let g = Guarded::new(dev, p, Arc::new(BackingIoStats::default()), "test");
        let outages = |g: &Guarded<_>| load(&g.stats().outages);

        // A read its caller drops while the device works on it (a hedged read that lost):
        // the device answers soon after, and there was no outage.
        h.hang(&[FaultOp::Read]);
        let cancelled = tokio::time::timeout(Duration::from_millis(5), g.read(0, AlignedBuf::zeroed(4096))).await;
        assert!(cancelled.is_err(), "the read must still be pending when dropped");
        assert!(!g.in_outage(), "a dropped operation is not a stall");
        assert_eq!(h.held(), 1);
        h.resume();
        while h.held() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!((outages(&g), load(&g.stats().timeouts), load(&g.stats().stalled_ops)), (0, 0, 0));

        // Dropped on a device that then stays silent: a stall from its attempt timeout on,
        // counted once, and over when the device answers.
        h.hang(&[FaultOp::Read]);
        let cancelled = tokio::time::timeout(Duration::from_millis(5), g.read(0, AlignedBuf::zeroed(4096))).await;
        assert!(cancelled.is_err());
        while !g.in_outage() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!((outages(&g), load(&g.stats().timeouts), load(&g.stats().stalled_ops)), (1, 1, 1));
        h.resume();
        g.wait_answering(Duration::from_secs(10)).await;
        assert!(!g.in_outage());
        assert_eq!(load(&g.stats().stalled_ops), 0);
    })
    .await;
}

#[tokio::test]
async fn a_request_deadline_bounds_every_wait_inside_it() {
    bounded_test(async {
        let d = Instant::now() + Duration::from_millis(30);
        let r = with_deadline(d, bounded(std::future::pending::<()>())).await;
        assert!(is_deadline_error(&r.unwrap_err()));
        // An inner scope cannot extend an outer one.
        let inner = with_deadline(d, with_deadline(d + Duration::from_secs(60), async { current_deadline() })).await;
        assert_eq!(inner, Some(d));
        assert_eq!(current_deadline(), None);
        assert!(bounded(async { 1 }).await.is_ok());
        // A device operation inside a scope ends by the scope's deadline, not its own.
        let dev = FaultDevice::new(MemDevice::new(SIZE), 5);
        dev.handle().hang(&[FaultOp::Read]);
        let mut p = policy();
        p.deadline = Duration::from_secs(3600);
        p.attempt_timeout = Duration::from_secs(3600);
        let g = Guarded::new(dev.clone(), p, Arc::new(BackingIoStats::default()), "test");
        let d = Instant::now() + Duration::from_millis(30);
        let (_, r) = with_deadline(d, g.read(0, AlignedBuf::zeroed(512))).await;
        assert!(is_deadline_error(&r.unwrap_err()));
        // Given up on long before its attempt timeout, it still counts against the stall cap.
        assert!(g.in_outage(), "an operation the deadline gave up on is stalled");
        dev.handle().resume();
        g.wait_answering(Duration::from_secs(10)).await;
        assert!(!g.in_outage());
    })
    .await;
}

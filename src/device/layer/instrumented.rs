//! The counters around each device the daemon opens: operations, bytes, errors and a latency
//! histogram per kind (read, write, flush, zero), read by `superdisk status` and the metrics.

use crate::device::{AlignedBuf, BlockDevice, Extent};
use crate::telemetry::{OpSnapshot, OpStats};
use std::io;
use std::sync::Arc;
use std::time::Instant;

/// The kinds of device operation counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevOp {
    Read,
    Write,
    Flush,
    /// write_zeroes, which also carries TRIM.
    Zero,
}

impl DevOp {
    pub const ALL: [DevOp; 4] = [DevOp::Read, DevOp::Write, DevOp::Flush, DevOp::Zero];
    pub fn name(self) -> &'static str {
        match self {
            DevOp::Read => "read",
            DevOp::Write => "write",
            DevOp::Flush => "flush",
            DevOp::Zero => "zero",
        }
    }
}

/// Everything counted for one device.
pub struct DeviceStats {
    /// `backing`, `cache0`, `cache1`, … (the metrics label).
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
    ops: [OpStats; 4],
}

impl DeviceStats {
    pub fn new(name: &str, path: &str, size_bytes: u64) -> Self {
        DeviceStats {
            name: name.into(),
            path: path.into(),
            size_bytes,
            ops: std::array::from_fn(|_| OpStats::default()),
        }
    }

    pub fn op(&self, op: DevOp) -> &OpStats {
        &self.ops[op as usize]
    }

    pub fn snapshot(&self) -> [OpSnapshot; 4] {
        std::array::from_fn(|i| self.ops[i].snapshot())
    }
}

/// A device that counts what passes through it. Wraps each backing and cache device in the daemon.
pub struct Instrumented<D> {
    inner: D,
    stats: Arc<DeviceStats>,
}

impl<D: BlockDevice> Instrumented<D> {
    pub fn new(inner: D, stats: Arc<DeviceStats>) -> Self {
        Instrumented { inner, stats }
    }
    pub fn inner(&self) -> &D {
        &self.inner
    }
    pub fn stats(&self) -> &Arc<DeviceStats> {
        &self.stats
    }
}

impl<D: BlockDevice> BlockDevice for Instrumented<D> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn identity(&self) -> Option<crate::device::DeviceId> {
        self.inner.identity()
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        self.inner.drop_cached(offset, len)
    }
    fn open_files(&self, out: &mut Vec<crate::device::OpenFile>) {
        self.inner.open_files(out)
    }
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<crate::device::FileSlice> {
        let started = Instant::now();
        let slice = self.inner.zero_copy_source(offset, len)?;
        self.stats.op(DevOp::Read).record(len as u64, true, started);
        Some(slice)
    }
    fn logical_block_bytes(&self) -> u32 {
        self.inner.logical_block_bytes()
    }
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }
    async fn read(&self, offset: u64, buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let started = Instant::now();
        let (buf, r) = self.inner.read(offset, buf).await;
        self.stats.op(DevOp::Read).record(buf.len() as u64, r.is_ok(), started);
        (buf, r)
    }
    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        let started = Instant::now();
        let (buf, r) = self.inner.write(offset, buf, fua).await;
        self.stats.op(DevOp::Write).record(buf.len() as u64, r.is_ok(), started);
        (buf, r)
    }
    async fn write_shared(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        let started = Instant::now();
        let len = data.len() as u64;
        let r = self.inner.write_shared(offset, data, fua).await;
        self.stats.op(DevOp::Write).record(len, r.is_ok(), started);
        r
    }
    async fn flush(&self) -> io::Result<()> {
        let started = Instant::now();
        let r = self.inner.flush().await;
        self.stats.op(DevOp::Flush).record(0, r.is_ok(), started);
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let started = Instant::now();
        let r = self.inner.write_zeroes(offset, len, may_unmap).await;
        self.stats.op(DevOp::Zero).record(len, r.is_ok(), started);
        r
    }
    fn allocation(&self, offset: u64, len: u64) -> impl std::future::Future<Output = io::Result<Vec<Extent>>> + Send {
        self.inner.allocation(offset, len)
    }
}

//! What a front end (NBD today, ublk later) asks of the storage engine. The front end knows
//! nothing about devices, regions or mirrors; an engine knows nothing about NBD.
//!
//! Errors are `io::Error`; the front end maps them to its wire values.

pub mod plain;

use crate::device::{AlignedBuf, Extent, FileSlice};
use std::future::Future;
use std::io;

pub use plain::PlainVolume;

pub trait Volume: Send + Sync + 'static {
    /// Size of the exported disk.
    fn size_bytes(&self) -> u64;
    /// Whether write_zeroes is fast (NBD FAST_ZERO can succeed).
    fn fast_zero(&self) -> bool;
    /// Whether the medium is rotational (a hint for the client's I/O scheduler).
    fn rotational(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: AlignedBuf) -> impl Future<Output = (AlignedBuf, io::Result<()>)> + Send;
    /// A read the front end may send straight from a file to its socket: where the range's bytes
    /// are, when all of them are in the page cache of one device file right now. None means "use
    /// `read`". Counted as a read when it returns Some. A send that fails part-way reads the rest
    /// with `read`, so a source that turns bad costs a copy, never the client's data.
    fn read_zero_copy(&self, _offset: u64, _len: u64) -> Option<FileSlice> {
        None
    }
    /// Acknowledged only once the durable device accepted it; with `fua`, once it is durable there.
    fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> impl Future<Output = (AlignedBuf, io::Result<()>)> + Send;
    /// Every write acknowledged before this call is durable when it returns Ok.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// The client no longer needs the range; contents become unspecified (we zero it).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = io::Result<()>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// A hint that the range will be read soon.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;
    /// `base:allocation` for the range (may cover only a prefix).
    fn allocation(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<Vec<Extent>>> + Send;
    /// Called once, after the last request: flush and record a clean shutdown.
    fn shutdown(&self) -> impl Future<Output = io::Result<()>> + Send;
}

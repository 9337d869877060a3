//! The request mapping, without a kernel: each ublk op reaches the right `Volume` call with the
//! right range and flags, answers what the kernel expects, and the tag's buffer keeps its
//! capacity whatever buffer the volume hands back. (The protocol itself runs in the 6.12 guest:
//! scripts/ublk-e2e.sh.)

use super::sys::{self, IoDesc};
use super::{params_for, serve_request, MAX_IO_BYTES};
use crate::device::{AlignedBuf, Extent};
use crate::server::stats::{ReqOp, ServerStats};
use crate::volume::Volume;
use std::io;
use std::sync::Mutex;

const SIZE_BYTES: u64 = 1 << 30;

/// Records every call; a read fills its buffer with 0xab and, with `shrink`, answers in a buffer
/// of its own (as a mirror read answered from another copy may); `fail` answers every call with it.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    shrink: bool,
    fail: Option<i32>,
}

impl Recorder {
    fn log(&self, s: String) -> io::Result<()> {
        self.calls.lock().unwrap().push(s);
        self.fail.map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
    }
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Volume for Recorder {
    fn size_bytes(&self) -> u64 {
        SIZE_BYTES
    }
    fn fast_zero(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, mut buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        let r = self.log(format!("read {offset} {}", buf.len()));
        if self.shrink {
            buf = AlignedBuf::zeroed(buf.len());
        }
        buf.fill(0xab);
        (buf, r)
    }
    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        let r = self.log(format!("write {offset} {} fua={fua} first={}", buf.len(), buf[0]));
        (buf, r)
    }
    async fn flush(&self) -> io::Result<()> {
        self.log("flush".into())
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.log(format!("trim {offset} {len} fua={fua}"))
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> io::Result<()> {
        self.log(format!("zeroes {offset} {len} unmap={may_unmap} fua={fua}"))
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

fn desc(op: u8, flags: u32, start_sector: u64, nr_sectors: u32) -> IoDesc {
    IoDesc { op_flags: u32::from(op) | flags, nr_sectors, start_sector, addr: 0 }
}

fn tag_buf() -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(MAX_IO_BYTES);
    b[..1].fill(7);
    b
}

#[tokio::test]
async fn every_op_reaches_its_volume_call_and_answers_what_the_kernel_expects() {
    let v = Recorder::default();
    let stats = ServerStats::default();
    let cases = [
        (desc(sys::IO_OP_READ, 0, 8, 8), 4096, "read 4096 4096"),
        (desc(sys::IO_OP_WRITE, 0, 16, 128), 65536, "write 8192 65536 fua=false first=7"),
        (desc(sys::IO_OP_WRITE, sys::IO_F_FUA, 0, 8), 4096, "write 0 4096 fua=true first=7"),
        // A flush's sector means nothing (it is not range-checked).
        (desc(sys::IO_OP_FLUSH, 0, u64::MAX >> 9, 0), 0, "flush"),
        (desc(sys::IO_OP_DISCARD, 0, 2048, 2048), 0, "trim 1048576 1048576 fua=false"),
        (desc(sys::IO_OP_WRITE_ZEROES, 0, 8, 8), 0, "zeroes 4096 4096 unmap=true fua=false"),
        (
            desc(sys::IO_OP_WRITE_ZEROES, sys::IO_F_NOUNMAP | sys::IO_F_FUA, 8, 8),
            0,
            "zeroes 4096 4096 unmap=false fua=true",
        ),
    ];
    for (d, want_result, want_call) in cases {
        let (buf, result) = serve_request(&v, d, tag_buf(), &stats).await;
        assert_eq!(result, want_result, "{want_call}");
        assert_eq!(v.calls(), vec![want_call.to_string()]);
        assert_eq!(buf.capacity(), MAX_IO_BYTES);
    }
    assert_eq!(stats.request(ReqOp::Write).snapshot().ops, 2);
    assert_eq!(stats.request(ReqOp::Write).snapshot().bytes, 65536 + 4096);
    assert_eq!(stats.request(ReqOp::Flush).snapshot().ops, 1);
}

#[tokio::test]
async fn requests_the_volume_cannot_take_are_refused_without_calling_it() {
    let v = Recorder::default();
    let stats = ServerStats::default();
    let end_sector = SIZE_BYTES >> 9;
    for (d, errno) in [
        (desc(sys::IO_OP_READ, 0, end_sector - 4, 8), libc::EIO),
        (desc(sys::IO_OP_WRITE, 0, u64::MAX >> 9, 8), libc::EIO),
        (desc(sys::IO_OP_DISCARD, 0, end_sector, 1), libc::EIO),
        (desc(sys::IO_OP_READ, 0, 0, (MAX_IO_BYTES as u32 >> 9) + 8), libc::EIO),
        (desc(4, 0, 0, 8), libc::EOPNOTSUPP),  // WRITE_SAME
        (desc(13, 0, 0, 8), libc::EOPNOTSUPP), // ZONE_APPEND
    ] {
        let (buf, result) = serve_request(&v, d, tag_buf(), &stats).await;
        assert_eq!(result, -errno, "{d:?}");
        assert_eq!(buf.capacity(), MAX_IO_BYTES);
    }
    assert!(v.calls().is_empty());
    assert_eq!(stats.request(ReqOp::Other).snapshot().errors, 6);
}

#[tokio::test]
async fn a_volume_error_answers_its_errno_and_eio_when_it_has_none() {
    let v = Recorder { fail: Some(libc::ENOSPC), ..Default::default() };
    let stats = ServerStats::default();
    let (_, result) = serve_request(&v, desc(sys::IO_OP_WRITE, 0, 0, 8), tag_buf(), &stats).await;
    assert_eq!(result, -libc::ENOSPC);
    assert_eq!(stats.request(ReqOp::Write).snapshot().errors, 1);
    let v = Recorder { fail: Some(0), ..Default::default() };
    let (_, result) = serve_request(&v, desc(sys::IO_OP_FLUSH, 0, 0, 0), tag_buf(), &stats).await;
    assert_eq!(result, -libc::EIO, "an error without an errno must still be an error");
}

/// The kernel copies the tag's next request into the buffer the commit names, up to
/// max_io_buf_bytes: a smaller buffer from the volume would be overrun (the guest test saw
/// writes fail with EIO before this held).
#[tokio::test]
async fn a_smaller_buffer_from_the_volume_comes_back_full_size_with_its_bytes() {
    let v = Recorder { shrink: true, ..Default::default() };
    let (buf, result) = serve_request(&v, desc(sys::IO_OP_READ, 0, 0, 8), tag_buf(), &ServerStats::default()).await;
    assert_eq!(result, 4096);
    assert_eq!(buf.capacity(), MAX_IO_BYTES);
    assert_eq!(buf.len(), 4096);
    assert!(buf.iter().all(|b| *b == 0xab), "the read's bytes must move into the full-size buffer");
}

#[test]
fn params_describe_a_4k_disk_with_a_volatile_cache_and_fua() {
    let p = params_for(SIZE_BYTES, false, false);
    assert_eq!(p.basic.dev_sectors, SIZE_BYTES >> 9);
    assert_eq!((p.basic.logical_bs_shift, p.basic.physical_bs_shift), (12, 12));
    assert_eq!(p.basic.attrs, sys::ATTR_VOLATILE_CACHE | sys::ATTR_FUA);
    assert_eq!(p.basic.max_sectors as usize, MAX_IO_BYTES >> 9);
    assert_eq!(p.types, sys::PARAM_TYPE_BASIC | sys::PARAM_TYPE_DISCARD);
    assert_eq!(p.len as usize, std::mem::size_of::<sys::Params>());
    let ro = params_for(SIZE_BYTES, true, true);
    assert_eq!(
        ro.basic.attrs & (sys::ATTR_READ_ONLY | sys::ATTR_ROTATIONAL),
        sys::ATTR_READ_ONLY | sys::ATTR_ROTATIONAL
    );
    assert_eq!(ro.types, sys::PARAM_TYPE_BASIC, "a read-only disk offers no discard");
}

#[test]
fn the_cookie_marks_superdisk_and_tells_backings_apart() {
    let a = super::cookie_for(std::path::Path::new("/dev/disk/by-id/a"));
    let b = super::cookie_for(std::path::Path::new("/dev/disk/by-id/b"));
    assert_eq!(a >> 48, 0x5344);
    assert_ne!(a, b);
    assert_eq!(a, super::cookie_for(std::path::Path::new("/dev/disk/by-id/a")));
}

//! What the two model-based tests (plain_model.rs, mirror_model.rs) share: seeds, write
//! patterns, request shapes, sending a request to a volume, and telling the model what it did.
//! Each test keeps its own world (devices, steps, checks).

#![allow(dead_code)]

use superdisk::device::sim::fault::SimRng;
use superdisk::device::sim::shadow::ShadowDisk;
use superdisk::device::AlignedBuf;
use superdisk::volume::Volume;

/// `SUPERDISK_SEED=N` replays one seed; `SUPERDISK_SEEDS=N` runs N seeds instead of `default`.
pub fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("SUPERDISK_SEED") {
        return vec![s.trim().parse().expect("SUPERDISK_SEED must be an integer")];
    }
    let n = std::env::var("SUPERDISK_SEEDS").map_or(default, |s| s.trim().parse().expect("SUPERDISK_SEEDS: integer"));
    (0..n).collect()
}

/// The bytes write number `id` puts at `offset`: depend on both, so a write that lands at the
/// wrong place or a stale copy of an older write never reads back as the expected value.
pub fn pattern(id: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    SimRng::new(id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ offset).fill(&mut data);
    data
}

pub fn buf_of(data: &[u8]) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(data.len());
    b.copy_from_slice(data);
    b
}

/// A random request range, in the shapes real clients send: tiny unaligned, sector-aligned,
/// page-aligned, and arbitrary up to 32 KiB.
pub fn random_range(rng: &mut SimRng, size: u64) -> (u64, u64) {
    let (align, len) = match rng.below(4) {
        0 => (1, rng.in_range(1..65)),
        1 => (512, 512 * rng.in_range(1..17)),
        2 => (4096, 4096 * rng.in_range(1..9)),
        _ => (1, rng.in_range(1..(32 << 10) + 1)),
    };
    let len = len.min(size);
    let off = rng.below(size - len + 1) / align * align;
    (off, len)
}

#[derive(Debug)]
pub enum Req {
    Read { off: u64, len: u64 },
    Write { off: u64, data: Vec<u8>, fua: bool },
    Zero { off: u64, len: u64, fua: bool, trim: bool },
    Flush,
}

impl Req {
    pub fn write_range(&self) -> Option<(u64, u64)> {
        match self {
            Req::Write { off, data, .. } => Some((*off, data.len() as u64)),
            Req::Zero { off, len, .. } => Some((*off, *len)),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Req::Read { off, len } => format!("read [{off}, +{len})"),
            Req::Write { off, data, fua } => format!("write [{off}, +{}) fua={fua}", data.len()),
            Req::Zero { off, len, fua, trim } => {
                format!("{} [{off}, +{len}) fua={fua}", if *trim { "trim" } else { "write_zeroes" })
            }
            Req::Flush => "flush".into(),
        }
    }
}

/// What a zero-copy read would send.
pub fn file_bytes(slice: &superdisk::device::FileSlice) -> Vec<u8> {
    let mut out = vec![0u8; slice.len];
    let file = std::fs::File::from(slice.file.fd().try_clone_to_owned().expect("dup the slice's descriptor"));
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut out, slice.offset).expect("read the zero-copy source");
    out
}

/// How reads are sent: always through `Volume::read`, or, for every other 4 KiB-aligned start, the
/// way a large NBD read goes when it can (its bytes straight from a device file, see
/// `Volume::read_zero_copy`), checked like any read, so a zero-copy source holding stale data fails.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    Copied,
    SomeZeroCopy,
}

/// Sends one request; a read returns its data and whether it came from a zero-copy source.
pub async fn send<V: Volume>(
    vol: &V,
    req: &Req,
    may_unmap: bool,
    reads: Reads,
) -> std::io::Result<(Option<Vec<u8>>, bool)> {
    match req {
        Req::Read { off, len } => {
            let zc = (reads == Reads::SomeZeroCopy && off / 4096 % 2 == 1).then(|| vol.read_zero_copy(*off, *len));
            if let Some(slice) = zc.flatten() {
                return Ok((Some(file_bytes(&slice)), true));
            }
            let (buf, r) = vol.read(*off, AlignedBuf::zeroed(*len as usize)).await;
            r.map(|()| (Some(buf.to_vec()), false))
        }
        Req::Write { off, data, fua } => vol.write(*off, buf_of(data), *fua).await.1.map(|()| (None, false)),
        Req::Zero { off, len, fua, trim: true } => vol.trim(*off, *len, *fua).await.map(|()| (None, false)),
        Req::Zero { off, len, fua, trim: false } => {
            vol.write_zeroes(*off, *len, may_unmap, *fua).await.map(|()| (None, false))
        }
        Req::Flush => vol.flush().await.map(|()| (None, false)),
    }
}

/// The model's side of a completed request.
pub fn apply(model: &mut ShadowDisk, req: &Req, read: Option<Vec<u8>>) -> Result<(), String> {
    match req {
        Req::Read { off, .. } => model.check_read(*off, &read.expect("read data")),
        Req::Write { off, data, fua } => {
            model.write(*off, data, *fua);
            Ok(())
        }
        Req::Zero { off, len, fua, .. } => {
            model.write_zeroes(*off, *len, *fua);
            Ok(())
        }
        Req::Flush => {
            model.flush();
            Ok(())
        }
    }
}

/// Prints how to replay the seed if the test panics inside it (an unwrap in the code under test).
pub struct SeedGuard {
    pub seed: u64,
    pub test: &'static str,
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("panicked in seed {0}; replay: SUPERDISK_SEED={0} cargo test --test {1}", self.seed, self.test);
        }
    }
}

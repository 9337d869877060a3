//! Reading, writing and creating superblocks on a device.

use super::superblock::{to_io, DeviceRole, Superblock, SuperblockError, FLAG_OPEN, SUPERBLOCK_BYTES};
use super::{data_size_for_device, meta_bytes};
use crate::device::{AlignedBuf, BlockDevice};
use std::io;

/// Reads both slots and returns the newest valid superblock.
pub async fn read_superblock<D: BlockDevice>(dev: &D) -> io::Result<Result<Superblock, SuperblockError>> {
    let size = dev.size_bytes();
    if size < 2 * SUPERBLOCK_BYTES as u64 {
        return Ok(Err(SuperblockError::NoMagic));
    }
    let [a, b] = Superblock::slot_offsets(size);
    let (buf, r) = dev.read(a, AlignedBuf::zeroed(2 * SUPERBLOCK_BYTES)).await;
    r?;
    debug_assert_eq!(b, a + SUPERBLOCK_BYTES as u64);
    Ok(Superblock::pick(Superblock::decode(&buf[..SUPERBLOCK_BYTES]), Superblock::decode(&buf[SUPERBLOCK_BYTES..])))
}

/// Writes `sb` into the slot its generation selects and makes it durable. The other slot keeps the
/// previous generation, so a torn write here loses at most this update.
pub async fn write_superblock<D: BlockDevice>(dev: &D, sb: &Superblock) -> io::Result<()> {
    let slot = Superblock::slot_offsets(dev.size_bytes())[(sb.generation % 2) as usize];
    let mut buf = AlignedBuf::zeroed(SUPERBLOCK_BYTES);
    buf.copy_from_slice(&sb.encode());
    let (_, r) = dev.write(slot, buf, true).await;
    r?;
    dev.flush().await
}

/// Writes the next generation of `sb` (bumping it in place).
pub async fn update_superblock<D: BlockDevice>(dev: &D, sb: &mut Superblock) -> io::Result<()> {
    sb.generation += 1;
    write_superblock(dev, sb).await
}

/// What `create` found on the device's tail.
#[derive(Debug, PartialEq, Eq)]
pub enum TailState {
    Blank,
    Ours(Box<Superblock>),
    Foreign,
}

/// Inspects the last `meta_bytes` of the device: all zeroes, a superdisk superblock, or neither.
pub async fn inspect_tail<D: BlockDevice>(dev: &D, region_bytes: u32) -> io::Result<TailState> {
    if let Ok(sb) = read_superblock(dev).await? {
        return Ok(TailState::Ours(Box::new(sb)));
    }
    let size = dev.size_bytes();
    let tail = meta_bytes(size, region_bytes).min(size);
    let chunk = 1u64 << 20;
    let mut pos = size - tail;
    while pos < size {
        let n = super::to_usize(chunk.min(size - pos));
        let (buf, r) = dev.read(pos, AlignedBuf::zeroed(n)).await;
        r?;
        if !is_zero(&buf) {
            return Ok(TailState::Foreign);
        }
        pos += n as u64;
    }
    Ok(TailState::Blank)
}

pub fn new_uuid() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A fresh backing superblock for a device of `device_bytes`.
pub fn new_backing_superblock(device_bytes: u64, region_bytes: u32) -> io::Result<Superblock> {
    let data = data_size_for_device(device_bytes, region_bytes).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device of {device_bytes} bytes is too small for superdisk's metadata"),
        )
    })?;
    Ok(Superblock {
        role: DeviceRole::Backing,
        generation: 1,
        array_uuid: new_uuid(),
        device_uuid: new_uuid(),
        data_size_bytes: data,
        device_size_bytes: device_bytes,
        meta_bytes: meta_bytes(data, region_bytes),
        region_bytes,
        flags: 0,
        epoch: 1,
        created_unix_s: unix_now_s(),
        ..Superblock::default()
    })
}

/// Checks that a superblock read from `dev` describes it, returning a readable reason if not.
pub fn check_backing(sb: &Superblock, dev_size_bytes: u64) -> io::Result<()> {
    if sb.role != DeviceRole::Backing {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "superblock belongs to a cache device, not a backing device",
        ));
    }
    if dev_size_bytes < sb.device_size_bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "device shrank from {} to {} bytes since it was created; refusing to serve a truncated disk",
                sb.device_size_bytes, dev_size_bytes
            ),
        ));
    }
    Ok(())
}

pub fn was_open(sb: &Superblock) -> bool {
    sb.flags & FLAG_OPEN != 0
}

pub fn to_io_error(e: SuperblockError) -> io::Error {
    to_io(e)
}

/// Word-at-a-time zero check: scanning a 1 MiB tail byte by byte dominates start-up in debug
/// builds and the model tests.
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { buf.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

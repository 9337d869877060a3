//! Several cache devices striped into one (RAID0-like), because local SSDs come in fixed units.
//!
//! ```text
//!   striped offset:  │ stripe 0 │ stripe 1 │ stripe 2 │ stripe 3 │ stripe 4 │ …
//!   member:               0          1          2          0          1
//!   member offset:        0          0          0          S          S
//! ```
//! Only each member's data part is striped; its tail holds its own superblock and a replica of the
//! set's valid bitmap. With one member the mapping is the identity and buffers pass straight through.

use crate::device::join::join_all;
use crate::device::{AlignedBuf, BlockDevice, Extent};
use std::io;

pub struct Striped<C> {
    members: Vec<C>,
    member_data_bytes: u64,
    stripe_bytes: u64,
    size_bytes: u64,
}

/// One contiguous piece of a striped request on one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    member: usize,
    member_offset: u64,
    /// Offset of the piece within the request.
    at: u64,
    len: u64,
}

impl<C: BlockDevice> Striped<C> {
    /// `member_data_bytes` (a multiple of the stripe when there are several members) of each member
    /// are used, from its offset 0.
    pub fn new(members: Vec<C>, member_data_bytes: u64, stripe_bytes: u32) -> Self {
        assert!(!members.is_empty(), "a striped set needs a member");
        let n = members.len() as u64;
        let stripe_bytes = u64::from(stripe_bytes);
        if n > 1 {
            assert!(stripe_bytes.is_power_of_two() && member_data_bytes % stripe_bytes == 0);
        }
        for m in &members {
            assert!(m.size_bytes() >= member_data_bytes, "member smaller than its data part");
        }
        Striped { size_bytes: n * member_data_bytes, members, member_data_bytes, stripe_bytes }
    }

    pub fn members(&self) -> &[C] {
        &self.members
    }

    pub fn member_data_bytes(&self) -> u64 {
        self.member_data_bytes
    }

    /// A bit per member that `[offset, +len)` touches.
    pub fn members_touched(&self, offset: u64, len: u64) -> u64 {
        let n = self.members.len() as u64;
        if n == 1 || len == 0 {
            return 1;
        }
        let (first, last) = (offset / self.stripe_bytes, (offset + len - 1) / self.stripe_bytes);
        if last - first + 1 >= n {
            return (1u64 << n) - 1;
        }
        (first..=last).fold(0, |mask, stripe| mask | 1 << (stripe % n))
    }

    pub fn into_members(self) -> Vec<C> {
        self.members
    }

    fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let n = self.members.len() as u64;
        if n == 1 {
            return vec![Piece { member: 0, member_offset: offset, at: 0, len }];
        }
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let stripe = pos / self.stripe_bytes;
            let within = pos % self.stripe_bytes;
            let take = (self.stripe_bytes - within).min(end - pos);
            out.push(Piece {
                member: (stripe % n) as usize,
                member_offset: (stripe / n) * self.stripe_bytes + within,
                at: pos - offset,
                len: take,
            });
            pos += take;
        }
        out
    }

    /// Pieces merged per member where they are contiguous on the member (a long range becomes one
    /// range per member), for operations without a buffer.
    fn merged_pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let mut per_member: Vec<Piece> = Vec::new();
        for p in self.pieces(offset, len) {
            match per_member.iter_mut().find(|q| q.member == p.member && q.member_offset + q.len == p.member_offset) {
                Some(q) => q.len += p.len,
                None => per_member.push(p),
            }
        }
        per_member
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("striped cache: [{offset}, +{len}) is past its end ({} bytes)", self.size_bytes),
            )),
        }
    }
}

impl<C: BlockDevice> Striped<C> {
    /// Writes a request that spans members: each piece from its own buffer, all at once.
    async fn write_pieces(&self, pieces: &[Piece], data: &[u8], fua: bool) -> io::Result<()> {
        let futs = pieces
            .iter()
            .map(|p| {
                let mut b = AlignedBuf::uninit_for_fill(p.len as usize);
                b.copy_from_slice(&data[p.at as usize..(p.at + p.len) as usize]);
                self.members[p.member].write(p.member_offset, b, fua)
            })
            .collect();
        first_error(join_all(futs).await.into_iter().map(|(_, r)| r))
    }
}

fn first_error(results: impl IntoIterator<Item = io::Result<()>>) -> io::Result<()> {
    results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
}

impl<C: BlockDevice> BlockDevice for Striped<C> {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn logical_block_bytes(&self) -> u32 {
        self.members.iter().map(|m| m.logical_block_bytes()).max().unwrap_or(1)
    }

    fn fast_zero(&self) -> bool {
        self.members.iter().all(|m| m.fast_zero())
    }

    async fn read(&self, offset: u64, mut buf: AlignedBuf) -> (AlignedBuf, io::Result<()>) {
        if let Err(e) = self.check(offset, buf.len() as u64) {
            return (buf, Err(e));
        }
        let pieces = self.pieces(offset, buf.len() as u64);
        if let [p] = pieces[..] {
            return self.members[p.member].read(p.member_offset, buf).await;
        }
        let results = join_all(
            pieces
                .iter()
                .map(|p| self.members[p.member].read(p.member_offset, AlignedBuf::uninit_for_fill(p.len as usize)))
                .collect(),
        )
        .await;
        let mut result = Ok(());
        for (p, (b, r)) in pieces.iter().zip(results) {
            match r {
                Ok(()) => buf[p.at as usize..(p.at + p.len) as usize].copy_from_slice(&b),
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        (buf, result)
    }

    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> (AlignedBuf, io::Result<()>) {
        if let Err(e) = self.check(offset, buf.len() as u64) {
            return (buf, Err(e));
        }
        let pieces = self.pieces(offset, buf.len() as u64);
        if let [p] = pieces[..] {
            return self.members[p.member].write(p.member_offset, buf, fua).await;
        }
        let r = self.write_pieces(&pieces, &buf, fua).await;
        (buf, r)
    }

    async fn write_shared(&self, offset: u64, data: std::sync::Arc<AlignedBuf>, fua: bool) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let pieces = self.pieces(offset, data.len() as u64);
        if let [p] = pieces[..] {
            return self.members[p.member].write_shared(p.member_offset, data, fua).await;
        }
        self.write_pieces(&pieces, &data, fua).await
    }

    /// Only a range on one member: a range that spans members is read and assembled.
    fn zero_copy_source(&self, offset: u64, len: usize) -> Option<crate::device::FileSlice> {
        self.check(offset, len as u64).ok()?;
        match self.pieces(offset, len as u64)[..] {
            [p] => self.members[p.member].zero_copy_source(p.member_offset, len),
            _ => None,
        }
    }

    /// One member is that device; a set of several is none of them.
    fn identity(&self) -> Option<crate::device::DeviceId> {
        match &self.members[..] {
            [one] => one.identity(),
            _ => None,
        }
    }

    fn drop_cached(&self, offset: u64, len: u64) {
        if self.check(offset, len).is_ok() {
            for p in self.pieces(offset, len) {
                self.members[p.member].drop_cached(p.member_offset, p.len);
            }
        }
    }
    fn open_files(&self, out: &mut Vec<crate::device::OpenFile>) {
        for m in &self.members {
            m.open_files(out);
        }
    }

    async fn flush(&self) -> io::Result<()> {
        first_error(join_all(self.members.iter().map(|m| m.flush()).collect()).await)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let futs = self
            .merged_pieces(offset, len)
            .into_iter()
            .map(|p| self.members[p.member].write_zeroes(p.member_offset, p.len, may_unmap))
            .collect();
        first_error(join_all(futs).await)
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check(offset, len)?;
        // Nobody asks a cache for its allocation map; "all data" is always a correct answer.
        Ok(vec![Extent { length_bytes: len, hole: false }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::mem::MemDevice;

    #[test]
    fn members_touched_names_exactly_the_members_of_the_pieces() {
        let s = Striped::new(
            vec![MemDevice::new(1 << 20), MemDevice::new(1 << 20), MemDevice::new(1 << 20)],
            1 << 20,
            4096,
        );
        for (offset, len) in [(0, 1), (4095, 2), (8192, 4096), (4000, 10000), (0, 3 << 20), (12288, 4096)] {
            let want = s.pieces(offset, len).iter().fold(0u64, |m, p| m | 1 << p.member);
            assert_eq!(s.members_touched(offset, len), want, "[{offset}, +{len})");
        }
        let one = Striped::new(vec![MemDevice::new(1 << 20)], 1 << 20, 4096);
        assert_eq!(one.members_touched(12345, 678), 1);
    }

    #[test]
    fn pieces_cover_the_request_once() {
        let s = Striped::new(
            vec![MemDevice::new(1 << 20), MemDevice::new(1 << 20), MemDevice::new(1 << 20)],
            1 << 20,
            4096,
        );
        let ps = s.pieces(4000, 10000);
        assert_eq!(ps.iter().map(|p| p.len).sum::<u64>(), 10000);
        assert_eq!(ps[0], Piece { member: 0, member_offset: 4000, at: 0, len: 96 });
        assert_eq!(ps[1], Piece { member: 1, member_offset: 0, at: 96, len: 4096 });
        assert_eq!(ps[2], Piece { member: 2, member_offset: 0, at: 4192, len: 4096 });
        assert_eq!(ps[3], Piece { member: 0, member_offset: 4096, at: 8288, len: 1712 });
        // Merged: member 0's two pieces are contiguous on it.
        let m = s.merged_pieces(0, 6 * 4096);
        assert_eq!(m.len(), 3);
        assert!(m.iter().all(|p| p.len == 2 * 4096));
    }

    #[tokio::test]
    async fn striped_round_trip_matches_a_flat_model() {
        let members: Vec<MemDevice> = (0..3).map(|_| MemDevice::new(64 << 10)).collect();
        let s = Striped::new(members, 64 << 10, 4096);
        assert_eq!(s.size_bytes(), 3 * (64 << 10));
        let mut model = vec![0u8; s.size_bytes() as usize];
        let mut rng = crate::device::sim::fault::SimRng::new(7);
        for _ in 0..200 {
            let off = rng.below(s.size_bytes() - 1);
            let len = 1 + rng.below((s.size_bytes() - off).min(20000));
            if rng.below(3) == 0 {
                s.write_zeroes(off, len, true).await.unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let mut b = AlignedBuf::zeroed(len as usize);
                rng.fill(&mut b);
                model[off as usize..(off + len) as usize].copy_from_slice(&b);
                let (_, r) = s.write(off, b, false).await;
                r.unwrap();
            }
        }
        let (b, r) = s.read(0, AlignedBuf::zeroed(s.size_bytes() as usize)).await;
        r.unwrap();
        assert!(b[..] == model[..]);
        // Out of range is refused, not wrapped.
        let (_, r) = s.read(s.size_bytes() - 1, AlignedBuf::zeroed(2)).await;
        assert!(r.is_err());
    }
}

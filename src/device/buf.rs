//! Owned, aligned I/O buffers. An I/O takes a buffer and always hands it back with its result,
//! so no borrow crosses an await point or a thread boundary (the io_uring thread holds it while
//! the kernel owns the memory).

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every buffer: enough for O_DIRECT on 512- and 4096-byte devices.
pub const BUF_ALIGN_BYTES: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the buffer is plain owned memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity.max(BUF_ALIGN_BYTES), BUF_ALIGN_BYTES).expect("valid layout")
    }

    /// A buffer of `len` bytes, zeroed.
    pub fn new(len: usize) -> Self {
        Self::zeroed(len)
    }

    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::uninit_for_fill(len);
        // SAFETY: the allocation holds `capacity` ≥ len bytes.
        unsafe { std::ptr::write_bytes(b.ptr.as_ptr(), 0, b.capacity) };
        b.len = len;
        b
    }

    /// A buffer whose bytes will all be overwritten before anyone reads them (socket or device
    /// reads of exactly `len` bytes); skips the memset on the hot path. It may come from the pool
    /// and hold a previous request's bytes, which is why callers never expose unfilled bytes (a
    /// short read is an error and the buffer is dropped).
    pub fn uninit_for_fill(len: usize) -> Self {
        let capacity = size_class(len);
        if let Some(ptr) = POOL.take(capacity) {
            return AlignedBuf { ptr, len, capacity };
        }
        // SAFETY: layout has non-zero size. u8 has no invalid bit patterns.
        let ptr = unsafe { alloc(Self::layout(capacity)) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(capacity)));
        AlignedBuf { ptr, len, capacity }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity ≥ len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for capacity ≥ len bytes and uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if !POOL.give(self.ptr, self.capacity) {
            // SAFETY: allocated with the same layout in uninit_for_fill.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
        }
    }
}

/// Capacities are powers of two from 4 KiB: one free list per size.
fn size_class(len: usize) -> usize {
    len.max(BUF_ALIGN_BYTES).next_power_of_two()
}

const POOL_CLASSES: usize = 16; // 4 KiB ..= 128 MiB
/// Bytes kept idle per size class (at least one buffer is kept for every class).
const POOL_BYTES_PER_CLASS: usize = 16 << 20;

/// Free lists of recently used buffers. Large buffers are the point: a fresh 1 MiB allocation is
/// an mmap, 256 page faults on first touch and an munmap on free, which cost more CPU than the
/// copy the buffer is for. The pool is bounded, so idle memory stays small.
struct Pool {
    classes: [Mutex<Vec<NonNull<u8>>>; POOL_CLASSES],
}

// SAFETY: the pointers are owned, unaliased allocations handed out to one owner at a time.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool { classes: [const { Mutex::new(Vec::new()) }; POOL_CLASSES] };

impl Pool {
    fn index(capacity: usize) -> Option<usize> {
        let i = (capacity.trailing_zeros() as usize).checked_sub(BUF_ALIGN_BYTES.trailing_zeros() as usize)?;
        (i < POOL_CLASSES && capacity.is_power_of_two()).then_some(i)
    }

    fn take(&self, capacity: usize) -> Option<NonNull<u8>> {
        self.classes[Self::index(capacity)?].lock().ok()?.pop()
    }

    fn give(&self, ptr: NonNull<u8>, capacity: usize) -> bool {
        let Some(i) = Self::index(capacity) else { return false };
        let Ok(mut list) = self.classes[i].lock() else { return false };
        if list.len() >= (POOL_BYTES_PER_CLASS / capacity).max(1) {
            return false;
        }
        list.push(ptr);
        true
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_reused_and_zeroed_when_asked() {
        let mut a = AlignedBuf::uninit_for_fill(1 << 20);
        a.fill(0x5a);
        drop(a);
        let b = AlignedBuf::zeroed(1 << 20);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(size_class(1), 4096);
        assert_eq!(size_class(4097), 8192);
        assert_eq!(Pool::index(4096), Some(0));
        assert_eq!(Pool::index(1 << 30), None);
    }

    #[test]
    fn aligned_and_sized() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN_BYTES, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(7);
        }
    }
}

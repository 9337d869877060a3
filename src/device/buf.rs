//! Owned, aligned I/O buffers. An I/O takes a buffer and always hands it back with its result,
//! so no borrow crosses an await point or a thread boundary (the io_uring thread holds it while
//! the kernel owns the memory).

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

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

    /// A buffer of `len` bytes whose contents are unspecified until written (it is zeroed, since
    /// handing stale heap memory to a client by mistake is worse than the memset).
    pub fn new(len: usize) -> Self {
        Self::zeroed(len)
    }

    pub fn zeroed(len: usize) -> Self {
        let capacity = len.div_ceil(BUF_ALIGN_BYTES).max(1) * BUF_ALIGN_BYTES;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(Self::layout(capacity)) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(capacity)));
        AlignedBuf { ptr, len, capacity }
    }

    /// A buffer whose bytes will all be overwritten before anyone reads them (socket or device
    /// reads of exactly `len` bytes); skips the memset on the hot path.
    pub fn uninit_for_fill(len: usize) -> Self {
        let capacity = len.div_ceil(BUF_ALIGN_BYTES).max(1) * BUF_ALIGN_BYTES;
        // SAFETY: layout has non-zero size. The memory is treated as initialised bytes only after
        // the caller fills it; u8 has no invalid bit patterns, and the callers never expose
        // unfilled bytes (a short read is an error and the buffer is dropped).
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
        // SAFETY: allocated with the same layout in new/uninit_for_fill.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
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

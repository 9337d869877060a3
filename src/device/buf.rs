//! Owned, aligned I/O buffers. An I/O takes a buffer and always hands it back with its result,
//! so no borrow crosses an await point or a thread boundary (the io_uring thread holds it while
//! the kernel owns the memory).

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Alignment of every buffer: enough for O_DIRECT on 512- and 4096-byte devices.
pub const BUF_ALIGN_BYTES: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the buffer is plain owned memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only through &self, as for a Vec<u8>.
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
        if let Some(a) = Arena::get() {
            if let Some(ptr) = a.take(capacity) {
                return AlignedBuf { ptr, len, capacity };
            }
        }
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

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the length within the capacity: a buffer kept for requests of varying sizes
    /// (ublk's per-tag buffers, which the kernel fills in place).
    ///
    /// # Safety
    /// `len` ≤ [`capacity`](Self::capacity), and bytes `[0, len)` must have been initialized
    /// (true for every byte of a buffer made by [`zeroed`](Self::zeroed)).
    pub unsafe fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
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
        if let Some(a) = Arena::get().filter(|a| a.contains(self.ptr.as_ptr())) {
            a.give(self.ptr, self.capacity);
            return;
        }
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

/// Default size of the registered-buffer arena (`registered_buffer_bytes`): 4 MiB for each size
/// class from 4 KiB to 1 MiB, so a thousand 4 KiB requests or four 1 MiB ones in flight use it.
pub const DEFAULT_REGISTERED_BUFFER_BYTES: usize = ARENA_CLASSES * (4 << 20);
const ARENA_CLASSES: usize = 9; // 4 KiB ..= 1 MiB
const HUGE_PAGE_BYTES: usize = 2 << 20;

static ARENA_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_REGISTERED_BUFFER_BYTES);
/// Buffers of an arena class served from ordinary memory because the class was used up: the
/// operator's sign that `registered_buffer_bytes` is too small for the load. Counted only on that
/// path, so the common one touches no shared counter.
static ARENA_MISSES: AtomicU64 = AtomicU64::new(0);

/// The arena's size (0 when there is none) and its misses so far, for metrics.
pub fn registered_buffer_stats() -> (usize, u64) {
    let bytes = Arena::get().filter(|a| a.registered.load(Ordering::Relaxed)).map_or(0, |a| a.len);
    (bytes, ARENA_MISSES.load(Ordering::Relaxed))
}
static ARENA: OnceLock<Option<Arena>> = OnceLock::new();

/// Sets the size of the arena before anything creates it (the daemon, from its config; 0: none).
/// False when the arena already exists, with whatever size it was created.
pub fn set_registered_buffer_bytes(bytes: usize) -> bool {
    ARENA_BYTES.store(bytes, Ordering::Relaxed);
    ARENA.get().is_none()
}

/// One block of memory that every io_uring engine registers with its ring (fixed buffers), carved
/// into free lists of the pool's size classes. Why: an O_DIRECT read or write from an ordinary
/// buffer makes the kernel look up and pin its pages for every request and unpin them after;
/// from a registered buffer the pages were pinned once, at registration. Buffers are handed out
/// from here first; when a class is used up the ordinary pool serves (same behaviour, unregistered).
/// Created by the first io_uring engine and never freed (the rings refer to it until the process
/// ends), so a psync-only daemon never has one.
pub(crate) struct Arena {
    base: NonNull<u8>,
    len: usize,
    /// Per size class (index as in [`Pool::index`]): free slots, as pointers.
    free: [Mutex<Vec<NonNull<u8>>>; ARENA_CLASSES],
    /// Some ring registered it (else it is just a pool).
    registered: std::sync::atomic::AtomicBool,
}

// SAFETY: the memory is owned by the arena for the life of the process; each slot pointer is
// handed to one owner at a time, like the pool's.
unsafe impl Sync for Arena {}
// SAFETY: as for Sync: the arena's memory is not tied to the thread that mapped it.
unsafe impl Send for Arena {}

impl Arena {
    /// The arena if one was created.
    pub(crate) fn get() -> Option<&'static Arena> {
        ARENA.get().and_then(Option::as_ref)
    }

    /// The arena, created on first use with the configured size; None when that is 0 or the memory
    /// cannot be mapped.
    pub(crate) fn get_or_create() -> Option<&'static Arena> {
        ARENA.get_or_init(|| Arena::new(ARENA_BYTES.load(Ordering::Relaxed))).as_ref()
    }

    fn new(bytes: usize) -> Option<Arena> {
        let per_class = bytes / ARENA_CLASSES;
        // Largest classes first: every class starts at a multiple of its slot size from the base.
        let classes: Vec<(usize, usize)> = (0..ARENA_CLASSES)
            .rev()
            .map(|i| {
                let slot = BUF_ALIGN_BYTES << i;
                (i, per_class / slot)
            })
            .collect();
        let used: usize = classes.iter().map(|&(i, n)| (BUF_ALIGN_BYTES << i) * n).sum();
        if used == 0 {
            return None;
        }
        let len = used.next_multiple_of(HUGE_PAGE_BYTES);
        // SAFETY: a fresh anonymous private mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::warn!(bytes = len, error = %std::io::Error::last_os_error(), "cannot map the registered-buffer arena; using ordinary buffers");
            return None;
        }
        // Huge pages make the ring's pinned page list short; only a hint, so failure is fine.
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        let base = NonNull::new(p.cast::<u8>())?;
        let free = std::array::from_fn(|_| Mutex::new(Vec::new()));
        let arena = Arena { base, len, free, registered: Default::default() };
        let mut at = 0usize;
        for (i, n) in classes {
            let slot = BUF_ALIGN_BYTES << i;
            let mut list = arena.free[i].lock().expect("fresh lock");
            // Handed out from the end of the list: the lowest addresses first.
            list.extend((0..n).rev().map(|k| {
                // SAFETY: at + k * slot + slot ≤ used ≤ len, inside the mapping.
                unsafe { NonNull::new_unchecked(p.cast::<u8>().add(at + k * slot)) }
            }));
            at += n * slot;
        }
        Some(arena)
    }

    /// The whole arena, as the one iovec a ring registers (buffer index 0).
    pub(crate) fn iovec(&self) -> libc::iovec {
        libc::iovec { iov_base: self.base.as_ptr().cast(), iov_len: self.len }
    }

    /// Called by a ring that registered the arena.
    pub(crate) fn mark_registered(&self) {
        self.registered.store(true, Ordering::Relaxed);
    }

    pub(crate) fn contains(&self, p: *const u8) -> bool {
        let base = self.base.as_ptr() as usize;
        (base..base + self.len).contains(&(p as usize))
    }

    fn take(&self, capacity: usize) -> Option<NonNull<u8>> {
        let i = Pool::index(capacity).filter(|&i| i < ARENA_CLASSES)?;
        let slot = self.free[i].lock().ok()?.pop();
        if slot.is_none() {
            ARENA_MISSES.fetch_add(1, Ordering::Relaxed);
        }
        slot
    }

    fn give(&self, ptr: NonNull<u8>, capacity: usize) {
        let i = Pool::index(capacity).filter(|&i| i < ARENA_CLASSES).expect("arena buffers have an arena class");
        if let Ok(mut list) = self.free[i].lock() {
            list.push(ptr);
        }
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
    fn the_arena_serves_its_classes_first_and_takes_its_buffers_back() {
        let Some(a) = Arena::get_or_create() else { panic!("the arena could not be mapped") };
        assert_eq!(a.len % HUGE_PAGE_BYTES, 0);
        // Every class from 4 KiB to 1 MiB comes from the arena while it has free slots.
        for shift in 0..ARENA_CLASSES {
            let b = AlignedBuf::uninit_for_fill(BUF_ALIGN_BYTES << shift);
            assert!(a.contains(b.as_ptr()), "class {} KiB", 4 << shift);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN_BYTES, 0);
        }
        let big = AlignedBuf::zeroed(2 << 20);
        assert!(!a.contains(big.as_ptr()), "larger buffers are ordinary memory");
        // A class used up falls back to ordinary buffers; freed slots come back to the arena.
        let n = DEFAULT_REGISTERED_BUFFER_BYTES / ARENA_CLASSES / (1 << 20);
        let held: Vec<_> = (0..n + 8).map(|_| AlignedBuf::uninit_for_fill(1 << 20)).collect();
        let in_arena = held.iter().filter(|b| a.contains(b.as_ptr())).count();
        assert!(in_arena <= n, "{in_arena} of {n} slots");
        assert!(held.iter().any(|b| !a.contains(b.as_ptr())), "the class ran out");
        assert!(registered_buffer_stats().1 >= 8, "each buffer past the class's slots is a miss");
        let first = held.iter().find(|b| a.contains(b.as_ptr())).map(|b| b.as_ptr() as usize);
        drop(held);
        let again: Vec<_> = (0..n).map(|_| AlignedBuf::uninit_for_fill(1 << 20)).collect();
        assert!(again.iter().any(|b| Some(b.as_ptr() as usize) == first), "a freed slot is reused");
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

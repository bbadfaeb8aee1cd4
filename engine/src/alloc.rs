//! The allocator the Python extension installs (`#[global_allocator]` in pybind):
//! mimalloc for small blocks, the system's for large ones.
//!
//! Small blocks are most of what a single-row insert allocates, and many are freed on
//! another thread than the one that made them (a caller's batch is retained on a shard,
//! a shard's output dropped by the caller). With glibc's malloc the shards faulted in the
//! pages of the rows they retain one at a time, during inserts, and a first touch of a
//! page costs tens of microseconds on a VM. mimalloc commits its arenas eagerly on Linux
//! (`MIMALLOC_ARENA_EAGER_COMMIT`, default on): the process holds ~22 MB more resident
//! memory from the start, and the single-row round trip's p99 fell by about a third
//! (perf/README.md; with `MIMALLOC_ARENA_EAGER_COMMIT=0` both the page faults and the p99
//! are back where glibc had them). Large blocks (Arrow arrays of bulk batches, IPC
//! encodings) stay with glibc, which grows them in place with `mremap` where mimalloc
//! copies: with mimalloc for everything, OHLC bulk throughput was ~5 % lower.
//!
//! mimalloc is built without transparent huge pages (the `no_thp` feature: it does not
//! `madvise(MADV_HUGEPAGE)` its arenas, and leaves the process's own THP setting alone):
//! the thread that first touches a 2 MB page zeroes all of it, which on a VM stalled a
//! shard mid-insert for milliseconds (measured in perf/README.md, "Session 13's machine").
//!
//! Which allocator owns a block follows from its size alone: `dealloc` and `realloc` are
//! given the layout it was allocated with.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of at least this many bytes come from the system allocator.
pub const LARGE: usize = 256 * 1024;

pub struct Split;

fn is_large(layout: &Layout) -> bool {
    layout.size() >= LARGE
}

// SAFETY: every block is freed and resized by the allocator that made it, which is
// decided by the block's size as the caller states it in `layout` (GlobalAlloc's contract
// is that this is the layout it was allocated with); a resize that crosses `LARGE` moves
// the block from one allocator to the other.
unsafe impl GlobalAlloc for Split {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            unsafe { System.alloc(layout) }
        } else {
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            unsafe { System.alloc_zeroed(layout) }
        } else {
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(&layout) {
            unsafe { System.dealloc(ptr, layout) }
        } else {
            unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (both): the caller guarantees `new_size` with `layout.align()` is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (is_large(&layout), is_large(&new_layout)) {
            (true, true) => unsafe { System.realloc(ptr, layout, new_size) },
            (false, false) => unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) },
            _ => {
                let moved = unsafe { self.alloc(new_layout) };
                if !moved.is_null() {
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grows a block from `from` to `to` bytes through `Split` (filling it first) and
    /// checks the bytes that both sizes hold survive; then frees it with the new size.
    fn resize(from: usize, to: usize, zeroed: bool) {
        let layout = Layout::from_size_align(from, 64).unwrap();
        unsafe {
            let p = if zeroed { Split.alloc_zeroed(layout) } else { Split.alloc(layout) };
            assert!(!p.is_null());
            if zeroed {
                assert!((0..from).all(|i| *p.add(i) == 0), "{from} bytes zeroed");
            }
            for i in 0..from {
                *p.add(i) = (i % 251) as u8;
            }
            let q = Split.realloc(p, layout, to);
            assert!(!q.is_null());
            assert_eq!(q as usize % 64, 0, "alignment kept");
            assert!((0..from.min(to)).all(|i| *q.add(i) == (i % 251) as u8), "{from} → {to} bytes");
            Split.dealloc(q, Layout::from_size_align(to, 64).unwrap());
        }
    }

    /// Blocks resized within and across the boundary keep their bytes and are freed by
    /// the allocator that holds them (a mismatch aborts the test process).
    #[test]
    fn resizing_within_and_across_the_boundary_keeps_the_contents() {
        for (from, to) in [(16, 4096), (4096, 16), (100, LARGE), (LARGE, 100), (LARGE - 1, LARGE), (LARGE, 3 * LARGE), (3 * LARGE, LARGE - 1)] {
            resize(from, to, false);
            resize(from, to, true);
        }
    }
}

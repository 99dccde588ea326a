//! Helpers shared by the RDMA tests: deterministic data, rates, and anonymous mappings that
//! stand in for guest RAM.

use std::time::Duration;

use super::MemoryArea;

/// xorshift64*: fast deterministic bytes.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub(super) fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// An anonymous mapping standing in for guest RAM mapped by the VMM.
pub(super) struct Mapping {
    pub(super) ptr: *mut u8,
    len: usize,
}

impl Mapping {
    pub(super) fn new(len: usize) -> Mapping {
        Mapping::with_pages(len, true)
    }

    /// A populated mapping; `huge`: allow transparent huge pages (as
    /// Godwit's guest RAM does), else 4 KiB pages only.
    pub(super) fn with_pages(len: usize, huge: bool) -> Mapping {
        // SAFETY: an anonymous private mapping at an address the kernel
        // picks; no existing memory is affected.
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
        assert_ne!(p, libc::MAP_FAILED, "mmap {len}");
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on the mapping just made; it does not change its
        // content. Failure (no THP support) is harmless.
        unsafe { libc::madvise(p, len, advice) };
        let m = Mapping { ptr: p.cast(), len };
        // Populate: touch every page.
        for off in (0..len).step_by(4096) {
            // SAFETY: `off < len`, inside the read/write mapping; no
            // reference to it exists.
            unsafe { m.ptr.add(off).write_volatile(0) };
        }
        m
    }

    /// `len` bytes at `off`, read while no transfer into them is in flight.
    pub(super) fn read(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len);
        // SAFETY: inside the mapping, alive while `self` is; callers read
        // only ranges whose transfers completed (a later frame was seen).
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    /// Fills the mapping (before it is registered, or while no transfer
    /// reads or writes it).
    pub(super) fn fill(&mut self, rng: &mut Rng) {
        // SAFETY: the whole mapping, uniquely borrowed through `&mut self`.
        rng.fill(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) });
    }

    pub(super) fn area(&self, key: u64) -> MemoryArea {
        MemoryArea {
            key,
            ptr: self.ptr,
            len: self.len,
        }
    }

    /// Reads the mapping (only while no transfer into it is in flight).
    pub(super) fn to_vec(&self) -> Vec<u8> {
        // SAFETY: the mapping is `len` readable bytes, alive while `self` is;
        // the copy happens after the writes into it completed.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; every memory
        // region registered on it was declared after it and so dropped first.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

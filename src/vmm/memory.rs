//! Guest RAM: its layout, the host mappings that back it and the KVM memory slots over them.
//!
//! RAM below 4 GiB stops at 3 GiB so that the 3-4 GiB window stays free for the LAPIC, IOAPIC
//! and future MMIO devices; the rest continues at 4 GiB. Each RAM region is one KVM slot (slot
//! number = region index), so a dirty bitmap is kept per region.

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The guest page size that dirty tracking and the wire format work in.
pub const PAGE_SIZE: u64 = 4096;
/// Where RAM below 4 GiB ends, leaving room for the interrupt controllers and MMIO.
const LOW_RAM_END: u64 = 3 << 30;
/// Where RAM resumes above the MMIO hole.
const HIGH_RAM_START: u64 = 4 << 30;
/// The smallest guest this VMM runs (the PVH boot structures live in the first MiB and the
/// image is loaded at 1 MiB).
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// The largest guest this VMM accepts, on the command line or from a migration peer.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// How many RAM regions a layout may have; a peer that claims more is refused.
const MAX_REGIONS: usize = 8;

/// Guest memory as the VMM and the migration engine share it. The `AtomicBitmap` records the
/// pages that the VMM itself writes (image loading, a migration receiver), which KVM's dirty
/// log cannot see.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    /// Guest physical address of the first byte.
    pub start: u64,
    /// Length in bytes, a multiple of [`PAGE_SIZE`].
    pub size: u64,
}

impl RamRegion {
    /// The first address past the region.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }

    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// Guest RAM as a list of regions, sorted by address; what the migration handshake compares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// The regions, sorted and non-overlapping.
    pub regions: Vec<RamRegion>,
}

/// Why a memory layout was refused.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The size is not a whole number of pages.
    #[error("guest memory of {0} bytes is not a whole number of 4 KiB pages; give a size like 256M or 1G")]
    Unaligned(u64),
    /// The size is below the minimum or above the maximum.
    #[error("guest memory of {} MiB is outside the supported range of {} MiB to {} GiB", got >> 20, min >> 20, max >> 30)]
    OutOfRange {
        /// The requested size.
        got: u64,
        /// The smallest size accepted.
        min: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// More regions than any layout of this VMM has.
    #[error("the memory layout has {0} regions; at most 8 are supported")]
    TooManyRegions(usize),
    /// A region that is empty, unaligned, out of order or overflowing.
    #[error("RAM region {0} is empty, unaligned, overlaps the previous one or overflows")]
    BadRegion(usize),
}

impl MemoryLayout {
    /// The layout for a guest of `bytes` bytes of RAM.
    pub fn for_size(bytes: u64) -> Result<Self, LayoutError> {
        if bytes % PAGE_SIZE != 0 {
            return Err(LayoutError::Unaligned(bytes));
        }
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&bytes) {
            return Err(LayoutError::OutOfRange {
                got: bytes,
                min: MIN_MEMORY_BYTES,
                max: MAX_MEMORY_BYTES,
            });
        }
        let low = bytes.min(LOW_RAM_END);
        let mut regions = vec![RamRegion {
            start: 0,
            size: low,
        }];
        if bytes > low {
            regions.push(RamRegion {
                start: HIGH_RAM_START,
                size: bytes - low,
            });
        }
        Ok(Self { regions })
    }

    /// Checks a layout that came from elsewhere (a migration peer): sorted, page aligned,
    /// non-overlapping, bounded in count and total size.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions(self.regions.len()));
        }
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            let end = r.start.checked_add(r.size);
            let ok = r.size > 0
                && r.start % PAGE_SIZE == 0
                && r.size % PAGE_SIZE == 0
                && (i == 0 || r.start >= prev_end)
                && end.is_some();
            if !ok {
                return Err(LayoutError::BadRegion(i));
            }
            prev_end = end.unwrap_or(u64::MAX);
        }
        let total = self.total_bytes();
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&total) {
            return Err(LayoutError::OutOfRange {
                got: total,
                min: MIN_MEMORY_BYTES,
                max: MAX_MEMORY_BYTES,
            });
        }
        Ok(())
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Total RAM in pages.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// The region and page index within it of the page at `gpa`, if `gpa` is page aligned
    /// and in RAM.
    pub fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        if gpa % PAGE_SIZE != 0 {
            return None;
        }
        self.regions
            .iter()
            .position(|r| gpa >= r.start && gpa < r.end())
            .map(|i| (i, (gpa - self.regions[i].start) / PAGE_SIZE))
    }

    /// Maps anonymous host memory for every region, asking for transparent huge pages as QEMU
    /// does: a fresh 4 KiB page costs a fault and a clear (3-4 µs on these nested hosts, 1 s per
    /// GiB), which bounds how fast a migration receiver can fill guest RAM; a 2 MiB page costs
    /// one fault for 512 of them.
    pub fn allocate(&self) -> Result<GuestMemory, vm_memory::mmap::FromRangesError> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .regions
            .iter()
            .map(|r| (GuestAddress(r.start), r.size as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges)?;
        for region in mem.iter() {
            let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
            // SAFETY: the range is exactly one live mapping owned by `mem`; MADV_HUGEPAGE only
            // changes how the kernel backs it, never its contents. Where transparent huge pages
            // are disabled the call fails harmlessly and 4 KiB pages are used.
            unsafe {
                libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE);
            }
        }
        Ok(mem)
    }
}

/// A dirty bitmap over the whole guest: one `u64` word per 64 pages, per region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// One bitmap per region, in layout order; bit `i` is page `i` of that region.
    pub regions: Vec<Vec<u64>>,
}

impl DirtyBitmap {
    /// A bitmap with every page of `layout` marked: what the first pre-copy round sends.
    pub fn all(layout: &MemoryLayout) -> Self {
        let regions = layout
            .regions
            .iter()
            .map(|r| {
                let pages = r.pages() as usize;
                let mut words = vec![u64::MAX; pages.div_ceil(64)];
                if pages % 64 != 0 {
                    if let Some(last) = words.last_mut() {
                        *last = (1u64 << (pages % 64)) - 1;
                    }
                }
                words
            })
            .collect();
        Self { regions }
    }

    /// A bitmap of `layout` with no page marked.
    pub fn empty(layout: &MemoryLayout) -> Self {
        let mut b = Self::all(layout);
        b.regions.iter_mut().flatten().for_each(|w| *w = 0);
        b
    }

    /// Whether the page at `gpa` is marked.
    pub fn contains(&self, layout: &MemoryLayout, gpa: u64) -> bool {
        layout.locate(gpa).is_some_and(|(r, i)| {
            self.regions
                .get(r)
                .and_then(|w| w.get((i / 64) as usize))
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
    }

    /// Marks the pages of `words` (64 a word) from word `first` of region `region`; refuses
    /// words outside the region or bits past its last page (from an untrusted peer).
    pub fn mark_words(
        &mut self,
        layout: &MemoryLayout,
        region: usize,
        first: usize,
        words: &[u64],
    ) -> Result<(), String> {
        let (Some(mine), Some(r)) = (self.regions.get_mut(region), layout.regions.get(region))
        else {
            return Err(format!("there is no RAM region {region}"));
        };
        let end = first
            .checked_add(words.len())
            .filter(|&e| e <= mine.len())
            .ok_or_else(|| format!("words {first}.. lie outside RAM region {region}"))?;
        let full = DirtyBitmap::all(&MemoryLayout { regions: vec![*r] });
        for (i, (dst, &w)) in mine[first..end].iter_mut().zip(words).enumerate() {
            if w & !full.regions[0][first + i] != 0 {
                return Err(format!("bits past the end of RAM region {region}"));
            }
            *dst |= w;
        }
        Ok(())
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// ORs `other` into `self`; both must describe the same layout.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a |= *b;
            }
        }
    }

    /// Guest physical addresses of the marked pages, in address order.
    pub fn pages<'a>(&'a self, layout: &'a MemoryLayout) -> impl Iterator<Item = u64> + 'a {
        self.regions
            .iter()
            .zip(&layout.regions)
            .flat_map(|(words, region)| {
                words.iter().enumerate().flat_map(move |(wi, &word)| {
                    BitIter(word)
                        .map(move |bit| region.start + ((wi as u64) * 64 + bit) * PAGE_SIZE)
                })
            })
    }
}

/// Iterates the set bits of one word, lowest first.
struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(u64::from(bit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_mmio_hole() {
        let l = MemoryLayout::for_size(4 << 30).unwrap();
        assert_eq!(
            l.regions,
            vec![
                RamRegion {
                    start: 0,
                    size: 3 << 30
                },
                RamRegion {
                    start: 4 << 30,
                    size: 1 << 30
                }
            ]
        );
        assert_eq!(l.total_bytes(), 4 << 30);
        l.validate().unwrap();
    }

    #[test]
    fn layout_refuses_bad_sizes() {
        assert!(matches!(
            MemoryLayout::for_size(4097),
            Err(LayoutError::Unaligned(_))
        ));
        assert!(matches!(
            MemoryLayout::for_size(1 << 20),
            Err(LayoutError::OutOfRange { .. })
        ));
        let overlapping = MemoryLayout {
            regions: vec![
                RamRegion {
                    start: 0,
                    size: 64 << 20,
                },
                RamRegion {
                    start: 32 << 20,
                    size: 64 << 20,
                },
            ],
        };
        assert!(matches!(
            overlapping.validate(),
            Err(LayoutError::BadRegion(1))
        ));
        let overflowing = MemoryLayout {
            regions: vec![RamRegion {
                start: u64::MAX - 4095,
                size: 64 << 20,
            }],
        };
        assert!(overflowing.validate().is_err());
    }

    #[test]
    fn bitmap_iterates_marked_pages_in_order() {
        let l = MemoryLayout {
            regions: vec![
                RamRegion {
                    start: 0,
                    size: 100 * PAGE_SIZE,
                },
                RamRegion {
                    start: 1 << 32,
                    size: 64 * PAGE_SIZE,
                },
            ],
        };
        let all = DirtyBitmap::all(&l);
        assert_eq!(all.count(), 164);
        let pages: Vec<u64> = all.pages(&l).collect();
        assert_eq!(pages.len(), 164);
        assert_eq!(pages[99], 99 * PAGE_SIZE);
        assert_eq!(pages[100], 1 << 32);
        let mut some = DirtyBitmap {
            regions: vec![vec![0, 0b101], vec![1 << 63]],
        };
        some.merge(&DirtyBitmap {
            regions: vec![vec![1, 0], vec![0]],
        });
        let pages: Vec<u64> = some.pages(&l).collect();
        assert_eq!(
            pages,
            vec![
                0,
                64 * PAGE_SIZE,
                66 * PAGE_SIZE,
                (1 << 32) + 63 * PAGE_SIZE
            ]
        );
    }
}

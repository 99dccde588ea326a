//! Direct boot of PVH ELF images (the Xen PVH boot ABI that QEMU, Firecracker and Cloud
//! Hypervisor also use).
//!
//! The image's `PT_LOAD` segments are copied to their physical addresses; the entry point is
//! the `XEN_ELFNOTE_PHYS32_ENTRY` note (4 or 8 bytes, as QEMU accepts both). The vCPU starts in
//! 32-bit protected mode with paging off and `%ebx` pointing at `hvm_start_info`, which carries
//! the command line and the memory map. The image is untrusted input: every offset and size is
//! checked before use.

use vm_memory::{Bytes, GuestAddress};

use super::memory::{GuestMemory, MemoryLayout};

/// Where `hvm_start_info` is written (the same place Firecracker uses).
pub const START_INFO_ADDR: u64 = 0x6000;
/// Where the memory map entries follow.
const MEMMAP_ADDR: u64 = 0x7000;
/// Where the command line is written.
const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted (it must fit below the image at 1 MiB).
pub const CMDLINE_MAX: usize = 4095;
/// Start of conventional low memory's top reserve (EBDA), as a PC has it.
const EBDA_START: u64 = 0x9fc00;
/// Images may not load below this, where the boot structures live.
const IMAGE_MIN_ADDR: u64 = 0x100000;

const HVM_START_MAGIC: u32 = 0x336e_c578;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Why an image could not be booted.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// The file is not a 64-bit little-endian x86-64 ELF executable.
    #[error(
        "the image is not a 64-bit x86-64 ELF executable ({0}); build it as ELF64 for PVH boot"
    )]
    NotElf(&'static str),
    /// A header or segment points outside the file.
    #[error("the image is truncated or malformed: {0}")]
    Malformed(&'static str),
    /// No PVH entry note.
    #[error("the image has no XEN_ELFNOTE_PHYS32_ENTRY note, so it cannot be booted with PVH; add the note (see guests/src/boot.S)")]
    NoPvhNote,
    /// A segment does not fit in guest RAM.
    #[error("segment at {addr:#x} of {size} bytes does not fit in guest RAM below 4 GiB; give the VM more memory or link the image lower")]
    SegmentOutOfRam {
        /// Physical load address.
        addr: u64,
        /// Size in memory.
        size: u64,
    },
    /// The command line is too long.
    #[error("the kernel command line is {0} bytes; at most 4095 fit")]
    CmdlineTooLong(usize),
    /// Writing guest memory failed.
    #[error("cannot write the image into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Loads `image` into `mem`, writes the PVH start info, and returns the 32-bit entry address.
pub fn load(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    image: &[u8],
    cmdline: &str,
) -> Result<u32, PvhError> {
    let elf = Elf::parse(image)?;
    let ram_below_4g = layout.regions[0].end();
    for seg in &elf.loads {
        let end = seg.paddr.checked_add(seg.memsz);
        if seg.paddr < IMAGE_MIN_ADDR || end.is_none_or(|e| e > ram_below_4g) {
            return Err(PvhError::SegmentOutOfRam {
                addr: seg.paddr,
                size: seg.memsz,
            });
        }
        let data = &image[seg.offset..seg.offset + seg.filesz as usize];
        mem.write_slice(data, GuestAddress(seg.paddr))?;
        // The bss part is already zero: the memory is freshly mapped.
    }
    write_start_info(mem, layout, cmdline)?;
    Ok(elf.entry)
}

fn write_start_info(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    cmdline: &str,
) -> Result<(), PvhError> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(PvhError::CmdlineTooLong(cmdline.len()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(CMDLINE_ADDR))?;

    let mut map: Vec<(u64, u64, u32)> = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, IMAGE_MIN_ADDR - EBDA_START, E820_RESERVED),
    ];
    for (i, r) in layout.regions.iter().enumerate() {
        let start = if i == 0 { IMAGE_MIN_ADDR } else { r.start };
        map.push((start, r.end() - start, E820_RAM));
    }
    let mut entries = Vec::with_capacity(map.len() * 24);
    for (addr, size, ty) in &map {
        entries.extend_from_slice(&addr.to_le_bytes());
        entries.extend_from_slice(&size.to_le_bytes());
        entries.extend_from_slice(&ty.to_le_bytes());
        entries.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&entries, GuestAddress(MEMMAP_ADDR))?;

    // struct hvm_start_info, version 1 (with the memory map).
    let mut si = Vec::with_capacity(56);
    si.extend_from_slice(&HVM_START_MAGIC.to_le_bytes());
    si.extend_from_slice(&1u32.to_le_bytes()); // version
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    si.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    si.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    si.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    si.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr
    si.extend_from_slice(&MEMMAP_ADDR.to_le_bytes());
    si.extend_from_slice(&(map.len() as u32).to_le_bytes());
    si.extend_from_slice(&0u32.to_le_bytes()); // reserved
    mem.write_slice(&si, GuestAddress(START_INFO_ADDR))?;
    Ok(())
}

struct LoadSegment {
    offset: usize,
    filesz: u64,
    paddr: u64,
    memsz: u64,
}

struct Elf {
    loads: Vec<LoadSegment>,
    entry: u32,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, PvhError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(PvhError::Malformed("header field past the end of the file"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, PvhError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(PvhError::Malformed("header field past the end of the file"))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, PvhError> {
    b.get(off..off + 8)
        .map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
        .ok_or(PvhError::Malformed("header field past the end of the file"))
}

fn to_usize(v: u64) -> Result<usize, PvhError> {
    usize::try_from(v).map_err(|_| PvhError::Malformed("offset does not fit in memory"))
}

impl Elf {
    fn parse(b: &[u8]) -> Result<Self, PvhError> {
        const PT_LOAD: u32 = 1;
        const PT_NOTE: u32 = 4;
        if b.len() < 64 || &b[0..4] != b"\x7fELF" {
            return Err(PvhError::NotElf("no ELF magic"));
        }
        if b[4] != 2 || b[5] != 1 {
            return Err(PvhError::NotElf("not ELF64 little-endian"));
        }
        if u16_at(b, 18)? != 62 {
            return Err(PvhError::NotElf("machine is not x86-64"));
        }
        let phoff = to_usize(u64_at(b, 32)?)?;
        let phentsize = usize::from(u16_at(b, 54)?);
        let phnum = usize::from(u16_at(b, 56)?);
        if phentsize < 56 || phnum == 0 || phnum > 64 {
            return Err(PvhError::Malformed("bad program header table"));
        }
        let mut loads = Vec::new();
        let mut entry = None;
        for i in 0..phnum {
            let ph = phoff
                .checked_add(i * phentsize)
                .ok_or(PvhError::Malformed("program header offset overflows"))?;
            let p_type = u32_at(b, ph)?;
            let offset = u64_at(b, ph + 8)?;
            let paddr = u64_at(b, ph + 24)?;
            let filesz = u64_at(b, ph + 32)?;
            let memsz = u64_at(b, ph + 40)?;
            let (start, len) = (to_usize(offset)?, to_usize(filesz)?);
            let in_file = start.checked_add(len).is_some_and(|end| end <= b.len());
            if !in_file {
                return Err(PvhError::Malformed("segment lies outside the file"));
            }
            match p_type {
                PT_LOAD if memsz > 0 => {
                    if filesz > memsz {
                        return Err(PvhError::Malformed("segment file size exceeds memory size"));
                    }
                    loads.push(LoadSegment {
                        offset: start,
                        filesz,
                        paddr,
                        memsz,
                    });
                }
                PT_NOTE => {
                    if let Some(e) = find_pvh_entry(&b[start..start + len])? {
                        entry = Some(e);
                    }
                }
                _ => {}
            }
        }
        let entry = entry.ok_or(PvhError::NoPvhNote)?;
        Ok(Self { loads, entry })
    }
}

/// Walks the notes of one `PT_NOTE` segment looking for the PVH entry.
fn find_pvh_entry(mut notes: &[u8]) -> Result<Option<u32>, PvhError> {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0)? as usize;
        let descsz = u32_at(notes, 4)? as usize;
        let ty = u32_at(notes, 8)?;
        let name_end = 12usize
            .checked_add(align4(namesz))
            .ok_or(PvhError::Malformed("note name size overflows"))?;
        let desc_end = name_end
            .checked_add(align4(descsz))
            .ok_or(PvhError::Malformed("note size overflows"))?;
        if notes.len() < name_end + descsz {
            return Err(PvhError::Malformed("note runs past its segment"));
        }
        let name = &notes[12..12 + namesz];
        if ty == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
            let desc = &notes[name_end..name_end + descsz];
            let entry = match descsz {
                4 => u32_at(desc, 0)?,
                8 => u32::try_from(u64_at(desc, 0)?)
                    .map_err(|_| PvhError::Malformed("PVH entry above 4 GiB"))?,
                _ => return Err(PvhError::Malformed("PVH entry note has a bad size")),
            };
            return Ok(Some(entry));
        }
        notes = notes.get(desc_end..).unwrap_or(&[]);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_guest_parses() {
        let elf = Elf::parse(godwit_guests::TESTGUEST_ELF).unwrap();
        assert!(elf.entry >= IMAGE_MIN_ADDR as u32);
        assert!(!elf.loads.is_empty());
    }

    #[test]
    fn garbage_and_truncated_images_are_refused() {
        assert!(matches!(
            Elf::parse(b"not an elf"),
            Err(PvhError::NotElf(_))
        ));
        let img = godwit_guests::TESTGUEST_ELF;
        for cut in [16, 63, 64, 100, 200] {
            assert!(
                Elf::parse(&img[..cut.min(img.len() - 1)]).is_err(),
                "cut at {cut}"
            );
        }
    }
}

//! Freestanding test guests for Godwit, built from source by `build.rs` with
//! the system gcc/ld and embedded here as ELF images.

/// The x86-64 PVH memory-check / dirtying test guest (ELF64, loaded at
/// physical 1 MiB, entered through its `XEN_ELFNOTE_PHYS32_ENTRY` note).
///
/// # Boot
///
/// PVH ABI: 32-bit protected mode, paging off, `%ebx` = physical address of
/// `struct hvm_start_info` (magic `0x336ec578`). The guest reads the command
/// line (`cmdline_paddr`) and the memory map (`memmap_paddr`, needs
/// `version >= 1`). Ring 0 only loads static GDT/IDT/TSS/page tables
/// (identity map of 0..4 GiB, 2 MiB pages), enables long mode and `iretq`s to
/// ring 3, where the whole workload runs with interrupts off and no
/// interrupts used. Ring-3 port I/O is allowed by the TSS I/O bitmap only for
/// COM1 (`0x3f8..=0x3ff`) and the debug-exit port `0xf4`.
///
/// # Command line
///
/// Space-separated `key=value` words; unknown keys and bare words are ignored.
/// Numbers are decimal.
///
/// | key | default | meaning |
/// |-----|---------|---------|
/// | `mode=check\|dirty` | `check` | `check`: touch byte 0 of each page; `dirty`: also rewrite the whole page |
/// | `wss_mb=N` | all | working set in MiB, starting at 16 MiB; clipped to the first RAM region of the memmap that covers 16 MiB (and to 4 GiB) |
/// | `rate_mbps=N` | `0` | dirtying rate in MiB/s (`N*256` pages/s, paced by busy-waiting on `rdtsc`); `0` = as fast as possible |
/// | `catchup=0` | `1` | after a stall (a pause, a throttled vCPU), do not write faster to make up for lost time: the rate is per unit of CPU the guest gets, as in a workload that dirties memory as it computes. By default it catches up for at most one heartbeat period |
/// | `fill=1` | off | run the first pass unpaced (populate the working set at full speed), then dirty at `rate_mbps` |
/// | `hb_ms=N` | `50` | heartbeat period in ms (`0` is taken as 1) |
/// | `tsc_khz=N` | see below | TSC frequency; else CPUID `0x40000010` EAX if CPUID `0x40000000` EAX >= `0x40000010`, else 2000000 (`tsc_src=assumed` on the boot line) |
/// | `passes=N` | `0` | stop after `N` passes; `0` = run forever |
///
/// # Workload
///
/// Pass `r = 1, 2, ...` walks every 4 KiB page of the region in order. Byte 0
/// of each page must hold `(r-1) mod 256` (memory starts zeroed), otherwise
/// the page was lost; then `r mod 256` is stored there. In `dirty` mode the
/// page's last 64-bit word must equal the pattern of pass `r-1` (0 for pass
/// 1), otherwise the page is torn; then words 1..=511 are rewritten with the
/// pattern of pass `r` (word `i` = `splitmix64((page_index << 24) ^ r) + i *
/// 0x9e3779b97f4a7c15`, word 0 = `r mod 256`).
///
/// The TSC is read at least every 16 pages, on every busy-wait iteration and
/// after every serial character; the largest gap between two consecutive
/// readings since the previous heartbeat is the reported stall (a migration
/// pause shows up there). A reading smaller than the previous one is an error.
/// At each heartbeat r15 and xmm15 (register-only state: the compiler never
/// touches either) are checked against the values expected from the heartbeat
/// count kept in memory, then advanced (`r15 += K`, `paddq` on xmm15); after a
/// mismatch they are reset to the expected values.
///
/// # Output (COM1, port 0x3f8; LSR polled at most once per line)
///
/// ```text
/// godwit-guest boot mode=<check|dirty> wss_mb=<n> rate_mbps=<n>[ catchup=0][ fill=1] hb_ms=<n> tsc_khz=<n> region=0x<start>-0x<end> tsc_src=<cmdline|cpuid|assumed>
/// hb seq=<n> pass=<r> stall_us=<max gap since last hb, µs> ok
/// hb seq=<n> pass=<r> stall_us=<n> err=<total errors>      (once any error happened)
/// ERR lost page gpa=0x<hex> got=<n> want=<n> pass=<r>
/// ERR torn page gpa=0x<hex> got=0x<hex> want=0x<hex> pass=<r>
/// ERR regs r15=0x<hex> want=0x<hex>
/// ERR regs xmm15=0x<32 hex digits, high qword first> want=0x<32 hex digits>
/// ERR tsc backwards prev=0x<hex> now=0x<hex>
/// ERR <setup problem> <hex value>                           (then exit status 1)
/// done passes=<N> errors=<E>                                 (only with passes=N)
/// EXC <vector> rip=0x<hex> err=0x<hex> cr2=0x<hex>          (CPU exception, ring 0)
/// ```
///
/// `wss_mb` on the boot line is the effective size (region size, rounded
/// down to MiB); `region` end is exclusive. `seq` starts at 1, increases by 1
/// per heartbeat and never restarts. At most 16 lost/torn lines and 16 other
/// `ERR` lines are printed; further errors are only counted. Heartbeats
/// happen only while passes run (not after `done`).
///
/// # Exit (port 0xf4, QEMU `isa-debug-exit` turns value `v` into status `(v<<1)|1`)
///
/// * `0` after `done` with no errors, `1` after `done` with errors or on a
///   setup error (`ERR ...` without a page), `3` after an `EXC` line.
///
/// After writing the exit port the guest spins in ring 3 (or `hlt`s in ring 0
/// after an exception) in case the VMM does not stop it.
pub const TESTGUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

//! Godwit's VMM: one KVM virtual machine with its memory slots, vCPU threads, in-kernel
//! interrupt controllers and timer, and port-I/O devices; PVH direct boot; and the capture and
//! restore of everything a live migration moves besides RAM.
//!
//! A [`Vm`] has one owner (the process's VM task); vCPU threads are reached only through
//! requests (see [`vcpu`]).

pub mod devices;
pub mod memory;
pub mod pvh;
pub mod state;
pub mod throttle;
pub mod userfault;
mod vcpu;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_pit_config, kvm_userspace_memory_region, CpuId,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use devices::{Serial, SerialSink};
use memory::{DirtyBitmap, GuestMemory, LayoutError, MemoryLayout};
use state::{VcpuState, VmState};
use throttle::{Level, Ticker};
use vcpu::{IoBus, VcpuHandle};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// The TSS KVM needs on Intel hosts, in the MMIO hole below 4 GiB.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// The hypervisor CPUID leaf that reports the TSC and LAPIC timer frequency in kHz (the
/// convention VMware started and QEMU and Cloud Hypervisor follow).
const CPUID_TIMING_LEAF: u32 = 0x4000_0010;
/// The KVM LAPIC timer runs at 1 GHz.
const LAPIC_TIMER_KHZ: u32 = 1_000_000;

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}; run as root on a host with KVM enabled")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The memory layout is not usable.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Host memory for the guest could not be mapped.
    #[error("cannot map guest memory: {0}; free host memory or give the VM less")]
    Mmap(String),
    /// The image could not be loaded.
    #[error(transparent)]
    Image(#[from] pvh::PvhError),
    /// The vCPU count is out of range.
    #[error("{0} vCPUs requested; give between 1 and 32")]
    VcpuCount(u8),
    /// A vCPU thread did not answer.
    #[error("vCPU {0} did not answer within 5 s; the VM is stuck or has crashed")]
    VcpuGone(u8),
    /// A thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(String),
    /// An MSR list could not be built.
    #[error("cannot build the MSR list")]
    MsrList,
    /// KVM refused an MSR.
    #[error("KVM refused MSR {0:#x}")]
    MsrAccess(u32),
    /// The saved state does not match this VM.
    #[error("the saved state has {got} vCPUs but this VM has {want}")]
    StateMismatch {
        /// vCPUs in the state.
        got: usize,
        /// vCPUs in this VM.
        want: usize,
    },
    /// The source's TSC frequency cannot be offered here.
    #[error("this host cannot run the guest's TSC at {0} kHz: {1}")]
    TscFrequency(u32, kvm_ioctls::Error),
}

/// Why a VM stopped on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote this byte to the debug-exit port.
    DebugExit(u8),
    /// The guest or a vCPU failed.
    Crashed(String),
}

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM.
    pub layout: MemoryLayout,
    /// The guest's TSC frequency; `None` runs it at the host's. A destination gives the
    /// source's, so the guest's sense of time does not change with the host.
    pub tsc_khz: Option<u32>,
}

/// A running (or paused) KVM virtual machine.
pub struct Vm {
    fd: Arc<VmFd>,
    memory: GuestMemory,
    layout: MemoryLayout,
    vcpus: Vec<VcpuHandle>,
    io: Arc<IoBus>,
    cpuid: Vec<kvm_cpuid_entry2>,
    host_cpuid: Vec<kvm_cpuid_entry2>,
    tsc_khz: u32,
    events: Receiver<VmEvent>,
    dirty_logging: bool,
    throttle: Arc<Level>,
    /// Kicks the vCPUs while the throttle is above zero.
    ticker: Option<Ticker>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("layout", &self.layout)
            .field("vcpus", &self.vcpus.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish()
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(what, e)
}

impl Vm {
    /// Creates a VM that boots `image` (a PVH ELF) with `cmdline`; it starts paused.
    pub fn boot(
        config: &VmConfig,
        image: &[u8],
        cmdline: &str,
        serial: SerialSink,
    ) -> Result<Self, VmmError> {
        let vm = Self::create(config, None, serial)?;
        let entry = pvh::load(&vm.memory, &vm.layout, image, cmdline)?;
        vm.with_boot_vcpu(entry)?;
        Ok(vm)
    }

    /// Creates an empty VM to receive a migration: same layout and vCPUs as the source, its
    /// CPUID (already checked against this host), and memory that stays zero until pages
    /// arrive. It starts paused and runs only after [`Vm::restore`].
    pub fn incoming(
        config: &VmConfig,
        cpuid: &[kvm_cpuid_entry2],
        serial: SerialSink,
    ) -> Result<Self, VmmError> {
        Self::create(config, Some(cpuid), serial)
    }

    fn create(
        config: &VmConfig,
        cpuid: Option<&[kvm_cpuid_entry2]>,
        serial: SerialSink,
    ) -> Result<Self, VmmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmmError::VcpuCount(config.vcpus));
        }
        config.layout.validate()?;
        vcpu::install_kick_handler()?;
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        // A dummy speaker keeps port 0x61 in the kernel instead of costing an exit each read.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let layout = config.layout.clone();
        let memory = layout
            .allocate()
            .map_err(|e| VmmError::Mmap(e.to_string()))?;
        let fd = Arc::new(fd);
        let vm_msrs = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs: Arc<[u32]> = state::MSRS_TO_SAVE
            .iter()
            .copied()
            .filter(|m| vm_msrs.as_slice().contains(m))
            .collect();
        let host_cpuid = host_supported_cpuid()?;

        let mut vm = Self {
            fd,
            memory,
            layout,
            vcpus: Vec::new(),
            io: Arc::new(IoBus {
                serial: Mutex::new(Serial::new(serial)),
            }),
            cpuid: Vec::new(),
            host_cpuid,
            tsc_khz: 0,
            events: unbounded().1,
            dirty_logging: false,
            throttle: Arc::new(Level::default()),
            ticker: None,
        };
        vm.set_memory_slots(false)?;
        let (events_tx, events_rx) = unbounded();
        vm.events = events_rx;
        for id in 0..config.vcpus {
            let vcpu = vm
                .fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let host_khz = vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            match config.tsc_khz {
                Some(khz) if khz != host_khz => {
                    vcpu.set_tsc_khz(khz)
                        .map_err(|e| VmmError::TscFrequency(khz, e))?;
                    vm.tsc_khz = khz;
                }
                _ => vm.tsc_khz = host_khz,
            }
            let entries = match cpuid {
                Some(c) => c.to_vec(),
                None => vm.guest_cpuid(id, config.vcpus),
            };
            let c = CpuId::from_entries(&entries).map_err(|_| VmmError::MsrList)?;
            vcpu.set_cpuid2(&c).map_err(kvm_err("KVM_SET_CPUID2"))?;
            if id == 0 {
                vm.cpuid = entries;
            }
            setup_lapic(&vcpu)?;
            let fpu = kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
            vm.vcpus.push(VcpuHandle::spawn(
                id,
                vcpu,
                vm.io.clone(),
                msrs.clone(),
                vm.throttle.clone(),
                events_tx.clone(),
            )?);
        }
        Ok(vm)
    }

    /// The CPUID the guest sees: what this KVM supports, with per-vCPU APIC IDs, the
    /// hypervisor bit and the timing leaf.
    fn guest_cpuid(&self, id: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
        let mut entries = self.host_cpuid.clone();
        for e in &mut entries {
            match e.function {
                1 => {
                    e.ebx =
                        (e.ebx & 0x0000_ffff) | (u32::from(count) << 16) | (u32::from(id) << 24);
                    e.ecx |= 1 << 31;
                }
                0xb => e.edx = u32::from(id),
                0x4000_0000 => e.eax = e.eax.max(CPUID_TIMING_LEAF),
                _ => {}
            }
        }
        entries.retain(|e| e.function != CPUID_TIMING_LEAF);
        entries.push(kvm_cpuid_entry2 {
            function: CPUID_TIMING_LEAF,
            eax: self.tsc_khz,
            ebx: LAPIC_TIMER_KHZ,
            ..Default::default()
        });
        entries
    }

    /// Puts vCPU 0 at the PVH entry: 32-bit protected mode, paging off, flat segments,
    /// `%ebx` = start info.
    fn with_boot_vcpu(&self, entry: u32) -> Result<(), VmmError> {
        let mut s = self.vcpus[0].save()?;
        state::set_pvh_entry(&mut s, entry, pvh::START_INFO_ADDR);
        self.vcpus[0].restore(s)
    }

    fn set_memory_slots(&self, log_dirty: bool) -> Result<(), VmmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmmError::Mmap(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping of exactly `memory_size` bytes owned by
            // `self.memory`, which outlives the VM fd's use of it (both dropped with `self`).
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Turns KVM dirty-page logging on or off for all of guest RAM. Turning it on also
    /// forgets pages the VMM wrote earlier: the first round sends everything anyway.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmmError> {
        if on != self.dirty_logging {
            self.set_memory_slots(on)?;
            self.dirty_logging = on;
        }
        if on {
            for region in self.memory.iter() {
                vmm_written(region).reset();
            }
        }
        Ok(())
    }

    /// The pages written since the last call (or since logging was turned on): KVM's log,
    /// which also re-arms write tracking, ORed with the pages the VMM itself wrote.
    pub fn take_dirty(&self) -> Result<DirtyBitmap, VmmError> {
        let mut regions = Vec::with_capacity(self.layout.regions.len());
        for (slot, region) in self.memory.iter().enumerate() {
            let mut words = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            for (w, v) in words.iter_mut().zip(vmm_written(region).get_and_reset()) {
                *w |= v;
            }
            regions.push(words);
        }
        Ok(DirtyBitmap { regions })
    }

    /// Lets every vCPU run.
    pub fn resume(&self) -> Result<(), VmmError> {
        self.vcpus.iter().try_for_each(VcpuHandle::resume)
    }

    /// Stops every vCPU; on return none is inside the guest.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.vcpus.iter().try_for_each(VcpuHandle::pause)
    }

    /// Captures the state of a paused VM.
    pub fn save(&self) -> Result<VmState, VmmError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save)
            .collect::<Result<Vec<VcpuState>, _>>()?;
        let serial = self.io.serial.lock().map(|s| s.state()).unwrap_or_default();
        state::save_vm(&self.fd, vcpus, serial)
    }

    /// Loads a state captured on another host, with the guest's clocks advanced by `paused`
    /// (how long the guest was stopped), so time keeps flowing for it.
    pub fn restore(&self, mut state: VmState, paused: Duration) -> Result<(), VmmError> {
        if state.vcpus.len() != self.vcpus.len() {
            return Err(VmmError::StateMismatch {
                got: state.vcpus.len(),
                want: self.vcpus.len(),
            });
        }
        let ticks = paused.as_micros() as u64 * u64::from(self.tsc_khz) / 1000;
        state.advance_clock(paused.as_nanos() as u64);
        state::restore_vm(&self.fd, &state)?;
        let amd = self.host_is_amd();
        for (handle, mut s) in self.vcpus.iter().zip(state.vcpus) {
            s.advance_tsc(ticks);
            if amd {
                s.tr_as_loaded_on_amd();
            }
            handle.restore(s)?;
        }
        if let Ok(mut serial) = self.io.serial.lock() {
            serial.restore(state.serial);
        }
        Ok(())
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Whether this host's CPU is AMD's (CPUID leaf 0 vendor "AuthenticAMD").
    fn host_is_amd(&self) -> bool {
        self.host_cpuid
            .iter()
            .find(|e| e.function == 0)
            .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163))
    }

    /// Guest RAM as `(guest physical address, host address, length)`, for a transport that
    /// registers it (RDMA). The mappings live as long as the VM.
    pub fn ram_areas(&self) -> Vec<(u64, *mut u8, usize)> {
        self.memory
            .iter()
            .map(|r| {
                let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = r;
                (r.start_addr().0, mapping.as_ptr(), mapping.size())
            })
            .collect()
    }

    /// The RAM layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The CPUID vCPU 0 runs with (what a destination must support).
    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// The guest's TSC frequency.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpus.len() as u8
    }

    /// Keeps the guest out of its vCPUs for `percent` of every [`throttle::PERIOD`] (0 lets
    /// it run freely again); returns the level set, capped at [`throttle::MAX_PERCENT`].
    pub fn set_throttle(&mut self, percent: u32) -> Result<u32, VmmError> {
        let p = self.throttle.set(percent);
        if p == 0 {
            self.ticker = None;
        } else if self.ticker.is_none() {
            let kickers: Vec<_> = self.vcpus.iter().filter_map(VcpuHandle::kicker).collect();
            self.ticker = Some(Ticker::start(move || {
                kickers.iter().for_each(|k| k.kick());
            })?);
        }
        Ok(p)
    }

    /// The current throttle, in percent.
    pub fn throttle(&self) -> u32 {
        self.throttle.percent()
    }

    /// Events from vCPU threads: the guest exited or crashed.
    pub fn events(&self) -> &Receiver<VmEvent> {
        &self.events
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The ticker first: it must not kick a vCPU thread that has ended.
        self.ticker = None;
        for v in &mut self.vcpus {
            v.exit();
        }
    }
}

/// The CPUID this host's KVM can offer a guest.
pub fn host_supported_cpuid() -> Result<Vec<kvm_cpuid_entry2>, VmmError> {
    let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
    Ok(kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?
        .as_slice()
        .to_vec())
}

/// Memory this host can still give a VM (`MemAvailable`), if the kernel says.
pub fn host_available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The bitmap of pages the VMM itself wrote in one region.
fn vmm_written(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
) -> &vm_memory::bitmap::AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
    mapping.bitmap()
}

/// Routes LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a PC's firmware does.
fn setup_lapic(vcpu: &VcpuFd) -> Result<(), VmmError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7 << 8;
    const DELIVERY_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(LVT_LINT0, DELIVERY_EXTINT), (LVT_LINT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

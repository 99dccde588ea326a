//! The state that crosses hosts besides RAM: each vCPU's registers and local APIC, the
//! in-kernel interrupt controllers and timer, the KVM clock, and the devices.
//!
//! Save and restore follow the order Firecracker and Cloud Hypervisor use: special registers
//! before the LAPIC (the APIC base lives in `sregs`), the LAPIC before the MSRs (the TSC
//! deadline is only meaningful once the LAPIC is set), pending events last.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::devices::SerialState;
use super::VmmError;

/// `IA32_TSC`: restored with the time that passed during the pause added, so the guest's
/// clock keeps running in step with the world.
pub const MSR_IA32_TSC: u32 = 0x10;

/// The MSRs that carry guest state, kept if the host's KVM knows them (KVM_GET_MSR_INDEX_LIST).
pub const MSRS_TO_SAVE: &[u32] = &[
    0x174,        // IA32_SYSENTER_CS
    0x175,        // IA32_SYSENTER_ESP
    0x176,        // IA32_SYSENTER_EIP
    MSR_IA32_TSC, // IA32_TSC
    0x1a0,        // IA32_MISC_ENABLE
    0x277,        // IA32_PAT
    0x2ff,        // IA32_MTRR_DEF_TYPE
    0x6e0,        // IA32_TSC_DEADLINE
    0xc000_0081,  // STAR
    0xc000_0082,  // LSTAR
    0xc000_0083,  // CSTAR
    0xc000_0084,  // SFMASK
    0xc000_0102,  // KERNEL_GS_BASE
    0xc000_0103,  // TSC_AUX
    0x4b56_4d00,  // KVM wall clock
    0x4b56_4d01,  // KVM system time
    0x4b56_4d02,  // KVM async page faults
    0x4b56_4d03,  // KVM steal time
    0x4b56_4d04,  // KVM paravirtual EOI
];

/// One vCPU's architectural state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (and APIC ID).
    pub id: u8,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

/// The whole VM's non-memory state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialState,
}

impl VcpuState {
    /// Loads TR as an available (not busy) TSS. KVM on AMD reports TR as busy whatever the
    /// VMCB holds (`svm_get_segment` sets the bit because AMD does not keep it), while what the
    /// CPU had loaded with `ltr` is the available type; QEMU's emulation of SVM, which the
    /// soft-RoCE lab runs KVM on, refuses ring-3 port I/O through the TSS bitmap when TR is
    /// busy. Intel's VM entry requires busy, so this is for AMD hosts only.
    pub fn tr_as_loaded_on_amd(&mut self) {
        const TSS_AVAILABLE: u8 = 0x9;
        const TSS_BUSY: u8 = 0xb;
        if self.sregs.tr.type_ == TSS_BUSY {
            self.sregs.tr.type_ = TSS_AVAILABLE;
        }
    }

    /// Moves the guest's TSC forward by `ticks`, for the time the VM spent paused.
    pub fn advance_tsc(&mut self, ticks: u64) {
        for m in &mut self.msrs {
            if m.index == MSR_IA32_TSC {
                m.data = m.data.wrapping_add(ticks);
            }
        }
    }
}

impl VmState {
    /// Moves the KVM clock forward by `ns`, for the time the VM spent paused.
    pub fn advance_clock(&mut self, ns: u64) {
        self.clock.clock = self.clock.clock.wrapping_add(ns);
    }
}

/// Puts a vCPU at a PVH entry point: 32-bit protected mode, paging off, flat 4 GiB segments,
/// `%ebx` = the physical address of `hvm_start_info`.
pub fn set_pvh_entry(s: &mut VcpuState, entry: u32, start_info: u64) {
    s.regs = kvm_regs {
        rip: u64::from(entry),
        rbx: start_info,
        rflags: 0x2,
        ..Default::default()
    };
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        ..code
    };
    let sr = &mut s.sregs;
    sr.cs = code;
    (sr.ds, sr.es, sr.fs, sr.gs, sr.ss) = (data, data, data, data, data);
    sr.tr = kvm_segment {
        selector: 0x18,
        limit: 0x67,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        db: 0,
        ..code
    };
    sr.cr0 = 0x11; // PE | ET
    sr.cr3 = 0;
    sr.cr4 = 0;
    sr.efer = 0;
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(what, e)
}

/// Reads the state of a paused vCPU.
pub fn save_vcpu(fd: &VcpuFd, id: u8, msr_list: &[u32]) -> Result<VcpuState, VmmError> {
    let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = msr_list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VmmError::MsrList)?;
    let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
    if n != entries.len() {
        return Err(VmmError::MsrAccess(entries[n].index));
    }
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs: msrs.as_slice().to_vec(),
        events,
    })
}

/// Loads a vCPU's state; the vCPU has not run on this host yet.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), VmmError> {
    fd.set_mp_state(s.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a legacy 4 KiB XSAVE area read by KVM_GET_XSAVE on the source,
    // whose CPUID the handshake proved this host supports; KVM_SET_XSAVE reads only that size.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VmmError::MsrList)?;
    let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        return Err(VmmError::MsrAccess(s.msrs[n].index));
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Reads the VM-wide state (after every vCPU is paused) around the vCPU states.
pub fn save_vm(vm: &VmFd, vcpus: Vec<VcpuState>, serial: SerialState) -> Result<VmState, VmmError> {
    Ok(VmState {
        vcpus,
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        serial,
    })
}

/// Loads the VM-wide state; vCPUs are restored separately, after this.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), VmmError> {
    vm.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// CPUID leaves whose feature bits must all be offered by a destination.
const FEATURE_LEAVES: &[(u32, u32)] = &[(1, 0), (7, 0), (0xd, 1), (0x8000_0001, 0)];

/// The guest's CPU features that `host` (a destination's supported CPUID) lacks, as readable
/// `leaf.subleaf reg bit` names; empty when the destination can run the guest.
pub fn missing_cpu_features(guest: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    let find = |set: &[kvm_cpuid_entry2], leaf: u32, sub: u32| {
        set.iter()
            .find(|e| e.function == leaf && e.index == sub)
            .map(|e| [e.ebx, e.ecx, e.edx])
    };
    let mut missing = Vec::new();
    for &(leaf, sub) in FEATURE_LEAVES {
        let Some(g) = find(guest, leaf, sub) else {
            continue;
        };
        let h = find(host, leaf, sub).unwrap_or([0; 3]);
        for (ri, reg) in ["ebx", "ecx", "edx"].iter().enumerate() {
            let mut lacking = g[ri] & !h[ri];
            if leaf == 1 && ri == 0 {
                // EBX of leaf 1 is the APIC ID and counts, not features.
                lacking = 0;
            }
            if leaf == 1 && ri == 1 {
                // The hypervisor bit is ours to set.
                lacking &= !(1 << 31);
            }
            while lacking != 0 {
                let bit = lacking.trailing_zeros();
                missing.push(format!("cpuid {leaf:#x}.{sub} {reg} bit {bit}"));
                lacking &= lacking - 1;
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn a_destination_missing_a_feature_is_named() {
        let guest = [leaf(1, 0, 0b1010 | 1 << 31), leaf(7, 0, 0)];
        let host = [leaf(1, 0, 0b0010)];
        assert_eq!(
            missing_cpu_features(&guest, &host),
            vec!["cpuid 0x1.0 ecx bit 3"]
        );
        assert!(missing_cpu_features(&host, &guest).is_empty());
    }
}

//! x86_64 vCPU state at boot: CPUID, MSRs, LAPIC, FPU, general and special
//! registers for the 64-bit Linux boot protocol and for the PVH entry.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId,
    Msrs, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::VcpuFd;

use super::boot::BOOT_GDT;
use super::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, PML4_START, ZERO_PAGE_START};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;
const CPUID_HTT_BIT: u32 = 1 << 28;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {vcpu}: {what} failed")]
    Ioctl {
        /// vCPU index.
        vcpu: u8,
        /// The operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Building the MSR list failed.
    #[error("vCPU {vcpu}: cannot build the MSR list")]
    MsrList {
        /// vCPU index.
        vcpu: u8,
        /// Cause.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// KVM refused some boot MSRs.
    #[error("vCPU {vcpu}: KVM set only {set} of {total} boot MSRs")]
    Msrs {
        /// vCPU index.
        vcpu: u8,
        /// Number set.
        set: usize,
        /// Number requested.
        total: usize,
    },
}

/// Adapts KVM's supported CPUID for vCPU `id` of `count`: hypervisor bit, APIC ids,
/// logical processor count.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= CPUID_HYPERVISOR_BIT;
                // EBX: [31:24] initial APIC id, [23:16] logical count, [15:8] CLFLUSH size/8.
                e.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                if count > 1 {
                    e.edx |= CPUID_HTT_BIT;
                } else {
                    e.edx &= !CPUID_HTT_BIT;
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = lapic.regs.get(offset + i).copied().unwrap_or(0) as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        if let Some(r) = lapic.regs.get_mut(offset + i) {
            *r = *b as _;
        }
    }
}

/// Decodes a GDT entry into a KVM segment (selector = `index * 8`).
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Special registers for 64-bit entry: GDT/IDT, flat segments, paging on.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// How the boot processor enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, paging on, `rsi` = zero page.
    Linux64 {
        /// Entry point (`rip`).
        rip: u64,
    },
    /// PVH (`XEN_ELFNOTE_PHYS32_ENTRY`): 32-bit protected mode, paging off,
    /// `ebx` = `hvm_start_info`.
    Pvh {
        /// Entry point (`eip`).
        rip: u64,
        /// Guest-physical address of `hvm_start_info`.
        start_info: u64,
    },
}

/// Special registers for the PVH entry: flat 32-bit code and data segments
/// (base 0, limit 4 GiB), CR0.PE only, paging, PAE and long mode off. The
/// guest loads its own GDT; ours only backs the task register.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let code = flat(0x8, 0xb);
    let data = flat(0x10, 0x3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers at the 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Per-vCPU boot configuration, re-applied on every system reset.
#[derive(Clone)]
pub struct CpuSetup {
    /// vCPU index (= APIC id).
    pub id: u8,
    /// Filtered CPUID for this vCPU.
    pub cpuid: CpuId,
}

impl CpuSetup {
    fn ioctl(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
        let vcpu = self.id;
        move |source| CpuError::Ioctl { vcpu, what, source }
    }

    /// Puts `fd` in its boot state. The boot processor (id 0) starts at `entry`
    /// (64-bit or PVH); application processors wait for INIT/SIPI. CPUID is set
    /// only the first time (`initial`): KVM refuses to change it after `KVM_RUN`,
    /// and it does not change across resets.
    pub fn apply(&self, fd: &VcpuFd, entry: BootEntry, initial: bool) -> Result<(), CpuError> {
        if initial {
            fd.set_cpuid2(&self.cpuid)
                .map_err(self.ioctl("KVM_SET_CPUID2"))?;
        }
        let entries = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        ]
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        });
        let msrs = Msrs::from_entries(&entries).map_err(|source| CpuError::MsrList {
            vcpu: self.id,
            source,
        })?;
        let set = fd.set_msrs(&msrs).map_err(self.ioctl("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(CpuError::Msrs {
                vcpu: self.id,
                set,
                total: entries.len(),
            });
        }
        let mut lapic = fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(self.ioctl("KVM_SET_LAPIC"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(self.ioctl("KVM_SET_FPU"))?;
        if self.id == 0 {
            let sregs = fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
            let (sregs, regs) = match entry {
                BootEntry::Linux64 { rip } => (boot_sregs(sregs), boot_regs(rip)),
                BootEntry::Pvh { rip, start_info } => (
                    pvh_sregs(sregs),
                    kvm_regs {
                        rflags: 0x2,
                        rip,
                        rbx: start_info,
                        ..Default::default()
                    },
                ),
            };
            fd.set_sregs(&sregs).map_err(self.ioctl("KVM_SET_SREGS"))?;
            fd.set_regs(&regs).map_err(self.ioctl("KVM_SET_REGS"))?;
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(self.ioctl("KVM_SET_MP_STATE"))?;
        } else {
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            })
            .map_err(self.ioctl("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_from_gdt() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.present),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(
            (ds.selector, ds.type_, ds.l, ds.db, ds.s),
            (0x10, 3, 0, 1, 1)
        );
        let tr = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn sregs_enable_long_mode() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.gdt.base, 0x500);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn lvt_modes_patch_only_delivery_mode() {
        let mut l = kvm_lapic_state::default();
        l.regs[APIC_LVT0] = 0x10u8 as _;
        l.regs[APIC_LVT0 + 2] = 1;
        set_lvt_mode(&mut l, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(l.regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(l.regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(l.regs[APIC_LVT0 + 2] as u8, 1);
    }

    #[test]
    fn cpuid_filter_sets_apic_id_and_hypervisor_bit() {
        let mut c = CpuId::new(2).unwrap();
        c.as_mut_slice()[0].function = 1;
        c.as_mut_slice()[1].function = 0xb;
        filter_cpuid(&mut c, 3, 4);
        let e = c.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & CPUID_HYPERVISOR_BIT, 0);
        assert_ne!(e.edx & CPUID_HTT_BIT, 0);
        assert_eq!(c.as_slice()[1].edx, 3);
    }
}

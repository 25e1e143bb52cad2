// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A tiny x86_64 guest started directly at CPL3 (no CPL0 code at all), for the KVM tests
//! and the benchmark. This machine's KVM is nested/paravirtual (`kvm_pvm`): CPL3 code runs
//! natively, CPL0 code is emulated very slowly, so the guest never runs at CPL0.
//!
//! Memory map (guest physical = guest virtual, one 2 MiB user page):
//! 0x500 GDT, 0x1000 PML4, 0x2000 PDPT, 0x3000 PD, 0x4000 code, 0xf000 stack top,
//! 0x10000 TSS.

#![allow(dead_code)]

use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

pub const MEM_SIZE: usize = 2 << 20;
pub const CODE: u64 = 0x4000;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const STACK_TOP: u64 = 0xf000;
const TSS: u64 = 0x10000;

pub const SEL_USER_DATA: u16 = 0x18 | 3;
pub const SEL_USER_CODE: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;

/// RFLAGS: reserved bit 1 and IOPL = 3 (port I/O allowed at CPL3).
pub const RFLAGS_IOPL3: u64 = 0x2 | (3 << 12);

/// `in al, 0x10`-style echo loop:
/// ```text
/// 0:  66 ba 10 00   mov dx, 0x10
/// 4:  ec            in al, dx        ; exit: IoIn(0x10)
/// 5:  48 89 c3      mov rbx, rax     ; the guest observes RAX
/// 8:  66 ba 11 00   mov dx, 0x11
/// 12: ee            out dx, al       ; exit: IoOut(0x11), RBX = RAX seen by the guest
/// 13: 48 ff c1      inc rcx
/// 16: eb ee         jmp 0
/// ```
pub const ECHO_LOOP: &[u8] = &[
    0x66, 0xba, 0x10, 0x00, 0xec, 0x48, 0x89, 0xc3, 0x66, 0xba, 0x11, 0x00, 0xee, 0x48, 0xff, 0xc1,
    0xeb, 0xee,
];
/// Offset of the `in` instruction in [`ECHO_LOOP`].
pub const ECHO_IN_OFFSET: u64 = 4;
/// Offset of the `out` instruction in [`ECHO_LOOP`].
pub const ECHO_OUT_OFFSET: u64 = 12;

/// `out dx, al; jmp $-3` — one exit per iteration, port taken from RDX.
pub const OUT_LOOP: &[u8] = &[0xee, 0xeb, 0xfd];

/// Anonymous guest memory, unmapped on drop (after the VM, see field order in `Guest`).
pub struct GuestMemory {
    ptr: *mut u8,
}

impl GuestMemory {
    fn new() -> GuestMemory {
        // SAFETY: fresh anonymous private mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest memory");
        GuestMemory { ptr: ptr.cast() }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let off = usize::try_from(gpa).unwrap();
        assert!(off + bytes.len() <= MEM_SIZE);
        // SAFETY: in bounds of our mapping (checked above); the guest is not running.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) }
    }

    fn write_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping of MEM_SIZE bytes.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

/// A VM with one vCPU set up to start at CPL3 in long mode at [`CODE`].
pub struct Guest {
    pub vcpu: VcpuFd,
    pub vm: VmFd,
    pub mem: GuestMemory,
}

/// `/dev/kvm`, or `None` after printing a clear skip message when the device does not
/// exist. A machine that has `/dev/kvm` but cannot open it fails the test instead of
/// passing silently.
pub fn open_kvm(test: &str) -> Option<Kvm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("{test}: skipped: /dev/kvm unavailable");
        println!("{test}: skipped: /dev/kvm unavailable");
        return None;
    }
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => panic!("{test}: /dev/kvm exists but cannot be opened: {e}"),
    }
}

fn user_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Builds the VM: page tables with the U bit, a GDT with ring-3 segments and a TSS, CS/SS
/// with DPL 3 and RPL 3 selectors, long mode, RFLAGS.IOPL = 3 (set directly: no IRETQ is
/// involved), `code` at [`CODE`]; `regs` may adjust the initial registers.
///
/// Measured on this machine (`kvm_pvm`): RFLAGS.IOPL = 3 set with `KVM_SET_REGS` does not
/// survive — `KVM_GET_REGS` after the first exit shows IOPL = 0 and an `out` at CPL3 takes
/// #GP (vector 13, then a triple fault: `KVM_EXIT_SHUTDOWN`). An all-zero I/O permission
/// bitmap in the TSS, which the PVM emulator honours, makes port I/O at CPL3 work; the TSS
/// therefore carries one for all 65536 ports.
pub fn build(kvm: &Kvm, code: &[u8], regs: impl FnOnce(&mut kvm_regs)) -> Guest {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem = GuestMemory::new();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
        flags: 0,
    };
    // SAFETY: the region is our anonymous mapping, which outlives the VM (field order).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");

    // Identity map of the first 2 MiB, present|writable|user.
    mem.write_u64(PML4, PDPT | 0x7);
    mem.write_u64(PDPT, PD | 0x7);
    mem.write_u64(PD, 0x87); // 2 MiB page, P|RW|US|PS
                             // GDT: null, kernel code, kernel data, user data, user code 64, TSS (16 bytes).
                             // TSS with an all-zero I/O permission bitmap for every port (104-byte TSS, 8192-byte
                             // bitmap, 0xff terminator): see `build`'s docs for why IOPL alone is not enough here.
    let tss_limit: u64 = 104 + 8192;
    let tss_desc_low = tss_limit
        | ((TSS & 0xff_ffff) << 16)
        | (0x89 << 40) // present, type 9 (available 64-bit TSS)
        | (((TSS >> 24) & 0xff) << 56);
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
        tss_desc_low,
        TSS >> 32,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_u64(GDT + 8 * i as u64, *d);
    }
    mem.write(TSS + 102, &104u16.to_le_bytes());
    mem.write(TSS + 104 + 8192, &[0xff]);
    mem.write(CODE, code);

    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    sregs.cs = user_segment(SEL_USER_CODE, true);
    let data = user_segment(SEL_USER_DATA, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS,
        limit: tss_limit as u32,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
    sregs.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
    sregs.efer = 0x500; // LME, LMA
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");

    let mut r = kvm_regs {
        rip: CODE,
        rsp: STACK_TOP,
        rflags: RFLAGS_IOPL3,
        ..Default::default()
    };
    regs(&mut r);
    vcpu.set_regs(&r).expect("KVM_SET_REGS");
    Guest { vcpu, vm, mem }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `VcpuRegisters` over the simulated hypervisor: fast path, fallback, mixing guard, counters.
#![cfg(target_arch = "x86_64")]

use mshv_bindings as hv;
use mshv_regpage::sim::SimHypervisor;
use mshv_regpage::{
    Error, ExitRegisters, Gpr, ReadOnlyRegister, RegisterClass, Segment, SegmentAttributes,
    SegmentRegister, VcpuRegisters, WritePath, Xmm,
};

fn assoc(name: hv::hv_register_name, v: u64) -> hv::hv_register_assoc {
    hv::hv_register_assoc {
        name,
        value: hv::hv_register_value { reg64: v },
        ..Default::default()
    }
}

/// An exit handler written once against the trait: emulate `in al, dx` (2 bytes).
fn handle_pio_in<R: ExitRegisters>(regs: &mut R, data: u8) -> mshv_regpage::Result<()> {
    let rax = regs.gpr(Gpr::Rax)?;
    regs.set_gpr(Gpr::Rax, (rax & !0xff) | u64::from(data))?;
    let rip = regs.rip()?;
    regs.set_rip(rip + 2)
}

#[test]
fn exit_handler_uses_only_the_page_when_valid() {
    let (mut hv, page) = SimHypervisor::new();
    hv.state_mut().set_gpr(Gpr::Rax, 0xaaaa_bbbb_cccc_dd00);
    hv.state_mut().rip = 0x4000;
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    hv.exit(&mut regs).unwrap();
    for i in 0..100u64 {
        handle_pio_in(&mut regs, (i & 0xff) as u8).unwrap();
        let report = hv.run(&mut regs, |_| {}).unwrap();
        assert!(report.applied.contains(RegisterClass::General));
        assert!(report.applied.contains(RegisterClass::Ip));
        assert_eq!(hv.state().gpr(Gpr::Rax) & 0xff, i & 0xff);
        assert_eq!(hv.state().rip, 0x4000 + 2 * (i + 1));
    }
    let stats = regs.stats();
    assert_eq!(stats.hypercalls(), 0);
    assert_eq!(stats.page_reads, 200);
    assert_eq!(stats.page_writes, 200);
    assert_eq!(hv.hypercall_counts(), (0, 0));
}

#[test]
fn invalid_page_falls_back_to_hypercalls_and_rechecks_each_time() {
    let (mut hv, page) = SimHypervisor::new();
    hv.state_mut().rip = 0x1000;
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    hv.exit(&mut regs).unwrap();
    hv.set_page_valid(&mut regs, false).unwrap();
    handle_pio_in(&mut regs, 0x42).unwrap();
    let s = regs.stats();
    assert_eq!((s.page_reads, s.page_writes), (0, 0));
    assert_eq!((s.hypercall_gets, s.hypercall_sets), (2, 2));
    assert_eq!(hv.hypercall_counts(), (2, 2));
    // Hypercall writes take effect immediately in the hypervisor's state.
    assert_eq!(hv.state().gpr(Gpr::Rax), 0x42);
    assert_eq!(hv.state().rip, 0x1002);
    // The page becomes valid again at the next exit: the fast path resumes.
    hv.set_page_valid(&mut regs, true).unwrap();
    hv.run(&mut regs, |_| {}).unwrap();
    assert_eq!(regs.rip().unwrap(), 0x1002);
    assert_eq!(regs.stats().page_reads, 1);
}

#[test]
fn no_page_at_all_uses_hypercalls() {
    let (hv, _page) = SimHypervisor::new();
    hv.state_mut().set_gpr(Gpr::R9, 99);
    let mut regs = VcpuRegisters::new(None, hv.hypercalls());
    assert!(!regs.page_usable());
    assert_eq!(regs.gpr(Gpr::R9).unwrap(), 99);
    regs.set_xmm(Xmm::Xmm2, 1 << 100).unwrap();
    assert_eq!(hv.state().xmm(Xmm::Xmm2), 1 << 100);
    assert_eq!(regs.stats().page_accesses(), 0);
    assert_eq!(regs.stats().hypercalls(), 2);
}

#[test]
fn mixing_a_page_write_and_a_hypercall_write_is_refused() {
    let (mut hv, page) = SimHypervisor::new();
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    regs.set_gpr(Gpr::Rax, 1).unwrap();
    let err = regs
        .set_hv_registers(&[assoc(hv::hv_register_name_HV_X64_REGISTER_RBX, 2)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::MixedWrite {
                class: RegisterClass::General,
                earlier: WritePath::Page,
                attempted: WritePath::Hypercall
            }
        ),
        "{err}"
    );
    assert_eq!(hv.hypercall_counts(), (0, 0), "nothing was sent");
    // Another class is fine, and so is the same class after the next run.
    regs.set_hv_registers(&[assoc(hv::hv_register_name_HV_X64_REGISTER_RFLAGS, 0x202)])
        .unwrap();
    assert_eq!(
        regs.written_by(RegisterClass::Flags),
        Some(WritePath::Hypercall)
    );
    // RFLAGS now reads through the hypercall (the page copy is stale)...
    assert_eq!(regs.rflags().unwrap(), 0x202);
    // ...and a typed write of it keeps using the hypercall instead of mixing.
    regs.set_rflags(0x246).unwrap();
    assert_eq!(hv.state().rflags, 0x246);
    hv.run(&mut regs, |_| {}).unwrap();
    assert_eq!(hv.state().gpr(Gpr::Rax), 1);
    regs.set_hv_registers(&[assoc(hv::hv_register_name_HV_X64_REGISTER_RBX, 2)])
        .unwrap();
    assert_eq!(hv.state().gpr(Gpr::Rbx), 2);
}

#[test]
fn a_failed_run_keeps_guarding_unconsumed_dirty_classes() {
    let (mut hv, page) = SimHypervisor::new();
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    regs.set_rip(0x10).unwrap();
    // The run ioctl failed before the vCPU was dispatched: dirty is still set.
    hv.run_failed(&mut regs).unwrap();
    assert_eq!(regs.written_by(RegisterClass::Ip), Some(WritePath::Page));
    assert!(regs
        .set_hv_registers(&[assoc(hv::hv_register_name_HV_X64_REGISTER_RIP, 0x20)])
        .is_err());
}

#[test]
fn registers_not_on_the_page_always_use_hypercalls() {
    let (mut hv, page) = SimHypervisor::new();
    hv.state_mut().set_gpr(Gpr::Rdx, 0xd);
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    hv.exit(&mut regs).unwrap();
    regs.set_hv_registers(&[
        assoc(hv::hv_register_name_HV_X64_REGISTER_CR2, 0xfee),
        assoc(hv::hv_register_name_HV_X64_REGISTER_APIC_BASE, 0xfee0_0900),
    ])
    .unwrap();
    let mut q = [
        assoc(hv::hv_register_name_HV_X64_REGISTER_CR2, 0),
        assoc(hv::hv_register_name_HV_X64_REGISTER_RDX, 0),
        assoc(hv::hv_register_name_HV_X64_REGISTER_APIC_BASE, 0),
    ];
    let before = regs.stats();
    regs.get_hv_registers(&mut q).unwrap();
    let after = regs.stats();
    // SAFETY: reg64 of plain data.
    let vals: Vec<u64> = q.iter().map(|a| unsafe { a.value.reg64 }).collect();
    assert_eq!(vals, vec![0xfee, 0xd, 0xfee0_0900]);
    assert_eq!(after.page_reads - before.page_reads, 1, "RDX from the page");
    assert_eq!(
        after.hypercall_gets - before.hypercall_gets,
        1,
        "CR2+APIC_BASE batched"
    );
    // Unknown registers are reported as backend errors with a source.
    let err = regs
        .get_hv_registers(&mut [assoc(0xdead_beef, 0)])
        .unwrap_err();
    assert!(std::error::Error::source(&err).is_some(), "{err}");
}

#[test]
fn read_only_registers_read_from_page_and_write_by_hypercall() {
    let (mut hv, page) = SimHypervisor::new();
    hv.state_mut().read_only[ReadOnlyRegister::Cr8.index()] = 3;
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    hv.exit(&mut regs).unwrap();
    assert_eq!(regs.read_only(ReadOnlyRegister::Cr8).unwrap(), 3);
    assert_eq!(regs.stats().hypercalls(), 0);
    regs.set_read_only(ReadOnlyRegister::Cr8, 5).unwrap();
    assert_eq!(hv.state().read_only(ReadOnlyRegister::Cr8), 5);
    // The page still says 3 until the next exit; the facade knows and asks the hypervisor.
    assert_eq!(regs.page().unwrap().cr8(), 3);
    assert_eq!(regs.read_only(ReadOnlyRegister::Cr8).unwrap(), 5);
    hv.run(&mut regs, |_| {}).unwrap();
    assert_eq!(regs.page().unwrap().cr8(), 5);
}

#[test]
fn bulk_standard_and_special_registers() {
    let (mut hv, page) = SimHypervisor::new();
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    let std_regs = hv::StandardRegisters {
        rax: 1,
        rbx: 2,
        rcx: 3,
        rdx: 4,
        rsi: 5,
        rdi: 6,
        rsp: 7,
        rbp: 8,
        r8: 9,
        r9: 10,
        r10: 11,
        r11: 12,
        r12: 13,
        r13: 14,
        r14: 15,
        r15: 16,
        rip: 17,
        rflags: 18,
    };
    regs.set_standard_registers(&std_regs).unwrap();
    assert_eq!(regs.stats().hypercalls(), 0);
    assert_eq!(regs.standard_registers().unwrap(), std_regs);
    hv.run(&mut regs, |_| {}).unwrap();
    assert_eq!(hv.state().to_standard(), std_regs);

    let user_cs = SegmentRegister {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x33,
        attributes: SegmentAttributes::from_bits(0xa0fb),
    };
    let mut sregs = hv::SpecialRegisters {
        cs: user_cs.into(),
        cr0: 0x8000_0011,
        cr2: 0x1234,
        efer: 0x500,
        ..Default::default()
    };
    sregs.gdt.base = 0x500;
    sregs.gdt.limit = 0x27;
    regs.set_special_registers(&sregs).unwrap();
    let s = regs.stats();
    assert_eq!(
        s.hypercall_sets, 1,
        "segments on the page, the rest in one hypercall"
    );
    // CR0 was written by hypercall: it is read back by hypercall, the page is stale.
    let back = regs.special_registers().unwrap();
    assert_eq!(SegmentRegister::from(back.cs), user_cs);
    assert_eq!(
        (back.cr0, back.cr2, back.efer),
        (0x8000_0011, 0x1234, 0x500)
    );
    assert_eq!((back.gdt.base, back.gdt.limit), (0x500, 0x27));
    hv.run(&mut regs, |_| {}).unwrap();
    assert_eq!(hv.state().segment(Segment::Cs), user_cs);
    assert_eq!(regs.page().unwrap().cr0(), 0x8000_0011);
}

#[test]
fn pending_external_interrupt_sets_the_bitmap() {
    let (mut hv, page) = SimHypervisor::new();
    // Pending (bit 0), type external (0), vector 0x41.
    hv.state_mut().read_only[ReadOnlyRegister::PendingInterruption.index()] = 1 | (0x41 << 16);
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    hv.exit(&mut regs).unwrap();
    let sregs = regs.special_registers().unwrap();
    assert_eq!(sregs.interrupt_bitmap, [0, 1 << 1, 0, 0]);
}

#[test]
fn foreign_pages_are_rejected_by_the_simulator() {
    let (mut hv_a, _page_a) = SimHypervisor::new();
    let (_hv_b, mut page_b) = SimHypervisor::new();
    assert!(hv_a.dispatch(&mut page_b).is_err());
    let mut no_page = VcpuRegisters::new(None, hv_a.hypercalls());
    assert!(hv_a.exit(&mut no_page).is_err());
}

#[test]
fn unknown_page_version_falls_back_to_hypercalls() {
    let (mut hv, page) = SimHypervisor::new();
    hv.state_mut().set_gpr(Gpr::R12, 12);
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    hv.exit(&mut regs).unwrap();
    hv.set_page_version(&mut regs, 2).unwrap();
    assert!(regs.page().unwrap().is_valid());
    assert!(!regs.page_usable());
    assert_eq!(regs.gpr(Gpr::R12).unwrap(), 12);
    assert_eq!(regs.stats().page_reads, 0);
    assert_eq!(regs.stats().hypercall_gets, 1);
    hv.run(&mut regs, |_| {}).unwrap();
    assert!(regs.page_usable());
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The facade on this machine's real KVM: a CPL3 guest doing `in`/`out` in a loop.
//! Skipped (with a clear message) where `/dev/kvm` is missing.
#![cfg(target_arch = "x86_64")]

mod common;

use common::cpl3_guest::{self as guest, ECHO_IN_OFFSET, ECHO_LOOP, ECHO_OUT_OFFSET};
use kvm_ioctls::{Cap, VcpuExit};
use mshv_regpage::kvm::KvmVcpuRegisters;
use mshv_regpage::{Error, ExitRegisters, Gpr, ReadOnlyRegister, Segment};

/// Runs until the next exit and returns (port, is_in); for an `in`, fills the data with
/// `in_data`. Panics with a diagnosis on anything but port I/O.
fn next_pio(regs: &mut KvmVcpuRegisters, in_data: u8) -> (u16, bool, u8) {
    match regs.run().expect("KVM_RUN") {
        VcpuExit::IoIn(port, data) => {
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = in_data;
            }
            (port, true, in_data)
        }
        VcpuExit::IoOut(port, data) => (port, false, data.first().copied().unwrap_or(0)),
        other => panic!(
            "expected a port I/O exit, got {other:?} (if this is Shutdown/InternalError, port \
             I/O at CPL3 with RFLAGS.IOPL=3 faulted)"
        ),
    }
}

fn echo_round_trips(regs: &mut KvmVcpuRegisters, rounds: u64) {
    for i in 0..rounds {
        let in_data = 0x5a ^ (i as u8);
        let (port, is_in, _) = next_pio(regs, in_data);
        assert_eq!((port, is_in), (0x10, true), "round {i}");

        // RAX/RIP through the fast path (or fallback) and through the ioctl agree.
        let rax = regs.gpr(Gpr::Rax).unwrap();
        let rip = regs.rip().unwrap();
        let rflags = regs.rflags().unwrap();
        let ioctl = regs.get_regs_ioctl().unwrap();
        assert_eq!(
            (rax, rip, rflags),
            (ioctl.rax, ioctl.rip, ioctl.rflags),
            "round {i}"
        );
        // Hardware KVM reports RIP at the `in` (completed at the next KVM_RUN); this
        // machine's PVM emulator has already advanced it past the 1-byte instruction.
        let in_rip = guest::CODE + ECHO_IN_OFFSET;
        assert!(
            rip == in_rip || rip == in_rip + 1,
            "RIP {rip:#x} at/after the `in`"
        );
        assert_eq!(regs.gpr(Gpr::Rcx).unwrap(), i, "loop counter");

        // Complete the `in` the MSHV way: write RAX (AL = the input byte) and move RIP past
        // the 1-byte instruction. KVM sees the changed RIP and does not complete the PIO
        // itself (on PVM, where RIP is already past it, the data buffer holds the same byte).
        let value = (0x1122_3344_5566_7700u64 ^ (i << 8) ^ (i << 40)) | u64::from(in_data);
        regs.set_gpr(Gpr::Rax, value).unwrap();
        regs.set_rip(in_rip + 1).unwrap();

        let (port, is_in, al) = next_pio(regs, 0);
        assert_eq!((port, is_in), (0x11, false), "round {i}");
        assert_eq!(al, in_data, "guest echoed the input byte");
        let expected = value;
        let rbx = regs.gpr(Gpr::Rbx).unwrap();
        assert_eq!(
            rbx, expected,
            "round {i}: the guest observed the RAX we set"
        );
        assert_eq!(regs.get_regs_ioctl().unwrap().rbx, expected);
        let out_rip = guest::CODE + ECHO_OUT_OFFSET;
        let rip = regs.rip().unwrap();
        assert!(
            rip == out_rip || rip == out_rip + 1,
            "RIP {rip:#x} at/after the `out`"
        );
    }
}

#[test]
fn cpl3_guest_in_out_through_sync_regs() {
    let Some(kvm) = guest::open_kvm("cpl3_guest_in_out_through_sync_regs") else {
        return;
    };
    assert!(
        kvm.check_extension_int(Cap::SyncRegs) & 3 == 3,
        "this machine's KVM reports KVM_CAP_SYNC_REGS; it must work"
    );
    let g = guest::build(&kvm, ECHO_LOOP, |_| {});
    let mut regs = KvmVcpuRegisters::new(&kvm, g.vcpu);
    // Before the first run the sync area is empty: reads use the ioctl.
    assert!(!regs.sync_valid());
    assert_eq!(regs.rip().unwrap(), guest::CODE);
    assert_eq!(regs.stats().page_reads, 0);

    const ROUNDS: u64 = 50;
    echo_round_trips(&mut regs, ROUNDS);
    let s = regs.stats();
    // Per round: reads RAX RIP RFLAGS RCX + RBX RIP from the area, writes RAX and RIP.
    assert_eq!(s.page_reads, 6 * ROUNDS);
    assert_eq!(s.page_writes, 2 * ROUNDS);
    // Only the explicit comparison ioctls (2 per round) and the first RIP read.
    assert_eq!(s.hypercall_gets, 2 * ROUNDS + 1);
    assert_eq!(s.hypercall_sets, 0);

    // Segments and control registers from the SREGS class.
    let cs = regs.segment(Segment::Cs).unwrap();
    assert_eq!(cs.selector, guest::SEL_USER_CODE);
    assert_eq!(cs.selector & 3, 3, "RPL 3");
    assert_eq!(cs.attributes.dpl, 3);
    assert!(cs.attributes.long && cs.attributes.present);
    assert_eq!(regs.segment(Segment::Ss).unwrap().attributes.dpl, 3);
    let sregs = regs.get_sregs_ioctl().unwrap();
    assert_eq!(regs.read_only(ReadOnlyRegister::Cr3).unwrap(), sregs.cr3);
    assert_eq!(
        regs.read_only(ReadOnlyRegister::Efer).unwrap() & 0x500,
        0x500
    );
    drop(regs);
    drop(g.vm);
}

#[test]
fn cpl3_guest_in_out_through_ioctls_only() {
    let Some(kvm) = guest::open_kvm("cpl3_guest_in_out_through_ioctls_only") else {
        return;
    };
    let g = guest::build(&kvm, ECHO_LOOP, |_| {});
    let mut regs = KvmVcpuRegisters::with_sync_regs(g.vcpu, false);
    echo_round_trips(&mut regs, 10);
    let s = regs.stats();
    assert_eq!(s.page_accesses(), 0);
    assert_eq!(
        s.hypercall_sets, 20,
        "one KVM_SET_REGS per RAX and RIP write"
    );
    drop(regs);
    drop(g.vm);
}

#[test]
fn mixing_sync_area_and_ioctl_writes_is_refused() {
    let Some(kvm) = guest::open_kvm("mixing_sync_area_and_ioctl_writes_is_refused") else {
        return;
    };
    let g = guest::build(&kvm, ECHO_LOOP, |_| {});
    let mut regs = KvmVcpuRegisters::new(&kvm, g.vcpu);
    let (port, is_in, _) = next_pio(&mut regs, 1);
    assert_eq!((port, is_in), (0x10, true));
    let rip = regs.rip().unwrap();
    let in_rip = guest::CODE + ECHO_IN_OFFSET;
    assert!(rip == in_rip || rip == in_rip + 1);
    regs.set_gpr(Gpr::Rax, 0x4201).unwrap();
    regs.set_rip(in_rip + 1).unwrap();
    let snapshot = regs.get_regs_ioctl().unwrap();
    let err = regs.set_regs_ioctl(&snapshot).unwrap_err();
    assert!(matches!(err, Error::MixedWrite { .. }), "{err}");
    // The sync-area write still wins at the next run.
    let (port, _, _) = next_pio(&mut regs, 0);
    assert_eq!(port, 0x11);
    assert_eq!(regs.gpr(Gpr::Rbx).unwrap(), 0x4201);
    // After the run, an ioctl write is fine, and later reads of that class use the ioctl.
    let mut r = regs.get_regs_ioctl().unwrap();
    r.rdx = 0x77;
    regs.set_regs_ioctl(&r).unwrap();
    let reads_before = regs.stats().page_reads;
    assert_eq!(regs.gpr(Gpr::Rdx).unwrap(), 0x77);
    assert_eq!(
        regs.stats().page_reads,
        reads_before,
        "stale sync copy not used"
    );
    // ...and a typed write of that class follows the ioctl path instead of mixing.
    regs.set_gpr(Gpr::Rsi, 5).unwrap();
    assert_eq!(regs.get_regs_ioctl().unwrap().rsi, 5);
    drop(regs);
    drop(g.vm);
}

#[test]
fn a_run_failing_with_eintr_guards_by_what_the_kernel_loaded() {
    let Some(kvm) = guest::open_kvm("a_run_failing_with_eintr_guards_by_what_the_kernel_loaded")
    else {
        return;
    };
    let g = guest::build(&kvm, ECHO_LOOP, |_| {});
    let mut regs = KvmVcpuRegisters::new(&kvm, g.vcpu);
    let (port, is_in, _) = next_pio(&mut regs, 1);
    assert_eq!((port, is_in), (0x10, true));
    let before = regs.get_regs_ioctl().unwrap().rax;
    let written = before ^ 0x5a5a_0000;
    regs.set_gpr(Gpr::Rax, written).unwrap();
    // A run that fails with EINTR (the VMM kicked the vCPU).
    regs.set_immediate_exit(true);
    let err = regs.run().map(|_| ()).unwrap_err();
    assert_eq!(err.errno(), libc::EINTR);
    regs.set_immediate_exit(false);
    // Whether the kernel loaded the sync-area write before failing decides what is safe:
    // loaded -> an ioctl write is fine; still pending -> it must be refused (the pending
    // sync copy would overwrite it at the next run).
    let loaded = regs.get_regs_ioctl().unwrap().rax == written;
    let mut r = regs.get_regs_ioctl().unwrap();
    r.rdx = 0x99;
    let result = regs.set_regs_ioctl(&r);
    assert_eq!(
        result.is_ok(),
        loaded,
        "loaded by the failed run: {loaded}, ioctl write: {result:?}"
    );
    if let Err(e) = result {
        assert!(matches!(e, Error::MixedWrite { .. }), "{e}");
    }
    drop(regs);
    drop(g.vm);
}

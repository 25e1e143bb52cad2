// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `RegisterPage` on ordinary memory: mapping, raw wrapping, typed accessors, dirty bits.
#![cfg(target_arch = "x86_64")]

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use mshv_regpage::layout::{offsets, REGISTER_PAGE_MAP_SIZE};
use mshv_regpage::{
    Error, Gpr, ReadOnlyRegister, RegisterClass, RegisterPage, Segment, SegmentAttributes,
    SegmentRegister, Xmm,
};

/// A 4096-byte aligned buffer standing in for the hypervisor's page.
#[repr(C, align(4096))]
struct Backing([u8; REGISTER_PAGE_MAP_SIZE]);

fn backing() -> Box<Backing> {
    Box::new(Backing([0; REGISTER_PAGE_MAP_SIZE]))
}

fn wrap(buf: &mut Backing) -> RegisterPage {
    let ptr = NonNull::new(buf.0.as_mut_ptr()).unwrap();
    // SAFETY: the buffer outlives the page in every test, is 4096-byte aligned and is only
    // inspected after the page is dropped or through raw reads between page calls.
    unsafe { RegisterPage::from_raw(ptr) }.unwrap()
}

fn read_u64(buf: *const Backing, off: usize) -> u64 {
    // SAFETY: `off + 8 <= 4096`; the buffer is alive.
    unsafe { buf.cast::<u8>().add(off).cast::<u64>().read_volatile() }
}

fn write_u64(buf: *mut Backing, off: usize, v: u64) {
    // SAFETY: `off + 8 <= 4096`; the buffer is alive.
    unsafe { buf.cast::<u8>().add(off).cast::<u64>().write_volatile(v) }
}

fn dirty_of(buf: *const Backing) -> u32 {
    // SAFETY: offset 4 holds the 4-byte dirty field.
    unsafe {
        buf.cast::<u8>()
            .add(offsets::DIRTY)
            .cast::<u32>()
            .read_volatile()
    }
}

#[test]
fn every_setter_sets_exactly_its_class_bit() {
    let mut buf = backing();
    let raw: *mut Backing = &mut *buf;
    let mut page = wrap(&mut buf);
    assert!(page.dirty().is_empty());

    page.set_gpr(Gpr::Rbx, 0x1111);
    assert_eq!(dirty_of(raw), RegisterClass::General.mask());
    assert_eq!(read_u64(raw, offsets::GP + 3 * 8), 0x1111, "rbx is gp[3]");

    page.set_rip(0x2222);
    assert_eq!(dirty_of(raw), 0b11);
    assert_eq!(read_u64(raw, offsets::RIP), 0x2222);

    page.set_xmm(Xmm::Xmm5, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
    assert_eq!(dirty_of(raw), 0b111);
    assert_eq!(read_u64(raw, offsets::XMM + 5 * 16), 0xfedc_ba98_7654_3210);
    assert_eq!(
        read_u64(raw, offsets::XMM + 5 * 16 + 8),
        0x0123_4567_89ab_cdef
    );

    let cs = SegmentRegister {
        base: 0x10,
        limit: 0xffff_ffff,
        selector: 0x33,
        attributes: SegmentAttributes::from_bits(0xa0fb),
    };
    page.set_segment(Segment::Cs, cs);
    assert_eq!(dirty_of(raw), 0b1111);
    assert_eq!(read_u64(raw, offsets::SEGMENTS + 16), 0x10);
    assert_eq!(
        read_u64(raw, offsets::SEGMENTS + 16 + 8),
        0xffff_ffff | (0x33 << 32) | (0xa0fb << 48)
    );

    page.set_rflags(0x202);
    assert_eq!(dirty_of(raw), 0b1_1111);
    assert_eq!(read_u64(raw, offsets::RFLAGS), 0x202);

    // Getters read back what was written.
    assert_eq!(page.gpr(Gpr::Rbx), 0x1111);
    assert_eq!(page.rip(), 0x2222);
    assert_eq!(page.rflags(), 0x202);
    assert_eq!(
        page.xmm(Xmm::Xmm5),
        0x0123_4567_89ab_cdef_fedc_ba98_7654_3210
    );
    assert_eq!(page.segment(Segment::Cs), cs);
    drop(page);
}

#[test]
fn getters_see_hypervisor_writes_between_calls() {
    let mut buf = backing();
    let raw: *mut Backing = &mut *buf;
    let page = wrap(&mut buf);
    assert!(!page.is_valid());
    // "The hypervisor" fills the page behind the object's back.
    // SAFETY: header bytes of the live buffer.
    unsafe {
        raw.cast::<u16>().write_volatile(1);
        raw.cast::<u8>().add(offsets::ISVALID).write_volatile(1);
    }
    for i in 0..Gpr::ALL.len() {
        write_u64(raw, offsets::GP + 8 * i, 0x100 + i as u64);
    }
    let ro = [
        (offsets::CR0, ReadOnlyRegister::Cr0),
        (offsets::CR3, ReadOnlyRegister::Cr3),
        (offsets::CR4, ReadOnlyRegister::Cr4),
        (offsets::CR8, ReadOnlyRegister::Cr8),
        (offsets::EFER, ReadOnlyRegister::Efer),
        (offsets::DR7, ReadOnlyRegister::Dr7),
        (
            offsets::PENDING_INTERRUPTION,
            ReadOnlyRegister::PendingInterruption,
        ),
        (offsets::INTERRUPT_STATE, ReadOnlyRegister::InterruptState),
    ];
    for (k, (off, _)) in ro.iter().enumerate() {
        write_u64(raw, *off, 0xc0 + k as u64);
    }
    write_u64(raw, offsets::XFEM, 7);
    write_u64(raw, offsets::INSTRUCTION_EMULATION_HINTS, 9);
    assert!(page.is_valid() && page.is_usable());
    assert_eq!(page.version(), 1);
    for (i, g) in Gpr::ALL.iter().enumerate() {
        assert_eq!(page.gpr(*g), 0x100 + i as u64, "{g:?}");
    }
    for (k, (_, r)) in ro.iter().enumerate() {
        assert_eq!(page.read_only(*r), 0xc0 + k as u64, "{r:?}");
    }
    assert_eq!(
        [page.cr0(), page.cr3(), page.cr4(), page.cr8()],
        [0xc0, 0xc1, 0xc2, 0xc3]
    );
    assert_eq!([page.efer(), page.dr7()], [0xc4, 0xc5]);
    assert_eq!(
        [page.pending_interruption(), page.interrupt_state()],
        [0xc6, 0xc7]
    );
    assert_eq!([page.xfem(), page.instruction_emulation_hints()], [7, 9]);
    // Unknown version: valid but not usable.
    // SAFETY: header of the live buffer.
    unsafe { raw.cast::<u16>().write_volatile(2) };
    assert!(page.is_valid() && !page.is_usable());
    // Getters never dirty anything.
    assert_eq!(dirty_of(raw), 0);
    drop(page);
}

#[test]
fn bulk_conversions() {
    let mut buf = backing();
    let mut page = wrap(&mut buf);
    let regs = mshv_bindings::StandardRegisters {
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
    page.set_standard_registers(&regs);
    assert_eq!(page.dirty().bits(), 0b1_0011);
    assert_eq!(page.gpr(Gpr::Rbx), 2);
    assert_eq!(page.gpr(Gpr::Rcx), 3);
    assert_eq!(page.gpr(Gpr::Rsp), 7);
    let back = page.standard_registers();
    assert_eq!(back, regs);

    let mut sregs = mshv_bindings::SpecialRegisters::default();
    sregs.ss.selector = 0x2b;
    sregs.ss.dpl = 3;
    sregs.ss.present = 1;
    sregs.cs.l = 1;
    sregs.cr2 = 0x999;
    page.set_special_segments(&sregs);
    assert_eq!(page.dirty().bits(), 0b1_1011);
    assert_eq!(page.segment(Segment::Ss).selector, 0x2b);
    assert_eq!(page.segment(Segment::Ss).attributes.dpl, 3);
    assert!(page.segment(Segment::Cs).attributes.long);
    let mut out = mshv_bindings::SpecialRegisters {
        cr2: 0x777,
        ..Default::default()
    };
    page.read_special_registers(&mut out);
    assert_eq!(out.ss.selector, 0x2b);
    assert_eq!(out.cs.l, 1);
    assert_eq!(out.cr2, 0x777, "CR2 is not on the page and stays untouched");
    drop(page);
}

#[test]
fn from_raw_rejects_misaligned_pointers() {
    let mut buf = backing();
    let ptr = NonNull::new(buf.0[4..].as_mut_ptr()).unwrap();
    // SAFETY: the call fails before anything is accessed.
    let err = unsafe { RegisterPage::from_raw(ptr) }.unwrap_err();
    assert!(matches!(err, Error::Misaligned { align: 8, .. }), "{err}");
}

fn memfd(len: i64) -> OwnedFd {
    // SAFETY: plain syscalls with valid arguments; the fd is checked and owned.
    unsafe {
        let fd = libc::memfd_create(c"regpage-test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        assert_eq!(libc::ftruncate(fd, len), 0);
        OwnedFd::from_raw_fd(fd)
    }
}

fn is_mapped(addr: *const u8) -> bool {
    let mut vec = [0u8; 1];
    // SAFETY: mincore only inspects the page tables; ENOMEM means "not mapped".
    unsafe { libc::mincore(addr as *mut _, REGISTER_PAGE_MAP_SIZE, vec.as_mut_ptr()) == 0 }
}

#[test]
fn map_fd_shares_the_page_and_unmaps_on_drop() {
    let fd = memfd(REGISTER_PAGE_MAP_SIZE as i64);
    // SAFETY: a 4096-byte memfd that is never truncated while mapped.
    let mut a = unsafe { RegisterPage::map_fd(fd.as_fd()) }
        .unwrap()
        .unwrap();
    // SAFETY: as above.
    let b = unsafe { RegisterPage::map_fd(fd.as_fd()) }
        .unwrap()
        .unwrap();
    assert_eq!(a.as_ptr() as usize % REGISTER_PAGE_MAP_SIZE, 0);
    a.set_gpr(Gpr::R15, 0x5151);
    assert_eq!(
        b.gpr(Gpr::R15),
        0x5151,
        "MAP_SHARED: both mappings see the write"
    );
    assert!(b.dirty().contains(RegisterClass::General));
    let addr = a.as_ptr();
    assert!(is_mapped(addr));
    drop(a);
    assert!(!is_mapped(addr), "drop must munmap");
    drop(b);
}

#[test]
fn map_fd_enodev_means_no_register_page() {
    // SAFETY: plain syscall; the fd is checked and owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned here.
    let r = unsafe { OwnedFd::from_raw_fd(fd) };
    // An eventfd (read/write) has no mmap implementation: the kernel answers ENODEV, like
    // MSHV for a partition without register pages.
    // SAFETY: the mmap fails; nothing is mapped.
    let page = unsafe { RegisterPage::map_fd(r.as_fd()) }.unwrap();
    assert!(page.is_none());
}

#[test]
fn map_fd_other_errors_are_reported_with_source() {
    let path = std::env::temp_dir().join(format!("regpage-ro-{}", std::process::id()));
    std::fs::write(&path, [0u8; REGISTER_PAGE_MAP_SIZE]).unwrap();
    let file = std::fs::File::open(&path).unwrap(); // read-only
                                                    // SAFETY: mapping a read-only fd read/write fails with EACCES; nothing is mapped.
    let err = unsafe { RegisterPage::map_fd(file.as_fd()) }.unwrap_err();
    std::fs::remove_file(&path).unwrap();
    let Error::Map(source) = &err else {
        panic!("unexpected error {err}");
    };
    assert_eq!(source.raw_os_error(), Some(libc::EACCES));
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn register_page_is_send_but_not_sync() {
    fn assert_send<T: Send>() {}
    assert_send::<RegisterPage>();

    // Compile-time "not Sync" check: the call below is ambiguous (does not compile) if
    // `RegisterPage: Sync`, because both impls would apply.
    trait AmbiguousIfSync<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSync<()> for T {}
    #[allow(dead_code)]
    struct Invalid;
    impl<T: ?Sized + Sync> AmbiguousIfSync<Invalid> for T {}
    <RegisterPage as AmbiguousIfSync<_>>::check();
}

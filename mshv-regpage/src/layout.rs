// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Byte-exact mirror of the hypervisor's `struct hv_vp_register_page` (x86_64).
//!
//! The layout is taken from the design note (`hvhdk.h` after commit 48fcc895403c, which added
//! `reserved[8]` at offset 152). Every offset is checked at compile time below, and
//! `tests/layout.rs` compares each field with `mshv_bindings::hv_vp_register_page`.
//!
//! This module only describes memory; it never creates references into a live page. All
//! accesses go through raw pointers and volatile reads/writes in [`crate::RegisterPage`].

use core::mem::{offset_of, size_of};

/// `HV_VP_REGISTER_PAGE_VERSION_1`: the only page version this crate understands.
pub const REGISTER_PAGE_VERSION_1: u16 = 1;

/// Size of the mapping that holds the register page (one 4 KiB hypervisor page).
pub const REGISTER_PAGE_MAP_SIZE: usize = 4096;

/// Number of bytes of the page the hypervisor actually defines.
pub const REGISTER_PAGE_USED_SIZE: usize = 696;

/// Offset passed to `mmap` on a vCPU fd to map the register page
/// (`MSHV_VP_MMAP_OFFSET_REGISTERS` = 0, in pages).
pub const MSHV_VP_MMAP_OFFSET_REGISTERS: libc::off_t = 0;

/// One XMM register as stored on the page: low quadword first.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawXmm {
    /// Bits 0..64.
    pub low: u64,
    /// Bits 64..128.
    pub high: u64,
}

/// One segment register as stored on the page (`hv_x64_segment_register`).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawSegment {
    /// Segment base address.
    pub base: u64,
    /// Segment limit (byte granular, already expanded).
    pub limit: u32,
    /// Segment selector.
    pub selector: u16,
    /// Packed attribute bits (see [`crate::SegmentAttributes`]).
    pub attributes: u16,
}

/// The register page, field for field. 696 bytes, alignment 1 (`packed`).
///
/// The field order and sizes are those of `hv_vp_register_page` with the anonymous unions
/// flattened to their array views (`gp[16]`, `xmm[6]`, `segments[6]`).
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct RawRegisterPage {
    /// Page format version; [`REGISTER_PAGE_VERSION_1`].
    pub version: u16,
    /// Non-zero when the page contents are valid. Changes during the VM's life.
    pub isvalid: u8,
    /// Reserved, must be zero.
    pub rsvdz: u8,
    /// Dirty class bits, see [`crate::RegisterClass`].
    pub dirty: u32,
    /// General purpose registers in x86 encoding order (rax rcx rdx rbx rsp rbp rsi rdi r8..r15).
    pub gp: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags register.
    pub rflags: u64,
    /// Reserved (missing from older headers; see the module docs).
    pub reserved: [u8; 8],
    /// xmm0..xmm5.
    pub xmm: [RawXmm; 6],
    /// es cs ss ds fs gs.
    pub segments: [RawSegment; 6],
    /// CR0 (read-only via the page).
    pub cr0: u64,
    /// CR3 (read-only via the page).
    pub cr3: u64,
    /// CR4 (read-only via the page).
    pub cr4: u64,
    /// CR8 (read-only via the page).
    pub cr8: u64,
    /// EFER (read-only via the page).
    pub efer: u64,
    /// DR7 (read-only via the page).
    pub dr7: u64,
    /// `hv_x64_pending_interruption_register` (read-only via the page).
    pub pending_interruption: u64,
    /// `hv_x64_interrupt_state_register` (read-only via the page).
    pub interrupt_state: u64,
    /// Instruction emulation hints.
    pub instruction_emulation_hints: u64,
    /// XFEM.
    pub xfem: u64,
    /// Reserved.
    pub reserved1: [u8; 256],
    /// Interrupt vectors used by the kernel scheduler (count + 7 vectors).
    pub interrupt_vectors: u64,
}

/// Byte offsets of every field, as listed in the design note.
pub mod offsets {
    /// `version`.
    pub const VERSION: usize = 0;
    /// `isvalid`.
    pub const ISVALID: usize = 2;
    /// `rsvdz`.
    pub const RSVDZ: usize = 3;
    /// `dirty`.
    pub const DIRTY: usize = 4;
    /// `gp[0]` (rax).
    pub const GP: usize = 8;
    /// `rip`.
    pub const RIP: usize = 136;
    /// `rflags`.
    pub const RFLAGS: usize = 144;
    /// `reserved[8]`.
    pub const RESERVED: usize = 152;
    /// `xmm[0]`.
    pub const XMM: usize = 160;
    /// `segments[0]` (es).
    pub const SEGMENTS: usize = 256;
    /// `cr0`.
    pub const CR0: usize = 352;
    /// `cr3`.
    pub const CR3: usize = 360;
    /// `cr4`.
    pub const CR4: usize = 368;
    /// `cr8`.
    pub const CR8: usize = 376;
    /// `efer`.
    pub const EFER: usize = 384;
    /// `dr7`.
    pub const DR7: usize = 392;
    /// `pending_interruption`.
    pub const PENDING_INTERRUPTION: usize = 400;
    /// `interrupt_state`.
    pub const INTERRUPT_STATE: usize = 408;
    /// `instruction_emulation_hints`.
    pub const INSTRUCTION_EMULATION_HINTS: usize = 416;
    /// `xfem`.
    pub const XFEM: usize = 424;
    /// `reserved1[256]`.
    pub const RESERVED1: usize = 432;
    /// `interrupt_vectors`.
    pub const INTERRUPT_VECTORS: usize = 688;
}

// Compile-time layout checks: a wrong offset fails the build, not a test.
const _: () = {
    assert!(size_of::<RawRegisterPage>() == REGISTER_PAGE_USED_SIZE);
    assert!(REGISTER_PAGE_USED_SIZE <= REGISTER_PAGE_MAP_SIZE);
    assert!(size_of::<RawXmm>() == 16);
    assert!(size_of::<RawSegment>() == 16);
    assert!(offset_of!(RawXmm, low) == 0);
    assert!(offset_of!(RawXmm, high) == 8);
    assert!(offset_of!(RawSegment, base) == 0);
    assert!(offset_of!(RawSegment, limit) == 8);
    assert!(offset_of!(RawSegment, selector) == 12);
    assert!(offset_of!(RawSegment, attributes) == 14);
    assert!(offset_of!(RawRegisterPage, version) == offsets::VERSION);
    assert!(offset_of!(RawRegisterPage, isvalid) == offsets::ISVALID);
    assert!(offset_of!(RawRegisterPage, rsvdz) == offsets::RSVDZ);
    assert!(offset_of!(RawRegisterPage, dirty) == offsets::DIRTY);
    assert!(offset_of!(RawRegisterPage, gp) == offsets::GP);
    assert!(size_of::<[u64; 16]>() == offsets::RIP - offsets::GP);
    assert!(offset_of!(RawRegisterPage, rip) == offsets::RIP);
    assert!(offset_of!(RawRegisterPage, rflags) == offsets::RFLAGS);
    assert!(offset_of!(RawRegisterPage, reserved) == offsets::RESERVED);
    assert!(offset_of!(RawRegisterPage, xmm) == offsets::XMM);
    assert!(offset_of!(RawRegisterPage, segments) == offsets::SEGMENTS);
    assert!(offset_of!(RawRegisterPage, cr0) == offsets::CR0);
    assert!(offset_of!(RawRegisterPage, cr3) == offsets::CR3);
    assert!(offset_of!(RawRegisterPage, cr4) == offsets::CR4);
    assert!(offset_of!(RawRegisterPage, cr8) == offsets::CR8);
    assert!(offset_of!(RawRegisterPage, efer) == offsets::EFER);
    assert!(offset_of!(RawRegisterPage, dr7) == offsets::DR7);
    assert!(offset_of!(RawRegisterPage, pending_interruption) == offsets::PENDING_INTERRUPTION);
    assert!(offset_of!(RawRegisterPage, interrupt_state) == offsets::INTERRUPT_STATE);
    assert!(
        offset_of!(RawRegisterPage, instruction_emulation_hints)
            == offsets::INSTRUCTION_EMULATION_HINTS
    );
    assert!(offset_of!(RawRegisterPage, xfem) == offsets::XFEM);
    assert!(offset_of!(RawRegisterPage, reserved1) == offsets::RESERVED1);
    assert!(offset_of!(RawRegisterPage, interrupt_vectors) == offsets::INTERRUPT_VECTORS);
    // Every multi-byte field sits at its natural alignment relative to the page start, so
    // volatile accesses through an 8-byte aligned base pointer are aligned accesses.
    assert!(offsets::GP % 8 == 0 && offsets::XMM % 8 == 0 && offsets::SEGMENTS % 8 == 0);
    assert!(offsets::CR0 % 8 == 0 && offsets::INTERRUPT_VECTORS % 8 == 0);
};

/// Alignment the base pointer of a page must have so that all field accesses are aligned.
pub const REQUIRED_BASE_ALIGN: usize = 8;

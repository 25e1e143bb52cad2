// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Typed register names and values held by the register page.

use mshv_bindings as hv;

/// A general purpose register, numbered in x86 encoding order (the page's `gp[]` order).
///
/// Note that this is *not* the order of `kvm_regs` or `StandardRegisters` (rax rbx rcx rdx ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Gpr {
    /// rax (0).
    Rax = 0,
    /// rcx (1).
    Rcx = 1,
    /// rdx (2).
    Rdx = 2,
    /// rbx (3).
    Rbx = 3,
    /// rsp (4).
    Rsp = 4,
    /// rbp (5).
    Rbp = 5,
    /// rsi (6).
    Rsi = 6,
    /// rdi (7).
    Rdi = 7,
    /// r8.
    R8 = 8,
    /// r9.
    R9 = 9,
    /// r10.
    R10 = 10,
    /// r11.
    R11 = 11,
    /// r12.
    R12 = 12,
    /// r13.
    R13 = 13,
    /// r14.
    R14 = 14,
    /// r15.
    R15 = 15,
}

impl Gpr {
    /// All 16 registers in encoding order.
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    /// The x86 register number (index into the page's `gp[]`).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The register with encoding `index`, if `index < 16`.
    pub fn from_index(index: usize) -> Option<Gpr> {
        Gpr::ALL.get(index).copied()
    }

    /// The hypercall name (`HV_X64_REGISTER_RAX + index`).
    pub const fn hv_name(self) -> hv::hv_register_name {
        hv::hv_register_name_HV_X64_REGISTER_RAX + self as u32
    }
}

/// A segment register held by the page, in page order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Segment {
    /// es (0).
    Es = 0,
    /// cs (1).
    Cs = 1,
    /// ss (2).
    Ss = 2,
    /// ds (3).
    Ds = 3,
    /// fs (4).
    Fs = 4,
    /// gs (5).
    Gs = 5,
}

impl Segment {
    /// All six, in page order.
    pub const ALL: [Segment; 6] = [
        Segment::Es,
        Segment::Cs,
        Segment::Ss,
        Segment::Ds,
        Segment::Fs,
        Segment::Gs,
    ];

    /// Index into the page's `segments[]`.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The hypercall name (`HV_X64_REGISTER_ES + index`).
    pub const fn hv_name(self) -> hv::hv_register_name {
        hv::hv_register_name_HV_X64_REGISTER_ES + self as u32
    }
}

/// One of xmm0..xmm5 (the XMM registers the page holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Xmm {
    /// xmm0.
    Xmm0 = 0,
    /// xmm1.
    Xmm1 = 1,
    /// xmm2.
    Xmm2 = 2,
    /// xmm3.
    Xmm3 = 3,
    /// xmm4.
    Xmm4 = 4,
    /// xmm5.
    Xmm5 = 5,
}

impl Xmm {
    /// All six, in page order.
    pub const ALL: [Xmm; 6] = [
        Xmm::Xmm0,
        Xmm::Xmm1,
        Xmm::Xmm2,
        Xmm::Xmm3,
        Xmm::Xmm4,
        Xmm::Xmm5,
    ];

    /// Index into the page's `xmm[]`.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The hypercall name (`HV_X64_REGISTER_XMM0 + index`).
    pub const fn hv_name(self) -> hv::hv_register_name {
        hv::hv_register_name_HV_X64_REGISTER_XMM0 + self as u32
    }
}

/// A register the page mirrors but that may only be *read* through it.
///
/// Writing one of these needs the set-registers hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReadOnlyRegister {
    /// CR0.
    Cr0,
    /// CR3.
    Cr3,
    /// CR4.
    Cr4,
    /// CR8.
    Cr8,
    /// EFER.
    Efer,
    /// DR7.
    Dr7,
    /// `HV_REGISTER_PENDING_INTERRUPTION`.
    PendingInterruption,
    /// `HV_REGISTER_INTERRUPT_STATE`.
    InterruptState,
}

impl ReadOnlyRegister {
    /// All eight, in page order.
    pub const ALL: [ReadOnlyRegister; 8] = [
        ReadOnlyRegister::Cr0,
        ReadOnlyRegister::Cr3,
        ReadOnlyRegister::Cr4,
        ReadOnlyRegister::Cr8,
        ReadOnlyRegister::Efer,
        ReadOnlyRegister::Dr7,
        ReadOnlyRegister::PendingInterruption,
        ReadOnlyRegister::InterruptState,
    ];

    /// The hypercall name of the register.
    pub const fn hv_name(self) -> hv::hv_register_name {
        match self {
            ReadOnlyRegister::Cr0 => hv::hv_register_name_HV_X64_REGISTER_CR0,
            ReadOnlyRegister::Cr3 => hv::hv_register_name_HV_X64_REGISTER_CR3,
            ReadOnlyRegister::Cr4 => hv::hv_register_name_HV_X64_REGISTER_CR4,
            ReadOnlyRegister::Cr8 => hv::hv_register_name_HV_X64_REGISTER_CR8,
            ReadOnlyRegister::Efer => hv::hv_register_name_HV_X64_REGISTER_EFER,
            ReadOnlyRegister::Dr7 => hv::hv_register_name_HV_X64_REGISTER_DR7,
            ReadOnlyRegister::PendingInterruption => {
                hv::hv_register_name_HV_REGISTER_PENDING_INTERRUPTION
            }
            ReadOnlyRegister::InterruptState => hv::hv_register_name_HV_REGISTER_INTERRUPT_STATE,
        }
    }

    /// Position in [`ReadOnlyRegister::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Decoded segment attribute bits (`hv_x64_segment_register::attributes`).
///
/// Bits: type 0-3, S 4, DPL 5-6, P 7, reserved 8-11, AVL 12, L 13, D/B 14, G 15.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SegmentAttributes {
    /// Segment type (4 bits).
    pub type_: u8,
    /// S: code/data (true) or system (false) segment.
    pub s: bool,
    /// Descriptor privilege level (2 bits).
    pub dpl: u8,
    /// P: present.
    pub present: bool,
    /// Bits 8-11, reserved; kept so that decoding and encoding round-trip.
    pub reserved: u8,
    /// AVL: available for software.
    pub avl: bool,
    /// L: 64-bit code segment.
    pub long: bool,
    /// D/B: default operation size / big.
    pub db: bool,
    /// G: granularity.
    pub granularity: bool,
}

impl SegmentAttributes {
    /// Decodes the packed attribute word. Every `u16` decodes.
    pub const fn from_bits(bits: u16) -> Self {
        SegmentAttributes {
            type_: (bits & 0xf) as u8,
            s: bits & (1 << 4) != 0,
            dpl: ((bits >> 5) & 0x3) as u8,
            present: bits & (1 << 7) != 0,
            reserved: ((bits >> 8) & 0xf) as u8,
            avl: bits & (1 << 12) != 0,
            long: bits & (1 << 13) != 0,
            db: bits & (1 << 14) != 0,
            granularity: bits & (1 << 15) != 0,
        }
    }

    /// Encodes into the packed attribute word. Out-of-range `type_`, `dpl` and `reserved`
    /// values are truncated to their field widths.
    pub const fn to_bits(self) -> u16 {
        (self.type_ as u16 & 0xf)
            | ((self.s as u16) << 4)
            | ((self.dpl as u16 & 0x3) << 5)
            | ((self.present as u16) << 7)
            | ((self.reserved as u16 & 0xf) << 8)
            | ((self.avl as u16) << 12)
            | ((self.long as u16) << 13)
            | ((self.db as u16) << 14)
            | ((self.granularity as u16) << 15)
    }
}

/// A segment register: base, limit, selector and decoded attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SegmentRegister {
    /// Base address.
    pub base: u64,
    /// Limit.
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Attributes.
    pub attributes: SegmentAttributes,
}

impl From<SegmentRegister> for hv::SegmentRegister {
    fn from(seg: SegmentRegister) -> Self {
        let a = seg.attributes;
        hv::SegmentRegister {
            base: seg.base,
            limit: seg.limit,
            selector: seg.selector,
            type_: a.type_,
            present: a.present as u8,
            dpl: a.dpl,
            db: a.db as u8,
            s: a.s as u8,
            l: a.long as u8,
            g: a.granularity as u8,
            avl: a.avl as u8,
            // Same convention as mshv-bindings' own conversion from the hypervisor format.
            unusable: 0,
            padding: 0,
        }
    }
}

impl From<hv::SegmentRegister> for SegmentRegister {
    fn from(seg: hv::SegmentRegister) -> Self {
        SegmentRegister {
            base: seg.base,
            limit: seg.limit,
            selector: seg.selector,
            attributes: SegmentAttributes {
                type_: seg.type_ & 0xf,
                s: seg.s != 0,
                dpl: seg.dpl & 0x3,
                present: seg.present != 0,
                reserved: 0,
                avl: seg.avl != 0,
                long: seg.l != 0,
                db: seg.db != 0,
                granularity: seg.g != 0,
            },
        }
    }
}

impl From<SegmentRegister> for hv::hv_x64_segment_register {
    fn from(seg: SegmentRegister) -> Self {
        hv::hv_x64_segment_register {
            base: seg.base,
            limit: seg.limit,
            selector: seg.selector,
            __bindgen_anon_1: hv::hv_x64_segment_register__bindgen_ty_1 {
                attributes: seg.attributes.to_bits(),
            },
        }
    }
}

impl From<hv::hv_x64_segment_register> for SegmentRegister {
    fn from(seg: hv::hv_x64_segment_register) -> Self {
        // SAFETY: both union members are plain 16-bit integers/bitfields; every bit pattern
        // is a valid `u16`.
        let bits = unsafe { seg.__bindgen_anon_1.attributes };
        SegmentRegister {
            base: seg.base,
            limit: seg.limit,
            selector: seg.selector,
            attributes: SegmentAttributes::from_bits(bits),
        }
    }
}

/// Every register the page holds, as plain values (a snapshot of the page's contents).
///
/// Used for bulk copies, by the simulated hypervisor as its vCPU state and by the test
/// model in `sim` (feature `sim`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PageRegisters {
    /// General purpose registers, indexed by [`Gpr::index`].
    pub gp: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// xmm0..xmm5, indexed by [`Xmm::index`].
    pub xmm: [u128; 6],
    /// Segment registers, indexed by [`Segment::index`].
    pub segments: [SegmentRegister; 6],
    /// Read-only registers, indexed by [`ReadOnlyRegister::index`].
    pub read_only: [u64; 8],
}

impl PageRegisters {
    /// Value of a general purpose register.
    pub fn gpr(&self, reg: Gpr) -> u64 {
        self.gp[reg.index()]
    }

    /// Sets a general purpose register.
    pub fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.gp[reg.index()] = value;
    }

    /// Value of a segment register.
    pub fn segment(&self, seg: Segment) -> SegmentRegister {
        self.segments[seg.index()]
    }

    /// Value of an XMM register.
    pub fn xmm(&self, reg: Xmm) -> u128 {
        self.xmm[reg.index()]
    }

    /// Value of a read-only register.
    pub fn read_only(&self, reg: ReadOnlyRegister) -> u64 {
        self.read_only[reg.index()]
    }

    /// Copies the registers of `class` from `other` into `self`.
    pub fn copy_class_from(&mut self, other: &PageRegisters, class: crate::RegisterClass) {
        match class {
            crate::RegisterClass::General => self.gp = other.gp,
            crate::RegisterClass::Ip => self.rip = other.rip,
            crate::RegisterClass::Xmm => self.xmm = other.xmm,
            crate::RegisterClass::Segment => self.segments = other.segments,
            crate::RegisterClass::Flags => self.rflags = other.rflags,
        }
    }

    /// The general purpose registers, RIP and RFLAGS as `mshv_bindings::StandardRegisters`.
    pub fn to_standard(&self) -> hv::StandardRegisters {
        let g = |r: Gpr| self.gpr(r);
        hv::StandardRegisters {
            rax: g(Gpr::Rax),
            rbx: g(Gpr::Rbx),
            rcx: g(Gpr::Rcx),
            rdx: g(Gpr::Rdx),
            rsi: g(Gpr::Rsi),
            rdi: g(Gpr::Rdi),
            rsp: g(Gpr::Rsp),
            rbp: g(Gpr::Rbp),
            r8: g(Gpr::R8),
            r9: g(Gpr::R9),
            r10: g(Gpr::R10),
            r11: g(Gpr::R11),
            r12: g(Gpr::R12),
            r13: g(Gpr::R13),
            r14: g(Gpr::R14),
            r15: g(Gpr::R15),
            rip: self.rip,
            rflags: self.rflags,
        }
    }

    /// Takes the general purpose registers, RIP and RFLAGS from `regs`.
    pub fn set_standard(&mut self, regs: &hv::StandardRegisters) {
        self.gp = standard_to_gp(regs);
        self.rip = regs.rip;
        self.rflags = regs.rflags;
    }

    /// Fills the fields of `sregs` the page holds: the six segment registers, CR0, CR3,
    /// CR4, CR8 and EFER. TR, LDTR, GDTR, IDTR, CR2, APIC_BASE and the interrupt bitmap
    /// are left untouched (they are not on the page).
    pub fn fill_special(&self, sregs: &mut hv::SpecialRegisters) {
        sregs.es = self.segment(Segment::Es).into();
        sregs.cs = self.segment(Segment::Cs).into();
        sregs.ss = self.segment(Segment::Ss).into();
        sregs.ds = self.segment(Segment::Ds).into();
        sregs.fs = self.segment(Segment::Fs).into();
        sregs.gs = self.segment(Segment::Gs).into();
        sregs.cr0 = self.read_only(ReadOnlyRegister::Cr0);
        sregs.cr3 = self.read_only(ReadOnlyRegister::Cr3);
        sregs.cr4 = self.read_only(ReadOnlyRegister::Cr4);
        sregs.cr8 = self.read_only(ReadOnlyRegister::Cr8);
        sregs.efer = self.read_only(ReadOnlyRegister::Efer);
    }
}

/// The 16 general purpose registers of `regs` in x86 encoding order.
pub fn standard_to_gp(regs: &hv::StandardRegisters) -> [u64; 16] {
    [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ]
}

/// The six segment registers of `sregs` in page order (es cs ss ds fs gs).
pub fn special_segments(sregs: &hv::SpecialRegisters) -> [SegmentRegister; 6] {
    [
        sregs.es.into(),
        sregs.cs.into(),
        sregs.ss.into(),
        sregs.ds.into(),
        sregs.fs.into(),
        sregs.gs.into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpr_names_follow_encoding_order() {
        assert_eq!(Gpr::Rax.hv_name(), hv::hv_register_name_HV_X64_REGISTER_RAX);
        assert_eq!(Gpr::Rcx.hv_name(), hv::hv_register_name_HV_X64_REGISTER_RCX);
        assert_eq!(Gpr::Rdx.hv_name(), hv::hv_register_name_HV_X64_REGISTER_RDX);
        assert_eq!(Gpr::Rbx.hv_name(), hv::hv_register_name_HV_X64_REGISTER_RBX);
        assert_eq!(Gpr::Rsp.hv_name(), hv::hv_register_name_HV_X64_REGISTER_RSP);
        assert_eq!(Gpr::Rbp.hv_name(), hv::hv_register_name_HV_X64_REGISTER_RBP);
        assert_eq!(Gpr::Rsi.hv_name(), hv::hv_register_name_HV_X64_REGISTER_RSI);
        assert_eq!(Gpr::Rdi.hv_name(), hv::hv_register_name_HV_X64_REGISTER_RDI);
        assert_eq!(Gpr::R8.hv_name(), hv::hv_register_name_HV_X64_REGISTER_R8);
        assert_eq!(Gpr::R15.hv_name(), hv::hv_register_name_HV_X64_REGISTER_R15);
        for (i, g) in Gpr::ALL.iter().enumerate() {
            assert_eq!(g.index(), i);
            assert_eq!(Gpr::from_index(i), Some(*g));
        }
        assert_eq!(Gpr::from_index(16), None);
    }

    #[test]
    fn segment_and_xmm_names() {
        assert_eq!(
            Segment::Es.hv_name(),
            hv::hv_register_name_HV_X64_REGISTER_ES
        );
        assert_eq!(
            Segment::Cs.hv_name(),
            hv::hv_register_name_HV_X64_REGISTER_CS
        );
        assert_eq!(
            Segment::Ss.hv_name(),
            hv::hv_register_name_HV_X64_REGISTER_SS
        );
        assert_eq!(
            Segment::Ds.hv_name(),
            hv::hv_register_name_HV_X64_REGISTER_DS
        );
        assert_eq!(
            Segment::Fs.hv_name(),
            hv::hv_register_name_HV_X64_REGISTER_FS
        );
        assert_eq!(
            Segment::Gs.hv_name(),
            hv::hv_register_name_HV_X64_REGISTER_GS
        );
        assert_eq!(
            Xmm::Xmm5.hv_name(),
            hv::hv_register_name_HV_X64_REGISTER_XMM5
        );
    }

    #[test]
    fn standard_registers_round_trip_in_encoding_order() {
        let mut p = PageRegisters::default();
        for (i, g) in Gpr::ALL.iter().enumerate() {
            p.set_gpr(*g, 0x100 + i as u64);
        }
        p.rip = 0x1000;
        p.rflags = 0x2;
        let s = p.to_standard();
        assert_eq!((s.rax, s.rcx, s.rdx, s.rbx), (0x100, 0x101, 0x102, 0x103));
        assert_eq!((s.rsp, s.rbp, s.rsi, s.rdi), (0x104, 0x105, 0x106, 0x107));
        assert_eq!((s.r8, s.r15, s.rip, s.rflags), (0x108, 0x10f, 0x1000, 0x2));
        let mut q = PageRegisters::default();
        q.set_standard(&s);
        assert_eq!(q, p);
    }

    #[test]
    fn special_registers_carry_page_fields_only() {
        let mut p = PageRegisters::default();
        for (i, s) in Segment::ALL.iter().enumerate() {
            p.segments[s.index()] = SegmentRegister {
                base: i as u64,
                limit: 0xffff,
                selector: (i as u16) << 3,
                attributes: SegmentAttributes::from_bits(0xc093),
            };
        }
        p.read_only = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut sregs = hv::SpecialRegisters {
            cr2: 0x55,
            ..Default::default()
        };
        p.fill_special(&mut sregs);
        assert_eq!(sregs.cs.selector, 1 << 3);
        assert_eq!(sregs.gs.base, 5);
        assert_eq!((sregs.cr0, sregs.cr3, sregs.cr4), (1, 2, 3));
        assert_eq!((sregs.cr8, sregs.efer, sregs.cr2), (4, 5, 0x55));
        assert_eq!(special_segments(&sregs), p.segments);
    }

    #[test]
    fn attributes_round_trip_every_word() {
        for bits in 0..=u16::MAX {
            assert_eq!(SegmentAttributes::from_bits(bits).to_bits(), bits);
        }
    }

    #[test]
    fn attributes_decode_long_mode_user_code() {
        // 0xa0fb: type 0xb, S, DPL 3, P, L, G.
        let a = SegmentAttributes::from_bits(0xa0fb);
        assert_eq!(a.type_, 0xb);
        assert!(a.s && a.present && a.long && a.granularity);
        assert_eq!(a.dpl, 3);
        assert!(!a.db && !a.avl);
        assert_eq!(a.reserved, 0);
    }

    #[test]
    fn attributes_agree_with_bindgen_bitfields() {
        for bits in [0u16, 0xa09b, 0xc093, 0x808b, 0xffff, 0x1234, 0xa0fb] {
            let seg = SegmentRegister {
                base: 1,
                limit: 2,
                selector: 3,
                attributes: SegmentAttributes::from_bits(bits),
            };
            let hv_seg: hv::hv_x64_segment_register = seg.into();
            let ours = seg.attributes;
            // mshv-bindings' own decoder of the same word:
            let theirs: hv::SegmentRegister = hv_seg.into();
            assert_eq!(theirs.type_, ours.type_);
            assert_eq!(theirs.s != 0, ours.s);
            assert_eq!(theirs.dpl, ours.dpl);
            assert_eq!(theirs.present != 0, ours.present);
            assert_eq!(theirs.avl != 0, ours.avl);
            assert_eq!(theirs.l != 0, ours.long);
            assert_eq!(theirs.db != 0, ours.db);
            assert_eq!(theirs.g != 0, ours.granularity);
            // And back through their encoder (which drops the reserved bits).
            let back: hv::hv_x64_segment_register = theirs.into();
            let back: SegmentRegister = back.into();
            assert_eq!(back.attributes.to_bits(), bits & !0x0f00);
        }
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Compares every field of our layout mirror with `mshv_bindings::hv_vp_register_page`.
//!
//! mshv-bindings 0.7.1 was generated from a header that already has `reserved[8]` at 152
//! (Linux commit 48fcc895403c), so the two layouts are identical field for field. Older
//! bindings (without `reserved[8]`) would fail `rip_rflags_reserved_and_xmm` and
//! `total_size` here; our own struct follows the design note either way.
#![cfg(target_arch = "x86_64")]

use core::mem::{offset_of, size_of};

use mshv_bindings::{hv_vp_register_page as Hv, hv_x64_segment_register};
use mshv_regpage::layout::{offsets, RawRegisterPage as Ours, RawSegment, RawXmm};

macro_rules! same {
    ($($ours:tt).+ , $($theirs:tt).+) => {
        assert_eq!(
            offset_of!(Ours, $($ours).+),
            offset_of!(Hv, $($theirs).+),
            concat!("offset of ", stringify!($($ours).+))
        );
    };
}

/// Size of a field of `Hv` reached through a raw pointer (works for union members).
macro_rules! hv_size {
    ($($f:tt).+) => {{
        fn size_of_pointee<T>(_: *const T) -> usize {
            size_of::<T>()
        }
        let hv = core::mem::MaybeUninit::<Hv>::uninit();
        let p = hv.as_ptr();
        let field = {
            // SAFETY: only the address of a field of an (uninitialised) local is computed;
            // nothing is read.
            unsafe { core::ptr::addr_of!((*p).$($f).+) }
        };
        size_of_pointee(field)
    }};
}

#[test]
fn total_size() {
    assert_eq!(size_of::<Ours>(), size_of::<Hv>());
    assert_eq!(size_of::<Ours>(), 696);
    assert_eq!(core::mem::align_of::<Hv>(), 1);
    assert_eq!(core::mem::align_of::<Ours>(), 1);
}

#[test]
fn header() {
    same!(version, version);
    same!(isvalid, isvalid);
    same!(rsvdz, rsvdz);
    same!(dirty, dirty);
    assert_eq!(hv_size!(version), 2);
    assert_eq!(hv_size!(isvalid), 1);
    assert_eq!(hv_size!(rsvdz), 1);
    assert_eq!(hv_size!(dirty), 4);
}

#[test]
fn general_purpose_registers_in_encoding_order() {
    same!(
        gp,
        __bindgen_anon_1
            .__bindgen_anon_1
            .__bindgen_anon_1
            .gp_registers
    );
    same!(gp, __bindgen_anon_1.registers);
    assert_eq!(
        hv_size!(
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .gp_registers
        ),
        128
    );
    let gp = offset_of!(Ours, gp);
    let named = [
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .rax
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .rcx
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .rdx
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .rbx
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .rsp
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .rbp
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .rsi
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .rdi
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .r8
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .r9
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .r10
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .r11
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .r12
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .r13
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .r14
        ),
        offset_of!(
            Hv,
            __bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .__bindgen_anon_1
                .r15
        ),
    ];
    for (gpr, off) in mshv_regpage::Gpr::ALL.iter().zip(named) {
        assert_eq!(gp + 8 * gpr.index(), off, "{gpr:?}");
    }
}

#[test]
fn rip_rflags_reserved_and_xmm() {
    same!(rip, __bindgen_anon_1.__bindgen_anon_1.rip);
    same!(rflags, __bindgen_anon_1.__bindgen_anon_1.rflags);
    same!(reserved, reserved);
    assert_eq!(offset_of!(Ours, reserved), offsets::RESERVED);
    assert_eq!(offsets::RESERVED, 152);
    assert_eq!(hv_size!(reserved), 8);
    same!(xmm, __bindgen_anon_2.xmm_registers);
    assert_eq!(
        hv_size!(__bindgen_anon_2.xmm_registers),
        6 * size_of::<RawXmm>()
    );
    let xmm = offset_of!(Ours, xmm);
    let named = [
        offset_of!(Hv, __bindgen_anon_2.__bindgen_anon_1.xmm0),
        offset_of!(Hv, __bindgen_anon_2.__bindgen_anon_1.xmm1),
        offset_of!(Hv, __bindgen_anon_2.__bindgen_anon_1.xmm2),
        offset_of!(Hv, __bindgen_anon_2.__bindgen_anon_1.xmm3),
        offset_of!(Hv, __bindgen_anon_2.__bindgen_anon_1.xmm4),
        offset_of!(Hv, __bindgen_anon_2.__bindgen_anon_1.xmm5),
    ];
    for (i, off) in named.into_iter().enumerate() {
        assert_eq!(xmm + 16 * i, off, "xmm{i}");
    }
    assert_eq!(
        offset_of!(mshv_bindings::hv_u128, low_part),
        offset_of!(RawXmm, low)
    );
    assert_eq!(
        offset_of!(mshv_bindings::hv_u128, high_part),
        offset_of!(RawXmm, high)
    );
}

#[test]
fn segments() {
    same!(segments, __bindgen_anon_3.segment_registers);
    let segs = offset_of!(Ours, segments);
    let named = [
        offset_of!(Hv, __bindgen_anon_3.__bindgen_anon_1.es),
        offset_of!(Hv, __bindgen_anon_3.__bindgen_anon_1.cs),
        offset_of!(Hv, __bindgen_anon_3.__bindgen_anon_1.ss),
        offset_of!(Hv, __bindgen_anon_3.__bindgen_anon_1.ds),
        offset_of!(Hv, __bindgen_anon_3.__bindgen_anon_1.fs),
        offset_of!(Hv, __bindgen_anon_3.__bindgen_anon_1.gs),
    ];
    for (seg, off) in mshv_regpage::Segment::ALL.iter().zip(named) {
        assert_eq!(segs + 16 * seg.index(), off, "{seg:?}");
    }
    assert_eq!(
        size_of::<hv_x64_segment_register>(),
        size_of::<RawSegment>()
    );
    assert_eq!(
        offset_of!(hv_x64_segment_register, base),
        offset_of!(RawSegment, base)
    );
    assert_eq!(
        offset_of!(hv_x64_segment_register, limit),
        offset_of!(RawSegment, limit)
    );
    assert_eq!(
        offset_of!(hv_x64_segment_register, selector),
        offset_of!(RawSegment, selector)
    );
    assert_eq!(
        offset_of!(hv_x64_segment_register, __bindgen_anon_1.attributes),
        offset_of!(RawSegment, attributes)
    );
}

#[test]
fn read_only_and_tail() {
    same!(cr0, cr0);
    same!(cr3, cr3);
    same!(cr4, cr4);
    same!(cr8, cr8);
    same!(efer, efer);
    same!(dr7, dr7);
    same!(pending_interruption, pending_interruption);
    same!(interrupt_state, interrupt_state);
    same!(instruction_emulation_hints, instruction_emulation_hints);
    same!(xfem, xfem);
    same!(reserved1, reserved1);
    same!(interrupt_vectors, interrupt_vectors);
    assert_eq!(hv_size!(pending_interruption), 8);
    assert_eq!(hv_size!(interrupt_state), 8);
    assert_eq!(hv_size!(reserved1), 256);
    assert_eq!(hv_size!(interrupt_vectors), 8);
    assert_eq!(offsets::INTERRUPT_VECTORS + 8, size_of::<Hv>());
}

#[test]
fn constants_match_bindings() {
    assert_eq!(
        u32::from(mshv_regpage::layout::REGISTER_PAGE_VERSION_1),
        mshv_bindings::HV_VP_REGISTER_PAGE_VERSION_1
    );
    assert_eq!(
        mshv_regpage::layout::MSHV_VP_MMAP_OFFSET_REGISTERS,
        mshv_bindings::MSHV_VP_MMAP_OFFSET_REGISTERS as libc::off_t
    );
    assert_eq!(
        mshv_regpage::layout::REGISTER_PAGE_MAP_SIZE,
        mshv_bindings::MSHV_HV_PAGE_SIZE as usize
    );
}

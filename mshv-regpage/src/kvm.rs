// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The same facade over KVM's sync-regs area of `kvm_run` (feature `kvm`).
//!
//! `KVM_CAP_SYNC_REGS` is KVM's analogue of the MSHV register page: with
//! `kvm_run.kvm_valid_regs` set, the kernel stores `kvm_regs` and `kvm_sregs` into
//! `kvm_run.s.regs` on every exit; classes flagged in `kvm_run.kvm_dirty_regs` are loaded
//! back (and their flags cleared) at the next `KVM_RUN`. [`KvmVcpuRegisters`] implements
//! [`ExitRegisters`] on top of it, with the same rules as [`crate::VcpuRegisters`]:
//! sync area when valid, `KVM_GET_*`/`KVM_SET_*` ioctls otherwise, and no mixing of both
//! write paths for one KVM class before the next run.
//!
//! KVM's classes are coarser than MSHV's: GPRs, RIP and RFLAGS share `KVM_SYNC_X86_REGS`;
//! segments and control registers share `KVM_SYNC_X86_SREGS`; XMM registers are not in
//! the sync area at all (`KVM_GET_FPU`/`KVM_SET_FPU`).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd};

use crate::access::{AccessStats, ExitRegisters, PageCounters};
use crate::dirty::RegisterClass;
use crate::error::{Error, Result, WritePath};
use crate::regs::{Gpr, ReadOnlyRegister, Segment, SegmentAttributes, SegmentRegister, Xmm};

/// Keeps the errno of a failed KVM ioctl.
fn kvm_error(op: &'static str, e: kvm_ioctls::Error) -> Error {
    Error::backend(op, std::io::Error::from_raw_os_error(e.errno()))
}

/// A KVM sync-regs class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KvmClass {
    /// `KVM_SYNC_X86_REGS`: GPRs, RIP, RFLAGS.
    Regs = 0,
    /// `KVM_SYNC_X86_SREGS`: segments, descriptor tables, control registers, EFER.
    Sregs = 1,
}

impl KvmClass {
    fn flag(self) -> u64 {
        match self {
            KvmClass::Regs => u64::from(KVM_SYNC_X86_REGS),
            KvmClass::Sregs => u64::from(KVM_SYNC_X86_SREGS),
        }
    }

    fn sync_reg(self) -> SyncReg {
        match self {
            KvmClass::Regs => SyncReg::Register,
            KvmClass::Sregs => SyncReg::SystemRegister,
        }
    }

    /// The MSHV class used to report a refused write.
    fn reported_class(self) -> RegisterClass {
        match self {
            KvmClass::Regs => RegisterClass::General,
            KvmClass::Sregs => RegisterClass::Segment,
        }
    }
}

/// GPR `reg` of `regs` (x86 encoding order mapped onto `kvm_regs`' field order).
fn kvm_gpr(regs: &kvm_regs, reg: Gpr) -> u64 {
    match reg {
        Gpr::Rax => regs.rax,
        Gpr::Rcx => regs.rcx,
        Gpr::Rdx => regs.rdx,
        Gpr::Rbx => regs.rbx,
        Gpr::Rsp => regs.rsp,
        Gpr::Rbp => regs.rbp,
        Gpr::Rsi => regs.rsi,
        Gpr::Rdi => regs.rdi,
        Gpr::R8 => regs.r8,
        Gpr::R9 => regs.r9,
        Gpr::R10 => regs.r10,
        Gpr::R11 => regs.r11,
        Gpr::R12 => regs.r12,
        Gpr::R13 => regs.r13,
        Gpr::R14 => regs.r14,
        Gpr::R15 => regs.r15,
    }
}

fn kvm_gpr_mut(regs: &mut kvm_regs, reg: Gpr) -> &mut u64 {
    match reg {
        Gpr::Rax => &mut regs.rax,
        Gpr::Rcx => &mut regs.rcx,
        Gpr::Rdx => &mut regs.rdx,
        Gpr::Rbx => &mut regs.rbx,
        Gpr::Rsp => &mut regs.rsp,
        Gpr::Rbp => &mut regs.rbp,
        Gpr::Rsi => &mut regs.rsi,
        Gpr::Rdi => &mut regs.rdi,
        Gpr::R8 => &mut regs.r8,
        Gpr::R9 => &mut regs.r9,
        Gpr::R10 => &mut regs.r10,
        Gpr::R11 => &mut regs.r11,
        Gpr::R12 => &mut regs.r12,
        Gpr::R13 => &mut regs.r13,
        Gpr::R14 => &mut regs.r14,
        Gpr::R15 => &mut regs.r15,
    }
}

fn kvm_seg(sregs: &kvm_sregs, seg: Segment) -> kvm_segment {
    match seg {
        Segment::Es => sregs.es,
        Segment::Cs => sregs.cs,
        Segment::Ss => sregs.ss,
        Segment::Ds => sregs.ds,
        Segment::Fs => sregs.fs,
        Segment::Gs => sregs.gs,
    }
}

fn kvm_seg_mut(sregs: &mut kvm_sregs, seg: Segment) -> &mut kvm_segment {
    match seg {
        Segment::Es => &mut sregs.es,
        Segment::Cs => &mut sregs.cs,
        Segment::Ss => &mut sregs.ss,
        Segment::Ds => &mut sregs.ds,
        Segment::Fs => &mut sregs.fs,
        Segment::Gs => &mut sregs.gs,
    }
}

/// Converts KVM's unpacked segment into ours (`unusable` is dropped, as for MSHV).
pub fn segment_from_kvm(s: &kvm_segment) -> SegmentRegister {
    SegmentRegister {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        attributes: SegmentAttributes {
            type_: s.type_ & 0xf,
            s: s.s != 0,
            dpl: s.dpl & 0x3,
            present: s.present != 0,
            reserved: 0,
            avl: s.avl != 0,
            long: s.l != 0,
            db: s.db != 0,
            granularity: s.g != 0,
        },
    }
}

/// Converts our segment into KVM's (`unusable` = not present).
pub fn segment_to_kvm(s: &SegmentRegister) -> kvm_segment {
    let a = s.attributes;
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: a.type_ & 0xf,
        present: u8::from(a.present),
        dpl: a.dpl & 0x3,
        db: u8::from(a.db),
        s: u8::from(a.s),
        l: u8::from(a.long),
        g: u8::from(a.granularity),
        avl: u8::from(a.avl),
        unusable: u8::from(!a.present),
        padding: 0,
    }
}

/// A KVM vCPU's registers through the `kvm_run` sync-regs area, with ioctl fallback.
///
/// Owns the [`VcpuFd`]. Run the vCPU with [`KvmVcpuRegisters::run`] (the only way to run
/// it while wrapped: there is no `&mut VcpuFd` accessor, which would reach the sync area
/// past the mixing guard); handle the exit's data (e.g. fill an `IoIn` buffer), drop the
/// exit, then access registers. For `&self` access from a `Send + Sync` vCPU type, wrap it
/// in a [`crate::RegisterCell`].
///
/// The kernel writes the sync area only inside `KVM_RUN`, a system call, so plain accesses
/// through kvm-ioctls' `sync_regs_mut` cannot be reordered across it; the borrow checker
/// guarantees that no access overlaps a run.
#[derive(Debug)]
pub struct KvmVcpuRegisters {
    vcpu: VcpuFd,
    sync_enabled: bool,
    synced: bool,
    written: [Option<WritePath>; 2],
    /// Per class: the sync area may serve this class now (`synced` and not written by
    /// ioctl since the last run) — the one byte the fast path tests.
    fast: [bool; 2],
    /// Copies fetched by ioctl since the last run (the vCPU does not change in between
    /// except through this object), so the fallback costs one get per class per exit.
    regs_cache: Option<kvm_regs>,
    sregs_cache: Option<kvm_sregs>,
    /// Ioctl counters (the page counters come from `page_counters`).
    stats: AccessStats,
    page_counters: PageCounters,
}

/// Page counter slots of the sync-area accessors (one per kind, so that a handler's
/// increments do not chain on one memory word).
mod slot {
    pub(super) const GPR: usize = 0;
    pub(super) const RIP: usize = 1;
    pub(super) const RFLAGS: usize = 2;
    pub(super) const SREGS: usize = 3;
}

impl KvmVcpuRegisters {
    /// Wraps `vcpu`; enables the sync area for `KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS` if
    /// `kvm` reports `KVM_CAP_SYNC_REGS`, otherwise every access uses ioctls.
    pub fn new(kvm: &Kvm, vcpu: VcpuFd) -> Self {
        let wanted = u64::from(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS);
        let supported = u64::try_from(kvm.check_extension_int(Cap::SyncRegs)).unwrap_or(0);
        Self::with_sync_regs(vcpu, supported & wanted == wanted)
    }

    /// Wraps `vcpu`, using the sync area only if `enabled` (pass `false` to measure or test
    /// the ioctl path).
    pub fn with_sync_regs(mut vcpu: VcpuFd, enabled: bool) -> Self {
        if enabled {
            vcpu.set_sync_valid_reg(SyncReg::Register);
            vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        } else {
            vcpu.clear_sync_valid_reg(SyncReg::Register);
            vcpu.clear_sync_valid_reg(SyncReg::SystemRegister);
        }
        KvmVcpuRegisters {
            vcpu,
            sync_enabled: enabled,
            synced: false,
            written: [None; 2],
            fast: [false; 2],
            regs_cache: None,
            sregs_cache: None,
            stats: AccessStats::default(),
            page_counters: PageCounters::default(),
        }
    }

    /// The vCPU (for the ioctls that take `&self`; register writes made directly on it
    /// bypass the facade and its mixing guard).
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// Sets `kvm_run.immediate_exit`: while set, [`KvmVcpuRegisters::run`] returns `EINTR`
    /// at once (how a VMM kicks a vCPU thread out of its run loop).
    pub fn set_immediate_exit(&mut self, exit: bool) {
        self.vcpu.set_kvm_immediate_exit(u8::from(exit));
    }

    /// Gives the vCPU back.
    pub fn into_inner(self) -> VcpuFd {
        self.vcpu
    }

    /// Whether register reads are currently served from the sync area.
    pub fn sync_valid(&self) -> bool {
        self.synced
    }

    /// Runs the vCPU (`KVM_RUN`).
    ///
    /// The kernel stores the valid classes in the sync area on every return from `KVM_RUN`
    /// and loads (and clears) the dirty classes at its very beginning, so the write-path
    /// tracking is reset here. If the run fails before the kernel loaded the dirty classes,
    /// their flags stay set in `kvm_run.kvm_dirty_regs`, and an ioctl write of such a class
    /// is still refused (the guard consults those flags).
    pub fn run(&mut self) -> std::result::Result<VcpuExit<'_>, kvm_ioctls::Error> {
        self.synced = self.sync_enabled;
        self.written = [None; 2];
        self.fast = [self.sync_enabled; 2];
        self.regs_cache = None;
        self.sregs_cache = None;
        self.vcpu.run()
    }

    #[inline]
    fn read_sync(&self, class: KvmClass) -> bool {
        self.fast[class as usize]
    }

    /// Records an ioctl write of `class`, refusing it if the class was written in the sync
    /// area since the last run (the kernel would load that copy over the ioctl's write).
    fn claim_ioctl_write(&mut self, class: KvmClass) -> Result<()> {
        // Still pending in the sync area (e.g. a failed KVM_RUN did not load it)?
        let pending = self.vcpu.get_kvm_run().kvm_dirty_regs & class.flag() != 0;
        let slot = &mut self.written[class as usize];
        if *slot == Some(WritePath::Page) || pending {
            return Err(Error::MixedWrite {
                class: class.reported_class(),
                earlier: WritePath::Page,
                attempted: WritePath::Hypercall,
            });
        }
        *slot = Some(WritePath::Hypercall);
        self.fast[class as usize] = false;
        Ok(())
    }

    fn regs_ioctl(&mut self) -> Result<kvm_regs> {
        self.stats.hypercall_gets += 1;
        self.vcpu
            .get_regs()
            .map_err(|e| kvm_error("KVM_GET_REGS", e))
    }

    fn sregs_ioctl(&mut self) -> Result<kvm_sregs> {
        self.stats.hypercall_gets += 1;
        self.vcpu
            .get_sregs()
            .map_err(|e| kvm_error("KVM_GET_SREGS", e))
    }

    fn regs_cached(&mut self) -> Result<kvm_regs> {
        if let Some(regs) = self.regs_cache {
            return Ok(regs);
        }
        let regs = self.regs_ioctl()?;
        self.regs_cache = Some(regs);
        Ok(regs)
    }

    fn sregs_cached(&mut self) -> Result<kvm_sregs> {
        if let Some(sregs) = self.sregs_cache {
            return Ok(sregs);
        }
        let sregs = self.sregs_ioctl()?;
        self.sregs_cache = Some(sregs);
        Ok(sregs)
    }

    #[inline]
    fn read_regs<T>(&mut self, slot: usize, f: impl FnOnce(&kvm_regs) -> T) -> Result<T> {
        if self.read_sync(KvmClass::Regs) {
            self.page_counters.read(slot);
            return Ok(f(&self.vcpu.sync_regs_mut().regs));
        }
        self.regs_slow().map(|r| f(&r))
    }

    #[cold]
    #[inline(never)]
    fn regs_slow(&mut self) -> Result<kvm_regs> {
        self.regs_cached()
    }

    #[inline]
    fn read_sregs<T>(&mut self, f: impl FnOnce(&kvm_sregs) -> T) -> Result<T> {
        if self.read_sync(KvmClass::Sregs) {
            self.page_counters.read(slot::SREGS);
            return Ok(f(&self.vcpu.sync_regs_mut().sregs));
        }
        self.sregs_slow().map(|s| f(&s))
    }

    #[cold]
    #[inline(never)]
    fn sregs_slow(&mut self) -> Result<kvm_sregs> {
        self.sregs_cached()
    }

    /// Whether a write of `class` may go to the sync area now; if so, records it and sets
    /// the class's dirty flag (once per run).
    #[inline]
    fn fast_write(&mut self, class: KvmClass, counter: usize) -> bool {
        if !self.fast[class as usize] {
            return false;
        }
        let slot = &mut self.written[class as usize];
        if *slot != Some(WritePath::Page) {
            *slot = Some(WritePath::Page);
            self.vcpu.set_sync_dirty_reg(class.sync_reg());
        }
        self.page_counters.write(counter);
        true
    }

    #[inline]
    fn write_regs(&mut self, slot: usize, f: impl FnOnce(&mut kvm_regs)) -> Result<()> {
        if self.fast_write(KvmClass::Regs, slot) {
            f(&mut self.vcpu.sync_regs_mut().regs);
            return Ok(());
        }
        let mut regs = self.regs_for_slow_write()?;
        f(&mut regs);
        self.set_regs_unchecked(&regs)
    }

    /// Slow-path write of `KVM_SYNC_X86_REGS` (the sync area is not valid or the class
    /// already went by ioctl): claims the ioctl path and returns the registers to modify.
    #[cold]
    #[inline(never)]
    fn regs_for_slow_write(&mut self) -> Result<kvm_regs> {
        self.claim_ioctl_write(KvmClass::Regs)?;
        self.regs_cached()
    }

    #[inline]
    fn write_sregs(&mut self, f: impl FnOnce(&mut kvm_sregs)) -> Result<()> {
        if self.fast_write(KvmClass::Sregs, slot::SREGS) {
            f(&mut self.vcpu.sync_regs_mut().sregs);
            return Ok(());
        }
        let mut sregs = self.sregs_for_slow_write()?;
        f(&mut sregs);
        self.stats.hypercall_sets += 1;
        self.sregs_cache = None;
        self.vcpu
            .set_sregs(&sregs)
            .map_err(|e| kvm_error("KVM_SET_SREGS", e))?;
        self.sregs_cache = Some(sregs);
        Ok(())
    }

    /// As [`Self::regs_for_slow_write`] for `KVM_SYNC_X86_SREGS`.
    #[cold]
    #[inline(never)]
    fn sregs_for_slow_write(&mut self) -> Result<kvm_sregs> {
        self.claim_ioctl_write(KvmClass::Sregs)?;
        self.sregs_cached()
    }

    fn set_regs_unchecked(&mut self, regs: &kvm_regs) -> Result<()> {
        self.stats.hypercall_sets += 1;
        // If the ioctl fails we no longer know what the vCPU holds.
        self.regs_cache = None;
        self.vcpu
            .set_regs(regs)
            .map_err(|e| kvm_error("KVM_SET_REGS", e))?;
        self.regs_cache = Some(*regs);
        Ok(())
    }

    /// `KVM_GET_REGS` through the ioctl, bypassing the sync area and the cache (for
    /// comparisons).
    pub fn get_regs_ioctl(&mut self) -> Result<kvm_regs> {
        self.regs_ioctl()
    }

    /// `KVM_GET_SREGS` through the ioctl, bypassing the sync area.
    pub fn get_sregs_ioctl(&mut self) -> Result<kvm_sregs> {
        self.sregs_ioctl()
    }

    /// `KVM_SET_REGS` through the ioctl (the explicit slow path). Refused with
    /// [`Error::MixedWrite`] if `KVM_SYNC_X86_REGS` was written in the sync area since the
    /// last run: the kernel would load the sync copy over it at the next `KVM_RUN`.
    pub fn set_regs_ioctl(&mut self, regs: &kvm_regs) -> Result<()> {
        self.claim_ioctl_write(KvmClass::Regs)?;
        self.set_regs_unchecked(regs)
    }

    /// The general purpose registers, RIP and RFLAGS.
    pub fn regs(&mut self) -> Result<kvm_regs> {
        self.read_regs(slot::GPR, |r| *r)
    }

    /// The special registers.
    pub fn sregs(&mut self) -> Result<kvm_sregs> {
        self.read_sregs(|s| *s)
    }
}

impl ExitRegisters for KvmVcpuRegisters {
    #[inline]
    fn gpr(&mut self, reg: Gpr) -> Result<u64> {
        self.read_regs(slot::GPR, |r| kvm_gpr(r, reg))
    }

    #[inline]
    fn set_gpr(&mut self, reg: Gpr, value: u64) -> Result<()> {
        self.write_regs(slot::GPR, |r| *kvm_gpr_mut(r, reg) = value)
    }

    #[inline]
    fn rip(&mut self) -> Result<u64> {
        self.read_regs(slot::RIP, |r| r.rip)
    }

    #[inline]
    fn set_rip(&mut self, value: u64) -> Result<()> {
        self.write_regs(slot::RIP, |r| r.rip = value)
    }

    #[inline]
    fn rflags(&mut self) -> Result<u64> {
        self.read_regs(slot::RFLAGS, |r| r.rflags)
    }

    #[inline]
    fn set_rflags(&mut self, value: u64) -> Result<()> {
        self.write_regs(slot::RFLAGS, |r| r.rflags = value)
    }

    #[inline]
    fn segment(&mut self, seg: Segment) -> Result<SegmentRegister> {
        self.read_sregs(|s| segment_from_kvm(&kvm_seg(s, seg)))
    }

    #[inline]
    fn set_segment(&mut self, seg: Segment, value: SegmentRegister) -> Result<()> {
        self.write_sregs(|s| *kvm_seg_mut(s, seg) = segment_to_kvm(&value))
    }

    fn xmm(&mut self, reg: Xmm) -> Result<u128> {
        self.stats.hypercall_gets += 1;
        let fpu = self
            .vcpu
            .get_fpu()
            .map_err(|e| kvm_error("KVM_GET_FPU", e))?;
        let bytes = fpu.xmm.get(reg.index()).copied().unwrap_or_default();
        Ok(u128::from_le_bytes(bytes))
    }

    fn set_xmm(&mut self, reg: Xmm, value: u128) -> Result<()> {
        self.stats.hypercall_gets += 1;
        let mut fpu = self
            .vcpu
            .get_fpu()
            .map_err(|e| kvm_error("KVM_GET_FPU", e))?;
        if let Some(slot) = fpu.xmm.get_mut(reg.index()) {
            *slot = value.to_le_bytes();
        }
        self.stats.hypercall_sets += 1;
        self.vcpu
            .set_fpu(&fpu)
            .map_err(|e| kvm_error("KVM_SET_FPU", e))
    }

    fn read_only(&mut self, reg: ReadOnlyRegister) -> Result<u64> {
        match reg {
            ReadOnlyRegister::Cr0 => self.read_sregs(|s| s.cr0),
            ReadOnlyRegister::Cr3 => self.read_sregs(|s| s.cr3),
            ReadOnlyRegister::Cr4 => self.read_sregs(|s| s.cr4),
            ReadOnlyRegister::Cr8 => self.read_sregs(|s| s.cr8),
            ReadOnlyRegister::Efer => self.read_sregs(|s| s.efer),
            ReadOnlyRegister::Dr7 => {
                self.stats.hypercall_gets += 1;
                self.vcpu
                    .get_debug_regs()
                    .map(|d| d.dr7)
                    .map_err(|e| kvm_error("KVM_GET_DEBUGREGS", e))
            }
            ReadOnlyRegister::PendingInterruption => Err(Error::Unsupported {
                what: "the MSHV pending interruption register on KVM",
            }),
            ReadOnlyRegister::InterruptState => Err(Error::Unsupported {
                what: "the MSHV interrupt state register on KVM",
            }),
        }
    }

    fn stats(&self) -> AccessStats {
        self.page_counters.into_stats(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_conversion_round_trips() {
        for bits in [0xa0fbu16, 0xc0f3, 0x808b, 0x0000, 0xf0ff] {
            let ours = SegmentRegister {
                base: 0x1000,
                limit: 0xfffff,
                selector: 0x2b,
                attributes: SegmentAttributes::from_bits(bits & !0x0f00),
            };
            let kvm = segment_to_kvm(&ours);
            assert_eq!(kvm.unusable, u8::from(!ours.attributes.present));
            assert_eq!(segment_from_kvm(&kvm), ours);
        }
    }

    #[test]
    fn gpr_mapping_follows_names() {
        let mut regs = kvm_regs::default();
        for (i, g) in Gpr::ALL.iter().enumerate() {
            *kvm_gpr_mut(&mut regs, *g) = i as u64;
        }
        assert_eq!((regs.rax, regs.rcx, regs.rdx, regs.rbx), (0, 1, 2, 3));
        assert_eq!((regs.rsp, regs.rbp, regs.rsi, regs.rdi), (4, 5, 6, 7));
        assert_eq!((regs.r8, regs.r15), (8, 15));
        for (i, g) in Gpr::ALL.iter().enumerate() {
            assert_eq!(kvm_gpr(&regs, *g), i as u64);
        }
    }
}

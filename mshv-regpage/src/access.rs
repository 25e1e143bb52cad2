// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`VcpuRegisters`]: the page when it is usable, hypercalls otherwise.

use std::borrow::Borrow;

use mshv_bindings as hv;
use mshv_bindings::{hv_register_assoc, hv_register_value, hv_u128};

use crate::dirty::RegisterClass;
use crate::error::{Error, Result, WritePath};
use crate::fallback::{mshv_io_error, RegisterHypercalls};
use crate::page::RegisterPage;
use crate::regs::{Gpr, ReadOnlyRegister, Segment, SegmentRegister, Xmm};

/// Counters of how register accesses were served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccessStats {
    /// Register reads served from the page (or KVM sync-regs area).
    pub page_reads: u64,
    /// Register writes stored on the page (or KVM sync-regs area) with a dirty bit.
    pub page_writes: u64,
    /// Get-registers hypercalls (or KVM get ioctls) issued.
    pub hypercall_gets: u64,
    /// Set-registers hypercalls (or KVM set ioctls) issued.
    pub hypercall_sets: u64,
}

impl AccessStats {
    /// All page accesses.
    pub fn page_accesses(&self) -> u64 {
        self.page_reads + self.page_writes
    }

    /// All hypercalls (or ioctls).
    pub fn hypercalls(&self) -> u64 {
        self.hypercall_gets + self.hypercall_sets
    }
}

/// Page access counters, one slot per register kind, summed into [`AccessStats`] on demand.
///
/// One counter per slot keeps the increments of a typical exit handler (RAX, RIP, RFLAGS)
/// on different memory words: on a single counter they form a serial load-add-store chain
/// through store forwarding, which was the longest dependency chain of the whole fast path.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PageCounters {
    reads: [u64; PageCounters::SLOTS],
    writes: [u64; PageCounters::SLOTS],
}

impl PageCounters {
    /// Slots: the MSHV register classes (by dirty bit), then read-only registers.
    pub(crate) const SLOTS: usize = 6;
    /// The slot of the read-only registers.
    pub(crate) const READ_ONLY: usize = 5;

    #[inline(always)]
    pub(crate) fn read(&mut self, slot: usize) {
        if let Some(c) = self.reads.get_mut(slot) {
            *c += 1;
        }
    }

    #[inline(always)]
    pub(crate) fn write(&mut self, slot: usize) {
        if let Some(c) = self.writes.get_mut(slot) {
            *c += 1;
        }
    }

    /// `stats` with the page counters filled in.
    pub(crate) fn into_stats(self, mut stats: AccessStats) -> AccessStats {
        stats.page_reads = self.reads.iter().sum();
        stats.page_writes = self.writes.iter().sum();
        stats
    }
}

/// The register accesses an exit handler needs, independent of the hypervisor.
///
/// Implemented by [`VcpuRegisters`] (MSHV register page + hypercalls) and, with feature
/// `kvm`, by `kvm::KvmVcpuRegisters` (KVM sync-regs area + ioctls). Write exit handlers
/// against this trait and test them on `sim::SimHypervisor`.
///
/// The methods take `&mut self`: one vCPU's registers are used by one thread at a time.
/// To call them behind a `&self`, `Send + Sync` vCPU type, put the facade in a
/// [`crate::RegisterCell`] and run the vCPU and its exit handler inside one
/// [`crate::RegisterCell::with`] call.
pub trait ExitRegisters {
    /// Reads a general purpose register.
    fn gpr(&mut self, reg: Gpr) -> Result<u64>;
    /// Writes a general purpose register.
    fn set_gpr(&mut self, reg: Gpr, value: u64) -> Result<()>;
    /// Reads RIP.
    fn rip(&mut self) -> Result<u64>;
    /// Writes RIP.
    fn set_rip(&mut self, value: u64) -> Result<()>;
    /// Reads RFLAGS.
    fn rflags(&mut self) -> Result<u64>;
    /// Writes RFLAGS.
    fn set_rflags(&mut self, value: u64) -> Result<()>;
    /// Reads a segment register.
    fn segment(&mut self, seg: Segment) -> Result<SegmentRegister>;
    /// Writes a segment register.
    fn set_segment(&mut self, seg: Segment, value: SegmentRegister) -> Result<()>;
    /// Reads xmm0..xmm5.
    fn xmm(&mut self, reg: Xmm) -> Result<u128>;
    /// Writes xmm0..xmm5.
    fn set_xmm(&mut self, reg: Xmm, value: u128) -> Result<()>;
    /// Reads a register that is read-only on the page (CR0, CR3, CR4, CR8, EFER, DR7,
    /// pending interruption, interrupt state).
    fn read_only(&mut self, reg: ReadOnlyRegister) -> Result<u64>;
    /// How accesses were served so far.
    fn stats(&self) -> AccessStats;
}

/// A register the page holds, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageReg {
    Gpr(Gpr),
    Rip,
    Rflags,
    Xmm(Xmm),
    Segment(Segment),
    ReadOnly(ReadOnlyRegister),
}

impl PageReg {
    pub(crate) fn from_name(name: hv::hv_register_name) -> Option<PageReg> {
        if let Some(g) = name
            .checked_sub(hv::hv_register_name_HV_X64_REGISTER_RAX)
            .and_then(|i| Gpr::from_index(i as usize))
        {
            return Some(PageReg::Gpr(g));
        }
        if name == hv::hv_register_name_HV_X64_REGISTER_RIP {
            return Some(PageReg::Rip);
        }
        if name == hv::hv_register_name_HV_X64_REGISTER_RFLAGS {
            return Some(PageReg::Rflags);
        }
        if let Some(x) = Xmm::ALL.into_iter().find(|x| x.hv_name() == name) {
            return Some(PageReg::Xmm(x));
        }
        if let Some(s) = Segment::ALL.into_iter().find(|s| s.hv_name() == name) {
            return Some(PageReg::Segment(s));
        }
        ReadOnlyRegister::ALL
            .into_iter()
            .find(|r| r.hv_name() == name)
            .map(PageReg::ReadOnly)
    }

    /// The page counter slot of the register.
    fn counter_slot(self) -> usize {
        self.class()
            .map_or(PageCounters::READ_ONLY, |c| c.bit() as usize)
    }

    pub(crate) fn class(self) -> Option<RegisterClass> {
        match self {
            PageReg::Gpr(_) => Some(RegisterClass::General),
            PageReg::Rip => Some(RegisterClass::Ip),
            PageReg::Rflags => Some(RegisterClass::Flags),
            PageReg::Xmm(_) => Some(RegisterClass::Xmm),
            PageReg::Segment(_) => Some(RegisterClass::Segment),
            PageReg::ReadOnly(_) => None,
        }
    }

    fn read_from(self, page: &RegisterPage) -> hv_register_value {
        match self {
            PageReg::Gpr(g) => hv_register_value { reg64: page.gpr(g) },
            PageReg::Rip => hv_register_value { reg64: page.rip() },
            PageReg::Rflags => hv_register_value {
                reg64: page.rflags(),
            },
            PageReg::Xmm(x) => hv_register_value {
                reg128: u128_to_hv(page.xmm(x)),
            },
            PageReg::Segment(s) => hv_register_value {
                segment: page.segment(s).into(),
            },
            PageReg::ReadOnly(r) => hv_register_value {
                reg64: page.read_only(r),
            },
        }
    }
}

fn u128_to_hv(v: u128) -> hv_u128 {
    hv_u128 {
        low_part: v as u64,
        high_part: (v >> 64) as u64,
    }
}

fn hv_to_u128(v: hv_u128) -> u128 {
    (u128::from(v.high_part) << 64) | u128::from(v.low_part)
}

fn reg64(value: hv_register_value) -> u64 {
    // SAFETY: every member of the union is plain old data at offset 0 and the union is at
    // least 8 bytes long, so any bit pattern is a valid u64.
    unsafe { value.reg64 }
}

fn reg128(value: hv_register_value) -> u128 {
    // SAFETY: as for `reg64`; the union is 16 bytes of plain data.
    hv_to_u128(unsafe { value.reg128 })
}

fn segment_value(value: hv_register_value) -> SegmentRegister {
    // SAFETY: as for `reg64`; `hv_x64_segment_register` is 16 bytes of plain integers.
    SegmentRegister::from(unsafe { value.segment })
}

fn assoc(name: hv::hv_register_name, value: hv_register_value) -> hv_register_assoc {
    hv_register_assoc {
        name,
        value,
        ..Default::default()
    }
}

fn named(name: hv::hv_register_name) -> hv_register_assoc {
    assoc(name, hv_register_value { reg64: 0 })
}

/// One vCPU's registers: the register page when it is mapped, valid and of a known version
/// (re-checked on every access), the get/set-registers hypercalls otherwise.
///
/// * Registers the page does not hold (TR, LDTR, GDTR, IDTR, CR2, APIC_BASE, xmm6-15, MSRs)
///   always go by hypercall ([`VcpuRegisters::get_hv_registers`]).
/// * Read-only page registers are read from the page, written by hypercall.
/// * For each [`RegisterClass`] the facade remembers how it was written since the last run.
///   Once a class went by hypercall, later accesses of that class keep using the hypercall
///   (the page copy is stale). A hypercall write of a class already written on the page
///   (or vice versa, e.g. after the page became invalid) is refused with
///   [`Error::MixedWrite`]: the hypervisor would apply one and silently drop the other.
/// * Run the vCPU with [`VcpuRegisters::run`] (or, on the simulator, `sim::SimHypervisor::run`):
///   it resets that tracking once the run returned. There is no other way to reset it, and
///   no safe way to write the page past the guard: the page is only lent out as `&`
///   ([`VcpuRegisters::page`]) or given up whole ([`VcpuRegisters::into_parts`]).
///
/// The guard covers every write made through this facade. Writes the VMM makes on the vCPU
/// fd directly (e.g. `VcpuFd::set_reg`/`set_regs` on a clone of the `Arc` it gave the
/// facade, or through mshv-ioctls' own mapping of the page) bypass the facade entirely:
/// route every register write of a vCPU through its facade.
///
/// Ownership: the backend `B` is the vCPU fd itself (`VcpuRegisters<VcpuFd>`), an
/// `Arc<VcpuFd>` shared with the VMM, or a borrow (`&VcpuFd`); see
/// [`VcpuRegisters::for_vcpu`]. The facade is `Send` when `B` is, so it can move to the
/// vCPU thread; for `&self` access from a `Send + Sync` vCPU object, wrap it in a
/// [`crate::RegisterCell`].
#[derive(Debug)]
pub struct VcpuRegisters<B> {
    page: Option<RegisterPage>,
    backend: B,
    written: [Option<WritePath>; 5],
    /// Bit `i`: `ReadOnlyRegister::ALL[i]` was written by hypercall since the last run.
    stale_read_only: u8,
    /// Hypercall counters (the page counters of `stats` stay zero: see `page_counters`).
    stats: AccessStats,
    page_counters: PageCounters,
}

impl<V> VcpuRegisters<V>
where
    V: Borrow<mshv_ioctls::VcpuFd> + RegisterHypercalls,
{
    /// Maps the register page of `vcpu` (falling back to hypercalls only if the partition
    /// has none) and uses `vcpu`'s hypercalls as the fallback.
    ///
    /// `vcpu` is the fd itself (the facade owns it), an `Arc<VcpuFd>` (the facade and the
    /// VMM share it), a `Box<VcpuFd>` or a `&VcpuFd`.
    pub fn for_vcpu(vcpu: V) -> Result<Self> {
        let page = RegisterPage::map_vcpu(vcpu.borrow())?;
        Ok(VcpuRegisters::new(page, vcpu))
    }

    /// Runs the vCPU (`MSHV_RUN_VP`) until its next intercept and returns the intercept
    /// message; the write-path tracking is reset as the run returns, so the exit handler
    /// starts from the fresh page.
    ///
    /// Dirty classes the hypervisor did not consume (the ioctl failed before dispatching the
    /// vCPU, e.g. `EINTR`) stay guarded. A failed run is `Error::Backend` with the errno
    /// ([`Error::errno`]).
    pub fn run(&mut self) -> Result<hv::hv_message> {
        let result = self.backend.borrow().run();
        self.run_done();
        result.map_err(|e| Error::backend("MSHV_RUN_VP", mshv_io_error(e)))
    }
}

impl<B: RegisterHypercalls> VcpuRegisters<B> {
    /// A facade over `page` (if any) and `backend`.
    pub fn new(page: Option<RegisterPage>, backend: B) -> Self {
        VcpuRegisters {
            page,
            backend,
            written: [None; 5],
            stale_read_only: 0,
            stats: AccessStats::default(),
            page_counters: PageCounters::default(),
        }
    }

    /// The page, if one is mapped (valid or not), for reading. There is deliberately no
    /// `page_mut`: writes go through the facade's setters, which keep the mixing guard.
    ///
    /// Neither the page nor the tracking can be reached past the guard from safe code:
    ///
    /// ```compile_fail,E0599
    /// fn bypass(regs: &mut mshv_regpage::VcpuRegisters<mshv_ioctls::VcpuFd>) {
    ///     let _ = regs.page_mut(); // no such method
    /// }
    /// ```
    ///
    /// ```compile_fail,E0596
    /// use mshv_regpage::Gpr;
    /// fn bypass(regs: &mut mshv_regpage::VcpuRegisters<mshv_ioctls::VcpuFd>) {
    ///     if let Some(page) = regs.page() {
    ///         page.set_gpr(Gpr::Rax, 1); // `page()` lends `&RegisterPage` only
    ///     }
    /// }
    /// ```
    ///
    /// ```compile_fail,E0624
    /// fn bypass(regs: &mut mshv_regpage::VcpuRegisters<mshv_ioctls::VcpuFd>) {
    ///     regs.run_done(); // resetting the tracking without a run is crate-internal
    /// }
    /// ```
    ///
    /// ```
    /// use mshv_regpage::Gpr;
    /// // What is allowed: reading the page.
    /// fn read(regs: &mshv_regpage::VcpuRegisters<mshv_ioctls::VcpuFd>) -> Option<u64> {
    ///     regs.page().map(|page| page.gpr(Gpr::Rax))
    /// }
    /// ```
    pub fn page(&self) -> Option<&RegisterPage> {
        self.page.as_ref()
    }

    /// The page for the simulated hypervisor (crate-internal: it bypasses the guard).
    #[cfg(feature = "sim")]
    pub(crate) fn page_mut(&mut self) -> Option<&mut RegisterPage> {
        self.page.as_mut()
    }

    /// The hypercall backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Splits the facade into its parts (the write-path tracking is dropped with it).
    pub fn into_parts(self) -> (Option<RegisterPage>, B) {
        (self.page, self.backend)
    }

    /// Whether the next access of a page register would use the page.
    pub fn page_usable(&self) -> bool {
        self.page.as_ref().is_some_and(RegisterPage::is_usable)
    }

    /// How `class` was written since the last run, if at all.
    pub fn written_by(&self, class: RegisterClass) -> Option<WritePath> {
        self.written[class.bit() as usize]
    }

    /// The page, if it may be used to *read* `class` now.
    fn read_page(&self, class: Option<RegisterClass>) -> Option<&RegisterPage> {
        if let Some(c) = class {
            if self.written[c.bit() as usize] == Some(WritePath::Hypercall) {
                return None;
            }
        }
        self.page.as_ref().filter(|p| p.is_usable())
    }

    /// The page, if the fast path may serve a read of `class` now.
    #[inline]
    fn fast_read(&mut self, class: RegisterClass) -> Option<&RegisterPage> {
        if self.written[class.bit() as usize] == Some(WritePath::Hypercall) {
            return None;
        }
        let page = self.page.as_ref().filter(|p| p.is_usable())?;
        self.page_counters.read(class.bit() as usize);
        Some(page)
    }

    /// The page, if the fast path may take a write of `class` now (recorded as a page
    /// write). `None` leaves every decision, including refusals, to the slow path.
    #[inline]
    fn fast_write(&mut self, class: RegisterClass) -> Option<&mut RegisterPage> {
        let slot = &mut self.written[class.bit() as usize];
        if *slot == Some(WritePath::Hypercall) {
            return None;
        }
        let page = self.page.as_mut().filter(|p| p.is_usable())?;
        *slot = Some(WritePath::Page);
        self.page_counters.write(class.bit() as usize);
        Some(page)
    }

    /// Decides the path of a write of `class` and records it: `Some(page)` to write on the
    /// page (whose setters set the dirty bit), `None` to use the hypercall. A hypercall
    /// write of a class already written on the page since the last run is refused.
    fn route_write(&mut self, class: RegisterClass) -> Result<Option<&mut RegisterPage>> {
        let usable = self.page.as_ref().is_some_and(RegisterPage::is_usable);
        let slot = class.bit() as usize;
        match self.written[slot] {
            Some(WritePath::Hypercall) => Ok(None),
            _ if usable => {
                self.written[slot] = Some(WritePath::Page);
                self.page_counters.write(slot);
                Ok(self.page.as_mut())
            }
            Some(WritePath::Page) => Err(Error::MixedWrite {
                class,
                earlier: WritePath::Page,
                attempted: WritePath::Hypercall,
            }),
            None => {
                self.written[slot] = Some(WritePath::Hypercall);
                Ok(None)
            }
        }
    }

    fn hypercall_get(&mut self, op: &'static str, assocs: &mut [hv_register_assoc]) -> Result<()> {
        self.stats.hypercall_gets += 1;
        self.backend
            .get_registers(assocs)
            .map_err(|source| Error::backend(op, source))
    }

    fn hypercall_set(&mut self, op: &'static str, assocs: &[hv_register_assoc]) -> Result<()> {
        self.stats.hypercall_sets += 1;
        self.backend
            .set_registers(assocs)
            .map_err(|source| Error::backend(op, source))
    }

    #[cold]
    #[inline(never)]
    fn get_one(&mut self, reg: PageReg, name: hv::hv_register_name) -> Result<hv_register_value> {
        if let Some(page) = self.read_page(reg.class()) {
            let stale = match reg {
                PageReg::ReadOnly(r) => self.stale_read_only & (1 << r.index()) != 0,
                _ => false,
            };
            if !stale {
                let value = reg.read_from(page);
                self.page_counters.read(reg.counter_slot());
                return Ok(value);
            }
        }
        let mut a = [named(name)];
        self.hypercall_get("get vp registers", &mut a)?;
        Ok(a[0].value)
    }

    /// Reads any registers by name: those the page holds (and may be read now) from the page,
    /// all others with one get-registers hypercall.
    pub fn get_hv_registers(&mut self, assocs: &mut [hv_register_assoc]) -> Result<()> {
        let mut remote: Vec<usize> = Vec::new();
        for (i, a) in assocs.iter_mut().enumerate() {
            let page_value = PageReg::from_name(a.name).and_then(|reg| {
                let slot = reg.counter_slot();
                let stale = match reg {
                    PageReg::ReadOnly(r) => self.stale_read_only & (1 << r.index()) != 0,
                    _ => false,
                };
                if stale {
                    return None;
                }
                self.read_page(reg.class())
                    .map(|p| (reg.read_from(p), slot))
            });
            match page_value {
                Some((v, slot)) => {
                    a.value = v;
                    self.page_counters.read(slot);
                }
                None => remote.push(i),
            }
        }
        if remote.is_empty() {
            return Ok(());
        }
        let mut batch: Vec<hv_register_assoc> = remote
            .iter()
            .filter_map(|i| assocs.get(*i).map(|a| named(a.name)))
            .collect();
        self.hypercall_get("get vp registers", &mut batch)?;
        for (i, v) in remote.iter().zip(batch) {
            if let Some(a) = assocs.get_mut(*i) {
                a.value = v.value;
            }
        }
        Ok(())
    }

    /// Writes any registers by name with one set-registers hypercall (the explicit hypercall
    /// path). Refused with [`Error::MixedWrite`] if one of them belongs to a class already
    /// written on the page since the last run; nothing is written in that case.
    pub fn set_hv_registers(&mut self, assocs: &[hv_register_assoc]) -> Result<()> {
        let regs: Vec<Option<PageReg>> =
            assocs.iter().map(|a| PageReg::from_name(a.name)).collect();
        for class in regs.iter().flatten().filter_map(|r| r.class()) {
            if self.written[class.bit() as usize] == Some(WritePath::Page) {
                return Err(Error::MixedWrite {
                    class,
                    earlier: WritePath::Page,
                    attempted: WritePath::Hypercall,
                });
            }
        }
        self.hypercall_set("set vp registers", assocs)?;
        for reg in regs.into_iter().flatten() {
            match reg {
                PageReg::ReadOnly(r) => self.stale_read_only |= 1 << r.index(),
                other => {
                    if let Some(class) = other.class() {
                        self.written[class.bit() as usize] = Some(WritePath::Hypercall);
                    }
                }
            }
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn set_one(
        &mut self,
        class: RegisterClass,
        name: hv::hv_register_name,
        value: hv_register_value,
        on_page: impl FnOnce(&mut RegisterPage),
    ) -> Result<()> {
        match self.route_write(class)? {
            Some(page) => {
                on_page(page);
                Ok(())
            }
            None => self.hypercall_set("set vp registers", &[assoc(name, value)]),
        }
    }

    /// The vCPU ran: resets the write-path tracking from the page's dirty bits.
    ///
    /// Crate-internal on purpose: called without a run, it would let a later write mix
    /// paths. Runs go through [`VcpuRegisters::run`] or the simulator.
    pub(crate) fn run_done(&mut self) {
        // Classes whose dirty bits the run did not consume (e.g. the run ioctl failed before
        // dispatching) are still pending on the page: keep guarding them.
        let pending = self
            .page
            .as_ref()
            .filter(|p| p.is_usable())
            .map(RegisterPage::dirty)
            .unwrap_or_default();
        for class in RegisterClass::ALL {
            let slot = &mut self.written[class.bit() as usize];
            *slot = if pending.contains(class) {
                Some(WritePath::Page)
            } else {
                None
            };
        }
        self.stale_read_only = 0;
    }

    /// Writes a register that is read-only on the page (always a hypercall). Later reads
    /// of it use the hypercall until the next run.
    pub fn set_read_only(&mut self, reg: ReadOnlyRegister, value: u64) -> Result<()> {
        self.hypercall_set(
            "set vp registers",
            &[assoc(reg.hv_name(), hv_register_value { reg64: value })],
        )?;
        self.stale_read_only |= 1 << reg.index();
        Ok(())
    }

    /// The general purpose registers, RIP and RFLAGS.
    pub fn standard_registers(&mut self) -> Result<hv::StandardRegisters> {
        let mut assocs: Vec<hv_register_assoc> = Gpr::ALL
            .iter()
            .map(|g| named(g.hv_name()))
            .chain([
                named(hv::hv_register_name_HV_X64_REGISTER_RIP),
                named(hv::hv_register_name_HV_X64_REGISTER_RFLAGS),
            ])
            .collect();
        self.get_hv_registers(&mut assocs)?;
        let mut regs = crate::PageRegisters::default();
        for (slot, a) in regs.gp.iter_mut().zip(&assocs) {
            *slot = reg64(a.value);
        }
        regs.rip = assocs.get(16).map(|a| reg64(a.value)).unwrap_or_default();
        regs.rflags = assocs.get(17).map(|a| reg64(a.value)).unwrap_or_default();
        Ok(regs.to_standard())
    }

    /// Writes the general purpose registers, RIP and RFLAGS (page or hypercall per class).
    pub fn set_standard_registers(&mut self, regs: &hv::StandardRegisters) -> Result<()> {
        let gp = crate::standard_to_gp(regs);
        match self.route_write(RegisterClass::General)? {
            Some(page) => {
                for (g, v) in Gpr::ALL.into_iter().zip(gp) {
                    page.set_gpr(g, v);
                }
            }
            None => {
                let assocs: Vec<_> = Gpr::ALL
                    .into_iter()
                    .zip(gp)
                    .map(|(g, v)| assoc(g.hv_name(), hv_register_value { reg64: v }))
                    .collect();
                self.hypercall_set("set vp registers", &assocs)?;
            }
        }
        ExitRegisters::set_rip(self, regs.rip)?;
        ExitRegisters::set_rflags(self, regs.rflags)
    }

    /// The special registers: segments, CR0/3/4/8 and EFER from the page when usable,
    /// TR, LDTR, GDTR, IDTR, CR2 and APIC_BASE (and the others when the page is not usable)
    /// by hypercall. The interrupt bitmap is derived from the pending interruption register
    /// as mshv-ioctls does.
    pub fn special_registers(&mut self) -> Result<hv::SpecialRegisters> {
        let seg_names = Segment::ALL.map(|s| s.hv_name());
        let names = [
            hv::hv_register_name_HV_X64_REGISTER_TR,
            hv::hv_register_name_HV_X64_REGISTER_LDTR,
            hv::hv_register_name_HV_X64_REGISTER_GDTR,
            hv::hv_register_name_HV_X64_REGISTER_IDTR,
            hv::hv_register_name_HV_X64_REGISTER_CR0,
            hv::hv_register_name_HV_X64_REGISTER_CR2,
            hv::hv_register_name_HV_X64_REGISTER_CR3,
            hv::hv_register_name_HV_X64_REGISTER_CR4,
            hv::hv_register_name_HV_X64_REGISTER_CR8,
            hv::hv_register_name_HV_X64_REGISTER_EFER,
            hv::hv_register_name_HV_X64_REGISTER_APIC_BASE,
            hv::hv_register_name_HV_REGISTER_PENDING_INTERRUPTION,
        ];
        let mut assocs: Vec<hv_register_assoc> = seg_names
            .iter()
            .chain(names.iter())
            .map(|n| named(*n))
            .collect();
        self.get_hv_registers(&mut assocs)?;
        let v = |i: usize| {
            assocs
                .get(i)
                .map(|a| a.value)
                .unwrap_or(hv_register_value { reg64: 0 })
        };
        let seg = |i: usize| hv::SegmentRegister::from(segment_value(v(i)));
        // SAFETY: `hv_x64_segment_register` and `hv_x64_table_register` are plain data.
        let table = |i: usize| hv::TableRegister::from(unsafe { v(i).table });
        let mut sregs = hv::SpecialRegisters {
            es: seg(0),
            cs: seg(1),
            ss: seg(2),
            ds: seg(3),
            fs: seg(4),
            gs: seg(5),
            // SAFETY: see above.
            tr: hv::SegmentRegister::from(unsafe { v(6).segment }),
            // SAFETY: see above.
            ldt: hv::SegmentRegister::from(unsafe { v(7).segment }),
            gdt: table(8),
            idt: table(9),
            cr0: reg64(v(10)),
            cr2: reg64(v(11)),
            cr3: reg64(v(12)),
            cr4: reg64(v(13)),
            cr8: reg64(v(14)),
            efer: reg64(v(15)),
            apic_base: reg64(v(16)),
            interrupt_bitmap: [0; 4],
        };
        let pending = reg64(v(17));
        // Bit 0: pending; bits 1-3: type (0 = external interrupt); bits 16-31: vector.
        if pending & 1 == 1 && (pending >> 1) & 0x7 == 0 {
            let vector = ((pending >> 16) & 0xff) as usize;
            if let Some(word) = sregs.interrupt_bitmap.get_mut(vector / 64) {
                *word |= 1 << (vector % 64);
            }
        }
        Ok(sregs)
    }

    /// Writes the special registers: the six segments on the page when usable (class
    /// [`RegisterClass::Segment`]), everything else (TR, LDTR, GDTR, IDTR, CR0, CR2, CR3,
    /// CR4, CR8, EFER, APIC_BASE) with one hypercall. The interrupt bitmap is ignored.
    pub fn set_special_registers(&mut self, sregs: &hv::SpecialRegisters) -> Result<()> {
        let segs = crate::special_segments(sregs);
        match self.route_write(RegisterClass::Segment)? {
            Some(page) => {
                for (s, v) in Segment::ALL.into_iter().zip(segs) {
                    page.set_segment(s, v);
                }
            }
            None => {
                let assocs: Vec<_> = Segment::ALL
                    .into_iter()
                    .zip(segs)
                    .map(|(s, v)| assoc(s.hv_name(), hv_register_value { segment: v.into() }))
                    .collect();
                self.hypercall_set("set vp registers", &assocs)?;
            }
        }
        let r64 = |n, v| assoc(n, hv_register_value { reg64: v });
        let assocs = [
            assoc(
                hv::hv_register_name_HV_X64_REGISTER_TR,
                hv_register_value {
                    segment: sregs.tr.into(),
                },
            ),
            assoc(
                hv::hv_register_name_HV_X64_REGISTER_LDTR,
                hv_register_value {
                    segment: sregs.ldt.into(),
                },
            ),
            assoc(
                hv::hv_register_name_HV_X64_REGISTER_GDTR,
                hv_register_value {
                    table: sregs.gdt.into(),
                },
            ),
            assoc(
                hv::hv_register_name_HV_X64_REGISTER_IDTR,
                hv_register_value {
                    table: sregs.idt.into(),
                },
            ),
            r64(hv::hv_register_name_HV_X64_REGISTER_CR0, sregs.cr0),
            r64(hv::hv_register_name_HV_X64_REGISTER_CR2, sregs.cr2),
            r64(hv::hv_register_name_HV_X64_REGISTER_CR3, sregs.cr3),
            r64(hv::hv_register_name_HV_X64_REGISTER_CR4, sregs.cr4),
            r64(hv::hv_register_name_HV_X64_REGISTER_CR8, sregs.cr8),
            r64(hv::hv_register_name_HV_X64_REGISTER_EFER, sregs.efer),
            r64(
                hv::hv_register_name_HV_X64_REGISTER_APIC_BASE,
                sregs.apic_base,
            ),
        ];
        self.hypercall_set("set vp registers", &assocs)?;
        for r in [
            ReadOnlyRegister::Cr0,
            ReadOnlyRegister::Cr3,
            ReadOnlyRegister::Cr4,
            ReadOnlyRegister::Cr8,
            ReadOnlyRegister::Efer,
        ] {
            self.stale_read_only |= 1 << r.index();
        }
        Ok(())
    }
}

impl<B: RegisterHypercalls> ExitRegisters for VcpuRegisters<B> {
    #[inline]
    fn gpr(&mut self, reg: Gpr) -> Result<u64> {
        if let Some(page) = self.fast_read(RegisterClass::General) {
            return Ok(page.gpr(reg));
        }
        self.get_one(PageReg::Gpr(reg), reg.hv_name()).map(reg64)
    }

    #[inline]
    fn set_gpr(&mut self, reg: Gpr, value: u64) -> Result<()> {
        if let Some(page) = self.fast_write(RegisterClass::General) {
            page.set_gpr(reg, value);
            return Ok(());
        }
        self.set_one(
            RegisterClass::General,
            reg.hv_name(),
            hv_register_value { reg64: value },
            |p| p.set_gpr(reg, value),
        )
    }

    #[inline]
    fn rip(&mut self) -> Result<u64> {
        if let Some(page) = self.fast_read(RegisterClass::Ip) {
            return Ok(page.rip());
        }
        self.get_one(PageReg::Rip, hv::hv_register_name_HV_X64_REGISTER_RIP)
            .map(reg64)
    }

    #[inline]
    fn set_rip(&mut self, value: u64) -> Result<()> {
        if let Some(page) = self.fast_write(RegisterClass::Ip) {
            page.set_rip(value);
            return Ok(());
        }
        self.set_one(
            RegisterClass::Ip,
            hv::hv_register_name_HV_X64_REGISTER_RIP,
            hv_register_value { reg64: value },
            |p| p.set_rip(value),
        )
    }

    #[inline]
    fn rflags(&mut self) -> Result<u64> {
        if let Some(page) = self.fast_read(RegisterClass::Flags) {
            return Ok(page.rflags());
        }
        self.get_one(PageReg::Rflags, hv::hv_register_name_HV_X64_REGISTER_RFLAGS)
            .map(reg64)
    }

    #[inline]
    fn set_rflags(&mut self, value: u64) -> Result<()> {
        if let Some(page) = self.fast_write(RegisterClass::Flags) {
            page.set_rflags(value);
            return Ok(());
        }
        self.set_one(
            RegisterClass::Flags,
            hv::hv_register_name_HV_X64_REGISTER_RFLAGS,
            hv_register_value { reg64: value },
            |p| p.set_rflags(value),
        )
    }

    #[inline]
    fn segment(&mut self, seg: Segment) -> Result<SegmentRegister> {
        if let Some(page) = self.fast_read(RegisterClass::Segment) {
            return Ok(page.segment(seg));
        }
        self.get_one(PageReg::Segment(seg), seg.hv_name())
            .map(segment_value)
    }

    #[inline]
    fn set_segment(&mut self, seg: Segment, value: SegmentRegister) -> Result<()> {
        if let Some(page) = self.fast_write(RegisterClass::Segment) {
            page.set_segment(seg, value);
            return Ok(());
        }
        self.set_one(
            RegisterClass::Segment,
            seg.hv_name(),
            hv_register_value {
                segment: value.into(),
            },
            |p| p.set_segment(seg, value),
        )
    }

    #[inline]
    fn xmm(&mut self, reg: Xmm) -> Result<u128> {
        if let Some(page) = self.fast_read(RegisterClass::Xmm) {
            return Ok(page.xmm(reg));
        }
        self.get_one(PageReg::Xmm(reg), reg.hv_name()).map(reg128)
    }

    #[inline]
    fn set_xmm(&mut self, reg: Xmm, value: u128) -> Result<()> {
        if let Some(page) = self.fast_write(RegisterClass::Xmm) {
            page.set_xmm(reg, value);
            return Ok(());
        }
        self.set_one(
            RegisterClass::Xmm,
            reg.hv_name(),
            hv_register_value {
                reg128: u128_to_hv(value),
            },
            |p| p.set_xmm(reg, value),
        )
    }

    #[inline]
    fn read_only(&mut self, reg: ReadOnlyRegister) -> Result<u64> {
        if self.stale_read_only & (1 << reg.index()) == 0 {
            if let Some(page) = self.page.as_ref().filter(|p| p.is_usable()) {
                self.page_counters.read(PageCounters::READ_ONLY);
                return Ok(page.read_only(reg));
            }
        }
        self.get_one(PageReg::ReadOnly(reg), reg.hv_name())
            .map(reg64)
    }

    fn stats(&self) -> AccessStats {
        self.page_counters.into_stats(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_classify_to_page_registers() {
        assert_eq!(
            PageReg::from_name(hv::hv_register_name_HV_X64_REGISTER_R15),
            Some(PageReg::Gpr(Gpr::R15))
        );
        assert_eq!(
            PageReg::from_name(hv::hv_register_name_HV_X64_REGISTER_RIP),
            Some(PageReg::Rip)
        );
        assert_eq!(
            PageReg::from_name(hv::hv_register_name_HV_X64_REGISTER_XMM3),
            Some(PageReg::Xmm(Xmm::Xmm3))
        );
        assert_eq!(
            PageReg::from_name(hv::hv_register_name_HV_X64_REGISTER_GS),
            Some(PageReg::Segment(Segment::Gs))
        );
        assert_eq!(
            PageReg::from_name(hv::hv_register_name_HV_X64_REGISTER_EFER),
            Some(PageReg::ReadOnly(ReadOnlyRegister::Efer))
        );
        for not_on_page in [
            hv::hv_register_name_HV_X64_REGISTER_TR,
            hv::hv_register_name_HV_X64_REGISTER_CR2,
            hv::hv_register_name_HV_X64_REGISTER_XMM6,
            hv::hv_register_name_HV_X64_REGISTER_APIC_BASE,
            hv::hv_register_name_HV_X64_REGISTER_GDTR,
        ] {
            assert_eq!(PageReg::from_name(not_on_page), None, "{not_on_page:#x}");
        }
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A simulated hypervisor side of the register page (feature `sim`).
//!
//! [`SimHypervisor`] owns the vCPU's register state and plays the hypervisor's part of the
//! page protocol:
//!
//! * [`SimHypervisor::exit`] — the vCPU exits to the VMM: the whole state is stored on the
//!   page, `dirty` is cleared, `isvalid` set as configured;
//! * [`SimHypervisor::dispatch`] — the VMM runs the vCPU again: only the classes whose dirty
//!   bit is set are copied from the page into the state (a page write without its dirty bit
//!   is **lost**, exactly as on the real hypervisor), then `dirty` is cleared;
//! * [`SimHypervisor::set_page_valid`] — flips `isvalid`, as the hypervisor may at any
//!   dispatch.
//!
//! [`SimHypercalls`] is the matching fake get/set-registers backend: it reads and writes the
//! same state directly (the page is only refreshed at the next exit, as on the real
//! hypervisor). Downstream VMMs use both to test their exit handlers without `/dev/mshv`.
//! Both are `Send + Sync`, so a simulated vCPU can sit behind the same `Send + Sync` vCPU
//! type as a real one (see `examples/vcpu_trait.rs`).
//!
//! [`model`] holds a plain reference model and an operation language ([`Op`]) for property
//! tests and fuzzing.

pub mod model;

use std::collections::BTreeMap;
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mshv_bindings as hv;
use mshv_bindings::{hv_register_assoc, hv_register_value, hv_u128};

use crate::access::{PageReg, VcpuRegisters};
use crate::dirty::DirtyClasses;
use crate::fallback::RegisterHypercalls;
use crate::page::RegisterPage;
use crate::regs::PageRegisters;

pub use model::{Divergence, Harness, Model, Op};

/// Errors of the simulated hypervisor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The target has no register page.
    #[error("the target has no register page")]
    NoPage,
    /// The page was not created by this simulated hypervisor.
    #[error(
        "page at {found:#x} does not belong to this simulated hypervisor (expected {expected:#x})"
    )]
    ForeignPage {
        /// Address of the page created by [`SimHypervisor::new`].
        expected: usize,
        /// Address of the page passed in.
        found: usize,
    },
    /// A fake hypercall named a register the simulator does not model.
    #[error("register {name:#x} is not modelled by the simulated hypervisor")]
    UnknownRegister {
        /// The `hv_register_name`.
        name: hv::hv_register_name,
    },
}

/// Something that holds the VMM side of a simulated page: a bare [`RegisterPage`] or a
/// [`VcpuRegisters`] facade (which is also told that the vCPU ran).
///
/// Sealed: its methods cannot be called outside this crate (they take a token only the
/// crate can create), because they reach the facade's page past its mixing guard, as only
/// the (simulated) hypervisor may.
pub trait SimTarget: sealed::SimTargetInner {}

mod sealed {
    use crate::page::RegisterPage;

    /// Proof that the caller is this crate (no public constructor, not nameable outside).
    #[derive(Debug)]
    pub struct Token(());

    impl Token {
        pub(crate) fn new() -> Self {
            Token(())
        }
    }

    /// The crate-internal half of [`super::SimTarget`].
    pub trait SimTargetInner {
        /// The page, if any.
        fn sim_page(&mut self, token: Token) -> Option<&mut RegisterPage>;
        /// Called when a run returned (after [`super::SimHypervisor::exit`] filled the
        /// page, or after a failed run).
        fn sim_run_done(&mut self, _token: Token) {}
    }
}

use sealed::Token;

impl SimTarget for RegisterPage {}

impl sealed::SimTargetInner for RegisterPage {
    fn sim_page(&mut self, _: Token) -> Option<&mut RegisterPage> {
        Some(self)
    }
}

impl<B: RegisterHypercalls> SimTarget for VcpuRegisters<B> {}

impl<B: RegisterHypercalls> sealed::SimTargetInner for VcpuRegisters<B> {
    fn sim_page(&mut self, _: Token) -> Option<&mut RegisterPage> {
        self.page_mut()
    }

    fn sim_run_done(&mut self, _: Token) {
        self.run_done();
    }
}

/// What a dispatch did with the page's dirty classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DispatchReport {
    /// Classes copied from the page into the vCPU state.
    pub applied: DirtyClasses,
    /// Dirty classes dropped because the page was invalid.
    pub discarded: DirtyClasses,
}

/// Registers that are not on the page but that the fake hypercalls accept.
const OFF_PAGE_NAMES: [hv::hv_register_name; 6] = [
    hv::hv_register_name_HV_X64_REGISTER_TR,
    hv::hv_register_name_HV_X64_REGISTER_LDTR,
    hv::hv_register_name_HV_X64_REGISTER_GDTR,
    hv::hv_register_name_HV_X64_REGISTER_IDTR,
    hv::hv_register_name_HV_X64_REGISTER_CR2,
    hv::hv_register_name_HV_X64_REGISTER_APIC_BASE,
];

fn off_page_known(name: hv::hv_register_name) -> bool {
    OFF_PAGE_NAMES.contains(&name)
        || (hv::hv_register_name_HV_X64_REGISTER_XMM6..=hv::hv_register_name_HV_X64_REGISTER_XMM15)
            .contains(&name)
}

/// The simulated vCPU: the registers the page holds plus a few it does not.
#[derive(Debug, Default)]
struct SimVcpu {
    regs: PageRegisters,
    other: BTreeMap<hv::hv_register_name, hv_u128>,
    gets: u64,
    sets: u64,
}

impl SimVcpu {
    fn get(&self, name: hv::hv_register_name) -> Result<hv_register_value, SimError> {
        if let Some(reg) = PageReg::from_name(name) {
            let r = &self.regs;
            return Ok(match reg {
                PageReg::Gpr(g) => hv_register_value { reg64: r.gpr(g) },
                PageReg::Rip => hv_register_value { reg64: r.rip },
                PageReg::Rflags => hv_register_value { reg64: r.rflags },
                PageReg::Xmm(x) => {
                    let v = r.xmm(x);
                    hv_register_value {
                        reg128: hv_u128 {
                            low_part: v as u64,
                            high_part: (v >> 64) as u64,
                        },
                    }
                }
                PageReg::Segment(s) => hv_register_value {
                    segment: r.segment(s).into(),
                },
                PageReg::ReadOnly(ro) => hv_register_value {
                    reg64: r.read_only(ro),
                },
            });
        }
        if off_page_known(name) {
            let v = self.other.get(&name).copied().unwrap_or_default();
            return Ok(hv_register_value { reg128: v });
        }
        Err(SimError::UnknownRegister { name })
    }

    fn set(
        &mut self,
        name: hv::hv_register_name,
        value: hv_register_value,
    ) -> Result<(), SimError> {
        // SAFETY (for the union reads below): `hv_register_value` is 16 bytes of plain data;
        // every member accepts any bit pattern.
        if let Some(reg) = PageReg::from_name(name) {
            let r = &mut self.regs;
            match reg {
                // SAFETY: see above.
                PageReg::Gpr(g) => r.set_gpr(g, unsafe { value.reg64 }),
                // SAFETY: see above.
                PageReg::Rip => r.rip = unsafe { value.reg64 },
                // SAFETY: see above.
                PageReg::Rflags => r.rflags = unsafe { value.reg64 },
                PageReg::Xmm(x) => {
                    // SAFETY: see above.
                    let v = unsafe { value.reg128 };
                    r.xmm[x.index()] = (u128::from(v.high_part) << 64) | u128::from(v.low_part);
                }
                PageReg::Segment(s) => {
                    // SAFETY: see above.
                    r.segments[s.index()] = unsafe { value.segment }.into();
                }
                // SAFETY: see above.
                PageReg::ReadOnly(ro) => r.read_only[ro.index()] = unsafe { value.reg64 },
            }
            return Ok(());
        }
        if off_page_known(name) {
            // SAFETY: see above.
            self.other.insert(name, unsafe { value.reg128 });
            return Ok(());
        }
        Err(SimError::UnknownRegister { name })
    }
}

/// Locks the simulated vCPU state; a panic while it was held cannot leave it torn (every
/// update is a plain field store), so poisoning is ignored.
fn lock(vcpu: &Mutex<SimVcpu>) -> MutexGuard<'_, SimVcpu> {
    vcpu.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Mutable access to the simulated vCPU's page registers (from
/// [`SimHypervisor::state_mut`]); holds the simulator's lock until dropped.
#[derive(Debug)]
pub struct SimStateGuard<'a>(MutexGuard<'a, SimVcpu>);

impl Deref for SimStateGuard<'_> {
    type Target = PageRegisters;

    fn deref(&self) -> &PageRegisters {
        &self.0.regs
    }
}

impl DerefMut for SimStateGuard<'_> {
    fn deref_mut(&mut self) -> &mut PageRegisters {
        &mut self.0.regs
    }
}

/// The simulated hypervisor of one vCPU.
#[derive(Debug)]
pub struct SimHypervisor {
    vcpu: Arc<Mutex<SimVcpu>>,
    page_addr: usize,
    valid: bool,
    dispatches: u64,
    exits: u64,
}

impl SimHypervisor {
    /// A vCPU with all registers zero and a valid, filled page.
    pub fn new() -> (SimHypervisor, RegisterPage) {
        Self::with_registers(PageRegisters::default())
    }

    /// A vCPU with the given page registers and a valid, filled page.
    pub fn with_registers(regs: PageRegisters) -> (SimHypervisor, RegisterPage) {
        let mut page = RegisterPage::new_heap();
        page.hv_fill(&regs, true);
        let hv = SimHypervisor {
            vcpu: Arc::new(Mutex::new(SimVcpu {
                regs,
                ..SimVcpu::default()
            })),
            page_addr: page.as_ptr() as usize,
            valid: true,
            dispatches: 0,
            exits: 0,
        };
        (hv, page)
    }

    /// The fake hypercall backend operating on this vCPU.
    pub fn hypercalls(&self) -> SimHypercalls {
        SimHypercalls {
            vcpu: Arc::clone(&self.vcpu),
        }
    }

    /// A copy of the vCPU's page registers as the hypervisor sees them.
    pub fn state(&self) -> PageRegisters {
        lock(&self.vcpu).regs
    }

    /// Mutable access to the vCPU state (to play the guest: changes become visible on the
    /// page at the next [`SimHypervisor::exit`]). Drop the guard before the next call that
    /// needs the state (fake hypercalls, `dispatch`, `exit`): it holds the simulator's lock.
    pub fn state_mut(&self) -> SimStateGuard<'_> {
        SimStateGuard(lock(&self.vcpu))
    }

    /// Number of fake get- and set-registers hypercalls served so far.
    pub fn hypercall_counts(&self) -> (u64, u64) {
        let v = lock(&self.vcpu);
        (v.gets, v.sets)
    }

    /// Number of dispatches and exits so far.
    pub fn run_counts(&self) -> (u64, u64) {
        (self.dispatches, self.exits)
    }

    /// Whether the page will be marked valid at exits.
    pub fn page_valid(&self) -> bool {
        self.valid
    }

    fn page_of<'t, T: SimTarget + ?Sized>(
        &self,
        target: &'t mut T,
    ) -> Result<&'t mut RegisterPage, SimError> {
        let page = target.sim_page(Token::new()).ok_or(SimError::NoPage)?;
        let found = page.as_ptr() as usize;
        if found != self.page_addr {
            return Err(SimError::ForeignPage {
                expected: self.page_addr,
                found,
            });
        }
        Ok(page)
    }

    /// Sets `isvalid` now and for the following exits.
    pub fn set_page_valid<T: SimTarget + ?Sized>(
        &mut self,
        target: &mut T,
        valid: bool,
    ) -> Result<(), SimError> {
        let page = self.page_of(target)?;
        page.hv_set_valid(valid);
        self.valid = valid;
        Ok(())
    }

    /// Overwrites the page's `version` field now (a page format this crate does not know
    /// must make the facade fall back to hypercalls). The next [`exit`](Self::exit) writes
    /// version 1 again.
    pub fn set_page_version<T: SimTarget + ?Sized>(
        &mut self,
        target: &mut T,
        version: u16,
    ) -> Result<(), SimError> {
        self.page_of(target)?.hv_set_version(version);
        Ok(())
    }

    /// The vCPU is dispatched: applies the page's dirty classes (only those) to the vCPU
    /// state and clears `dirty`. With an invalid page the dirty classes are discarded.
    pub fn dispatch<T: SimTarget + ?Sized>(
        &mut self,
        target: &mut T,
    ) -> Result<DispatchReport, SimError> {
        let page = self.page_of(target)?;
        let dirty = page.dirty();
        let mut report = DispatchReport::default();
        if page.is_valid() {
            let on_page = page.registers();
            let mut vcpu = lock(&self.vcpu);
            for class in dirty.iter() {
                vcpu.regs.copy_class_from(&on_page, class);
            }
            report.applied = dirty;
        } else {
            report.discarded = dirty;
        }
        page.hv_set_dirty(DirtyClasses::empty());
        self.dispatches += 1;
        Ok(report)
    }

    /// The vCPU exits to the VMM: stores the state on the page (clearing `dirty`, setting
    /// `isvalid` as configured) and tells the target that a run completed.
    pub fn exit<T: SimTarget + ?Sized>(&mut self, target: &mut T) -> Result<(), SimError> {
        let page = self.page_of(target)?;
        let regs = lock(&self.vcpu).regs;
        page.hv_fill(&regs, self.valid);
        self.exits += 1;
        target.sim_run_done(Token::new());
        Ok(())
    }

    /// A run that fails before the vCPU is dispatched (the run ioctl returned an error such
    /// as `EINTR`): nothing is consumed, the page keeps its contents and dirty bits, and the
    /// target is told that the run returned.
    pub fn run_failed<T: SimTarget + ?Sized>(&mut self, target: &mut T) -> Result<(), SimError> {
        self.page_of(target)?;
        target.sim_run_done(Token::new());
        Ok(())
    }

    /// One full run: [`dispatch`](Self::dispatch), `guest` changes the state as the guest's
    /// execution would, then [`exit`](Self::exit).
    pub fn run<T: SimTarget + ?Sized>(
        &mut self,
        target: &mut T,
        guest: impl FnOnce(&mut PageRegisters),
    ) -> Result<DispatchReport, SimError> {
        let report = self.dispatch(target)?;
        guest(&mut self.state_mut());
        self.exit(target)?;
        Ok(report)
    }
}

/// The fake get/set-registers hypercall backend of a [`SimHypervisor`].
///
/// An unknown register name fails like the real hypercall's invalid-parameter status: an
/// `io::Error` of kind `InvalidInput` wrapping [`SimError::UnknownRegister`].
#[derive(Debug, Clone)]
pub struct SimHypercalls {
    vcpu: Arc<Mutex<SimVcpu>>,
}

fn invalid(e: SimError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

impl RegisterHypercalls for SimHypercalls {
    fn get_registers(&self, assocs: &mut [hv_register_assoc]) -> io::Result<()> {
        let mut vcpu = lock(&self.vcpu);
        vcpu.gets += 1;
        for a in assocs.iter_mut() {
            a.value = vcpu.get(a.name).map_err(invalid)?;
        }
        Ok(())
    }

    fn set_registers(&self, assocs: &[hv_register_assoc]) -> io::Result<()> {
        let mut vcpu = lock(&self.vcpu);
        vcpu.sets += 1;
        // Validate first so that a bad name leaves the state untouched, like the hypercall.
        if let Some(bad) = assocs
            .iter()
            .find(|a| PageReg::from_name(a.name).is_none() && !off_page_known(a.name))
        {
            return Err(invalid(SimError::UnknownRegister { name: bad.name }));
        }
        for a in assocs {
            vcpu.set(a.name, a.value).map_err(invalid)?;
        }
        Ok(())
    }
}

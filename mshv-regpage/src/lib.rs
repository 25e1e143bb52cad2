// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Typed, layout-checked, dirty-bit-safe access to the Microsoft Hypervisor (MSHV) vCPU
//! register page, with a hypercall fallback.
//!
//! On MSHV every vCPU has a 4 KiB page shared with the hypervisor. On an intercept (MMIO or
//! port I/O exit) the hypervisor stores the vCPU's general purpose registers, RIP, RFLAGS,
//! xmm0-5, segment registers and a few read-only control registers there; the VMM can read
//! them and write the writable ones back without a single hypercall, provided it sets the
//! class's *dirty bit* so that the hypervisor applies the write at the next dispatch.
//!
//! * [`RegisterPage`] maps the page and gives typed, volatile access; every setter sets its
//!   class's dirty bit ([`RegisterClass`]), read-only registers have no setter.
//! * [`VcpuRegisters`] is the facade a VMM's exit handler uses: the page when it is mapped
//!   and valid, the get/set-registers hypercalls ([`RegisterHypercalls`]) otherwise, and a
//!   guard against mixing both paths for one register class before the next run. It owns,
//!   shares (`Arc`) or borrows the vCPU fd, and [`VcpuRegisters::run`] runs the vCPU.
//! * [`RegisterCell`] puts a facade behind `&self` for a `Send + Sync` vCPU type (the
//!   shape of cloud-hypervisor's `trait Vcpu`): one claim per exit, plain register accesses
//!   inside; see `examples/vcpu_trait.rs`.
//! * [`ExitRegisters`] is the trait exit handlers can be written against; it is implemented
//!   by [`VcpuRegisters`] and, with feature `kvm`, by `kvm::KvmVcpuRegisters` (the same idea
//!   on KVM's `kvm_run` sync-regs area).
//! * Feature `sim`: `sim::SimHypervisor`, a simulated hypervisor side of the page plus a fake
//!   hypercall backend, to test exit handlers without `/dev/mshv`, and `sim::Op`/`sim::Model`
//!   for property tests and fuzzing.
//!
//! See `docs/DESIGN.md` for the aliasing model and the dirty-bit discipline.
//!
//! The crate is x86_64-only (the page layout is the x86_64 one): on any other target it
//! compiles to an empty crate.
#![cfg_attr(
    feature = "sim",
    doc = r##"
# Example (simulated hypervisor)

```
use mshv_regpage::sim::SimHypervisor;
use mshv_regpage::{ExitRegisters, Gpr, VcpuRegisters};

// The simulated hypervisor and the page it shares with the "VMM".
let (mut hv, page) = SimHypervisor::new();
hv.state_mut().set_gpr(Gpr::Rax, 0x1234);
hv.state_mut().rip = 0x1000;
let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
hv.exit(&mut regs); // the vCPU exits: the hypervisor fills the page

// An exit handler emulating a 1-byte `in al, dx` (2-byte instruction):
let rax = regs.gpr(Gpr::Rax)?;
regs.set_gpr(Gpr::Rax, (rax & !0xff) | 0x5a)?;
let rip = regs.rip()?;
regs.set_rip(rip + 2)?;
assert_eq!(regs.stats().hypercalls(), 0); // all through the page

hv.dispatch(&mut regs)?; // next run: the hypervisor consumes the dirty classes
assert_eq!(hv.state().gpr(Gpr::Rax), 0x125a);
assert_eq!(hv.state().rip, 0x1002);
# Ok::<(), Box<dyn std::error::Error>>(())
```
"##
)]
#![cfg(target_arch = "x86_64")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]

pub(crate) mod access;
mod cell;
mod dirty;
mod error;
mod fallback;
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub mod kvm;
pub mod layout;
mod page;
mod regs;
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub mod sim;

pub use access::{AccessStats, ExitRegisters, VcpuRegisters};
pub use cell::RegisterCell;

/// Compiles and runs the README's example as a doctest.
#[cfg(all(doctest, feature = "sim"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
pub use dirty::{DirtyClasses, RegisterClass};
pub use error::{Error, Result, WritePath};
pub use fallback::RegisterHypercalls;
pub use page::RegisterPage;
pub use regs::{
    special_segments, standard_to_gp, Gpr, PageRegisters, ReadOnlyRegister, Segment,
    SegmentAttributes, SegmentRegister, Xmm,
};

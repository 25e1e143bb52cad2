// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`RegisterCell`]: one vCPU's register facade behind `&self`, `Send + Sync`.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::error::Error;

/// Holds one vCPU's register facade (a [`crate::VcpuRegisters`], a `kvm::KvmVcpuRegisters`
/// or anything else) so that a `Send + Sync` vCPU type whose methods take `&self` can use
/// it — the shape of cloud-hypervisor's `trait Vcpu: Send + Sync` (`run(&self)`,
/// `get_regs(&self)`, `set_regs(&self, ..)`).
///
/// # The pattern
///
/// The register page may be touched by one thread at a time, and by none while the vCPU
/// runs. `RegisterCell::with` lends the facade as `&mut` to one closure at a time; a
/// concurrent or nested `with` does not wait, it fails with [`Error::Busy`]:
///
/// * `run(&self)` claims the cell **once per exit** and does everything inside: the run
///   ioctl ([`crate::VcpuRegisters::run`]) and the fast-path exit handling (PIO: advance
///   RIP, update RAX). The register accesses inside are the plain facade's — no lock, no
///   atomic per register;
/// * `get_regs(&self)`/`set_regs(&self, ..)` each claim the cell once around their bulk
///   access. In a VMM they run on the vCPU thread between runs, or on another thread while
///   the vCPU is paused (not inside `run`) — then the cell is free;
/// * a call from another thread while the vCPU is inside `run` gets [`Error::Busy`]
///   instead of blocking behind a guest that may not exit for a long time (and instead of
///   reading registers the hypervisor owns at that moment). Pause the vCPU first, as VMMs
///   already do before saving state.
///
/// The claim is one compare-exchange (acquire) and one release store per `with`: a few
/// nanoseconds once per exit, next to an exit that costs tens of microseconds
/// (`benches/exit_cost.rs` measures both).
///
/// ```
/// # #[cfg(feature = "sim")] {
/// use mshv_regpage::sim::{SimHypercalls, SimHypervisor};
/// use mshv_regpage::{ExitRegisters, Gpr, RegisterCell, VcpuRegisters};
///
/// let (_hv, page) = SimHypervisor::new();
/// let cell = RegisterCell::new(VcpuRegisters::new(Some(page), _hv.hypercalls()));
/// // Shared by reference (or through an `Arc`) between threads:
/// std::thread::scope(|s| {
///     s.spawn(|| cell.with(|regs| regs.set_gpr(Gpr::Rax, 7)));
/// });
/// assert_eq!(cell.with(|regs| regs.gpr(Gpr::Rax))?, 7);
/// // A nested claim (or one from another thread during a run) is refused, not waited for.
/// let nested = cell.with(|_| Ok::<_, mshv_regpage::Error>(cell.with(|r| r.rip())));
/// assert!(matches!(nested, Ok(Err(mshv_regpage::Error::Busy))));
/// # }
/// # Ok::<(), mshv_regpage::Error>(())
/// ```
#[derive(Debug)]
pub struct RegisterCell<R> {
    claimed: AtomicBool,
    inner: UnsafeCell<R>,
}

// SAFETY: `inner` is only reached through `with` (which hands out `&mut R` to exactly one
// closure at a time, guarded by `claimed`: the successful compare-exchange with Acquire
// ordering synchronises with the Release store of the previous holder) or through
// `get_mut`/`into_inner`, which need `&mut self`/`self`. So sharing `&RegisterCell<R>`
// between threads only ever moves exclusive access to `R` from one thread to another, which
// is sound when `R: Send` (the same bound as `Mutex<R>: Sync`).
unsafe impl<R: Send> Sync for RegisterCell<R> {}

/// Releases the claim when dropped (also when the closure panics).
struct Claim<'a>(&'a AtomicBool);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<R> RegisterCell<R> {
    /// Wraps `regs`.
    pub const fn new(regs: R) -> Self {
        RegisterCell {
            claimed: AtomicBool::new(false),
            inner: UnsafeCell::new(regs),
        }
    }

    /// Lends the facade to `f` if nobody else is using it, else fails with
    /// [`Error::Busy`] at once (it never waits). `f`'s own error type only needs
    /// `From<mshv_regpage::Error>`.
    ///
    /// Keep everything one exit needs — the run and the exit handling — inside one call.
    #[inline]
    pub fn with<T, E>(&self, f: impl FnOnce(&mut R) -> Result<T, E>) -> Result<T, E>
    where
        E: From<Error>,
    {
        if self
            .claimed
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(Error::Busy.into());
        }
        let _claim = Claim(&self.claimed);
        // SAFETY: the compare-exchange above succeeded, so this thread holds the only claim
        // until `_claim` is dropped after `f` returns (or unwinds); every other `with` fails
        // without touching `inner`, and `get_mut`/`into_inner` cannot run while `&self` is
        // borrowed. So this is the only reference to `inner` for its lifetime.
        let regs = unsafe { &mut *self.inner.get() };
        f(regs)
    }

    /// Whether the cell is claimed right now (a snapshot, for diagnostics).
    pub fn is_busy(&self) -> bool {
        self.claimed.load(Ordering::Relaxed)
    }

    /// The facade, when the cell is not shared (`&mut self` proves it).
    pub fn get_mut(&mut self) -> &mut R {
        self.inner.get_mut()
    }

    /// Gives the facade back.
    pub fn into_inner(self) -> R {
        self.inner.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_closure_releases_the_claim() {
        let cell = RegisterCell::new(0u32);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = cell.with(|_| -> Result<(), Error> { panic!("handler bug") });
        }));
        assert!(caught.is_err());
        assert!(!cell.is_busy());
        assert_eq!(
            cell.with(|v| {
                *v += 1;
                Ok::<_, Error>(*v)
            })
            .unwrap(),
            1
        );
    }

    #[test]
    fn nested_claims_are_refused_not_deadlocked() {
        let cell = RegisterCell::new(1u8);
        let inner = cell
            .with(|_| Ok::<_, Error>(cell.with(|v| Ok::<_, Error>(*v))))
            .unwrap();
        assert!(matches!(inner, Err(Error::Busy)));
        assert_eq!(cell.into_inner(), 1);
    }
}

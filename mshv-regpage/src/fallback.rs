// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The get/set-registers hypercall backend used when the page is unmapped or invalid, and
//! for every register the page does not hold.

use std::io;
use std::sync::Arc;

use mshv_bindings::hv_register_assoc;

/// Get/set-registers hypercalls of one vCPU.
///
/// Implemented for `mshv_ioctls::VcpuFd` (through `get_reg`/`set_reg`, i.e. the
/// `HVCALL_GET_VP_REGISTERS`/`HVCALL_SET_VP_REGISTERS` hypercalls — deliberately *not*
/// `get_regs`/`set_regs`, which consult mshv-ioctls' own copy of the register page), for
/// `&T`, `Box<T>` and `Arc<T>` of implementors (so the facade can own the vCPU fd, share it
/// with the VMM through an `Arc`, or borrow it), and by `sim::SimHypercalls` (feature
/// `sim`).
///
/// Errors are `io::Error`s so that the errno survives: an OS error should be returned as
/// `io::Error::from_raw_os_error(errno)` (or `from(...)` of an errno type), anything else
/// wrapped with `io::Error::new`/`io::Error::other`.
pub trait RegisterHypercalls {
    /// Reads the registers named by `assocs[i].name` into `assocs[i].value`.
    fn get_registers(&self, assocs: &mut [hv_register_assoc]) -> io::Result<()>;

    /// Writes `assocs[i].value` to the registers named by `assocs[i].name`.
    fn set_registers(&self, assocs: &[hv_register_assoc]) -> io::Result<()>;
}

/// Converts mshv-ioctls' error: an errno stays an OS error (`raw_os_error()`), a hypercall
/// that failed with a hypervisor status is wrapped whole (code and status kept).
pub(crate) fn mshv_io_error(e: mshv_ioctls::MshvError) -> io::Error {
    match e {
        mshv_ioctls::MshvError::Errno(errno) => io::Error::from_raw_os_error(errno.errno()),
        other => io::Error::other(other),
    }
}

impl RegisterHypercalls for mshv_ioctls::VcpuFd {
    fn get_registers(&self, assocs: &mut [hv_register_assoc]) -> io::Result<()> {
        self.get_reg(assocs).map_err(mshv_io_error)
    }

    fn set_registers(&self, assocs: &[hv_register_assoc]) -> io::Result<()> {
        self.set_reg(assocs).map_err(mshv_io_error)
    }
}

impl<T: RegisterHypercalls + ?Sized> RegisterHypercalls for &T {
    fn get_registers(&self, assocs: &mut [hv_register_assoc]) -> io::Result<()> {
        (**self).get_registers(assocs)
    }

    fn set_registers(&self, assocs: &[hv_register_assoc]) -> io::Result<()> {
        (**self).set_registers(assocs)
    }
}

impl<T: RegisterHypercalls + ?Sized> RegisterHypercalls for Box<T> {
    fn get_registers(&self, assocs: &mut [hv_register_assoc]) -> io::Result<()> {
        (**self).get_registers(assocs)
    }

    fn set_registers(&self, assocs: &[hv_register_assoc]) -> io::Result<()> {
        (**self).set_registers(assocs)
    }
}

impl<T: RegisterHypercalls + ?Sized> RegisterHypercalls for Arc<T> {
    fn get_registers(&self, assocs: &mut [hv_register_assoc]) -> io::Result<()> {
        (**self).get_registers(assocs)
    }

    fn set_registers(&self, assocs: &[hv_register_assoc]) -> io::Result<()> {
        (**self).set_registers(assocs)
    }
}

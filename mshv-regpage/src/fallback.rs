//! The get/set-registers hypercall backend used when the page is unmapped or invalid, and
//! for every register the page does not hold.

use mshv_bindings::hv_register_assoc;

use crate::error::BackendError;

/// Get/set-registers hypercalls of one vCPU.
///
/// Implemented for `mshv_ioctls::VcpuFd` (through `get_reg`/`set_reg`, i.e. the
/// `HVCALL_GET_VP_REGISTERS`/`HVCALL_SET_VP_REGISTERS` hypercalls — deliberately *not*
/// `get_regs`/`set_regs`, which consult mshv-ioctls' own copy of the register page), for
/// references to implementors, and by `sim::SimHypercalls` (feature `sim`).
pub trait RegisterHypercalls {
    /// Reads the registers named by `assocs[i].name` into `assocs[i].value`.
    fn get_registers(&self, assocs: &mut [hv_register_assoc]) -> Result<(), BackendError>;

    /// Writes `assocs[i].value` to the registers named by `assocs[i].name`.
    fn set_registers(&self, assocs: &[hv_register_assoc]) -> Result<(), BackendError>;
}

impl RegisterHypercalls for mshv_ioctls::VcpuFd {
    fn get_registers(&self, assocs: &mut [hv_register_assoc]) -> Result<(), BackendError> {
        self.get_reg(assocs)
            .map_err(|e| Box::new(e) as BackendError)
    }

    fn set_registers(&self, assocs: &[hv_register_assoc]) -> Result<(), BackendError> {
        self.set_reg(assocs)
            .map_err(|e| Box::new(e) as BackendError)
    }
}

impl<T: RegisterHypercalls + ?Sized> RegisterHypercalls for &T {
    fn get_registers(&self, assocs: &mut [hv_register_assoc]) -> Result<(), BackendError> {
        (**self).get_registers(assocs)
    }

    fn set_registers(&self, assocs: &[hv_register_assoc]) -> Result<(), BackendError> {
        (**self).set_registers(assocs)
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! mshv-regpage behind a cloud-hypervisor-shaped `trait Vcpu: Send + Sync` (methods on
//! `&self`), the vCPU owning its fd through an `Arc` shared with the VM.

use std::sync::Arc;

use mshv_bindings::{hv_message, StandardRegisters};
use mshv_ioctls::VcpuFd;
use mshv_regpage::{Error, ExitRegisters, Gpr, RegisterCell, RegisterHypercalls, VcpuRegisters};

/// The vCPU interface of the VMM.
pub trait Vcpu: Send + Sync {
    /// The general purpose registers, RIP and RFLAGS.
    fn get_regs(&self) -> Result<StandardRegisters, Error>;
    /// Sets the general purpose registers, RIP and RFLAGS.
    fn set_regs(&self, regs: &StandardRegisters) -> Result<(), Error>;
    /// Completes a port `in` of `size` bytes (1, 2 or 4) that returned `data`, for an
    /// instruction of `insn_len` bytes: the PIO fast path of an exit.
    fn complete_pio_in(&self, size: u8, data: u32, insn_len: u64) -> Result<(), Error>;
}

/// A vCPU whose registers go through mshv-regpage, whatever the hypercall backend.
pub struct RegpageVcpu<B> {
    regs: RegisterCell<VcpuRegisters<B>>,
}

/// The production type: the VM keeps an `Arc<VcpuFd>` per vCPU, the facade another.
pub type MshvVcpu = RegpageVcpu<Arc<VcpuFd>>;

impl MshvVcpu {
    /// Maps the vCPU's register page (hypercalls where there is none).
    pub fn from_fd(fd: Arc<VcpuFd>) -> Result<Self, Error> {
        Ok(Self::new(VcpuRegisters::for_vcpu(fd)?))
    }

    /// Runs the vCPU until its next intercept.
    pub fn run(&self) -> Result<hv_message, Error> {
        self.regs.with(|regs| regs.run())
    }
}

impl<B: RegisterHypercalls> RegpageVcpu<B> {
    /// Wraps a facade.
    pub fn new(regs: VcpuRegisters<B>) -> Self {
        RegpageVcpu {
            regs: RegisterCell::new(regs),
        }
    }

    /// Lends the facade to `f` (one claim), e.g. for a simulated run in tests.
    pub fn with_registers<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut VcpuRegisters<B>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.regs.with(f)
    }
}

/// New RAX after an `in` of `size` bytes: 32-bit results zero-extend, 8/16-bit ones merge.
fn rax_after_in(rax: u64, size: u8, data: u32) -> u64 {
    match size {
        4 => u64::from(data),
        2 => (rax & !0xffff) | u64::from(data & 0xffff),
        _ => (rax & !0xff) | u64::from(data & 0xff),
    }
}

impl<B: RegisterHypercalls + Send> Vcpu for RegpageVcpu<B> {
    fn get_regs(&self) -> Result<StandardRegisters, Error> {
        self.regs.with(|regs| regs.standard_registers())
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<(), Error> {
        self.regs.with(|facade| facade.set_standard_registers(regs))
    }

    fn complete_pio_in(&self, size: u8, data: u32, insn_len: u64) -> Result<(), Error> {
        self.regs.with(|regs| {
            let rax = regs.gpr(Gpr::Rax)?;
            regs.set_gpr(Gpr::Rax, rax_after_in(rax, size, data))?;
            let rip = regs.rip()?;
            regs.set_rip(rip.wrapping_add(insn_len))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mshv_regpage::sim::SimHypervisor;
    use mshv_regpage::RegisterClass;

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    #[test]
    fn pio_fast_path_through_a_shared_vcpu() -> Result<(), BoxError> {
        let (mut hv, page) = SimHypervisor::new();
        let vcpu = Arc::new(RegpageVcpu::new(VcpuRegisters::new(
            Some(page),
            hv.hypercalls(),
        )));
        let shared: Arc<dyn Vcpu> = vcpu.clone();
        shared.set_regs(&StandardRegisters {
            rip: 0x1000,
            rax: 0xffff_0000_0000_1100,
            ..Default::default()
        })?;
        vcpu.with_registers(|regs| -> Result<(), BoxError> {
            hv.dispatch(regs)?;
            hv.exit(regs)?;
            Ok(())
        })?;

        // The vCPU thread completes an `in al` exit through `&self`.
        let thread_vcpu = Arc::clone(&shared);
        std::thread::spawn(move || thread_vcpu.complete_pio_in(1, 0x5a, 1))
            .join()
            .map_err(|_| "vCPU thread panicked")??;

        let applied =
            vcpu.with_registers(|regs| -> Result<_, BoxError> { Ok(hv.dispatch(regs)?.applied) })?;
        assert!(applied.contains(RegisterClass::General) && applied.contains(RegisterClass::Ip));
        assert_eq!(hv.state().gpr(Gpr::Rax), 0xffff_0000_0000_115a);
        assert_eq!(hv.state().rip, 0x1001);
        Ok(())
    }

    #[test]
    fn in_sizes_merge_or_zero_extend() {
        assert_eq!(rax_after_in(u64::MAX, 1, 0x12), 0xffff_ffff_ffff_ff12);
        assert_eq!(rax_after_in(u64::MAX, 2, 0x1234), 0xffff_ffff_ffff_1234);
        assert_eq!(rax_after_in(u64::MAX, 4, 0x1234_5678), 0x1234_5678);
    }
}

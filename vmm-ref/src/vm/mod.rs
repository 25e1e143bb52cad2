//! The KVM virtual machine: RAM, in-kernel irqchip and PIT, vCPUs, and the
//! interrupt / notification plumbing (irqfd, ioeventfd) devices need.

pub mod boot;
pub mod cpu;
pub mod iobus;
pub mod kernel;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod stop;
pub mod vcpu;

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use cpu::CpuSetup;

/// Errors creating or wiring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A required KVM capability is missing.
    #[error("KVM lacks the required capability {0:?}")]
    MissingCap(Cap),
    /// A VM-level KVM ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// The operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory set-up failed.
    #[error("cannot set up guest memory")]
    Memory(#[source] memory::MemoryError),
    /// More vCPUs than KVM allows.
    #[error("{requested} vCPUs requested but KVM allows {max}")]
    TooManyVcpus {
        /// Requested count.
        requested: u8,
        /// KVM's limit.
        max: usize,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// A KVM VM with its RAM.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    mem_size: u64,
}

impl Vm {
    /// Creates the VM: TSS and identity-map addresses, in-kernel irqchip and PIT2
    /// (both before any vCPU), and `mem_size` bytes of RAM registered as slots.
    pub fn new(mem_size: u64) -> Result<Vm, VmError> {
        Self::with_memory(mem_size, false)
    }

    /// [`Vm::new`], with RAM that other processes can map when `shared` (one
    /// sealed memfd, `MAP_SHARED`: what vhost-user back-ends need, see
    /// [`memory::create_shared`]).
    pub fn with_memory(mem_size: u64, shared: bool) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::Pit2,
            Cap::UserMemory,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        let mem = if shared {
            memory::create_shared(mem_size)
        } else {
            memory::create(mem_size)
        }
        .map_err(VmError::Memory)?;
        memory::register(&fd, &mem).map_err(VmError::Memory)?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            memory: GuestMemoryAtomic::new(mem),
            mem_size,
        })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Guest memory, in the form virtio devices take it.
    pub fn memory(&self) -> &GuestMemoryAtomic<GuestMemoryMmap> {
        &self.memory
    }

    /// RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Creates `count` vCPUs with their filtered CPUID (not yet configured).
    pub fn create_vcpus(&self, count: u8) -> Result<Vec<(VcpuFd, CpuSetup)>, VmError> {
        let max = self.kvm.get_max_vcpus();
        if usize::from(count) > max {
            return Err(VmError::TooManyVcpus {
                requested: count,
                max,
            });
        }
        let base_cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        (0..count)
            .map(|id| {
                let fd = self
                    .fd
                    .create_vcpu(u64::from(id))
                    .map_err(ioctl("KVM_CREATE_VCPU"))?;
                let mut cpuid = base_cpuid.clone();
                cpu::filter_cpuid(&mut cpuid, id, count);
                Ok((fd, CpuSetup { id, cpuid }))
            })
            .collect()
    }

    /// The guest's kvmclock now (`KVM_GET_CLOCK`), in nanoseconds: saved when
    /// the VM is stopped so that [`Vm::restore_clock`] can make the stop
    /// invisible to the guest's clock (QEMU's and cloud-hypervisor's pause do
    /// the same).
    pub fn save_clock(&self) -> Result<u64, VmError> {
        Ok(self.fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?.clock)
    }

    /// Sets the guest's kvmclock back to `clock` (`KVM_SET_CLOCK`). The flags
    /// are zero: `KVM_CLOCK_REALTIME`, which `KVM_GET_CLOCK` may report, would
    /// make KVM add the time that passed since.
    pub fn restore_clock(&self, clock: u64) -> Result<(), VmError> {
        let data = kvm_bindings::kvm_clock_data {
            clock,
            ..Default::default()
        };
        self.fd.set_clock(&data).map_err(ioctl("KVM_SET_CLOCK"))
    }

    /// Routes writes of `evt` to guest interrupt `gsi` (KVM irqfd).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl("KVM_IRQFD"))
    }

    /// Signals `evt` in the kernel when the guest writes `datamatch` (32 bits) at
    /// MMIO address `addr` (KVM ioeventfd).
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(ioctl("KVM_IOEVENTFD"))
    }
}

/// The TSC frequency the guest sees, in kHz (KVM_GET_TSC_KHZ on a vCPU).
pub fn tsc_khz(vcpu: &VcpuFd) -> Option<u32> {
    vcpu.get_tsc_khz().ok().filter(|k| *k > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop does not move the guest's clock: restored, kvmclock goes on
    /// from where it was saved, not from where it would be now. Skipped
    /// without /dev/kvm.
    #[test]
    fn a_restored_clock_does_not_count_the_stop() {
        let vm = match Vm::new(16 << 20) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let stop = std::time::Duration::from_millis(300);
        let saved = vm.save_clock().unwrap();
        std::thread::sleep(stop);
        let unrestored = vm.save_clock().unwrap();
        assert!(
            unrestored - saved >= stop.as_nanos() as u64,
            "kvmclock runs while nothing restores it"
        );
        vm.restore_clock(saved).unwrap();
        let after = vm.save_clock().unwrap();
        assert!(
            after >= saved && after - saved < 100_000_000,
            "restored to {saved}, reads {after} ({} ms later)",
            (after.saturating_sub(saved)) / 1_000_000
        );
    }
}

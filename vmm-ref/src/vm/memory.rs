//! Guest RAM: anonymous mappings registered with KVM as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The RAM size does not fit the host's address space.
    #[error("memory size {0:#x} does not fit in the host address space")]
    TooLarge(u64),
    /// Mapping the RAM failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// A region has no host mapping (cannot happen for mmap regions).
    #[error("guest memory region at {0:#x} has no host address")]
    HostAddress(u64, #[source] vm_memory::GuestMemoryError),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest memory slot {slot} with KVM")]
    SetRegion {
        /// Slot number.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Maps `mem_size` bytes of RAM following [`layout::ram_ranges`].
pub fn create(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(start, size)| {
            usize::try_from(size)
                .map(|size| (GuestAddress(start), size))
                .map_err(|_| MemoryError::TooLarge(mem_size))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Mmap)
}

/// Registers every region of `mem` as a KVM memory slot (slots 0, 1, ...).
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let start = region.start_addr();
        let host = mem
            .get_host_address(start)
            .map_err(|e| MemoryError::HostAddress(start.0, e))?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: start.0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host+len` is a live anonymous mapping owned by `mem`, which the
        // VM keeps alive (in its GuestMemoryAtomic) for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::SetRegion { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_low_ram() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}

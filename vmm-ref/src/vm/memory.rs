//! Guest RAM registered with KVM as memory slots: private anonymous mappings,
//! or - when a vhost-user back-end must map it too - one sealed memfd mapped
//! `MAP_SHARED` (see [`create_shared`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    /// The memfd backing shareable RAM could not be created, sized or sealed.
    #[error("cannot create the shared memory file for guest RAM ({what})")]
    Memfd {
        /// The step that failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
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

/// Maps `mem_size` bytes of RAM following [`layout::ram_ranges`] from one
/// memfd, `MAP_SHARED`, so that another process (a vhost-user back-end) can
/// map the same pages from the file descriptors of the regions
/// (`GuestRegionMmap::file_offset`). The memfd is sealed against growing and
/// shrinking: a back-end that maps it cannot have its pages truncated away
/// under it (a later access would raise `SIGBUS`), and neither can we.
pub fn create_shared(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let name = c"vmm-ref-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd {
            what: "memfd_create",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_size)
        .map_err(|source| MemoryError::Memfd {
            what: "ftruncate",
            source,
        })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a file descriptor owned by `file`; no pointers.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(MemoryError::Memfd {
            what: "F_ADD_SEALS",
            source: std::io::Error::last_os_error(),
        });
    }
    let file = std::sync::Arc::new(file);
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (start, size) in layout::ram_ranges(mem_size) {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(mem_size))?;
        ranges.push((
            GuestAddress(start),
            len,
            Some(FileOffset::from_arc(file.clone(), offset)),
        ));
        offset += size;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Mmap)
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
        // SAFETY: `host..host+len` is a live mapping owned by `mem`, which the
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
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }

    #[test]
    fn shared_ram_is_one_sealed_memfd() {
        use vm_memory::Bytes;
        // Above the MMIO gap: two regions, consecutive in the file.
        let size = 0xd000_0000 + (16 << 20);
        let mem = create_shared(size).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let offsets: Vec<(u64, u64)> = mem
            .iter()
            .map(|r| (r.start_addr().0, r.file_offset().unwrap().start()))
            .collect();
        assert_eq!(offsets, [(0, 0), (1 << 32, 0xd000_0000)]);
        let file = mem.iter().next().unwrap().file_offset().unwrap().file();
        assert_eq!(file.metadata().unwrap().len(), size);
        // SAFETY: fcntl on an open fd; no pointers.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & libc::F_SEAL_SHRINK, libc::F_SEAL_SHRINK);
        assert!(file.set_len(4096).is_err(), "shrinking must be refused");
        // The mapping is shared: a write through guest memory shows in the file.
        mem.write_obj(0xabcdu32, GuestAddress(1 << 32)).unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, 0xd000_0000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
    }
}

//! The front-end's guest memory as described by `VHOST_USER_SET_MEM_TABLE`.
//!
//! Each region arrives as (guest physical address, size, front-end virtual
//! address, mmap offset) plus a file descriptor. Everything is validated
//! before anything is mapped: sizes, overflow, page alignment, that the
//! mapping lies inside the file (mapping past the end of a memfd would turn a
//! later guest access into `SIGBUS`), and that neither the guest-physical nor
//! the front-end-virtual ranges overlap (the latter would make vring address
//! translation ambiguous). Only then are the regions mapped and returned as a
//! new [`GuestMemoryMmap`] with the matching [`AddressTable`], so a bad table
//! never replaces a good one.
//!
//! A front-end that shrinks a mapped file afterwards makes the next access
//! to the lost pages raise `SIGBUS`. QEMU's memfd backends are sealed
//! against shrinking (`seal=on`, the default); for every other region each
//! mapping is registered with the process-wide [`sigbus`](crate::sigbus)
//! guard: a fault in it maps a zero page over the lost one and poisons the
//! region, and the virtqueues that use it stop (the request fails, the
//! front-end sees the vring error eventfd) instead of the whole daemon
//! dying with every export it serves.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Largest number of regions accepted in one table (the protocol's limit for
/// `SET_MEM_TABLE`: one fd per region in a single message).
pub const MAX_REGIONS: usize = 8;

/// Why a memory table was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The number of regions and of file descriptors differ.
    #[error("{regions} memory regions but {files} file descriptors")]
    FdCount {
        /// Regions in the message.
        regions: usize,
        /// File descriptors attached.
        files: usize,
    },
    /// More regions than supported.
    #[error("{0} memory regions (at most {MAX_REGIONS} supported)")]
    TooManyRegions(usize),
    /// A region is empty, overflows, or is not page aligned.
    #[error("memory region {index}: {reason} (gpa {gpa:#x}, size {size:#x}, uaddr {uaddr:#x}, offset {offset:#x})")]
    BadRegion {
        /// Index in the message.
        index: usize,
        /// What is wrong.
        reason: &'static str,
        /// Guest physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Front-end virtual address.
        uaddr: u64,
        /// Offset in the file.
        offset: u64,
    },
    /// `fstat` on a region's file descriptor failed.
    #[error("memory region {index}: cannot stat its file descriptor")]
    Stat {
        /// Index in the message.
        index: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is too small for the mapping or is not a regular file.
    #[error("memory region {index}: offset {offset:#x} + size {size:#x} does not fit the file ({file_size:#x} bytes, regular: {regular})")]
    OutsideFile {
        /// Index in the message.
        index: usize,
        /// Offset in the file.
        offset: u64,
        /// Size of the region.
        size: u64,
        /// Size of the file.
        file_size: u64,
        /// Whether the descriptor is a regular file (memfd, shm, hugetlbfs).
        regular: bool,
    },
    /// Two regions overlap in guest-physical or front-end-virtual space.
    #[error("memory regions {a} and {b} overlap in {space} address space")]
    Overlap {
        /// First region index.
        a: usize,
        /// Second region index.
        b: usize,
        /// "guest-physical" or "front-end virtual".
        space: &'static str,
    },
    /// `mmap` failed.
    #[error("memory region {index}: mmap failed")]
    Mmap {
        /// Index in the message.
        index: usize,
        /// The cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the region collection.
    #[error("cannot build the guest memory map")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// One region's translation from front-end virtual to guest physical.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    uaddr: u64,
    size: u64,
    gpa: u64,
}

/// Translates front-end virtual addresses (as used in `SET_VRING_ADDR`) to
/// guest physical addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressTable {
    mappings: Vec<Mapping>,
}

impl AddressTable {
    /// Translates `[uaddr, uaddr + len)`; `None` unless the whole range lies
    /// inside one region.
    pub fn to_gpa(&self, uaddr: u64, len: u64) -> Option<u64> {
        let end = uaddr.checked_add(len)?;
        self.mappings.iter().find_map(|m| {
            let m_end = m.uaddr.checked_add(m.size)?;
            if uaddr >= m.uaddr && end <= m_end {
                m.gpa.checked_add(uaddr - m.uaddr)
            } else {
                None
            }
        })
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.mappings.len()
    }

    /// Whether no memory table was set.
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// Total bytes of guest memory.
    pub fn total_size(&self) -> u64 {
        self.mappings.iter().map(|m| m.size).sum()
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Size of the file behind `file` and whether it is a regular file.
fn file_size(file: &File) -> std::io::Result<(u64, bool)> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is owned by `file` and open; `st` is a valid out pointer.
    let rc = unsafe { libc::fstat(file.as_raw_fd(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
    Ok((u64::try_from(st.st_size).unwrap_or(0), regular))
}

/// Whether `file` is a memfd sealed with `F_SEAL_SHRINK`.
fn sealed_against_shrinking(file: &File) -> bool {
    // SAFETY: fcntl on an fd owned by `file`; no pointers involved.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

fn overlaps(a_start: u64, a_len: u64, b_start: u64, b_len: u64) -> bool {
    // Lengths are non-zero and the ends were checked for overflow.
    a_start < b_start.saturating_add(b_len) && b_start < a_start.saturating_add(a_len)
}

/// Validates and maps a memory table. Nothing is mapped unless every region
/// passed the checks.
pub fn build(
    regions: &[VhostUserMemoryRegion],
    files: Vec<File>,
) -> Result<(GuestMemoryMmap, AddressTable), MemoryError> {
    if regions.len() != files.len() {
        return Err(MemoryError::FdCount {
            regions: regions.len(),
            files: files.len(),
        });
    }
    if regions.len() > MAX_REGIONS {
        return Err(MemoryError::TooManyRegions(regions.len()));
    }
    let page = page_size();
    for (index, (r, file)) in regions.iter().zip(&files).enumerate() {
        let bad = |reason| MemoryError::BadRegion {
            index,
            reason,
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            uaddr: r.user_addr,
            offset: r.mmap_offset,
        };
        if r.memory_size == 0 {
            return Err(bad("empty region"));
        }
        if r.guest_phys_addr.checked_add(r.memory_size).is_none()
            || r.user_addr.checked_add(r.memory_size).is_none()
            || r.mmap_offset.checked_add(r.memory_size).is_none()
        {
            return Err(bad("address overflow"));
        }
        if usize::try_from(r.memory_size).is_err() {
            return Err(bad("region larger than the address space"));
        }
        if r.mmap_offset % page != 0 || r.memory_size % page != 0 {
            return Err(bad("offset or size not page aligned"));
        }
        let (fsize, regular) =
            file_size(file).map_err(|source| MemoryError::Stat { index, source })?;
        let end = r.mmap_offset.saturating_add(r.memory_size);
        if !regular || end > fsize {
            return Err(MemoryError::OutsideFile {
                index,
                offset: r.mmap_offset,
                size: r.memory_size,
                file_size: fsize,
                regular,
            });
        }
    }
    for (a, ra) in regions.iter().enumerate() {
        for (b, rb) in regions.iter().enumerate().skip(a + 1) {
            if overlaps(
                ra.guest_phys_addr,
                ra.memory_size,
                rb.guest_phys_addr,
                rb.memory_size,
            ) {
                return Err(MemoryError::Overlap {
                    a,
                    b,
                    space: "guest-physical",
                });
            }
            if overlaps(ra.user_addr, ra.memory_size, rb.user_addr, rb.memory_size) {
                return Err(MemoryError::Overlap {
                    a,
                    b,
                    space: "front-end virtual",
                });
            }
        }
    }

    let mut mapped = Vec::with_capacity(regions.len());
    let mut mappings = Vec::with_capacity(regions.len());
    for (index, (r, file)) in regions.iter().zip(files).enumerate() {
        // Checked above: fits in usize.
        let size = usize::try_from(r.memory_size).unwrap_or(usize::MAX);
        let sealed = sealed_against_shrinking(&file);
        let region = MmapRegion::from_file(FileOffset::new(file, r.mmap_offset), size)
            .map_err(|source| MemoryError::Mmap { index, source })?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_phys_addr)).ok_or(
            MemoryError::BadRegion {
                index,
                reason: "region end overflows",
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                uaddr: r.user_addr,
                offset: r.mmap_offset,
            },
        )?;
        let region = Arc::new(region);
        // Every region, sealed or not: hugetlbfs files raise SIGBUS too
        // when the pool runs dry.
        if let Err(e) = crate::sigbus::guard_guest_region(&region) {
            let risk = if sealed {
                ""
            } else {
                "; its file is not sealed against shrinking (F_SEAL_SHRINK): \
                 a front-end that truncates it can crash this process"
            };
            log::warn!("vhost-user memory region {index}: not guarded against SIGBUS ({e}){risk}");
        }
        mapped.push(region);
        mappings.push(Mapping {
            uaddr: r.user_addr,
            size: r.memory_size,
            gpa: r.guest_phys_addr,
        });
    }
    mapped.sort_by_key(|r| vm_memory::GuestMemoryRegion::start_addr(&**r));
    let mem = GuestMemoryMmap::from_arc_regions(mapped).map_err(MemoryError::Collection)?;
    Ok((mem, AddressTable { mappings }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestMemoryBackend};

    /// A memfd of `size` bytes.
    pub(crate) fn memfd(size: u64) -> File {
        let name = c"vhost-test";
        // SAFETY: valid NUL-terminated name; flags are valid.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        file
    }

    fn region(gpa: u64, size: u64, uaddr: u64, off: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, uaddr, off)
    }

    #[test]
    fn maps_two_regions_and_translates() {
        let f1 = memfd(0x10000);
        let mut f2 = memfd(0x20000);
        f2.write_all(b"hello").unwrap();
        let regions = [
            region(0x10_0000, 0x10000, 0x7f00_0000_0000, 0),
            region(0, 0x10000, 0x7f00_1000_0000, 0x10000),
        ];
        let (mem, table) = build(&regions, vec![f1, f2]).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(table.to_gpa(0x7f00_0000_0010, 16), Some(0x10_0010));
        assert_eq!(table.to_gpa(0x7f00_1000_0000, 0x10000), Some(0));
        // Straddling the end of a region, or outside any region.
        assert_eq!(table.to_gpa(0x7f00_0000_fff0, 0x20), None);
        assert_eq!(table.to_gpa(0x1000, 1), None);
        assert_eq!(table.to_gpa(u64::MAX, 2), None);
        assert_eq!(table.total_size(), 0x20000);
        // Guest memory is the shared file.
        mem.write_slice(b"xy", GuestAddress(0x10_0000)).unwrap();
    }

    #[test]
    fn detects_shrink_seals() {
        let plain = memfd(0x1000);
        assert!(!sealed_against_shrinking(&plain));
        // SAFETY: valid NUL-terminated name; flags are valid.
        let fd = unsafe {
            libc::memfd_create(
                c"sealed".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let sealed = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        sealed.set_len(0x1000).unwrap();
        // SAFETY: fcntl on an open fd; no pointers involved.
        let rc = unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(rc, 0);
        assert!(sealed_against_shrinking(&sealed));
        let (mem, _) = build(&[region(0, 0x1000, 0x1000, 0)], vec![sealed]).unwrap();
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn rejects_bad_tables() {
        let cases: Vec<(Vec<VhostUserMemoryRegion>, Vec<u64>)> = vec![
            // empty region
            (vec![region(0, 0, 0x1000, 0)], vec![0x1000]),
            // overflow
            (
                vec![region(u64::MAX - 0xfff, 0x2000, 0x1000, 0)],
                vec![0x2000],
            ),
            // unaligned offset
            (vec![region(0, 0x1000, 0x1000, 0x10)], vec![0x2000]),
            // past the end of the file (would SIGBUS on access)
            (vec![region(0, 0x2000, 0x1000, 0)], vec![0x1000]),
            (vec![region(0, 0x1000, 0x1000, 0x1000)], vec![0x1000]),
            // gpa overlap
            (
                vec![
                    region(0, 0x2000, 0x10000, 0),
                    region(0x1000, 0x1000, 0x20000, 0),
                ],
                vec![0x2000, 0x1000],
            ),
            // uaddr overlap
            (
                vec![
                    region(0, 0x1000, 0x10000, 0),
                    region(0x1000, 0x1000, 0x10000, 0),
                ],
                vec![0x1000, 0x1000],
            ),
        ];
        for (regions, sizes) in cases {
            let files = sizes.iter().map(|&s| memfd(s)).collect();
            assert!(build(&regions, files).is_err(), "{sizes:?}");
        }
        // fd count mismatch
        assert!(matches!(
            build(&[region(0, 0x1000, 0, 0)], vec![]),
            Err(MemoryError::FdCount { .. })
        ));
        // Not a regular file: a pipe.
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds were just created and are owned here.
        let (r, w) = unsafe {
            (
                <File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
                <File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
            )
        };
        drop(w);
        assert!(matches!(
            build(&[region(0, 0x1000, 0, 0)], vec![r]),
            Err(MemoryError::OutsideFile { regular: false, .. })
        ));
    }
}

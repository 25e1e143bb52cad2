//! Reads served from a shared, read-only mapping of an image that lives on a
//! memory file system (tmpfs, ramfs).
//!
//! On tmpfs a `preadv` is a system call, a page-cache lookup per page and a
//! copy. Through a mapping the lookup happens once per page (at its first
//! fault) and a read is a plain copy: in `ci/bench-export.sh` (4 KiB random
//! reads) the export's CPU per I/O fell by 6 %. Writes keep using `pwritev`,
//! so that a full tmpfs reports `ENOSPC` (an I/O error for the guest) instead
//! of raising SIGBUS in a store through a mapping.
//!
//! The price of reading through a mapping is SIGBUS: if another process
//! truncates the image, touching a page past the new end of file raises
//! SIGBUS, whose default action would kill the process with every guest
//! disk it serves. The mapping is therefore registered with the
//! process-wide guard of [`sigbus`](crate::sigbus): a fault inside it marks
//! it poisoned and maps an anonymous zero page over the faulting page, so
//! the interrupted copy completes. The reader checks the mark after every
//! copy; a poisoned mapping is never trusted again, and the read is redone
//! with `preadv` (which zero-fills past end of file, as for an image that
//! was short from the start).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::VolatileSlice;

use crate::sigbus::{guard_owned, OwnedGuard};

/// An `mmap`ed range, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are our own mapping, unmapped exactly once; no
        // reference into it outlives the `MappedImage` that owns it.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A read-only shared mapping of a whole image, guarded against SIGBUS.
#[derive(Debug)]
pub struct MappedImage {
    // Field order matters: the guard leaves the SIGBUS registry (drop)
    // before the mapping is unmapped.
    guard: OwnedGuard,
    map: Mapping,
}

// SAFETY: the mapping is read-only shared memory owned by this struct; the
// pointer is only used to copy out of it (volatile-style, see `read`), which
// any thread may do concurrently.
unsafe impl Send for MappedImage {}
// SAFETY: as above; `read` takes `&self` and writes nothing in the mapping.
unsafe impl Sync for MappedImage {}

impl MappedImage {
    /// Maps all of `file` (its current length) read-only. Fails if the file
    /// is empty, the SIGBUS guard cannot be installed, every guard slot is
    /// taken, or `mmap` fails: the caller then reads with `preadv`.
    pub fn new(file: &File) -> io::Result<MappedImage> {
        let len = usize::try_from(super::raw::image_size(file)?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "image too large to map"))?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty image"));
        }
        // SAFETY: a fresh shared read-only mapping of an open file; the kernel
        // picks the address, so no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = Mapping {
            base: base.cast(),
            len,
        };
        let guard = guard_owned(map.base, len, false)?;
        Ok(MappedImage { guard, map })
    }

    /// Whether a SIGBUS (the file shrank under the mapping) replaced some of
    /// its pages. A poisoned mapping serves no more reads.
    pub fn is_poisoned(&self) -> bool {
        self.guard.is_poisoned()
    }

    /// The mapped length (the file's length when it was mapped).
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Always false: empty files are not mapped.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Copies `offset..` of the image into `iovecs`. `None` when the range is
    /// not all inside the mapping or the mapping is (or became, during this
    /// copy) poisoned: the caller must then read with `preadv`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe writable memory that stays mapped for the
    /// duration of the call and that is only accessed volatile-style by
    /// others (guest memory is).
    pub unsafe fn read(&self, offset: u64, iovecs: &[libc::iovec]) -> Option<usize> {
        if self.is_poisoned() {
            return None;
        }
        let total = iovecs
            .iter()
            .try_fold(0usize, |n, v| n.checked_add(v.iov_len))?;
        let start = usize::try_from(offset).ok()?;
        if start.checked_add(total)? > self.map.len {
            return None;
        }
        let mut pos = start;
        for v in iovecs {
            // SAFETY: `pos + iov_len <= self.map.len` (checked above), so the
            // source lies inside our live mapping; a page the file lost is
            // replaced by the SIGBUS handler, so the copy cannot fault fatally.
            let src = unsafe { VolatileSlice::new(self.map.base.add(pos), v.iov_len) };
            // SAFETY: the caller guarantees the iovec is mapped, writable and
            // accessed volatile-style by others.
            let dst = unsafe { VolatileSlice::new(v.iov_base.cast(), v.iov_len) };
            src.copy_to_volatile_slice(dst);
            pos += v.iov_len;
        }
        if self.is_poisoned() {
            return None; // some of what we copied may be the zero page
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn shm_file(name: &str, data: &[u8]) -> Option<(PathBuf, File)> {
        let path = PathBuf::from(format!(
            "/dev/shm/vmm-ref-mapped-{name}-{}",
            std::process::id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .ok()?;
        f.write_all(data).ok()?;
        Some((path, f))
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn reads_match_the_file_and_refuse_out_of_range() {
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
        let Some((path, f)) = shm_file("read", &data) else {
            eprintln!("no writable /dev/shm: skipped");
            return;
        };
        let m = MappedImage::new(&f).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(m.len(), data.len());
        let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 3096]);
        let iovs = [iov(&mut a), iov(&mut b)];
        // SAFETY: the iovecs point at live local buffers.
        assert_eq!(unsafe { m.read(8192, &iovs) }, Some(4096));
        assert_eq!(a[..], data[8192..9192]);
        assert_eq!(b[..], data[9192..12288]);
        // Past the end, even by one byte: the caller's preadv handles it.
        let mut c = vec![0u8; 4096];
        let iovs = [iov(&mut c)];
        // SAFETY: as above.
        assert_eq!(unsafe { m.read(60 * 1024 + 1, &iovs) }, None);
        // SAFETY: as above.
        assert_eq!(unsafe { m.read(u64::MAX, &iovs) }, None);
        assert!(!m.is_poisoned());
    }

    #[test]
    fn truncation_under_the_mapping_poisons_it_instead_of_killing_us() {
        let data = vec![0x5au8; 64 * 1024];
        let Some((path, f)) = shm_file("trunc", &data) else {
            eprintln!("no writable /dev/shm: skipped");
            return;
        };
        let m = MappedImage::new(&f).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Another writer shrinks the image to 4 KiB.
        f.set_len(4096).unwrap();
        let mut buf = vec![0xffu8; 4096];
        let iovs = [iov(&mut buf)];
        // Page 8 is gone: the copy takes a SIGBUS, which our handler turns
        // into a poisoned mapping; the caller is told to fall back.
        // SAFETY: the iovec points at a live local buffer.
        assert_eq!(unsafe { m.read(32 * 1024, &iovs) }, None);
        assert!(m.is_poisoned());
        // The page that still exists is not served from the mapping either.
        // SAFETY: as above.
        assert_eq!(unsafe { m.read(0, &iovs) }, None);
        drop(m);
        // The slot is reusable and a new mapping starts clean.
        let m2 = MappedImage::new(&f).unwrap();
        assert!(!m2.is_poisoned());
        // SAFETY: as above.
        assert_eq!(unsafe { m2.read(0, &iovs) }, Some(4096));
        assert!(buf.iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn faults_outside_our_mappings_still_kill() {
        use std::os::unix::process::ExitStatusExt;
        const CHILD: &str = "VMM_REF_FOREIGN_SIGBUS_CHILD";
        if std::env::var_os(CHILD).is_some() {
            // Child: guard installed (one registered mapping), then a SIGBUS
            // in a mapping of our own that is not registered.
            let (path, f) = shm_file("foreign-guarded", &[1u8; 8192]).unwrap();
            let _guarded = MappedImage::new(&f).unwrap();
            std::fs::remove_file(&path).unwrap();
            let (path, g) = shm_file("foreign", &[2u8; 8192]).unwrap();
            std::fs::remove_file(&path).unwrap();
            // SAFETY: a fresh read-only shared mapping of an open file.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    8192,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    g.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            g.set_len(0).unwrap();
            // SAFETY: inside the mapping; the page is gone, so this raises SIGBUS.
            let v = unsafe { std::ptr::read_volatile(p.cast::<u8>().add(4096)) };
            println!("survived a foreign SIGBUS, read {v}");
            std::process::exit(0);
        }
        if shm_file("probe", &[0])
            .map(|(p, _)| std::fs::remove_file(p))
            .is_none()
        {
            eprintln!("no writable /dev/shm: skipped");
            return;
        }
        let _spawn = crate::virtio::block::testing::spawn_exclusion();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "virtio::block::mapped::tests::faults_outside_our_mappings_still_kill",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "child: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn empty_files_are_not_mapped() {
        let Some((path, f)) = shm_file("empty", &[]) else {
            eprintln!("no writable /dev/shm: skipped");
            return;
        };
        std::fs::remove_file(&path).unwrap();
        assert!(MappedImage::new(&f).is_err());
    }
}

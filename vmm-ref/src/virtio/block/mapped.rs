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
//! disk it serves. [`MappedImage::new`] therefore installs, once per
//! process, a SIGBUS handler that recognises faults inside registered
//! mappings: it marks the mapping poisoned and maps an anonymous zero page
//! over the faulting page, so the interrupted copy completes. The reader
//! checks the mark after every copy; a poisoned mapping is never trusted
//! again, and the read is redone with `preadv` (which zero-fills past end of
//! file, as for an image that was short from the start). Faults anywhere
//! else go to the handler that was installed before ours (Rust's
//! stack-overflow handler, or the default action).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use vm_memory::VolatileSlice;

/// Mappings the SIGBUS handler can recognise at once; further images are
/// read with `preadv`.
const SLOTS: usize = 64;

/// One registered mapping. `len == 0` means free (or being set up).
#[derive(Debug)]
struct Slot {
    claimed: AtomicBool,
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            claimed: AtomicBool::new(false),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }
}

static REGISTRY: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS action that was installed before ours.
static PREVIOUS: OnceLock<Result<libc::sigaction, i32>> = OnceLock::new();

/// Installs the SIGBUS handler (once per process). Fails if `sigaction`
/// does; the caller then does not map anything.
fn install_guard() -> io::Result<()> {
    let installed = PREVIOUS.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(page) = usize::try_from(page) {
            if page.is_power_of_two() {
                PAGE_SIZE.store(page, Ordering::Relaxed);
            }
        }
        // SAFETY: a zeroed sigaction is a valid value (empty mask, no flags);
        // the fields that matter are set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        // SAFETY: as above, a valid out-parameter.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid sigaction structs; the handler is an
        // `extern "C"` function with the SA_SIGINFO signature.
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &action, &mut previous) };
        if rc == 0 {
            Ok(previous)
        } else {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL))
        }
    });
    match installed {
        Ok(_) => Ok(()),
        Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
    }
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap` and `sigaction`
/// only, no allocation, no locks.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in &REGISTRY {
        let len = slot.len.load(Ordering::Acquire);
        if len == 0 {
            continue;
        }
        let start = slot.start.load(Ordering::Acquire);
        if addr < start || addr - start >= len {
            continue;
        }
        // Poison first: a reader that sees the zero page below also sees this.
        slot.poisoned.store(true, Ordering::SeqCst);
        let at = addr & !(page - 1);
        // SAFETY: `at` is a page inside our own mapping (registered and not
        // yet unmapped: a mapping leaves the registry before munmap). Mapping
        // an anonymous page over it with MAP_FIXED only replaces that page of
        // our mapping; no other memory is touched.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return; // the faulting copy resumes and reads zeros
        }
        break;
    }
    // Not ours (or the page could not be replaced): what was there before.
    match PREVIOUS.get() {
        Some(Ok(previous))
            if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN =>
        {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO,
                // so it has this signature; we pass the kernel's arguments on.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a handler installed without SA_SIGINFO takes the
                // signal number only.
                let f: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Default action: reinstate it and return; the faulting access
            // runs again and the process ends as it would have without us.
            // SAFETY: a zeroed sigaction with SIG_DFL is valid.
            let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            dfl.sa_sigaction = libc::SIG_DFL;
            // SAFETY: valid sigaction pointer; the old action is not wanted.
            unsafe { libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut()) };
        }
    }
}

/// A read-only shared mapping of a whole image, guarded against SIGBUS.
#[derive(Debug)]
pub struct MappedImage {
    base: *mut u8,
    len: usize,
    slot: &'static Slot,
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
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "image too large to map"))?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty image"));
        }
        install_guard()?;
        let slot = REGISTRY
            .iter()
            .find(|s| {
                s.claimed
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })
            .ok_or_else(|| io::Error::other("all SIGBUS guard slots in use"))?;
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
            let e = io::Error::last_os_error();
            slot.claimed.store(false, Ordering::Release);
            return Err(e);
        }
        slot.poisoned.store(false, Ordering::Relaxed);
        slot.start.store(base as usize, Ordering::Release);
        slot.len.store(len, Ordering::Release);
        Ok(MappedImage {
            base: base.cast(),
            len,
            slot,
        })
    }

    /// Whether a SIGBUS (the file shrank under the mapping) replaced some of
    /// its pages. A poisoned mapping serves no more reads.
    pub fn is_poisoned(&self) -> bool {
        self.slot.poisoned.load(Ordering::SeqCst)
    }

    /// The mapped length (the file's length when it was mapped).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty files are not mapped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
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
        if start.checked_add(total)? > self.len {
            return None;
        }
        let mut pos = start;
        for v in iovecs {
            // SAFETY: `pos + iov_len <= self.len` (checked above), so the
            // source lies inside our live mapping; a page the file lost is
            // replaced by the SIGBUS handler, so the copy cannot fault fatally.
            let src = unsafe { VolatileSlice::new(self.base.add(pos), v.iov_len) };
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

impl Drop for MappedImage {
    fn drop(&mut self) {
        // Leave the registry before unmapping: the handler must never
        // patch an address range that may have been reused.
        self.slot.len.store(0, Ordering::Release);
        self.slot.start.store(0, Ordering::Release);
        // SAFETY: `base`/`len` are our own mapping, unmapped exactly once; no
        // reference into it outlives `&self` borrows, which have ended.
        unsafe { libc::munmap(self.base.cast(), self.len) };
        self.slot.claimed.store(false, Ordering::Release);
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

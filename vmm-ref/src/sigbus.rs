//! The process-wide SIGBUS guard for shared file mappings that another
//! process can shrink under us.
//!
//! Touching a page of a `MAP_SHARED` file mapping that lies past the file's
//! current end raises SIGBUS, whose default action kills the process with
//! every guest disk and export it serves. Two kinds of such mappings exist
//! here: images on tmpfs that the synchronous engine reads through a mapping
//! ([`MappedImage`](crate::virtio::block::mapped::MappedImage)), and the
//! guest memory a vhost-user front-end shares as memfds
//! ([`export::memory`](crate::export::memory)), which it may truncate.
//!
//! One SIGBUS handler, installed once, serves both. A mapping is registered
//! in a fixed table of slots; a fault inside a registered, live mapping
//! marks it poisoned and maps an anonymous zero page over the faulting page
//! (read-only for images, read-write for guest memory, so that both loads
//! and stores complete), and the interrupted access resumes. The owner
//! notices the poison after the access: an image read is redone with
//! `preadv`, a virtqueue whose guest memory was poisoned stops (see
//! [`LossWatch`]). Faults anywhere else go to the handler installed before
//! ours (Rust's stack-overflow handler, or the default action).
//!
//! Liveness: an image mapping ([`guard_owned`]) leaves the table (its
//! [`OwnedGuard`] is dropped) before it is unmapped. Guest memory is
//! unmapped by vm-memory when the last reference to its region goes, which
//! no code of ours sees; its slot ([`guard_guest_region`]) keeps a `Weak`
//! to the region instead, and the handler only trusts the slot while the
//! region's strong count is not zero. That count cannot drop to zero during
//! a fault inside the region: the faulting thread holds a reference to it.
//! Slots of dead regions are reclaimed by later registrations.

use std::io;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

/// Mappings the handler can recognise at once; further ones are not
/// guarded (images are then read with `preadv`; guest memory is used
/// unguarded, with a warning).
pub const SLOTS: usize = 256;

const FREE: u8 = 0;
/// Being set up, checked or torn down by one thread.
const BUSY: u8 = 1;
const OWNED: u8 = 2;
const SHARED: u8 = 3;

/// One registered mapping. The handler only looks at `len`, `start`,
/// `region` (under `readers`), `writable` and `poisoned`.
#[derive(Debug)]
struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    /// 0 = ignored by the handler.
    len: AtomicUsize,
    /// Replacement pages are writable (guest memory).
    writable: AtomicBool,
    poisoned: AtomicBool,
    /// `Weak::into_raw` of a shared region, null for owned mappings.
    region: AtomicPtr<GuestRegionMmap>,
    /// Handlers currently looking at `region`.
    readers: AtomicUsize,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            state: AtomicU8::new(FREE),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            writable: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            region: AtomicPtr::new(std::ptr::null_mut()),
            readers: AtomicUsize::new(0),
        }
    }

    /// Makes the slot invisible to the handler and waits until no handler
    /// still reads it; then drops the region's `Weak`, if any. The caller
    /// owns the slot (state `BUSY`).
    fn clear(&self) {
        self.len.store(0, Ordering::SeqCst);
        while self.readers.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        let p = self.region.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` came from `Weak::into_raw` in `guard_guest_region`
            // and is released exactly once (it was swapped out above); no
            // handler reads it any more (len is 0 and readers drained).
            drop(unsafe { Weak::from_raw(p) });
        }
    }

    /// Whether a shared slot's region is gone. The caller owns the slot.
    fn region_dead(&self) -> bool {
        let p = self.region.load(Ordering::SeqCst);
        // SAFETY: the caller owns the slot, so nobody releases the `Weak`
        // meanwhile; `ManuallyDrop` keeps this copy from releasing it.
        !p.is_null() && ManuallyDrop::new(unsafe { Weak::from_raw(p) }).strong_count() == 0
    }
}

static REGISTRY: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// Pages replaced by the handler since the process started.
static POISONINGS: AtomicU64 = AtomicU64::new(0);
/// The SIGBUS action that was installed before ours.
static PREVIOUS: OnceLock<Result<libc::sigaction, i32>> = OnceLock::new();

/// Installs the SIGBUS handler (once per process).
fn install() -> io::Result<()> {
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

/// The range `(start, len)` of `slot` if it is registered and its mapping
/// is live. Call with the slot's `readers` raised ([`with_reader`]).
fn live_range(slot: &Slot) -> Option<(usize, usize)> {
    let len = slot.len.load(Ordering::SeqCst);
    if len == 0 {
        return None;
    }
    let start = slot.start.load(Ordering::SeqCst);
    let p = slot.region.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `p` is a `Weak::into_raw` that `Slot::clear` releases only
        // after `len` is 0 and `readers` (raised by our caller) is 0;
        // `ManuallyDrop` keeps this copy from releasing it.
        let weak = ManuallyDrop::new(unsafe { Weak::from_raw(p) });
        if weak.strong_count() == 0 {
            return None; // unmapped (or about to be): not ours any more
        }
    }
    Some((start, len))
}

/// Runs `f` on `slot` with its `readers` raised (async-signal-safe).
fn with_reader<T>(slot: &Slot, f: impl FnOnce(&Slot) -> T) -> T {
    slot.readers.fetch_add(1, Ordering::SeqCst);
    let r = f(slot);
    slot.readers.fetch_sub(1, Ordering::SeqCst);
    r
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap` and `sigaction`
/// only, no allocation, no locks.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in &REGISTRY {
        let replaced = with_reader(slot, |slot| {
            let (start, len) = live_range(slot)?;
            if addr < start || addr - start >= len {
                return None;
            }
            // Poison first: an owner that sees the zero page also sees this.
            slot.poisoned.store(true, Ordering::SeqCst);
            POISONINGS.fetch_add(1, Ordering::SeqCst);
            let prot = if slot.writable.load(Ordering::SeqCst) {
                libc::PROT_READ | libc::PROT_WRITE
            } else {
                libc::PROT_READ
            };
            // SAFETY: the page lies inside a live mapping of ours (checked
            // by `live_range`: registered, and not yet unmapped). Mapping an
            // anonymous page over it with MAP_FIXED only replaces that page
            // of our mapping; no other memory is touched.
            let p = unsafe {
                libc::mmap(
                    (addr & !(page - 1)) as *mut libc::c_void,
                    page,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            Some(p != libc::MAP_FAILED)
        });
        match replaced {
            Some(true) => return, // the faulting access resumes on the zero page
            Some(false) => break,
            None => {}
        }
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

/// Takes a free slot (state `BUSY` on return), reclaiming the slot of a
/// guest-memory region that is gone if none is free.
fn claim() -> io::Result<&'static Slot> {
    install()?;
    let busy = |s: &Slot, from: u8| {
        s.state
            .compare_exchange(from, BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    };
    if let Some(s) = REGISTRY.iter().find(|s| busy(s, FREE)) {
        return Ok(s);
    }
    for s in &REGISTRY {
        if busy(s, SHARED) {
            if s.region_dead() {
                s.clear();
                return Ok(s);
            }
            s.state.store(SHARED, Ordering::Release);
        }
    }
    Err(io::Error::other(format!(
        "all {SLOTS} SIGBUS guard slots in use"
    )))
}

/// Fills a claimed slot and makes it visible to the handler.
fn publish(
    slot: &Slot,
    start: usize,
    len: usize,
    writable: bool,
    region: *mut GuestRegionMmap,
    state: u8,
) {
    slot.region.store(region, Ordering::SeqCst);
    slot.start.store(start, Ordering::SeqCst);
    slot.writable.store(writable, Ordering::SeqCst);
    slot.poisoned.store(false, Ordering::SeqCst);
    slot.len.store(len, Ordering::SeqCst);
    slot.state.store(state, Ordering::Release);
}

/// The registration of a mapping its owner unmaps itself: drop it before
/// the `munmap`.
#[derive(Debug)]
pub struct OwnedGuard {
    slot: &'static Slot,
}

impl OwnedGuard {
    /// Whether a SIGBUS replaced some of the mapping's pages.
    pub fn is_poisoned(&self) -> bool {
        self.slot.poisoned.load(Ordering::SeqCst)
    }
}

impl Drop for OwnedGuard {
    fn drop(&mut self) {
        self.slot.state.store(BUSY, Ordering::SeqCst);
        self.slot.clear();
        self.slot.state.store(FREE, Ordering::Release);
    }
}

/// Guards the mapping `[start, start + len)`, which the caller owns and
/// unmaps only after dropping the returned guard. Faulting pages are
/// replaced read-only, or read-write if `writable`.
pub fn guard_owned(start: *const u8, len: usize, writable: bool) -> io::Result<OwnedGuard> {
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
    }
    let slot = claim()?;
    publish(
        slot,
        start as usize,
        len,
        writable,
        std::ptr::null_mut(),
        OWNED,
    );
    Ok(OwnedGuard { slot })
}

/// Guards a guest-memory region (a shared file mapping) for as long as it
/// exists; faulting pages are replaced read-write. The slot is reclaimed
/// once every reference to the region is gone.
pub fn guard_guest_region(region: &Arc<GuestRegionMmap>) -> io::Result<()> {
    let len = usize::try_from(region.len())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty region"));
    }
    let slot = claim()?;
    let weak = Weak::into_raw(Arc::downgrade(region)).cast_mut();
    publish(slot, region.as_ptr() as usize, len, true, weak, SHARED);
    Ok(())
}

/// Whether a live guarded mapping overlapping `[start, start + len)` was
/// poisoned.
pub fn range_poisoned(start: usize, len: usize) -> bool {
    let end = start.saturating_add(len);
    REGISTRY.iter().any(|s| {
        with_reader(s, |s| {
            live_range(s).is_some_and(|(a, l)| {
                a < end && start < a.saturating_add(l) && s.poisoned.load(Ordering::SeqCst)
            })
        })
    })
}

/// Watches one guest memory for pages lost under it (a front-end that
/// shrank a memory file). Cheap enough for every request: one atomic load
/// unless some mapping of the process was poisoned since the last check.
#[derive(Debug, Default)]
pub struct LossWatch {
    /// Process-wide poisonings when `mem` was last found intact.
    clean_at: u64,
}

impl LossWatch {
    /// Whether any region of `mem` was poisoned. Once true, stays true for
    /// that memory.
    pub fn lost(&mut self, mem: &GuestMemoryMmap) -> bool {
        let now = POISONINGS.load(Ordering::SeqCst);
        if now == self.clean_at {
            return false;
        }
        let lost = mem
            .iter()
            .any(|r| range_poisoned(r.as_ptr() as usize, r.len() as usize));
        if !lost {
            self.clean_at = now;
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::FromRawFd;

    use vm_memory::{Bytes, FileOffset, GuestAddress, MmapRegion};

    use super::*;

    fn memfd(size: u64) -> File {
        // SAFETY: a valid NUL-terminated name and valid flags.
        let fd = unsafe { libc::memfd_create(c"sigbus-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    /// Guest memory of `size` bytes at 0 backed by `file`, guarded.
    fn guarded_memory(file: &File, size: usize) -> GuestMemoryMmap {
        let region =
            MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), size).unwrap();
        let region = Arc::new(GuestRegionMmap::new(region, GuestAddress(0)).unwrap());
        guard_guest_region(&region).unwrap();
        GuestMemoryMmap::from_arc_regions(vec![region]).unwrap()
    }

    #[test]
    fn a_shrunk_guest_memory_is_poisoned_not_fatal() {
        let file = memfd(64 << 10);
        let mem = guarded_memory(&file, 64 << 10);
        let mut watch = LossWatch::default();
        mem.write_obj(0x1234u32, GuestAddress(0x100)).unwrap();
        assert!(!watch.lost(&mem));
        // The "front-end" keeps 16 KiB: a store and a load past it fault.
        file.set_len(16 << 10).unwrap();
        mem.write_obj(0xabcdu32, GuestAddress(0x8000)).unwrap();
        assert!(watch.lost(&mem), "a store into a lost page poisons");
        let v: u32 = mem.read_obj(GuestAddress(0xc000)).unwrap();
        assert_eq!(v, 0, "a load from a lost page reads the zero page");
        // The replacement page is private and writable.
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x8000)).unwrap(), 0xabcd);
        // What the file still has is intact; the memory stays lost.
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x100)).unwrap(), 0x1234);
        assert!(watch.lost(&mem));
        // Another, intact memory is not reported lost, also once the lost
        // one is gone and the new one may reuse its addresses.
        drop(mem);
        let other_file = memfd(64 << 10);
        let other = guarded_memory(&other_file, 64 << 10);
        assert!(!LossWatch::default().lost(&other));
        assert_eq!(other.read_obj::<u32>(GuestAddress(0x8000)).unwrap(), 0);
    }

    #[test]
    fn slots_of_dropped_guest_memory_are_reclaimed() {
        let file = memfd(4096);
        // Far more registrations than slots: dead regions free theirs.
        for _ in 0..SLOTS * 2 {
            let mem = guarded_memory(&file, 4096);
            mem.write_obj(1u8, GuestAddress(0)).unwrap();
        }
        // A live one is not taken from its owner.
        let live = guarded_memory(&file, 4096);
        for _ in 0..SLOTS * 2 {
            drop(guarded_memory(&file, 4096));
        }
        file.set_len(0).unwrap();
        let v: u8 = live.read_obj(GuestAddress(0)).unwrap();
        assert_eq!(v, 0);
        assert!(LossWatch::default().lost(&live));
    }

    #[test]
    fn owned_guards_free_their_slot() {
        let mut buf = vec![0u8; 4096];
        let guards: Vec<OwnedGuard> = (0..8)
            .map(|_| guard_owned(buf.as_mut_ptr(), buf.len(), false).unwrap())
            .collect();
        assert!(guards.iter().all(|g| !g.is_poisoned()));
        assert!(!range_poisoned(buf.as_ptr() as usize, buf.len()));
        drop(guards);
        assert!(guard_owned(buf.as_ptr(), 0, false).is_err());
    }
}

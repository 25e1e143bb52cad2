// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`RegisterPage`]: typed, volatile, dirty-bit-safe access to one vCPU's register page.

use core::mem::offset_of;
use core::ptr::NonNull;
use std::os::fd::{AsRawFd, BorrowedFd};

use mshv_bindings as hv;

use crate::dirty::{DirtyClasses, RegisterClass};
use crate::error::{Error, Result};
use crate::layout::{
    offsets, RawRegisterPage, RawSegment, RawXmm, MSHV_VP_MMAP_OFFSET_REGISTERS,
    REGISTER_PAGE_MAP_SIZE, REGISTER_PAGE_VERSION_1, REQUIRED_BASE_ALIGN,
};
use crate::regs::{
    special_segments, standard_to_gp, Gpr, PageRegisters, ReadOnlyRegister, Segment,
    SegmentAttributes, SegmentRegister, Xmm,
};

const SEG_SIZE: usize = core::mem::size_of::<RawSegment>();
const XMM_SIZE: usize = core::mem::size_of::<RawXmm>();

/// Who releases the memory behind the page.
#[derive(Debug)]
enum Backing {
    /// Our own `mmap` of a vCPU fd: `munmap` on drop.
    Mapped,
    /// Memory owned by the caller of [`RegisterPage::from_raw`].
    Borrowed,
    /// A page-aligned heap page owned by this object (simulated hypervisor).
    #[cfg(feature = "sim")]
    Heap,
}

/// One vCPU's register page.
///
/// The page is shared with the hypervisor, which writes it when the vCPU exits to the VMM
/// and reads (and clears) the dirty classes when the vCPU is dispatched again. The VMM may
/// touch it only while the vCPU is not running — in practice, on the vCPU thread between two
/// run calls. The type enforces the parts of that contract Rust can express:
///
/// * the pointer is private and never turned into a reference: every access is a volatile
///   read or write of one field, so the compiler neither caches values across a run nor
///   elides stores the hypervisor must see;
/// * setters take `&mut self` and set their class's dirty bit in the same call, so a write
///   can never be silently dropped by the hypervisor;
/// * read-only registers (CR0/3/4/8, EFER, DR7, pending interruption, interrupt state) have
///   no setter;
/// * it is `Send` (it may move to the vCPU thread) but not `Sync` (two threads must never
///   access the same page concurrently).
///
/// Getters do not check [`RegisterPage::is_valid`]; callers that use the page directly must
/// check it after every run. [`crate::VcpuRegisters`] does that for you.
#[derive(Debug)]
pub struct RegisterPage {
    ptr: NonNull<RawRegisterPage>,
    backing: Backing,
}

// SAFETY: the page is plain memory with no thread affinity; moving the owner to another
// thread moves the only handle through which this process accesses the page. `Sync` is
// deliberately not implemented (`NonNull` is `!Sync`), so shared references cannot be used
// from two threads at once.
unsafe impl Send for RegisterPage {}

impl RegisterPage {
    /// Maps the register page of an MSHV vCPU.
    ///
    /// Returns `Ok(None)` when the kernel answers `ENODEV`: the partition has no register
    /// page (e.g. an encrypted/isolated partition) and the hypercalls must be used instead.
    /// Any other failure is returned as [`Error::Map`].
    ///
    /// `mshv_ioctls::VmFd::create_vcpu` keeps its own mapping of the same page; both map the
    /// same physical page, so values are coherent.
    pub fn map_vcpu(vcpu: &mshv_ioctls::VcpuFd) -> Result<Option<Self>> {
        // SAFETY: `vcpu` is an MSHV vCPU fd: its offset-0 page is the register page, which
        // the driver keeps alive for as long as the mapping exists.
        unsafe { Self::map_fd(BorrowedFd::borrow_raw(vcpu.as_raw_fd())) }
    }

    /// Maps page 0 of `fd` as a register page (`MAP_SHARED`, read/write, 4096 bytes).
    ///
    /// Returns `Ok(None)` on `ENODEV` (file without an mmap implementation, which is how the
    /// MSHV driver says "no register page"), [`Error::Map`] on any other error.
    ///
    /// # Safety
    ///
    /// `fd` must be an MSHV vCPU fd, or another file whose first 4096 bytes stay accessible
    /// for the lifetime of the mapping (a file truncated below that raises `SIGBUS` on
    /// access). Whatever else writes to the page must follow the protocol described on
    /// [`RegisterPage`] (no writes concurrent with this object's accesses).
    pub unsafe fn map_fd(fd: BorrowedFd<'_>) -> Result<Option<Self>> {
        // SAFETY: a fresh shared mapping chosen by the kernel (NULL hint); no existing memory
        // is affected. The result is checked below.
        let addr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                REGISTER_PAGE_MAP_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                MSHV_VP_MMAP_OFFSET_REGISTERS,
            )
        };
        if addr == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENODEV) {
                return Ok(None);
            }
            return Err(Error::Map(err));
        }
        let Some(ptr) = NonNull::new(addr.cast::<RawRegisterPage>()) else {
            // mmap never returns NULL for a NULL hint; treat it as a failure anyway.
            return Err(Error::Map(std::io::Error::from_raw_os_error(libc::EINVAL)));
        };
        Ok(Some(RegisterPage {
            ptr,
            backing: Backing::Mapped,
        }))
    }

    /// Wraps a register page mapped by someone else (for instance the pointer inside
    /// `mshv_bindings::RegisterPage` that `mshv-ioctls` keeps). The memory is not released
    /// when the `RegisterPage` is dropped.
    ///
    /// Fails with [`Error::Misaligned`] if `ptr` is not 8-byte aligned (a real page is
    /// 4096-byte aligned).
    ///
    /// # Safety
    ///
    /// * `ptr` must be valid for volatile reads and writes of
    ///   [`REGISTER_PAGE_USED_SIZE`](crate::layout::REGISTER_PAGE_USED_SIZE) bytes for the
    ///   whole lifetime of the returned object;
    /// * nothing else may access that memory while a method of the returned object runs,
    ///   except the hypervisor while the vCPU is running (when the VMM does not use the page);
    /// * no Rust reference to that memory may be alive while the returned object is used.
    pub unsafe fn from_raw(ptr: NonNull<u8>) -> Result<Self> {
        let addr = ptr.as_ptr() as usize;
        if addr % REQUIRED_BASE_ALIGN != 0 {
            return Err(Error::Misaligned {
                addr,
                align: REQUIRED_BASE_ALIGN,
            });
        }
        Ok(RegisterPage {
            ptr: ptr.cast(),
            backing: Backing::Borrowed,
        })
    }

    /// A new zeroed page on the heap, page aligned and owned by the returned object.
    #[cfg(feature = "sim")]
    pub(crate) fn new_heap() -> Self {
        let layout = heap_layout();
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<RawRegisterPage>()) else {
            std::alloc::handle_alloc_error(layout);
        };
        RegisterPage {
            ptr,
            backing: Backing::Heap,
        }
    }

    /// Address of the page (for identity checks and diagnostics only).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr().cast_const().cast()
    }

    // ---- raw volatile field access ----------------------------------------------------

    /// Pointer to the field at byte `offset`, typed as `T`.
    ///
    /// Callers pass offsets derived from [`RawRegisterPage`]'s layout: each is in bounds and
    /// naturally aligned for `T` (checked by the layout asserts and the base alignment).
    #[inline(always)]
    fn field<T>(&self, offset: usize) -> *mut T {
        debug_assert!(
            offset + core::mem::size_of::<T>() <= core::mem::size_of::<RawRegisterPage>()
        );
        debug_assert!(offset % core::mem::align_of::<T>() == 0);
        // SAFETY: `offset` is within the page object (see above), so the result stays inside
        // the same allocation/mapping.
        unsafe { self.ptr.as_ptr().cast::<u8>().add(offset).cast::<T>() }
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: in-bounds, aligned field of a live page (constructor invariants); plain
        // integer types accept any bit pattern the hypervisor may have written.
        unsafe { self.field::<T>(offset).read_volatile() }
    }

    #[inline(always)]
    fn write<T: Copy>(&mut self, offset: usize, value: T) {
        // SAFETY: in-bounds, aligned field of a live page; `&mut self` guarantees no other
        // access through this object is in progress.
        unsafe { self.field::<T>(offset).write_volatile(value) }
    }

    #[inline(always)]
    fn mark_dirty(&mut self, class: RegisterClass) {
        let dirty: u32 = self.read(offsets::DIRTY);
        self.write(offsets::DIRTY, dirty | class.mask());
    }

    // ---- header ------------------------------------------------------------------------

    /// The page format version (`1` for the layout this crate knows).
    #[inline]
    pub fn version(&self) -> u16 {
        self.read(offsets::VERSION)
    }

    /// Whether the hypervisor marked the contents valid. Re-check after every run: the
    /// hypervisor may invalidate the page at any dispatch.
    #[inline]
    pub fn is_valid(&self) -> bool {
        self.read::<u8>(offsets::ISVALID) != 0
    }

    /// Whether the page is valid and has the version this crate understands.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.is_valid() && self.version() == REGISTER_PAGE_VERSION_1
    }

    /// The classes written since the hypervisor last consumed the page.
    #[inline]
    pub fn dirty(&self) -> DirtyClasses {
        DirtyClasses::from_bits(self.read(offsets::DIRTY))
    }

    // ---- general purpose, rip, rflags -------------------------------------------------

    /// Reads a general purpose register.
    #[inline]
    pub fn gpr(&self, reg: Gpr) -> u64 {
        self.read(offsets::GP + 8 * reg.index())
    }

    /// Writes a general purpose register and marks [`RegisterClass::General`] dirty.
    #[inline]
    pub fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.write(offsets::GP + 8 * reg.index(), value);
        self.mark_dirty(RegisterClass::General);
    }

    /// Reads RIP.
    #[inline]
    pub fn rip(&self) -> u64 {
        self.read(offsets::RIP)
    }

    /// Writes RIP and marks [`RegisterClass::Ip`] dirty.
    #[inline]
    pub fn set_rip(&mut self, value: u64) {
        self.write(offsets::RIP, value);
        self.mark_dirty(RegisterClass::Ip);
    }

    /// Reads RFLAGS.
    #[inline]
    pub fn rflags(&self) -> u64 {
        self.read(offsets::RFLAGS)
    }

    /// Writes RFLAGS and marks [`RegisterClass::Flags`] dirty.
    #[inline]
    pub fn set_rflags(&mut self, value: u64) {
        self.write(offsets::RFLAGS, value);
        self.mark_dirty(RegisterClass::Flags);
    }

    // ---- xmm ---------------------------------------------------------------------------

    /// Reads xmm0..xmm5.
    #[inline]
    pub fn xmm(&self, reg: Xmm) -> u128 {
        let base = offsets::XMM + XMM_SIZE * reg.index();
        let low: u64 = self.read(base + offset_of!(RawXmm, low));
        let high: u64 = self.read(base + offset_of!(RawXmm, high));
        (u128::from(high) << 64) | u128::from(low)
    }

    /// Writes xmm0..xmm5 and marks [`RegisterClass::Xmm`] dirty.
    #[inline]
    pub fn set_xmm(&mut self, reg: Xmm, value: u128) {
        let base = offsets::XMM + XMM_SIZE * reg.index();
        self.write(base + offset_of!(RawXmm, low), value as u64);
        self.write(base + offset_of!(RawXmm, high), (value >> 64) as u64);
        self.mark_dirty(RegisterClass::Xmm);
    }

    // ---- segments ----------------------------------------------------------------------

    /// Reads a segment register.
    #[inline]
    pub fn segment(&self, seg: Segment) -> SegmentRegister {
        let base = offsets::SEGMENTS + SEG_SIZE * seg.index();
        SegmentRegister {
            base: self.read(base + offset_of!(RawSegment, base)),
            limit: self.read(base + offset_of!(RawSegment, limit)),
            selector: self.read(base + offset_of!(RawSegment, selector)),
            attributes: SegmentAttributes::from_bits(
                self.read(base + offset_of!(RawSegment, attributes)),
            ),
        }
    }

    /// Writes a segment register and marks [`RegisterClass::Segment`] dirty.
    #[inline]
    pub fn set_segment(&mut self, seg: Segment, value: SegmentRegister) {
        let base = offsets::SEGMENTS + SEG_SIZE * seg.index();
        self.write(base + offset_of!(RawSegment, base), value.base);
        self.write(base + offset_of!(RawSegment, limit), value.limit);
        self.write(base + offset_of!(RawSegment, selector), value.selector);
        self.write(
            base + offset_of!(RawSegment, attributes),
            value.attributes.to_bits(),
        );
        self.mark_dirty(RegisterClass::Segment);
    }

    // ---- read-only registers ------------------------------------------------------------

    /// Reads one of the read-only registers.
    #[inline]
    pub fn read_only(&self, reg: ReadOnlyRegister) -> u64 {
        self.read(read_only_offset(reg))
    }

    /// CR0 (read-only via the page).
    #[inline]
    pub fn cr0(&self) -> u64 {
        self.read(offsets::CR0)
    }

    /// CR3 (read-only via the page).
    #[inline]
    pub fn cr3(&self) -> u64 {
        self.read(offsets::CR3)
    }

    /// CR4 (read-only via the page).
    #[inline]
    pub fn cr4(&self) -> u64 {
        self.read(offsets::CR4)
    }

    /// CR8 (read-only via the page).
    #[inline]
    pub fn cr8(&self) -> u64 {
        self.read(offsets::CR8)
    }

    /// EFER (read-only via the page).
    #[inline]
    pub fn efer(&self) -> u64 {
        self.read(offsets::EFER)
    }

    /// DR7 (read-only via the page).
    #[inline]
    pub fn dr7(&self) -> u64 {
        self.read(offsets::DR7)
    }

    /// The pending interruption register (read-only via the page).
    #[inline]
    pub fn pending_interruption(&self) -> u64 {
        self.read(offsets::PENDING_INTERRUPTION)
    }

    /// The interrupt state register (read-only via the page).
    #[inline]
    pub fn interrupt_state(&self) -> u64 {
        self.read(offsets::INTERRUPT_STATE)
    }

    /// The instruction emulation hints.
    #[inline]
    pub fn instruction_emulation_hints(&self) -> u64 {
        self.read(offsets::INSTRUCTION_EMULATION_HINTS)
    }

    /// XFEM.
    #[inline]
    pub fn xfem(&self) -> u64 {
        self.read(offsets::XFEM)
    }

    // ---- bulk ----------------------------------------------------------------------------

    /// Reads every register the page holds.
    pub fn registers(&self) -> PageRegisters {
        let mut regs = PageRegisters::default();
        for g in Gpr::ALL {
            regs.gp[g.index()] = self.gpr(g);
        }
        regs.rip = self.rip();
        regs.rflags = self.rflags();
        for x in Xmm::ALL {
            regs.xmm[x.index()] = self.xmm(x);
        }
        for s in Segment::ALL {
            regs.segments[s.index()] = self.segment(s);
        }
        for r in ReadOnlyRegister::ALL {
            regs.read_only[r.index()] = self.read_only(r);
        }
        regs
    }

    /// The general purpose registers, RIP and RFLAGS.
    pub fn standard_registers(&self) -> hv::StandardRegisters {
        let mut regs = PageRegisters::default();
        for g in Gpr::ALL {
            regs.gp[g.index()] = self.gpr(g);
        }
        regs.rip = self.rip();
        regs.rflags = self.rflags();
        regs.to_standard()
    }

    /// Writes the general purpose registers, RIP and RFLAGS and marks
    /// [`RegisterClass::General`], [`RegisterClass::Ip`] and [`RegisterClass::Flags`] dirty.
    pub fn set_standard_registers(&mut self, regs: &hv::StandardRegisters) {
        for (i, v) in standard_to_gp(regs).into_iter().enumerate() {
            self.write(offsets::GP + 8 * i, v);
        }
        self.mark_dirty(RegisterClass::General);
        self.set_rip(regs.rip);
        self.set_rflags(regs.rflags);
    }

    /// Fills the fields of `sregs` the page holds (six segments, CR0, CR3, CR4, CR8, EFER);
    /// the others (TR, LDTR, GDTR, IDTR, CR2, APIC_BASE, interrupt bitmap) are untouched.
    pub fn read_special_registers(&self, sregs: &mut hv::SpecialRegisters) {
        let mut regs = PageRegisters::default();
        for s in Segment::ALL {
            regs.segments[s.index()] = self.segment(s);
        }
        for r in ReadOnlyRegister::ALL {
            regs.read_only[r.index()] = self.read_only(r);
        }
        regs.fill_special(sregs);
    }

    /// Writes the six segment registers of `sregs` (the only special registers the page
    /// accepts) and marks [`RegisterClass::Segment`] dirty.
    pub fn set_special_segments(&mut self, sregs: &hv::SpecialRegisters) {
        for (seg, value) in Segment::ALL.into_iter().zip(special_segments(sregs)) {
            self.set_segment(seg, value);
        }
    }

    // ---- hypervisor side (simulation and tests) -------------------------------------------

    /// Writes a general purpose register WITHOUT setting the dirty bit — the classic bug this
    /// crate prevents. Only for the simulator's "lost write" model.
    #[cfg(feature = "sim")]
    pub(crate) fn poke_gpr_without_dirty(&mut self, reg: Gpr, value: u64) {
        self.write(offsets::GP + 8 * reg.index(), value);
    }

    /// Hypervisor side: stores a full register set, the header and clears `dirty`.
    #[cfg(feature = "sim")]
    pub(crate) fn hv_fill(&mut self, regs: &PageRegisters, valid: bool) {
        self.write(offsets::VERSION, REGISTER_PAGE_VERSION_1);
        for (i, v) in regs.gp.iter().enumerate() {
            self.write(offsets::GP + 8 * i, *v);
        }
        self.write(offsets::RIP, regs.rip);
        self.write(offsets::RFLAGS, regs.rflags);
        for x in Xmm::ALL {
            let base = offsets::XMM + XMM_SIZE * x.index();
            let v = regs.xmm[x.index()];
            self.write(base + offset_of!(RawXmm, low), v as u64);
            self.write(base + offset_of!(RawXmm, high), (v >> 64) as u64);
        }
        for s in Segment::ALL {
            let base = offsets::SEGMENTS + SEG_SIZE * s.index();
            let v = regs.segments[s.index()];
            self.write(base + offset_of!(RawSegment, base), v.base);
            self.write(base + offset_of!(RawSegment, limit), v.limit);
            self.write(base + offset_of!(RawSegment, selector), v.selector);
            self.write(
                base + offset_of!(RawSegment, attributes),
                v.attributes.to_bits(),
            );
        }
        for r in ReadOnlyRegister::ALL {
            self.write(read_only_offset(r), regs.read_only[r.index()]);
        }
        self.write(offsets::DIRTY, 0u32);
        self.hv_set_valid(valid);
    }

    /// Hypervisor side: sets or clears `isvalid`.
    #[cfg(feature = "sim")]
    pub(crate) fn hv_set_valid(&mut self, valid: bool) {
        self.write(offsets::ISVALID, u8::from(valid));
    }

    /// Hypervisor side: overwrites `version`.
    #[cfg(feature = "sim")]
    pub(crate) fn hv_set_version(&mut self, version: u16) {
        self.write(offsets::VERSION, version);
    }

    /// Hypervisor side: overwrites `dirty`.
    #[cfg(feature = "sim")]
    pub(crate) fn hv_set_dirty(&mut self, dirty: DirtyClasses) {
        self.write(offsets::DIRTY, dirty.bits());
    }
}

#[inline]
fn read_only_offset(reg: ReadOnlyRegister) -> usize {
    match reg {
        ReadOnlyRegister::Cr0 => offsets::CR0,
        ReadOnlyRegister::Cr3 => offsets::CR3,
        ReadOnlyRegister::Cr4 => offsets::CR4,
        ReadOnlyRegister::Cr8 => offsets::CR8,
        ReadOnlyRegister::Efer => offsets::EFER,
        ReadOnlyRegister::Dr7 => offsets::DR7,
        ReadOnlyRegister::PendingInterruption => offsets::PENDING_INTERRUPTION,
        ReadOnlyRegister::InterruptState => offsets::INTERRUPT_STATE,
    }
}

/// Backing store of a heap page: 4096 bytes, 4096-byte aligned.
#[cfg(feature = "sim")]
#[repr(C, align(4096))]
struct AlignedPage([u8; REGISTER_PAGE_MAP_SIZE]);

#[cfg(feature = "sim")]
fn heap_layout() -> std::alloc::Layout {
    std::alloc::Layout::new::<AlignedPage>()
}

impl Drop for RegisterPage {
    fn drop(&mut self) {
        match self.backing {
            Backing::Mapped => {
                // SAFETY: we created this mapping of exactly this size in `map_fd` and never
                // handed out references into it. munmap of a valid mapping cannot fail in a way
                // we could act upon during drop.
                unsafe {
                    libc::munmap(self.ptr.as_ptr().cast(), REGISTER_PAGE_MAP_SIZE);
                }
            }
            Backing::Borrowed => {}
            #[cfg(feature = "sim")]
            Backing::Heap => {
                // SAFETY: allocated in `new_heap` with the same layout, freed only here.
                unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), heap_layout()) }
            }
        }
    }
}

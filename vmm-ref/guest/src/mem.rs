//! Guest RAM above the image: a bump allocator for rings and I/O buffers,
//! plus the `mem*` symbols that compiled code may call.
//!
//! Memory is identity mapped, so the addresses handed out are both pointers
//! and the guest-physical addresses given to devices.

use crate::bootinfo::Region;

extern "C" {
    static __image_end: u8;
}

/// A region of DMA-able RAM handed out front to back, never freed.
pub struct Arena {
    next: u64,
    end: u64,
}

/// Out of guest RAM.
#[derive(Debug)]
pub struct OutOfMemory {
    /// Bytes requested.
    pub size: u64,
}

impl Arena {
    /// An arena over the RAM region that holds our image, from the end of the
    /// image (page aligned) to the end of that region.
    pub fn above_image(ram: &[Region]) -> Option<Self> {
        // Only the address of the linker-defined symbol is taken.
        let image_end = core::ptr::addr_of!(__image_end) as u64;
        let region = ram
            .iter()
            .find(|r| r.start <= image_end && image_end < r.end)?;
        // Stay below 4 GiB: that is all our page tables map.
        let end = region.end.min(1 << 32);
        Some(Self {
            next: image_end,
            end,
        })
    }

    /// Bytes still available.
    pub fn remaining(&self) -> u64 {
        self.end - self.next
    }

    /// Allocates `size` zeroed bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64, OutOfMemory> {
        let start = self
            .next
            .checked_add(align - 1)
            .ok_or(OutOfMemory { size })?
            & !(align - 1);
        let end = start
            .checked_add(size)
            .filter(|&e| e <= self.end)
            .ok_or(OutOfMemory { size })?;
        // SAFETY: [start, end) is RAM above our image that no one else uses
        // (the arena hands each byte out once).
        unsafe { core::ptr::write_bytes(start as *mut u8, 0, size as usize) };
        self.next = end;
        Ok(start)
    }
    /// Allocates a slice of `n` copies of `value`, living as long as the guest.
    pub fn slice<T: Copy>(&mut self, n: usize, value: T) -> Result<&'static mut [T], OutOfMemory> {
        let size = (core::mem::size_of::<T>() as u64)
            .checked_mul(n as u64)
            .ok_or(OutOfMemory { size: u64::MAX })?;
        let addr = self.alloc(size.max(1), core::mem::align_of::<T>().max(8) as u64)?;
        let start = addr as *mut T;
        // SAFETY: fresh, suitably sized and aligned memory owned by nobody
        // else; every element is initialised before the slice is formed.
        unsafe {
            for i in 0..n {
                start.add(i).write(value);
            }
            Ok(core::slice::from_raw_parts_mut(start, n))
        }
    }

    /// Moves `value` into arena memory and returns a reference to it that
    /// lives as long as the guest (the arena never frees).
    pub fn boxed<T>(&mut self, value: T) -> Result<&'static mut T, OutOfMemory> {
        let addr = self.alloc(
            core::mem::size_of::<T>() as u64,
            core::mem::align_of::<T>().max(8) as u64,
        )?;
        let slot = addr as *mut T;
        // SAFETY: `alloc` returned fresh, suitably sized and aligned memory
        // that nothing else references; it is never freed, hence 'static.
        unsafe {
            slot.write(value);
            Ok(&mut *slot)
        }
    }
}

// The freestanding build has no libc: provide the memory functions the
// compiler emits calls to. `rep movsb`/`rep stosb` are fast on every CPU this
// runs on, and cannot be turned back into calls to themselves by the optimiser.

/// `memcpy`.
///
/// # Safety
/// Standard C semantics: valid, non-overlapping ranges.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
            options(nostack, preserves_flags));
    }
    dest
}

/// `memmove`.
///
/// # Safety
/// Standard C semantics: valid ranges, which may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // No harmful overlap for a forward copy.
        // SAFETY: forwarded caller guarantee; forward copy is safe when dest
        // does not start inside [src, src + n).
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copy backwards (DF=1) so that overlapping bytes are read before
    // they are overwritten; DF is restored before returning.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld",
            inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
            options(nostack));
    }
    dest
}

/// `memset`.
///
/// # Safety
/// Standard C semantics: a valid range.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for `n` bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8,
            options(nostack, preserves_flags));
    }
    dest
}

/// `memcmp`.
///
/// # Safety
/// Standard C semantics: valid ranges.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees both ranges hold n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `bcmp`.
///
/// # Safety
/// Standard C semantics: valid ranges.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded caller guarantee.
    unsafe { memcmp(a, b, n) }
}

//! Port I/O and leaving the VM.
//!
//! Port I/O works at CPL3 thanks to the all-zero I/O permission bitmap of our
//! TSS (see [`crate::cpu`]). Every access is a VM exit (~60 us on the PVM
//! hosts), so callers keep them out of hot paths.

use core::arch::asm;

/// QEMU `isa-debug-exit` / vmm-ref debug-exit port.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// i8042 command port; writing `0xfe` pulses the CPU reset line.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the ports we
    // touch (COM1, PIT, debug exit, i8042) are owned by this guest.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; reading a device register has no memory effects.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Stops the VM with `status`: debug-exit port first (QEMU exits with
/// `status << 1 | 1`, vmm-ref with `status`), then an i8042 reset, then
/// `hlt`, which at CPL3 faults and - with our null IDT - triple-faults
/// (a VM shutdown).
pub fn exit(status: u32) -> ! {
    outl(DEBUG_EXIT_PORT, status);
    outb(I8042_COMMAND, I8042_RESET);
    loop {
        // SAFETY: `hlt` at CPL3 raises #GP; with the null IDT that is a triple
        // fault, which every VMM treats as the guest stopping. No memory is
        // touched.
        unsafe { asm!("hlt", options(nomem, nostack)) }
    }
}

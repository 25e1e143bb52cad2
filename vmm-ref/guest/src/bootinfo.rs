//! What the loader tells us: the command line and the RAM map.
//!
//! Two sources, depending on the entry point: Linux `struct boot_params`
//! (the "zero page", `entry64`) or PVH `struct hvm_start_info`
//! (`pvh_entry`). Both are read through the identity map.

use crate::boot::{BOOT_LINUX, BOOT_PVH};

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// boot_params: number of e820 entries (u8).
const BP_E820_ENTRIES: u64 = 0x1e8;
/// boot_params: command line physical address (u32).
const BP_CMD_LINE_PTR: u64 = 0x228;
/// boot_params: e820 table (20-byte entries).
const BP_E820_TABLE: u64 = 0x2d0;
/// boot_params: capacity of the e820 table.
const BP_E820_MAX: usize = 128;
/// hvm_start_info offsets.
const PVH_CMDLINE: u64 = 24;
const PVH_MEMMAP: u64 = 40;
const PVH_MEMMAP_ENTRIES: u64 = 48;
/// Upper bound on PVH memory map entries we look at.
const PVH_MEMMAP_MAX: u32 = 128;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// Longest command line we read.
pub const CMDLINE_MAX: usize = 4096;
/// RAM regions we keep.
pub const MAX_REGIONS: usize = 32;

/// A range of usable RAM.
#[derive(Clone, Copy, Debug, Default)]
pub struct Region {
    /// Physical start address.
    pub start: u64,
    /// Physical end address (exclusive).
    pub end: u64,
}

/// Boot information in a loader-independent form.
pub struct BootInfo<'a> {
    /// Which protocol we were started with.
    pub protocol: &'static str,
    /// The kernel command line (empty if none or not valid UTF-8).
    pub cmdline: &'a str,
    regions: [Region; MAX_REGIONS],
    nr_regions: usize,
}

impl BootInfo<'_> {
    /// Usable RAM regions, as reported by the loader.
    pub fn ram(&self) -> &[Region] {
        &self.regions[..self.nr_regions]
    }

    fn push_ram(&mut self, start: u64, size: u64, kind: u32) {
        if kind != E820_RAM || size == 0 || self.nr_regions >= MAX_REGIONS {
            return;
        }
        if let Some(end) = start.checked_add(size) {
            self.regions[self.nr_regions] = Region { start, end };
            self.nr_regions += 1;
        }
    }
}

/// Error reading the boot information.
#[derive(Debug)]
pub enum BootInfoError {
    /// `guest_main` got a boot kind the entry code never passes.
    UnknownKind(u64),
    /// The PVH start info does not carry the PVH magic.
    BadPvhMagic(u32),
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::UnknownKind(kind) => write!(f, "unknown boot kind {kind}"),
            Self::BadPvhMagic(magic) => write!(f, "bad hvm_start_info magic {magic:#x}"),
        }
    }
}

/// Reads a value of type `T` from physical address `addr`.
///
/// # Safety
/// `addr` must be identity-mapped memory holding a `T`.
unsafe fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: the caller guarantees `addr` is mapped; the loader's structures
    // are not necessarily aligned, hence the unaligned read.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Copies the NUL-terminated command line at `addr` (0 = none) into `buf`
/// (so that it survives the guest reusing loader memory) and returns it.
///
/// # Safety
/// `addr` must be 0 or point to identity-mapped memory.
unsafe fn read_cmdline(addr: u64, buf: &mut [u8; CMDLINE_MAX]) -> &str {
    if addr == 0 {
        return "";
    }
    let mut len = 0;
    while len < CMDLINE_MAX {
        // SAFETY: the loader placed a NUL-terminated string at `addr`; we read
        // at most CMDLINE_MAX bytes of it.
        let byte = unsafe { read_phys::<u8>(addr + len as u64) };
        if byte == 0 {
            break;
        }
        buf[len] = byte;
        len += 1;
    }
    let bytes = &buf[..len];
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        // Keep the valid prefix rather than dropping everything.
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// Parses the loader's boot structure at `info` for entry `kind`.
///
/// # Safety
/// `kind`/`info` must be the values the entry code passed to `guest_main`:
/// `info` points to a `boot_params` or `hvm_start_info` in identity-mapped RAM.
/// The command line is copied into `cmdline_buf`.
pub unsafe fn parse(
    kind: u64,
    info: u64,
    cmdline_buf: &mut [u8; CMDLINE_MAX],
) -> Result<BootInfo<'_>, BootInfoError> {
    let mut boot = BootInfo {
        protocol: "",
        cmdline: "",
        regions: [Region::default(); MAX_REGIONS],
        nr_regions: 0,
    };
    match kind {
        BOOT_LINUX => {
            boot.protocol = "linux64";
            // SAFETY: `info` is the zero page; all offsets lie within its 4 KiB.
            unsafe {
                boot.cmdline = read_cmdline(
                    u64::from(read_phys::<u32>(info + BP_CMD_LINE_PTR)),
                    cmdline_buf,
                );
                let entries = usize::from(read_phys::<u8>(info + BP_E820_ENTRIES)).min(BP_E820_MAX);
                for i in 0..entries {
                    let entry = info + BP_E820_TABLE + 20 * i as u64;
                    boot.push_ram(
                        read_phys(entry),
                        read_phys(entry + 8),
                        read_phys(entry + 16),
                    );
                }
            }
        }
        BOOT_PVH => {
            boot.protocol = "pvh";
            // SAFETY: `info` is the hvm_start_info; its memory map and command
            // line are where it says (loader-provided, identity-mapped).
            unsafe {
                let magic: u32 = read_phys(info);
                if magic != PVH_MAGIC {
                    return Err(BootInfoError::BadPvhMagic(magic));
                }
                boot.cmdline = read_cmdline(read_phys(info + PVH_CMDLINE), cmdline_buf);
                let map: u64 = read_phys(info + PVH_MEMMAP);
                let entries: u32 = read_phys(info + PVH_MEMMAP_ENTRIES);
                if map != 0 {
                    for i in 0..entries.min(PVH_MEMMAP_MAX) {
                        let entry = map + 24 * u64::from(i);
                        boot.push_ram(
                            read_phys(entry),
                            read_phys(entry + 8),
                            read_phys(entry + 16),
                        );
                    }
                }
            }
        }
        other => return Err(BootInfoError::UnknownKind(other)),
    }
    Ok(boot)
}

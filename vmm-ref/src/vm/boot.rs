//! Loading the kernel and writing the x86_64 boot structures into guest memory:
//! kernel (ELF or bzImage), initrd, command line, zero page with the e820 map,
//! GDT and identity-mapped page tables. Pure functions over guest memory, so they
//! are unit-tested without KVM.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use serde::{Deserialize, Serialize};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cpu::BootEntry;
use super::kernel::open_boot_file;
use super::layout::*;

/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// e820 type of reserved ranges.
const E820_RESERVED: u32 = 2;
/// Linux boot protocol: "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Linux boot protocol: boot sector signature.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Linux boot protocol: loader type "undefined".
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Linux boot protocol: minimum kernel alignment.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point from the protected-mode load address of a bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Page-table entry bits: present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry bits: present | writable | 2 MiB page.
const PDE_2M_PAGE: u64 = 0x83;

/// Errors while preparing the guest for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image cannot be opened or read.
    #[error("cannot read kernel image {path}")]
    KernelFile {
        /// Path of the kernel.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("cannot load kernel image (tried ELF and bzImage)")]
    KernelLoad(#[source] loader::Error),
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    InitrdFile {
        /// Path of the initrd.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error("initrd of {size} bytes does not fit in guest RAM below {limit:#x} (kernel ends at {kernel_end:#x})")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Highest usable address.
        limit: u64,
        /// End of the kernel image.
        kernel_end: u64,
    },
    /// Rewinding the kernel image after the ELF probe failed.
    #[error("cannot rewind kernel image")]
    KernelSeek(#[source] std::io::Error),
    /// Writing the command line into guest memory failed.
    #[error("cannot write the kernel command line into guest memory")]
    CmdlineLoad(#[source] loader::Error),
    /// The command line is invalid.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line does not fit (with what vmm-ref appends).
    #[error("the kernel command line is {len} bytes long (with the arguments vmm-ref appends); at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The most that fits (without the NUL).
        max: usize,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        /// The structure being written.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// `--boot pvh` with a kernel that has no PVH entry note.
    #[error("--boot pvh: the kernel has no PVH entry (XEN_ELFNOTE_PHYS32_ENTRY note)")]
    NoPvhEntry,
    /// Writing `hvm_start_info` and the PVH memory map failed.
    #[error("cannot write the PVH start info into guest memory")]
    PvhStartInfo(#[source] linux_loader::configurator::Error),
    /// Guest memory is too small for the boot layout.
    #[error("guest memory of {0:#x} bytes is too small to boot (need more than {HIMEM_START:#x})")]
    MemoryTooSmall(u64),
}

/// Where the kernel landed and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point (`rip`).
    pub entry: u64,
    /// First byte after the loaded image.
    pub kernel_end: u64,
    /// The bzImage setup header, if the kernel was a bzImage.
    pub setup_header: Option<setup_header>,
    /// The 32-bit PVH entry point, if the ELF has a PVH note.
    pub pvh_entry: Option<u64>,
}

/// Loads an ELF (its 64-bit `e_entry`, and its PVH entry if it has the note) or
/// a bzImage (entered at its 64-bit entry, load address + 0x200).
pub fn load_kernel<F: Read + vm_memory::ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    image: &mut F,
) -> Result<LoadedKernel, BootError> {
    let highmem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, image, highmem) {
        Ok(res) => Ok(LoadedKernel {
            entry: res.kernel_load.0,
            kernel_end: res.kernel_end,
            setup_header: None,
            pvh_entry: match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
                _ => None,
            },
        }),
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            image
                .seek(SeekFrom::Start(0))
                .map_err(BootError::KernelSeek)?;
            let res = BzImage::load(mem, None, image, highmem).map_err(BootError::KernelLoad)?;
            Ok(LoadedKernel {
                entry: res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                kernel_end: res.kernel_end,
                setup_header: res.setup_header,
                pvh_entry: None,
            })
        }
        Err(e) => Err(BootError::KernelLoad(e)),
    }
}

/// Opens and loads the kernel file at `path`.
pub fn load_kernel_file(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = open_boot_file(path).map_err(|source| BootError::KernelFile {
        path: path.to_owned(),
        source,
    })?;
    load_kernel(mem, &mut file)
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of RAM below
/// the MMIO gap (and below `initrd_addr_max + 1` when the kernel gives one),
/// above `kernel_end`. The same rule is checked before the VM exists.
pub fn initrd_address(
    mem_size: u64,
    kernel_end: u64,
    size: u64,
    initrd_addr_max: Option<u32>,
) -> Result<u64, BootError> {
    let mut limit = mem_size.min(MMIO_GAP_START);
    if let Some(max) = initrd_addr_max.filter(|m| *m != 0) {
        limit = limit.min(u64::from(max) + 1);
    }
    match limit.checked_sub(size) {
        Some(a) if a & !0xfff >= kernel_end => Ok(a & !0xfff),
        _ => Err(BootError::InitrdTooLarge {
            size,
            limit,
            kernel_end,
        }),
    }
}

/// Loads the initrd at [`initrd_address`]. Returns `(address, size)`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    path: &Path,
    initrd_addr_max: Option<u32>,
) -> Result<(u64, u64), BootError> {
    let file_err = |source| BootError::InitrdFile {
        path: path.to_owned(),
        source,
    };
    let mut file = open_boot_file(path).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();
    let addr = initrd_address(mem_size, kernel_end, size, initrd_addr_max)?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        size,
        limit: addr,
        kernel_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::GuestWrite {
            what: "initrd",
            source,
        })?;
    Ok((addr, size))
}

/// The command line as linux-loader checks it: printable ASCII, at most
/// [`CMDLINE_MAX_SIZE`] bytes with the NUL. Also used before the VM exists.
pub fn checked_cmdline(cmdline: &str) -> Result<linux_loader::cmdline::Cmdline, BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    let mut cl =
        linux_loader::cmdline::Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    }
    Ok(cl)
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`]; returns its length
/// without the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let cl = checked_cmdline(cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::CmdlineLoad)?;
    Ok(cmdline.len())
}

/// The e820 map: RAM below the EBDA, RAM from 1 MiB, the MMIO gap reserved, RAM
/// above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![entry(0, EBDA_START, E820_RAM)];
    for (start, size) in ram_ranges(mem_size) {
        let (start, size) = if start == 0 {
            (HIMEM_START, size.saturating_sub(HIMEM_START))
        } else {
            (start, size)
        };
        if size > 0 && start < MMIO_GAP_START {
            map.push(entry(start, size, E820_RAM));
            map.push(entry(
                MMIO_GAP_START,
                MMIO_GAP_END - MMIO_GAP_START,
                E820_RESERVED,
            ));
        } else if size > 0 {
            map.push(entry(start, size, E820_RAM));
        }
    }
    map
}

/// What the zero page describes besides memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroPageParams {
    /// Length of the command line at [`CMDLINE_START`] (without NUL).
    pub cmdline_len: usize,
    /// Initrd `(address, size)`.
    pub initrd: Option<(u64, u64)>,
    /// bzImage setup header to start from.
    pub setup_header: Option<setup_header>,
}

/// Writes the zero page (`struct boot_params`) at [`ZERO_PAGE_START`].
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    p: &ZeroPageParams,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = p.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = p.cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = p.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *e;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::GuestWrite {
            what: "zero page",
            source,
        })
}

/// Builds a GDT entry from flags, base and limit (the classic packed layout).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (selector 0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Writes the GDT at [`GDT_START`] and an empty IDT at [`IDT_START`].
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(|source| BootError::GuestWrite {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|source| BootError::GuestWrite {
            what: "IDT",
            source,
        })
}

/// Writes identity-mapped page tables for the first [`IDENTITY_MAP_GIB`] GiB with
/// 2 MiB pages: PML4 at 0x9000, PDPT at 0xa000, page directories from 0xb000.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| BootError::GuestWrite {
                what: "page tables",
                source,
            })
    };
    w(PDPTE_START | PTE_PRESENT_RW, PML4_START)?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PDE_START + gib * 0x1000;
        w(pd | PTE_PRESENT_RW, PDPTE_START + gib * 8)?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            w(phys | PDE_2M_PAGE, pd + i * 8)?;
        }
    }
    Ok(())
}

/// Everything written into guest memory for one boot.
#[derive(Clone, Debug)]
pub struct BootSetup {
    /// Kernel image to load.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Full command line (user part + device and tsc arguments).
    pub cmdline: String,
    /// RAM size.
    pub mem_size: u64,
    /// How to enter the kernel.
    pub protocol: BootProtocol,
}

/// The boot protocol (`--boot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootProtocol {
    /// PVH when the ELF has the PVH note (as cloud-hypervisor chooses),
    /// the 64-bit entry otherwise (bzImage: always the 64-bit entry).
    #[default]
    Auto,
    /// Linux 64-bit boot protocol: ELF `e_entry` or bzImage + 0x200, long
    /// mode, `rsi` = zero page (the fewest emulated ring-0 instructions on a
    /// paravirtual nested KVM).
    Linux64,
    /// PVH: the ELF's `XEN_ELFNOTE_PHYS32_ENTRY`, 32-bit protected mode,
    /// `ebx` = `hvm_start_info` (as cloud-hypervisor and QEMU boot an ELF).
    Pvh,
}

impl std::str::FromStr for BootProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BootProtocol::Auto),
            "linux64" => Ok(BootProtocol::Linux64),
            "pvh" => Ok(BootProtocol::Pvh),
            other => Err(format!(
                "unknown boot protocol '{other}' (expected auto, linux64 or pvh)"
            )),
        }
    }
}

/// Writes `hvm_start_info` at [`PVH_INFO_START`] with the command line, the
/// initrd as module 0 and the memory map (linux-loader's PVH configurator).
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
) -> Result<u64, BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.r#type,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: linux_loader::loader::elf::start_info::XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::PvhStartInfo)?;
    Ok(PVH_INFO_START)
}

/// Loads the kernel, initrd, command line, zero page, GDT and page tables, and
/// for PVH the start info. Returns how the boot processor enters the kernel.
pub fn prepare(mem: &GuestMemoryMmap, setup: &BootSetup) -> Result<BootEntry, BootError> {
    if setup.mem_size <= HIMEM_START {
        return Err(BootError::MemoryTooSmall(setup.mem_size));
    }
    let kernel = load_kernel_file(mem, &setup.kernel)?;
    let initrd = match &setup.initrd {
        Some(path) => Some(load_initrd(
            mem,
            setup.mem_size,
            kernel.kernel_end,
            path,
            kernel.setup_header.map(|h| h.initrd_addr_max),
        )?),
        None => None,
    };
    let cmdline_len = write_cmdline(mem, &setup.cmdline)?;
    write_zero_page(
        mem,
        setup.mem_size,
        &ZeroPageParams {
            cmdline_len,
            initrd,
            setup_header: kernel.setup_header,
        },
    )?;
    write_gdt(mem)?;
    write_page_tables(mem)?;
    match (setup.protocol, kernel.pvh_entry) {
        (BootProtocol::Pvh, None) => Err(BootError::NoPvhEntry),
        (BootProtocol::Pvh | BootProtocol::Auto, Some(rip)) => {
            log::info!("boot: PVH entry {rip:#x} (--boot {:?})", setup.protocol);
            let start_info = write_pvh_start_info(mem, setup.mem_size, initrd)?;
            Ok(BootEntry::Pvh { rip, start_info })
        }
        (BootProtocol::Linux64, _) | (BootProtocol::Auto, None) => {
            log::info!(
                "boot: 64-bit entry {:#x} (--boot {:?})",
                kernel.entry,
                setup.protocol
            );
            Ok(BootEntry::Linux64 { rip: kernel.entry })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn mem(size: u64) -> GuestMemoryMmap {
        crate::vm::memory::create(size).unwrap()
    }

    #[test]
    fn pvh_start_info_describes_cmdline_memory_and_initrd() {
        let m = mem(256 << 20);
        let at = write_pvh_start_info(&m, 256 << 20, Some((0x80_0000, 0x1234))).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(
            (info.nr_modules, info.modlist_paddr),
            (1, PVH_MODLIST_START)
        );
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x80_0000, 0x1234));
        let e820 = e820_map(256 << 20);
        assert_eq!(info.memmap_entries as usize, e820.len());
        for (i, e) in e820.iter().enumerate() {
            let entry: hvm_memmap_table_entry = m
                .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!(
                (entry.addr, entry.size, entry.type_),
                (e.addr, e.size, e.r#type)
            );
        }
        // Without an initrd there is no module list.
        let at = write_pvh_start_info(&m, 256 << 20, None).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(at)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }

    #[test]
    fn gdt_entries_match_known_values() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn e820_small_memory() {
        let map = e820_map(256 << 20);
        let v: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            v,
            vec![
                (0, 0x9fc00, 1),
                (0x10_0000, (256 << 20) - 0x10_0000, 1),
                (0xd000_0000, 0x3000_0000, 2)
            ]
        );
    }

    #[test]
    fn e820_large_memory_goes_above_4g() {
        let map = e820_map(4 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!({ map[3].addr }, 1 << 32);
        assert_eq!({ map[3].size }, (4 << 30) - 0xd000_0000);
    }

    #[test]
    fn page_tables_identity_map() {
        let m = mem(1 << 20 << 4);
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0xa003);
        let pdpt1: u64 = m.read_obj(GuestAddress(PDPTE_START + 8)).unwrap();
        assert_eq!(pdpt1, 0xc003);
        let pde5: u64 = m.read_obj(GuestAddress(PDE_START + 5 * 8)).unwrap();
        assert_eq!(pde5, (5 << 21) | 0x83);
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, (3 << 30) | (511 << 21) | 0x83);
    }

    #[test]
    fn zero_page_fields_at_contract_offsets() {
        let m = mem(64 << 20);
        let len = write_cmdline(&m, "console=ttyS0 scenario=verify").unwrap();
        write_zero_page(
            &m,
            64 << 20,
            &ZeroPageParams {
                cmdline_len: len,
                ..Default::default()
            },
        )
        .unwrap();
        let ptr: u32 = m.read_obj(GuestAddress(ZERO_PAGE_START + 0x228)).unwrap();
        assert_eq!(ptr, CMDLINE_START as u32);
        let n: u8 = m.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(n, 3);
        let addr1: u64 = m
            .read_obj(GuestAddress(ZERO_PAGE_START + 0x2d0 + 20))
            .unwrap();
        assert_eq!(addr1, 0x10_0000);
        let mut buf = [0u8; 31];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf[..30], b"console=ttyS0 scenario=verify\0");
        assert!(m.last_addr().0 > CMDLINE_START);
    }

    #[test]
    fn garbage_kernel_is_an_error_not_a_panic() {
        let m = mem(16 << 20);
        let err = load_kernel(&m, &mut std::io::Cursor::new(vec![0u8; 8192])).unwrap_err();
        assert!(matches!(err, BootError::KernelLoad(_)));
        let err = load_kernel(&m, &mut std::io::Cursor::new(Vec::<u8>::new())).unwrap_err();
        assert!(matches!(err, BootError::KernelLoad(_)));
    }

    #[test]
    fn too_long_cmdline_is_rejected() {
        let m = mem(16 << 20);
        let long = "a".repeat(CMDLINE_MAX_SIZE + 10);
        assert!(write_cmdline(&m, &long).is_err());
    }
}

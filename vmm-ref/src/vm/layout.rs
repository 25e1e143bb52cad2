//! The x86_64 guest-physical memory map and fixed boot addresses.
//!
//! ```text
//! 0x0000_0500  GDT (null, code, data, TSS)     0x0000_0520  IDT (empty)
//! 0x0000_7000  zero page (struct boot_params)  0x0000_8ff0  boot stack pointer
//! 0x0000_9000  PML4   0xa000 PDPT   0xb000..0xf000 page directories (4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line             0x0009_fc00  MP table (EBDA)
//! 0x0010_0000  kernel (HIMEM_START) .. RAM .. 0xd000_0000
//! 0xd000_0000  virtio-mmio slots (4 KiB each, GSI 5, 6, ...) .. 4 GiB = MMIO gap
//! 0x1_0000_0000  RAM above the gap (when memory > 3.25 GiB)
//! ```

/// GDT location.
pub const GDT_START: u64 = 0x500;
/// IDT location (an empty IDT: interrupts are off at entry).
pub const IDT_START: u64 = 0x520;
/// The zero page (Linux `struct boot_params`), passed in `rsi`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH boot: `hvm_start_info` (then the module list and the memory map after it).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH boot: `hvm_modlist_entry` of the initrd.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH boot: the `hvm_memmap_table_entry` array.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Initial stack pointer of the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First page directory; `IDENTITY_MAP_GIB` of them follow each other.
pub const PDE_START: u64 = 0xb000;
/// Gibibytes identity-mapped with 2 MiB pages at entry (covers the MMIO gap).
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum size of the kernel command line, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Intel MP table (floating pointer + configuration table), in the EBDA.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of the low RAM reported below 1 MiB (start of the EBDA).
pub const EBDA_START: u64 = MPTABLE_START;
/// Start of high memory: kernels are loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio device slot.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; slot `i` uses `VIRTIO_FIRST_GSI + i`.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Highest GSI routed by the in-kernel IOAPIC.
pub const MAX_GSI: u32 = 23;
/// Maximum number of virtio-mmio devices (one GSI each).
pub const MAX_VIRTIO_DEVICES: usize = (MAX_GSI - VIRTIO_FIRST_GSI + 1) as usize;
/// KVM's three-page TSS region (inside the MMIO gap, never RAM).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// KVM's identity-map page (just below the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// COM1 port base.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// COM1 GSI.
pub const SERIAL_GSI: u32 = 4;
/// i8042 controller ports 0x60..=0x64.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Debug-exit port (QEMU isa-debug-exit, iobase=0xf4, iosize=4).
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// Local APIC base (MP table).
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IOAPIC base (MP table).
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Maximum number of vCPUs: bounded by the MP table's room in the EBDA.
pub const MAX_VCPUS: u8 = 32;

/// Guest-physical base of virtio-mmio slot `index`.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    if index >= MAX_VIRTIO_DEVICES {
        return None;
    }
    let base = VIRTIO_MMIO_BASE + VIRTIO_MMIO_SLOT_SIZE * index as u64;
    Some((base, VIRTIO_FIRST_GSI + index as u32))
}

/// RAM ranges `(start, size)` for `mem_size` bytes of guest memory.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if mem_size > low {
        ranges.push((MMIO_GAP_END, mem_size - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_below_gap_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn ram_above_gap_moves_past_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
    }

    #[test]
    fn virtio_slots_and_gsis() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_mmio_slot(2), Some((0xd000_2000, 7)));
        assert_eq!(
            virtio_mmio_slot(MAX_VIRTIO_DEVICES - 1).map(|s| s.1),
            Some(MAX_GSI)
        );
        assert_eq!(virtio_mmio_slot(MAX_VIRTIO_DEVICES), None);
    }
}

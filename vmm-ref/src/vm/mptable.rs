//! Intel MultiProcessor Specification 1.4 table in the EBDA, so that a Linux guest
//! finds its CPUs, the IOAPIC and the ISA interrupt routing without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_DEFAULT_PHYS_BASE, IO_APIC_DEFAULT_PHYS_BASE, MAX_GSI, MPTABLE_START};

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// CPUID signature of a generic family-6 CPU.
const CPU_STEPPING: u32 = 0x600;
/// Feature flags: FPU | APIC.
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const MP_IOAPIC_USABLE: u8 = 1;
/// Room between the MP table start and 640 KiB.
const MPTABLE_ROOM: usize = 0x400;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the EBDA.
    #[error("an MP table for {0} vCPUs does not fit below 640 KiB")]
    TooManyCpus(u8),
    /// Guest memory write failed.
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer + configuration table for `num_cpus` CPUs as bytes,
/// to be placed at [`MPTABLE_START`].
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    let ioapic_id = num_cpus
        .checked_add(1)
        .ok_or(MptableError::TooManyCpus(num_cpus))?;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION]);
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.push(flags);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, MP_IOAPIC_USABLE]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    for irq in 0..=MAX_GSI as u8 {
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const FLOAT_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_len = HEADER_LEN + entries.len();
    if FLOAT_LEN + table_len > MPTABLE_ROOM {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let table_addr = MPTABLE_START as u32 + FLOAT_LEN as u32;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(MPC_SPEC_REV);
    header.push(0); // checksum, patched below
    header.extend_from_slice(b"VMMREF  ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut float = Vec::with_capacity(FLOAT_LEN + table_len);
    float.extend_from_slice(b"_MP_");
    float.extend_from_slice(&table_addr.to_le_bytes());
    float.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    float[10] = checksum(&float);
    float.extend_from_slice(&table);
    Ok(float)
}

/// Writes the MP table for `num_cpus` CPUs at [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        let t = build(4).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(ptr as u64, MPTABLE_START + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        // First processor entry is the BSP.
        assert_eq!(table[44], MP_PROCESSOR);
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
    }

    #[test]
    fn max_vcpus_fit_and_more_do_not() {
        assert!(build(crate::vm::layout::MAX_VCPUS).is_ok());
        assert!(matches!(build(60), Err(MptableError::TooManyCpus(60))));
        assert!(build(255).is_err());
    }
}

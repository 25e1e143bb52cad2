//! Guest-physical MMIO and port-I/O buses.
//!
//! A bus maps address ranges to devices. The vCPU threads look up the device
//! for each exit and forward the access with the offset relative to the start
//! of the device's range.

/// A device reachable through an MMIO or port-I/O range.
///
/// Accesses come straight from the guest: `offset` and `data.len()` are
/// untrusted (any length from 1 to 8 bytes, any alignment) and must never cause
/// a panic. Reads of unimplemented registers fill `data` with zeros.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` within the device range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` within the device range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

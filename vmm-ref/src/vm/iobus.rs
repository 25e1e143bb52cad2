//! Address-range maps from guest MMIO / port-I/O addresses to [`BusDevice`]s.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum IoBusError {
    /// The new range overlaps an existing one or is empty/overflowing.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

struct Range {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct IoBus {
    ranges: BTreeMap<u64, Range>,
}

impl IoBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), IoBusError> {
        let overlap = IoBusError::Overlap { base, len };
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(overlap),
        };
        if let Some((b, r)) = self.ranges.range(..end).next_back() {
            if b + r.len > base {
                return Err(overlap);
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < range.len).then_some((range, offset))
    }

    /// Forwards a read; returns false (leaving `data` untouched) when nothing is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((r, offset)) => {
                r.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Forwards a write; returns false when nothing is mapped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((r, offset)) => {
                r.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = IoBus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(dev.lock().unwrap().last, Some((0, vec![0x41])));
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.write(0x3f7, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = IoBus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(0x1000, 0x100, d()).unwrap();
        assert!(bus.insert(0x10ff, 1, d()).is_err());
        assert!(bus.insert(0xf00, 0x101, d()).is_err());
        assert!(bus.insert(0x2000, 0, d()).is_err());
        assert!(bus.insert(u64::MAX, 2, d()).is_err());
        bus.insert(0x1100, 0x100, d()).unwrap();
        bus.insert(0xf00, 0x100, d()).unwrap();
    }
}

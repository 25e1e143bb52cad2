//! Debug-exit port (QEMU's `isa-debug-exit,iobase=0xf4,iosize=4`): a guest write
//! of value `v` stops the VM and vmm-ref exits with status `v`.

use crate::bus::BusDevice;
use crate::vm::stop::{StopReason, StopSignal};

/// Width of the port range.
pub const DEBUG_EXIT_SIZE: u64 = 4;

/// The debug-exit device.
pub struct DebugExit {
    stop: StopSignal,
}

impl DebugExit {
    /// A device that requests `StopReason::DebugExit` on `stop`.
    pub fn new(stop: StopSignal) -> Self {
        DebugExit { stop }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut raw = [0u8; 4];
        for (dst, src) in raw.iter_mut().zip(data) {
            *dst = *src;
        }
        self.stop
            .request(StopReason::DebugExit(u32::from_le_bytes(raw)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_stops_with_value() {
        let s = StopSignal::new();
        let mut d = DebugExit::new(s.clone());
        d.write(1, &[9]);
        assert_eq!(s.reason(), None);
        d.write(0, &[3, 0, 0, 0]);
        assert_eq!(s.reason(), Some(StopReason::DebugExit(3)));
    }

    #[test]
    fn byte_and_wide_writes() {
        let s = StopSignal::new();
        DebugExit::new(s.clone()).write(0, &[0x2a]);
        assert_eq!(s.reason(), Some(StopReason::DebugExit(42)));
        let s = StopSignal::new();
        DebugExit::new(s.clone()).write(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(s.reason(), Some(StopReason::DebugExit(0x0403_0201)));
    }
}

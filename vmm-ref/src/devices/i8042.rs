//! i8042 keyboard controller, reduced to what guests use to leave: the CPU reset
//! command (0xFE to port 0x64) stops the VM cleanly.

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::vm::stop::{StopReason, StopSignal};

/// Ports 0x60..=0x64.
pub const I8042_SIZE: u64 = 5;

/// Turns the i8042 reset line into a VM stop request.
pub struct ResetTrigger(StopSignal);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(StopReason::I8042Reset);
        Ok(())
    }
}

/// The i8042 device on the port-I/O bus.
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller whose reset command requests `StopReason::I8042Reset`.
    pub fn new(stop: StopSignal) -> Self {
        I8042(I8042Device::new(ResetTrigger(stop)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0, |o| self.0.read(o));
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(o), Some(v)) = (u8::try_from(offset), data.first()) {
            // The trigger is infallible.
            let _ = self.0.write(o, *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops() {
        let s = StopSignal::new();
        let mut d = I8042::new(s.clone());
        d.write(4, &[0x12]);
        d.write(0, &[0xfe]);
        assert_eq!(s.reason(), None);
        d.write(4, &[0xfe]);
        assert_eq!(s.reason(), Some(StopReason::I8042Reset));
        let mut b = [0xaa; 2];
        d.read(4, &mut b);
        assert_eq!(b, [0, 0]);
        d.read(u64::MAX, &mut b);
    }
}

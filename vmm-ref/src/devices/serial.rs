//! COM1: the vm-superio 16550A model on port 0x3f8, interrupting through an
//! irqfd (GSI 4), guest output to a writer (stdout by default).

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::ratelimit::RateLimiter;
use crate::vm::stop::StopSignal;

/// Ports 0x3f8..=0x3ff.
pub const SERIAL_SIZE: u64 = 8;

/// Raises the serial interrupt by writing the irqfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The serial port device.
pub struct Serial {
    uart: Uart<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>,
    /// Guest output that could not be written (a closed pipe, a full disk):
    /// the byte is dropped (the guest is never blocked) and the error logged
    /// at most once per [`OUTPUT_ERROR_PERIOD`], with the count in between.
    output_errors: RateLimiter,
    /// Bytes dropped that way since the device was created.
    dropped: u64,
    /// Output errors logged (for tests: one per period, not one per byte).
    logged: u64,
}

/// At most one serial output error message per this period.
const OUTPUT_ERROR_PERIOD: Duration = Duration::from_secs(10);

impl Serial {
    /// A UART that signals `irq` and writes guest output to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Serial {
            uart: Uart::new(EventFdTrigger(irq), out),
            output_errors: RateLimiter::new(1, OUTPUT_ERROR_PERIOD),
            dropped: 0,
            logged: 0,
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted (0 when
    /// the receive FIFO is full).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if input.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e}");
                0
            }
        }
    }

    /// Flushes buffered guest output.
    pub fn flush(&mut self) {
        if let Err(e) = self.uart.writer_mut().flush() {
            log::warn!("cannot flush serial output: {e}");
        }
    }
}

/// Forwards the host's stdin to the guest's serial port on a thread named
/// `serial-in`, until stdin ends or `stop` is requested. Input waits while the
/// guest does not drain its receive FIFO.
pub fn spawn_stdin_forwarder(
    serial: Arc<Mutex<Serial>>,
    stop: StopSignal,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                let n = match io::stdin().read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // The terminal went away (hang-up): the end of input, as
                    // EOF is; SIGHUP stops the VMM and says so.
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                        log::debug!("serial input: stdin hung up: {e}");
                        return;
                    }
                    Err(e) => {
                        log::warn!("serial input: cannot read stdin: {e}");
                        return;
                    }
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    if stop.reason().is_some() {
                        return;
                    }
                    let done = serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(pending);
                    pending = pending.get(done..).unwrap_or(&[]);
                    if done == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        })
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0, |o| self.uart.read(o));
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(o) = u8::try_from(offset) else {
            return;
        };
        // `rep outsb` delivers several bytes for the same port.
        for v in data {
            match self.uart.write(o, *v) {
                Ok(()) => {}
                Err(vm_superio::serial::Error::IOError(e)) => {
                    self.dropped += 1;
                    if let Some(suppressed) = self.output_errors.check() {
                        self.logged += 1;
                        let more = match suppressed {
                            0 => String::new(),
                            n => format!(" ({n} more output bytes dropped since the last message)"),
                        };
                        log::warn!("serial: guest output dropped: {e}{more}");
                    }
                }
                Err(e) => log::warn!("serial: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_lsr_reports_empty() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(sink.clone()));
        s.write(0, b"hi\n");
        let mut lsr = [0u8; 1];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        s.write(u64::MAX, &[1]);
    }

    /// A writer whose every write fails (stdout a closed pipe).
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Output to a closed pipe drops the bytes, still tells the guest the
    /// transmitter is empty (it must not wait for it), and logs one message
    /// per period, not one per byte.
    #[test]
    fn output_errors_are_logged_once_per_period() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(Broken));
        for _ in 0..843 {
            s.write(0, b"line\n");
        }
        s.write(0, &[b'x'; 64]);
        assert_eq!(s.dropped, 843 * 5 + 64);
        assert_eq!(s.logged, 1);
        let mut lsr = [0u8; 1];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }

    #[test]
    fn input_raises_interrupt_when_enabled() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let probe = irq.try_clone().unwrap();
        let mut s = Serial::new(irq, Box::new(Sink::default()));
        s.write(1, &[0x01]); // IER: received-data interrupt
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert_eq!(probe.read().unwrap(), 1);
        let mut b = [0u8; 1];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        // A full FIFO takes nothing and logs nothing.
        let big = vec![b'y'; 4096];
        let taken = s.enqueue_input(&big);
        assert!(taken > 0 && taken < big.len());
        assert_eq!(s.enqueue_input(&big), 0);
    }
}

//! Polled 8250 UART output on COM1 and the `print!`/`println!` macros.

use core::fmt;

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
const REG_DATA: u16 = 0;
const REG_IER: u16 = 1;
const REG_FCR: u16 = 2;
const REG_LCR: u16 = 3;
const REG_MCR: u16 = 4;
const REG_LSR: u16 = 5;
const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_DATA_READY: u8 = 0x01;
/// Bound on LSR polls per byte, so that a missing UART cannot hang us.
const MAX_POLLS: u32 = 100_000;

/// Programs COM1 for 115200 8N1, no interrupts, FIFO on.
pub fn init() {
    outb(COM1 + REG_IER, 0);
    outb(COM1 + REG_LCR, LCR_DLAB);
    outb(COM1 + REG_DATA, 1); // divisor 1 = 115200 baud
    outb(COM1 + REG_IER, 0);
    outb(COM1 + REG_LCR, LCR_8N1);
    outb(COM1 + REG_FCR, 0x07);
    outb(COM1 + REG_MCR, 0x03);
}

fn put_byte(byte: u8) {
    let mut polls = 0;
    while inb(COM1 + REG_LSR) & LSR_THR_EMPTY == 0 && polls < MAX_POLLS {
        polls += 1;
        core::hint::spin_loop();
    }
    outb(COM1 + REG_DATA, byte);
}

/// Whether a byte of input waits in COM1 (the host wrote to the console).
pub fn input_ready() -> bool {
    inb(COM1 + REG_LSR) & LSR_DATA_READY != 0
}

/// The serial console as a [`fmt::Write`] sink. Lines end in a bare `\n`
/// so that hosts can parse the output without stripping carriage returns.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(put_byte);
        Ok(())
    }
}

/// Backend of [`print!`]: formats straight to the UART.
pub fn print_args(args: fmt::Arguments<'_>) {
    // Writing to the UART cannot fail.
    let _ = fmt::Write::write_fmt(&mut Console, args);
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print_args(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::print_args(format_args!("{}\n", format_args!($($arg)*))) };
}

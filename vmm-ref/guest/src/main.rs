//! The vmm-ref test guest: a freestanding x86_64 program that drives
//! virtio-mmio virtio-blk devices from CPL3 and reports over COM1.
//!
//! Boot flow: [`boot`] (entry points, the only CPL0 code) -> [`guest_main`]
//! at CPL3: serial console, boot information, command line, TSC, device
//! probe and initialisation, then the scenarios the command line asks for
//! (see [`scenarios`]), then exit through the debug-exit port with the number
//! of failures as status.
//!
//! Built by `vmm-ref/build.rs` with `rustc` for x86_64-unknown-linux-gnu,
//! freestanding (see `link.ld` and the guest README).

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(missing_docs)]

mod blk;
mod boot;
mod bootinfo;
mod cmdline;
mod cpu;
mod io;
mod mem;
mod scenarios;
mod serial;
mod tsc;
mod virtio;

/// Exit status after a panic (distinct from failure counts).
const PANIC_STATUS: u32 = 0x7f;
/// Exit status when the guest cannot even start its scenarios.
const SETUP_FAILURE_STATUS: u32 = 0x7e;

/// First Rust code, entered at CPL3 from the boot code with the loader's
/// boot structure.
#[no_mangle]
pub extern "C" fn guest_main(kind: u64, info: u64) -> ! {
    serial::init();
    println!("vmm-ref test guest: running at CPL3");
    // guest_main never returns, so this buffer lives as long as the guest.
    let mut cmdline_buf = [0u8; bootinfo::CMDLINE_MAX];
    // SAFETY: `kind`/`info` are exactly what the entry code received from the
    // loader (boot kind constant and boot structure address).
    let boot = match unsafe { bootinfo::parse(kind, info, &mut cmdline_buf) } {
        Ok(boot) => boot,
        Err(e) => {
            println!("RESULT boot FAIL bad boot information: {}", e);
            io::exit(SETUP_FAILURE_STATUS);
        }
    };
    println!(
        "boot: protocol={} cmdline=\"{}\"",
        boot.protocol, boot.cmdline
    );
    for region in boot.ram() {
        println!("boot: ram {:#x}-{:#x}", region.start, region.end);
    }
    let cfg = cmdline::parse(boot.cmdline);
    let (khz, source) = tsc::init(cfg.tsc_khz);
    println!("tsc: {} kHz ({})", khz, source);
    let Some(mut arena) = mem::Arena::above_image(boot.ram()) else {
        println!("RESULT boot FAIL no usable RAM above the guest image");
        io::exit(SETUP_FAILURE_STATUS);
    };
    println!("mem: {} KiB free above the image", arena.remaining() / 1024);
    let failures = scenarios::run_all(&cfg, boot.ram(), &mut arena) + cfg.errors;
    println!("DONE failures={}", failures);
    io::exit(failures)
}

/// Referenced by the unwind tables of the prebuilt `libcore` (compiled with
/// `panic=unwind`); never called: we build with `panic=abort` and the linker
/// script discards `.eh_frame`.
#[no_mangle]
extern "C" fn rust_eh_personality() {
    io::exit(PANIC_STATUS)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("PANIC: {}", info);
    io::exit(PANIC_STATUS)
}

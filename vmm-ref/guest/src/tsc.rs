//! Time from the TSC: frequency discovery and conversions.
//!
//! Frequency sources, in order: `tsc_khz=` on the command line (vmm-ref
//! passes KVM_GET_TSC_KHZ), CPUID leaf 0x15 (crystal ratio), CPUID 0x16
//! (base MHz), the hypervisor leaf 0x40000010, and finally a PIT channel 2
//! calibration over 50 ms.

use core::arch::x86_64::__cpuid_count;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::io::{inb, outb};

static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);

/// Frequency used when even the PIT calibration fails.
const FALLBACK_KHZ: u64 = 2_000_000;
const PIT_HZ: u64 = 1_193_182;
const PIT_CALIBRATION_MS: u64 = 50;
const PIT_CH2_DATA: u16 = 0x42;
const PIT_COMMAND: u16 = 0x43;
const PORT_61: u16 = 0x61;
/// Bound on counter reads (each is a few VM exits of tens of microseconds).
const PIT_MAX_POLLS: u32 = 200_000;
/// Reads after which an unchanged counter means there is no PIT.
const PIT_STUCK_POLLS: u32 = 1000;

/// Reads the time-stamp counter.
pub fn now() -> u64 {
    // SAFETY: `rdtsc` only reads the TSC (CR4.TSD is clear, so it works at CPL3).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC frequency in kHz.
pub fn khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Converts microseconds to TSC ticks.
pub fn us_to_ticks(us: u64) -> u64 {
    us.saturating_mul(khz()) / 1000
}

/// Converts TSC ticks to microseconds (fractional).
pub fn ticks_to_us(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / khz() as f64
}

/// Converts TSC ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(khz())) as u64
}

/// A point in time after which [`Deadline::passed`] is true.
#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    /// A deadline `us` microseconds from now.
    pub fn after_us(us: u64) -> Self {
        Self(now().saturating_add(us_to_ticks(us)))
    }

    /// Whether the deadline has passed.
    pub fn passed(self) -> bool {
        now() >= self.0
    }
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let deadline = Deadline::after_us(us);
    while !deadline.passed() {
        core::hint::spin_loop();
    }
}

/// Determines the TSC frequency and returns (kHz, source).
pub fn init(cmdline_khz: Option<u64>) -> (u64, &'static str) {
    let (khz, source) = match cmdline_khz {
        Some(khz) => (khz, "cmdline"),
        None => from_cpuid()
            .or_else(|| calibrate_pit().map(|k| (k, "pit")))
            .unwrap_or_else(|| {
                crate::println!(
                    "tsc: no frequency source (CPUID, PIT); assuming {} kHz",
                    FALLBACK_KHZ
                );
                (FALLBACK_KHZ, "fallback")
            }),
    };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    (khz, source)
}

fn from_cpuid() -> Option<(u64, &'static str)> {
    let max = __cpuid_count(0, 0).eax;
    if max >= 0x15 {
        let leaf = __cpuid_count(0x15, 0);
        if leaf.eax != 0 && leaf.ebx != 0 && leaf.ecx != 0 {
            return Some((
                u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax) / 1000,
                "cpuid15",
            ));
        }
    }
    if max >= 0x16 {
        let mhz = __cpuid_count(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return Some((u64::from(mhz) * 1000, "cpuid16"));
        }
    }
    let hv_max = __cpuid_count(0x4000_0000, 0).eax;
    if (0x4000_0010..0x4000_0100).contains(&hv_max) {
        let khz = __cpuid_count(0x4000_0010, 0).eax;
        if khz != 0 {
            return Some((u64::from(khz), "cpuid40000010"));
        }
    }
    None
}

/// Latches and reads PIT channel 2's current count.
fn pit_ch2_count() -> u16 {
    outb(PIT_COMMAND, 0x80); // latch channel 2
    let low = inb(PIT_CH2_DATA);
    let high = inb(PIT_CH2_DATA);
    u16::from(high) << 8 | u16::from(low)
}

/// Times at least 50 ms of PIT channel 2 counting down (mode 0 from 0xffff)
/// with the TSC. The counter is read directly (latch command) rather than
/// through the OUT2 bit of port 0x61, which QEMU microvm does not implement.
fn calibrate_pit() -> Option<u64> {
    let needed = PIT_HZ * PIT_CALIBRATION_MS / 1000;
    // Gate on, speaker off (needed on real hardware; harmless elsewhere).
    outb(PORT_61, (inb(PORT_61) & !0x02) | 0x01);
    // Channel 2, lobyte/hibyte, mode 0, binary; count 0xffff.
    outb(PIT_COMMAND, 0xb0);
    outb(PIT_CH2_DATA, 0xff);
    outb(PIT_CH2_DATA, 0xff);
    let start_tsc = now();
    let start = pit_ch2_count();
    let mut polls = 0;
    loop {
        let tsc = now();
        let count = pit_ch2_count();
        let elapsed = u64::from(start.wrapping_sub(count));
        if elapsed >= needed && count < start {
            let khz = (tsc - start_tsc) * PIT_HZ / elapsed / 1000;
            // Below 100 MHz is implausible for a TSC: no real PIT behind the ports.
            return (khz > 100_000).then_some(khz);
        }
        polls += 1;
        // A missing PIT reads as a constant 0xffff: give up early.
        if polls > PIT_MAX_POLLS || (polls == PIT_STUCK_POLLS && count == start) {
            crate::println!("tsc: PIT channel 2 is not counting (count {:#x})", count);
            return None;
        }
    }
}

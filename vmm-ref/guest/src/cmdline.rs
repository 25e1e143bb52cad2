//! Kernel command line parsing (see the boot contract for the vocabulary).
//!
//! Words are separated by spaces; unknown words are ignored, malformed values
//! of known keys are reported and counted as failures by `guest_main`.

use crate::virtio::queue::Discipline;

/// Most virtio-mmio devices we accept on the command line.
pub const MAX_DEVICES: usize = 32;
/// Most scenarios in one `scenario=` list.
pub const MAX_SCENARIOS: usize = 16;

/// One `virtio_mmio.device=<size>@<addr>:<irq>` entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct MmioDevice {
    /// Physical base address of the transport.
    pub addr: u64,
    /// Size of the register window.
    pub size: u64,
    /// Interrupt line (unused: we poll).
    pub irq: u32,
}

/// Test scenarios, in the order given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Data integrity across all queues plus FLUSH, GET_ID, DISCARD, WRITE_ZEROES.
    Verify,
    /// IOPS / latency benchmark, device after device.
    Bench,
    /// IOPS / latency benchmark of all devices at once.
    BenchAll,
    /// Malformed requests the device must survive.
    Malformed,
    /// Device reset and re-initialisation.
    Reset,
    /// Stay active and idle.
    Hold,
    /// Write + FLUSH block by block, reporting what is durable.
    Durability,
}

impl Scenario {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "verify" => Self::Verify,
            "bench" => Self::Bench,
            "bench-all" => Self::BenchAll,
            "malformed" => Self::Malformed,
            "reset" => Self::Reset,
            "hold" => Self::Hold,
            "durability" => Self::Durability,
            _ => return None,
        })
    }

    /// The scenario's name as used on the command line and in RESULT lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::Verify => "verify",
            Self::Bench => "bench",
            Self::BenchAll => "bench-all",
            Self::Malformed => "malformed",
            Self::Reset => "reset",
            Self::Hold => "hold",
            Self::Durability => "durability",
        }
    }
}

/// Bench direction (fio's names).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchRw {
    /// 100% random reads.
    RandRead,
    /// 100% random writes.
    RandWrite,
    /// Random reads and writes, `rwmixread` percent reads.
    RandRw,
}

impl BenchRw {
    /// Name as used on the command line and in BENCH lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
            Self::RandRw => "randrw",
        }
    }
}

/// `bench.*` settings.
#[derive(Clone, Copy, Debug)]
pub struct BenchConfig {
    /// Run time in seconds (ignored when `ios` is set).
    pub secs: u64,
    /// Total I/Os to complete, if given.
    pub ios: Option<u64>,
    /// Requests in flight per queue.
    pub qd: u32,
    /// Read or write.
    pub rw: BenchRw,
    /// Percentage of reads with [`BenchRw::RandRw`] (0..=100).
    pub rwmixread: u8,
    /// Block size in bytes (multiple of 512).
    pub bs: u32,
    /// Driver profile (`bench.profile=ours|alt`): the queue discipline of
    /// every device, set at device initialisation, so it applies to all
    /// scenarios of the run.
    pub profile: Discipline,
}

/// `durability.*` settings.
#[derive(Clone, Copy, Debug)]
pub struct DurabilityConfig {
    /// Number of 4 KiB blocks to write and flush (from disk offset 0).
    pub blocks: u64,
    /// Print a `FLUSHED <k>` line every this many blocks.
    pub every: u64,
    /// Pattern seed; else the run's seed (`verify.seed` or TSC-derived).
    pub seed: Option<u64>,
}

/// Everything the command line configures.
#[derive(Debug)]
pub struct Config {
    devices: [MmioDevice; MAX_DEVICES],
    nr_devices: usize,
    scenarios: [Scenario; MAX_SCENARIOS],
    nr_scenarios: usize,
    /// `bench.*`.
    pub bench: BenchConfig,
    /// `hold.secs`.
    pub hold_secs: u64,
    /// `durability.*`.
    pub durability: DurabilityConfig,
    /// `reset.pause_ms`.
    pub reset_pause_ms: u64,
    /// `tsc_khz`, when the host told us.
    pub tsc_khz: Option<u64>,
    /// `verify.seed` (extension): fixes the data pattern, else TSC-derived.
    pub verify_seed: Option<u64>,
    /// `verify.until_input=1`: repeat `verify` (each round with a new pattern)
    /// until a byte arrives on the serial console, at least once.
    pub verify_until_input: bool,
    /// `virtio.event_idx=0|1` (extension, default 1): whether to negotiate
    /// VIRTIO_F_EVENT_IDX (0 makes devices use `VIRTQ_USED_F_NO_NOTIFY`).
    pub event_idx: bool,
    /// Number of malformed values seen (each is printed when found).
    pub errors: u32,
}

impl Config {
    /// Devices from `virtio_mmio.device=`, in command line order.
    pub fn devices(&self) -> &[MmioDevice] {
        &self.devices[..self.nr_devices]
    }

    /// Scenarios to run in order (`verify` when none is given).
    pub fn scenarios(&self) -> &[Scenario] {
        if self.nr_scenarios == 0 {
            &[Scenario::Verify]
        } else {
            &self.scenarios[..self.nr_scenarios]
        }
    }
}

/// Parses an unsigned integer: decimal or `0x` hex.
pub fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Parses a size with an optional K/M/G suffix (Linux `memparse`).
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(digits)?.checked_mul(1 << shift)
}

/// Parses `<size>@<addr>:<irq>` (the `:<irq>` part is required by Linux; we
/// accept it missing).
fn parse_mmio_device(s: &str) -> Option<MmioDevice> {
    let (size, rest) = s.split_once('@')?;
    let (addr, irq) = match rest.split_once(':') {
        Some((addr, irq)) => (addr, irq.parse().ok()?),
        None => (rest, 0),
    };
    let size = parse_size(size)?;
    let addr = parse_u64(addr)?;
    if size == 0 || addr.checked_add(size).is_none() {
        return None;
    }
    Some(MmioDevice { addr, size, irq })
}

/// Parses the command line.
pub fn parse(cmdline: &str) -> Config {
    let mut cfg = Config {
        devices: [MmioDevice::default(); MAX_DEVICES],
        nr_devices: 0,
        scenarios: [Scenario::Verify; MAX_SCENARIOS],
        nr_scenarios: 0,
        bench: BenchConfig {
            secs: 2,
            ios: None,
            qd: 32,
            rw: BenchRw::RandRead,
            rwmixread: 70,
            bs: 4096,
            profile: Discipline::Ours,
        },
        hold_secs: 0,
        durability: DurabilityConfig {
            blocks: 2048,
            every: 16,
            seed: None,
        },
        reset_pause_ms: 0,
        tsc_khz: None,
        verify_seed: None,
        verify_until_input: false,
        event_idx: true,
        errors: 0,
    };
    for word in cmdline.split(' ').filter(|w| !w.is_empty()) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let ok = match key {
            "virtio_mmio.device" => match parse_mmio_device(value) {
                Some(dev) if cfg.nr_devices < MAX_DEVICES => {
                    cfg.devices[cfg.nr_devices] = dev;
                    cfg.nr_devices += 1;
                    true
                }
                _ => false,
            },
            "scenario" => value.split(',').all(|name| match Scenario::parse(name) {
                Some(s) if cfg.nr_scenarios < MAX_SCENARIOS => {
                    cfg.scenarios[cfg.nr_scenarios] = s;
                    cfg.nr_scenarios += 1;
                    true
                }
                _ => false,
            }),
            "bench.secs" => set(&mut cfg.bench.secs, parse_u64(value).filter(|&s| s > 0)),
            "bench.ios" => parse_u64(value)
                .filter(|&n| n > 0)
                .map(|n| cfg.bench.ios = Some(n))
                .is_some(),
            "bench.qd" => set(
                &mut cfg.bench.qd,
                parse_u64(value)
                    .and_then(|q| u32::try_from(q).ok())
                    .filter(|&q| q > 0),
            ),
            "bench.bs" => set(
                &mut cfg.bench.bs,
                parse_u64(value)
                    .and_then(|b| u32::try_from(b).ok())
                    .filter(|&b| b >= 512 && b % 512 == 0 && b <= 1 << 20),
            ),
            "bench.rw" => set(
                &mut cfg.bench.rw,
                match value {
                    "randread" => Some(BenchRw::RandRead),
                    "randwrite" => Some(BenchRw::RandWrite),
                    "randrw" => Some(BenchRw::RandRw),
                    _ => None,
                },
            ),
            "bench.rwmixread" => set(
                &mut cfg.bench.rwmixread,
                parse_u64(value)
                    .filter(|&p| p <= 100)
                    .and_then(|p| u8::try_from(p).ok()),
            ),
            "bench.profile" => set(
                &mut cfg.bench.profile,
                match value {
                    "ours" => Some(Discipline::Ours),
                    "alt" => Some(Discipline::Fixed),
                    _ => None,
                },
            ),
            "hold.secs" => set(&mut cfg.hold_secs, parse_u64(value)),
            "durability.blocks" => set(
                &mut cfg.durability.blocks,
                parse_u64(value).filter(|&n| n > 0),
            ),
            "durability.every" => set(
                &mut cfg.durability.every,
                parse_u64(value).filter(|&n| n > 0),
            ),
            "durability.seed" => parse_u64(value)
                .map(|s| cfg.durability.seed = Some(s))
                .is_some(),
            "reset.pause_ms" => set(&mut cfg.reset_pause_ms, parse_u64(value)),
            "tsc_khz" => parse_u64(value)
                .filter(|&k| k > 0)
                .map(|k| cfg.tsc_khz = Some(k))
                .is_some(),
            "virtio.event_idx" => set(
                &mut cfg.event_idx,
                match value {
                    "0" | "off" => Some(false),
                    "1" | "on" => Some(true),
                    _ => None,
                },
            ),
            "verify.until_input" => set(
                &mut cfg.verify_until_input,
                match value {
                    "0" | "off" => Some(false),
                    "1" | "on" => Some(true),
                    _ => None,
                },
            ),
            "verify.seed" => parse_u64(value)
                .map(|s| cfg.verify_seed = Some(s))
                .is_some(),
            _ => true,
        };
        if !ok {
            crate::println!("cmdline: bad value in '{}'", word);
            cfg.errors += 1;
        }
    }
    cfg
}

fn set<T>(slot: &mut T, value: Option<T>) -> bool {
    match value {
        Some(v) => {
            *slot = v;
            true
        }
        None => false,
    }
}

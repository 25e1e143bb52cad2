//! The test scenarios and their driver.
//!
//! Every scenario runs on every virtio-blk device found on the command line
//! and prints one `RESULT <scenario> PASS|FAIL <detail>` line per device;
//! `bench-all` runs once on all devices together and prints one
//! `RESULT bench-all PASS|FAIL <detail>` line.
//! Disk layout used (512-byte sectors; the disk must have at least
//! [`MIN_CAPACITY`] sectors):
//!
//! | sectors            | use                                              |
//! |--------------------|--------------------------------------------------|
//! | `q*256 .. +128`    | `verify`: queue `q`'s pattern region (q < 16)     |
//! | `4096 .. 4160`     | `verify`: DISCARD test                            |
//! | `4224 .. 4288`     | `verify`: WRITE_ZEROES test                       |
//! | `6144 + q*16 ..+16`| quick verify of queue `q` (malformed/reset/hold)  |
//! | everything         | `bench`, `bench-all` (random; writes overwrite the disk) |
//! | `0 .. 8*blocks`    | `durability`: 4 KiB block `k` at sector `8k`      |

mod bench;
mod bench_all;
mod durability;
mod hold;
mod malformed;
mod reset;
mod verify;
mod workload;

use core::fmt::{self, Write};

use crate::blk::BlkDevice;
use crate::bootinfo::Region;
use crate::cmdline::{Config, Scenario, MAX_DEVICES};
use crate::mem::Arena;
use crate::println;
use crate::virtio::mmio::{Transport, MIN_WINDOW};
use crate::virtio::queue::Discipline;

/// Smallest disk the scenarios accept, in sectors (4 MiB).
pub const MIN_CAPACITY: u64 = 8192;

/// A short, fixed-capacity text (no allocator in the guest).
pub struct Detail {
    buf: [u8; 512],
    len: usize,
}

impl Detail {
    /// An empty text.
    pub const fn new() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
        }
    }

    /// The text so far.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<invalid utf-8>")
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Write for Detail {
    /// Appends, silently truncating at capacity (on a character boundary).
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut tmp = [0u8; 4];
            let bytes = c.encode_utf8(&mut tmp).as_bytes();
            if self.len + bytes.len() > self.buf.len() {
                break;
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

/// The result of one scenario on one device.
pub struct Outcome {
    /// Passed?
    pub pass: bool,
    /// Free-form detail for the RESULT line.
    pub detail: Detail,
}

impl Outcome {
    /// A passing outcome with a formatted detail.
    pub fn pass(args: fmt::Arguments<'_>) -> Self {
        let mut detail = Detail::new();
        let _ = detail.write_fmt(args);
        Self { pass: true, detail }
    }

    /// A failing outcome with a formatted detail.
    pub fn fail(args: fmt::Arguments<'_>) -> Self {
        Self {
            pass: false,
            ..Self::pass(args)
        }
    }
}

/// What every scenario gets.
pub struct Ctx<'a> {
    /// The device under test (initialised).
    pub dev: &'a mut BlkDevice,
    /// Guest memory for buffers.
    pub arena: &'a mut Arena,
    /// The command line.
    pub cfg: &'a Config,
    /// Per-run seed of data patterns.
    pub seed: u64,
}

/// Probes and initialises one device from the command line.
/// Why a `virtio_mmio.device=` window cannot be used, if it cannot.
fn window_problem(addr: u64, size: u64, ram: &[Region]) -> Option<&'static str> {
    let Some(end) = addr.checked_add(size) else {
        return Some("address + size overflows");
    };
    if size < MIN_WINDOW {
        Some("smaller than 0x200 bytes")
    } else if addr & 511 != 0 {
        Some("not 512-byte aligned")
    } else if end > 1 << 32 {
        Some("not below 4 GiB (the guest maps only that)")
    } else if ram.iter().any(|r| addr < r.end && r.start < end) {
        Some("overlaps RAM")
    } else {
        None
    }
}

/// Probes and initialises the device at `addr` (a window checked by
/// [`window_problem`]) with the driver `discipline`.
fn open(
    addr: u64,
    event_idx: bool,
    discipline: Discipline,
    arena: &mut Arena,
) -> Result<Option<BlkDevice>, crate::blk::BlkError> {
    // SAFETY: the command line names this window as a virtio-mmio device and
    // `window_problem` found it below 4 GiB (identity mapped, uncached) and
    // outside RAM; only this driver uses it.
    let transport = unsafe { Transport::new(addr) };
    let Some(mut dev) = BlkDevice::probe(transport, event_idx)? else {
        return Ok(None);
    };
    dev.set_discipline(discipline);
    dev.init(arena)?;
    Ok(Some(dev))
}

/// Probes all devices and runs all scenarios; returns the number of failures.
pub fn run_all(cfg: &Config, ram: &[Region], arena: &mut Arena) -> u32 {
    let mut failures = 0;
    let mut devices: [Option<BlkDevice>; MAX_DEVICES] = [const { None }; MAX_DEVICES];
    let mut nr_devices = 0;
    for d in cfg.devices() {
        if let Some(problem) = window_problem(d.addr, d.size, ram) {
            println!(
                "RESULT probe FAIL virtio-mmio {:#x} size {:#x}: {}",
                d.addr, d.size, problem
            );
            failures += 1;
            continue;
        }
        match open(d.addr, cfg.event_idx, cfg.bench.profile, arena) {
            Ok(Some(dev)) => {
                let c = dev.config();
                println!(
                    "blk {:#x} irq {}: features={:#x} capacity={} sectors queues={} queue_size={} seg_max={} size_max={} blk_size={}",
                    d.addr,
                    d.irq,
                    dev.features(),
                    c.capacity,
                    dev.nr_queues(),
                    dev.queue_size(),
                    c.seg_max,
                    c.size_max,
                    c.blk_size
                );
                devices[nr_devices] = Some(dev);
                nr_devices += 1;
            }
            Ok(None) => {}
            Err(e) => {
                println!("RESULT probe FAIL virtio-mmio {:#x}: {}", d.addr, e);
                failures += 1;
            }
        }
    }
    if nr_devices == 0 {
        println!(
            "RESULT probe FAIL no virtio-blk device among {} virtio_mmio.device= entries",
            cfg.devices().len()
        );
        return failures + 1;
    }
    let seed = cfg
        .verify_seed
        .unwrap_or_else(|| crate::tsc::now().wrapping_mul(0x2545_f491_4f6c_dd1d));
    println!("seed: {:#x}", seed);
    for &scenario in cfg.scenarios() {
        let per_device: fn(&mut Ctx<'_>) -> Outcome = match scenario {
            Scenario::Verify => verify::run,
            Scenario::Bench => bench::run,
            Scenario::Malformed => malformed::run,
            Scenario::Reset => reset::run,
            Scenario::Hold => hold::run,
            Scenario::Durability => durability::run,
            Scenario::BenchAll => {
                let outcome = run_bench_all(&mut devices[..nr_devices], arena, cfg, seed);
                let verdict = if outcome.pass { "PASS" } else { "FAIL" };
                println!("RESULT bench-all {} {}", verdict, outcome.detail.as_str());
                if !outcome.pass {
                    failures += 1;
                }
                continue;
            }
        };
        for dev in devices.iter_mut().flatten() {
            let base = dev.transport().base();
            let mut ctx = Ctx {
                dev,
                arena,
                cfg,
                seed,
            };
            let outcome = if ctx.dev.config().capacity < MIN_CAPACITY {
                Outcome::fail(format_args!(
                    "disk has {} sectors, need {}",
                    ctx.dev.config().capacity,
                    MIN_CAPACITY
                ))
            } else {
                per_device(&mut ctx)
            };
            let verdict = if outcome.pass { "PASS" } else { "FAIL" };
            println!(
                "RESULT {} {} dev={:#x} {}",
                scenario.name(),
                verdict,
                base,
                outcome.detail.as_str()
            );
            if !outcome.pass {
                failures += 1;
            }
        }
    }
    failures
}

/// `bench-all` on all `devices` together (every disk must be at least
/// [`MIN_CAPACITY`], as for the other scenarios).
fn run_bench_all(
    devices: &mut [Option<BlkDevice>],
    arena: &mut Arena,
    cfg: &Config,
    seed: u64,
) -> Outcome {
    if let Some(d) = devices
        .iter()
        .flatten()
        .find(|d| d.config().capacity < MIN_CAPACITY)
    {
        return Outcome::fail(format_args!(
            "disk {:#x} has {} sectors, need {}",
            d.transport().base(),
            d.config().capacity,
            MIN_CAPACITY
        ));
    }
    let mut all: [Option<&mut BlkDevice>; MAX_DEVICES] = [const { None }; MAX_DEVICES];
    let n = devices.len().min(MAX_DEVICES);
    for (slot, dev) in all.iter_mut().zip(devices.iter_mut()) {
        *slot = dev.as_mut();
    }
    bench_all::run(&mut all[..n], arena, &cfg.bench, seed)
}

/// The pattern word at disk byte offset `addr` (a multiple of 8) for `seed`:
/// `addr ^ (seed * 0x9e3779b97f4a7c15)` - distinct at every position and for
/// every seed, so stale data from an earlier run never matches.
pub fn pattern_word(seed: u64, addr: u64) -> u64 {
    addr ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Fills `buf` with the pattern for disk byte offset `disk_offset`.
pub fn fill_pattern(buf: &mut [u8], seed: u64, disk_offset: u64) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern_word(seed, disk_offset + 8 * i as u64).to_le_bytes());
    }
}

/// Offset of the first byte in `buf` that differs from the pattern.
pub fn check_pattern(buf: &[u8], seed: u64, disk_offset: u64) -> Option<usize> {
    buf.chunks_exact(8)
        .enumerate()
        .find(|(i, chunk)| **chunk != pattern_word(seed, disk_offset + 8 * *i as u64).to_le_bytes())
        .map(|(i, _)| 8 * i)
}

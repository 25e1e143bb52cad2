//! `bench`: `qd` requests in flight on every queue, random `bs`-sized reads
//! or writes over the whole disk, for `bench.secs` seconds or `bench.ios`
//! I/Os. Reports IOPS, latency percentiles (TSC) and notifications sent.

use core::fmt::Write;

use super::{Ctx, Detail, Outcome};
use crate::blk::feature;
use crate::blk::request::{Op, ReqMem, SECTOR, S_OK};
use crate::blk::BlkError;
use crate::cmdline::BenchRw;
use crate::println;
use crate::tsc::{self, Deadline};

/// Descriptors per request (header, data, status).
const DESCS_PER_REQ: u16 = 3;
/// No completion at all for this long means the device is stuck.
const STALL_US: u64 = 10_000_000;
/// How often to look for NEEDS_RESET while nothing completes.
const STATUS_CHECK_US: u64 = 100_000;

/// Log-linear latency histogram in nanoseconds: exact below 64 ns, then 32
/// buckets per power of two (about 3% resolution).
struct Histogram {
    buckets: [u64; Self::BUCKETS],
    count: u64,
}

impl Histogram {
    const SUB_BITS: u32 = 5;
    const LINEAR: usize = 64;
    const BUCKETS: usize = Self::LINEAR + (64 - 6) * (1 << Self::SUB_BITS);

    fn new() -> Self {
        Self {
            buckets: [0; Self::BUCKETS],
            count: 0,
        }
    }

    fn index(ns: u64) -> usize {
        if ns < Self::LINEAR as u64 {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros(); // >= 6
        let sub = (ns >> (exp - Self::SUB_BITS)) & ((1 << Self::SUB_BITS) - 1);
        Self::LINEAR + ((exp - 6) as usize) * (1 << Self::SUB_BITS) + sub as usize
    }

    /// Lower bound of bucket `i`'s range, plus half its width.
    fn value(i: usize) -> f64 {
        if i < Self::LINEAR {
            return i as f64;
        }
        let exp = ((i - Self::LINEAR) >> Self::SUB_BITS) as u32 + 6;
        let sub = ((i - Self::LINEAR) & ((1 << Self::SUB_BITS) - 1)) as u64;
        let width = 1u64 << (exp - Self::SUB_BITS);
        ((1u64 << exp) + sub * width) as f64 + width as f64 / 2.0
    }

    fn add(&mut self, ns: u64) {
        self.buckets[Self::index(ns).min(Self::BUCKETS - 1)] += 1;
        self.count += 1;
    }

    /// The `p`-th percentile (0 < p <= 100) in nanoseconds.
    fn percentile(&self, p: f64) -> f64 {
        let target = ((self.count as f64 * p / 100.0) as u64).clamp(1, self.count.max(1));
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Self::value(i);
            }
        }
        0.0
    }
}

/// xorshift64* pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs `bench`.
pub fn run(ctx: &mut Ctx<'_>) -> Outcome {
    match run_inner(ctx) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::fail(format_args!("driver error: {}", e)),
    }
}

fn run_inner(ctx: &mut Ctx<'_>) -> Result<Outcome, BlkError> {
    let b = ctx.cfg.bench;
    let nq = ctx.dev.nr_queues();
    if b.rw == BenchRw::RandWrite && ctx.dev.has(feature::RO) {
        return Ok(Outcome::fail(format_args!(
            "randwrite on a read-only device"
        )));
    }
    let qd =
        b.qd.min(u32::from(ctx.dev.queue_size() / DESCS_PER_REQ))
            .max(1) as usize;
    if qd as u32 != b.qd {
        println!(
            "bench: qd {} does not fit queue size {}, using {}",
            b.qd,
            ctx.dev.queue_size(),
            qd
        );
    }
    let blocks = ctx.dev.config().capacity * SECTOR / u64::from(b.bs);
    if blocks == 0 {
        return Ok(Outcome::fail(format_args!(
            "disk smaller than one {}-byte block",
            b.bs
        )));
    }
    let slots = nq * qd;
    let mems = ctx.arena.slice(slots, None::<ReqMem>)?;
    for (i, m) in mems.iter_mut().enumerate() {
        let mem = ReqMem::alloc(ctx.arena, b.bs)?;
        super::fill_pattern(mem.data(), ctx.seed, i as u64 * u64::from(b.bs));
        *m = Some(mem);
    }
    let starts = ctx.arena.slice(slots, 0u64)?;
    let mut hist = Histogram::new();
    let mut rng = Rng(ctx.seed | 1);
    let next_op = |rng: &mut Rng| {
        let sector = rng.next() % blocks * u64::from(b.bs) / SECTOR;
        match b.rw {
            BenchRw::RandRead => Op::Read { sector, len: b.bs },
            BenchRw::RandWrite => Op::Write { sector, len: b.bs },
        }
    };

    let kicks_before = ctx.dev.kicks();
    let target_ios = b.ios;
    let end = Deadline::after_us(b.secs.saturating_mul(1_000_000));
    let start = tsc::now();
    let mut issued: u64 = 0;
    let mut done: u64 = 0;
    let mut errors: u64 = 0;
    let mut last_done = start;
    for q in 0..nq {
        for k in 0..qd {
            if target_ios.is_some_and(|t| issued >= t) {
                break;
            }
            let slot = q * qd + k;
            let Some(mem) = mems[slot] else { continue };
            starts[slot] = tsc::now();
            ctx.dev.submit(q, &mem, next_op(&mut rng), slot as u32)?;
            issued += 1;
        }
        ctx.dev.kick(q)?;
    }
    let mut stall = Deadline::after_us(STALL_US);
    let mut next_check = Deadline::after_us(STATUS_CHECK_US);
    let mut stop_issuing = false;
    while done < issued {
        if !stop_issuing {
            stop_issuing = match target_ios {
                Some(t) => issued >= t,
                None => end.passed(),
            };
        }
        let mut progress = false;
        for q in 0..nq {
            let mut resubmitted = false;
            while let Some(used) = ctx.dev.pop(q)? {
                let now = tsc::now();
                let slot = used.token as usize;
                let Some(mem) = mems.get(slot).copied().flatten() else {
                    continue;
                };
                hist.add(tsc::ticks_to_ns(now - starts[slot]));
                if mem.status() != S_OK {
                    errors += 1;
                }
                done += 1;
                last_done = now;
                progress = true;
                if !stop_issuing && target_ios.is_none_or(|t| issued < t) {
                    starts[slot] = tsc::now();
                    ctx.dev.submit(q, &mem, next_op(&mut rng), slot as u32)?;
                    issued += 1;
                    resubmitted = true;
                }
            }
            if resubmitted {
                ctx.dev.kick(q)?;
            }
        }
        if progress {
            stall = Deadline::after_us(STALL_US);
        } else if next_check.passed() {
            if ctx.dev.needs_reset() {
                return Err(BlkError::NeedsReset);
            }
            if stall.passed() {
                return Err(BlkError::Timeout);
            }
            next_check = Deadline::after_us(STATUS_CHECK_US);
        }
    }
    let secs = tsc::ticks_to_us(last_done - start) / 1e6;
    let kicks = ctx.dev.kicks() - kicks_before;
    let iops = if secs > 0.0 {
        (done as f64 / secs) as u64
    } else {
        0
    };
    let p50 = hist.percentile(50.0) / 1000.0;
    let p99 = hist.percentile(99.0) / 1000.0;
    println!(
        "BENCH queues={} qd={} rw={} ios={} secs={:.3} iops={} lat_p50_us={:.1} lat_p99_us={:.1} kicks={}",
        nq,
        qd,
        b.rw.name(),
        done,
        secs,
        iops,
        p50,
        p99,
        kicks
    );
    let mut detail = Detail::new();
    let ios_per_kick = if kicks > 0 {
        done as f64 / kicks as f64
    } else {
        done as f64
    };
    let _ = write!(
        detail,
        "iops={} ios_per_kick={:.1} errors={}",
        iops, ios_per_kick, errors
    );
    if errors != 0 {
        return Ok(Outcome::fail(format_args!("{}", detail.as_str())));
    }
    Ok(Outcome::pass(format_args!("{}", detail.as_str())))
}

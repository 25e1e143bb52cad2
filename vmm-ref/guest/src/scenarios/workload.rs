//! The I/O engine of `bench` and `bench-all`: `qd` requests in flight on
//! every queue of every device given, random `bs`-aligned reads, writes or a
//! read/write mix over each whole disk, for `bench.secs` seconds or
//! `bench.ios` I/Os in total.
//!
//! One vCPU drives everything by polling: the queues of all devices are
//! visited round-robin; on each visit all completions are taken off the used
//! ring, each one immediately replaced by a new request on the same queue,
//! and the queue gets one notification decision (the device's suppression
//! state decides whether a notification is sent). Latency is measured from
//! submission to the completion being seen (TSC), in a log-linear histogram
//! per device.

use crate::blk::request::{Op, ReqMem, SECTOR, S_OK};
use crate::blk::{feature, BlkDevice, BlkError};
use crate::cmdline::{BenchConfig, BenchRw};
use crate::mem::Arena;
use crate::println;
use crate::tsc::{self, Deadline};
use crate::virtio::queue::FIXED_CHAIN;

/// No completion at all for this long means a device is stuck.
const STALL_US: u64 = 10_000_000;
/// How often to look for NEEDS_RESET while nothing completes.
const STATUS_CHECK_US: u64 = 100_000;

/// Log-linear latency histogram in nanoseconds: exact below 64 ns, then 32
/// buckets per power of two (about 3% resolution).
#[derive(Clone, Copy)]
pub struct Histogram {
    buckets: [u64; Self::BUCKETS],
    count: u64,
}

impl Histogram {
    const SUB_BITS: u32 = 5;
    const LINEAR: usize = 64;
    const BUCKETS: usize = Self::LINEAR + (64 - 6) * (1 << Self::SUB_BITS);

    /// An empty histogram.
    pub const fn new() -> Self {
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

    /// Records one latency.
    pub fn add(&mut self, ns: u64) {
        self.buckets[Self::index(ns).min(Self::BUCKETS - 1)] += 1;
        self.count += 1;
    }

    /// Adds all of `other`'s samples.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
    }

    /// The `p`-th percentile (0 < p <= 100) in microseconds (0 when empty).
    pub fn percentile_us(&self, p: f64) -> f64 {
        let target = ((self.count as f64 * p / 100.0) as u64).clamp(1, self.count.max(1));
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Self::value(i) / 1000.0;
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

/// What happened on one device.
#[derive(Clone, Copy)]
pub struct DevReport {
    /// Transport base address.
    pub base: u64,
    /// Queues driven.
    pub queues: usize,
    /// Requests in flight per queue.
    pub qd: usize,
    /// Completed I/Os.
    pub ios: u64,
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Completions whose status was not OK.
    pub errors: u64,
    /// Notifications sent.
    pub kicks: u64,
    /// Latencies.
    pub hist: Histogram,
}

impl DevReport {
    /// I/Os per notification.
    pub fn ios_per_kick(&self) -> f64 {
        self.ios as f64 / self.kicks.max(1) as f64
    }
}

/// What a whole run did.
pub struct Report {
    /// Seconds from the first submission to the last completion.
    pub secs: f64,
    /// Per device, in the order given.
    pub devices: &'static mut [DevReport],
    /// All devices together (`base` 0).
    pub total: DevReport,
}

impl Report {
    /// Operations per second of `ios` over the run.
    pub fn rate(&self, ios: u64) -> u64 {
        if self.secs > 0.0 {
            (ios as f64 / self.secs) as u64
        } else {
            0
        }
    }
}

/// One request slot: its memory, and the request it carries.
#[derive(Clone, Copy)]
struct Slot {
    mem: ReqMem,
    /// TSC at submission.
    start: u64,
    /// Index into the device list.
    dev: u16,
    /// Queue of that device.
    q: u16,
    /// The request in flight is a write.
    write: bool,
}

/// One queue of one device, and its slots `first .. first + qd`.
#[derive(Clone, Copy)]
struct Lane {
    dev: u16,
    q: u16,
    first: u32,
    qd: u32,
}

/// The next random operation on a disk of `blocks` blocks.
fn next_op(rng: &mut Rng, b: &BenchConfig, blocks: u64) -> Op {
    let sector = rng.next() % blocks * u64::from(b.bs) / SECTOR;
    let read = match b.rw {
        BenchRw::RandRead => true,
        BenchRw::RandWrite => false,
        BenchRw::RandRw => rng.next() % 100 < u64::from(b.rwmixread),
    };
    if read {
        Op::Read { sector, len: b.bs }
    } else {
        Op::Write { sector, len: b.bs }
    }
}

/// Requests in flight per queue on `dev`: `qd`, capped by what its queues
/// hold (chains of 3 descriptors).
pub fn queue_depth(dev: &BlkDevice, qd: u32) -> usize {
    let fits = dev.queue_size() / FIXED_CHAIN;
    qd.min(u32::from(fits)).max(1) as usize
}

/// Runs the workload `b` on all devices in `devs` (all of them `Some`; a
/// `None` is skipped). Prints `bench: start ...` right before the first
/// request (a marker for hosts that measure the run), then nothing until the
/// end. `Ok(Err(why))` for a workload the devices cannot run.
pub fn run(
    devs: &mut [Option<&mut BlkDevice>],
    arena: &mut Arena,
    b: &BenchConfig,
    seed: u64,
) -> Result<Result<Report, &'static str>, BlkError> {
    let mut nr_lanes = 0;
    let mut nr_slots = 0;
    for dev in devs.iter().flatten() {
        if b.rw != BenchRw::RandRead && dev.has(feature::RO) {
            return Ok(Err("writes on a read-only device"));
        }
        if dev.config().capacity * SECTOR < u64::from(b.bs) {
            return Ok(Err("disk smaller than one block"));
        }
        nr_lanes += dev.nr_queues();
        nr_slots += dev.nr_queues() * queue_depth(dev, b.qd);
    }
    if nr_lanes == 0 {
        return Ok(Err("no device"));
    }
    let empty = DevReport {
        base: 0,
        queues: 0,
        qd: 0,
        ios: 0,
        reads: 0,
        writes: 0,
        errors: 0,
        kicks: 0,
        hist: Histogram::new(),
    };
    let reports = arena.slice(devs.len(), empty)?;
    let blocks = arena.slice(devs.len(), 0u64)?;
    let lanes = arena.slice(
        nr_lanes,
        Lane {
            dev: 0,
            q: 0,
            first: 0,
            qd: 0,
        },
    )?;
    // Data buffers first, then the small header/status blocks packed together
    // (allocating them in turn would waste most of a page per request).
    let data = arena.slice(nr_slots, 0u64)?;
    for d in data.iter_mut() {
        *d = arena.alloc(u64::from(b.bs), 4096)?;
    }
    let mut lane = 0;
    let mut slot = 0;
    for (i, dev) in devs.iter().enumerate() {
        let Some(dev) = dev else { continue };
        let qd = queue_depth(dev, b.qd);
        if qd as u32 != b.qd {
            println!(
                "bench: dev {:#x}: qd {} does not fit queue size {}, using {}",
                dev.transport().base(),
                b.qd,
                dev.queue_size(),
                qd
            );
        }
        reports[i].base = dev.transport().base();
        reports[i].queues = dev.nr_queues();
        reports[i].qd = qd;
        reports[i].kicks = dev.kicks();
        blocks[i] = dev.config().capacity * SECTOR / u64::from(b.bs);
        for q in 0..dev.nr_queues() {
            lanes[lane] = Lane {
                dev: i as u16,
                q: q as u16,
                first: slot as u32,
                qd: qd as u32,
            };
            lane += 1;
            slot += qd;
        }
    }
    let idle = Slot {
        mem: ReqMem {
            hdr: 0,
            data: 0,
            cap: b.bs,
        },
        start: 0,
        dev: 0,
        q: 0,
        write: false,
    };
    let slots = arena.slice(nr_slots, idle)?;
    for l in lanes.iter() {
        for s in l.first..l.first + l.qd {
            let s = s as usize;
            slots[s] = Slot {
                mem: ReqMem {
                    hdr: arena.alloc(64, 64)?,
                    data: data[s],
                    cap: b.bs,
                },
                dev: l.dev,
                q: l.q,
                ..idle
            };
            super::fill_pattern(slots[s].mem.data(), seed, s as u64 * u64::from(b.bs));
        }
    }

    let mut rng = Rng(seed | 1);
    let end = Deadline::after_us(b.secs.saturating_mul(1_000_000));
    let mut issued: u64 = 0;
    let mut done: u64 = 0;
    let mut submit = |dev: &mut BlkDevice,
                      slot: &mut Slot,
                      token: usize,
                      issued: &mut u64|
     -> Result<(), BlkError> {
        let op = next_op(&mut rng, b, blocks[usize::from(slot.dev)]);
        slot.write = matches!(op, Op::Write { .. });
        slot.start = tsc::now();
        dev.submit(usize::from(slot.q), &slot.mem, op, token as u32)?;
        *issued += 1;
        Ok(())
    };
    println!(
        "bench: start devices={} queues={} slots={} rw={} profile={}",
        devs.iter().flatten().count(),
        nr_lanes,
        nr_slots,
        b.rw.name(),
        b.profile.profile_name()
    );
    let start = tsc::now();
    for l in lanes.iter() {
        let Some(dev) = devs[usize::from(l.dev)].as_deref_mut() else {
            continue;
        };
        for s in l.first..l.first + l.qd {
            if b.ios.is_some_and(|t| issued >= t) {
                break;
            }
            submit(dev, &mut slots[s as usize], s as usize, &mut issued)?;
        }
        dev.kick(usize::from(l.q))?;
    }
    let mut last_done = start;
    let mut stall = Deadline::after_us(STALL_US);
    let mut next_check = Deadline::after_us(STATUS_CHECK_US);
    let mut stop_issuing = false;
    while done < issued {
        if !stop_issuing {
            stop_issuing = match b.ios {
                Some(t) => issued >= t,
                None => end.passed(),
            };
        }
        let mut progress = false;
        for l in lanes.iter() {
            let Some(dev) = devs[usize::from(l.dev)].as_deref_mut() else {
                continue;
            };
            let mut resubmitted = false;
            while let Some(used) = dev.pop(usize::from(l.q))? {
                let now = tsc::now();
                let token = used.token as usize;
                // Only tokens of this lane's own slots are ours to complete.
                if token < l.first as usize || token >= (l.first + l.qd) as usize {
                    continue;
                }
                let s = &mut slots[token];
                let r = &mut reports[usize::from(s.dev)];
                r.hist.add(tsc::ticks_to_ns(now - s.start));
                if s.mem.status() != S_OK {
                    r.errors += 1;
                }
                r.ios += 1;
                if s.write {
                    r.writes += 1;
                } else {
                    r.reads += 1;
                }
                done += 1;
                last_done = now;
                progress = true;
                if !stop_issuing && b.ios.is_none_or(|t| issued < t) {
                    submit(dev, s, token, &mut issued)?;
                    resubmitted = true;
                }
            }
            if resubmitted {
                dev.kick(usize::from(l.q))?;
            }
        }
        if progress {
            stall = Deadline::after_us(STALL_US);
        } else if next_check.passed() {
            if devs.iter().flatten().any(|d| d.needs_reset()) {
                return Err(BlkError::NeedsReset);
            }
            if stall.passed() {
                return Err(BlkError::Timeout);
            }
            next_check = Deadline::after_us(STATUS_CHECK_US);
        }
    }
    let secs = tsc::ticks_to_us(last_done - start) / 1e6;
    let mut total = empty;
    for (r, dev) in reports.iter_mut().zip(devs.iter()) {
        let Some(dev) = dev else { continue };
        r.kicks = dev.kicks() - r.kicks;
        total.queues += r.queues;
        total.qd = total.qd.max(r.qd);
        total.ios += r.ios;
        total.reads += r.reads;
        total.writes += r.writes;
        total.errors += r.errors;
        total.kicks += r.kicks;
        total.hist.merge(&r.hist);
    }
    Ok(Ok(Report {
        secs,
        devices: reports,
        total,
    }))
}

//! `verify`: data integrity over all queues in parallel, FLUSH, GET_ID,
//! DISCARD, WRITE_ZEROES, a read past the end, and read-only behaviour.

use core::fmt::Write;

use super::{check_pattern, fill_pattern, Ctx, Detail, Outcome};
use crate::blk::feature;
use crate::blk::request::{Op, ReqMem, ID_LEN, SECTOR, S_IOERR, S_OK, S_PENDING};
use crate::blk::{BlkError, MAX_QUEUES};

/// 4 KiB writes per queue, plus one larger write.
const SMALL_PER_QUEUE: usize = 8;
const SMALL_LEN: u32 = 4096;
const BIG_LEN: u32 = 32 * 1024;
const REQS_PER_QUEUE: usize = SMALL_PER_QUEUE + 1;
/// Sectors reserved per queue for its pattern region.
const QUEUE_REGION: u64 = 256;
const DISCARD_SECTOR: u64 = 4096;
const WRITE_ZEROES_SECTOR: u64 = 4224;
const AREA_SECTORS: u32 = 64;
const QUICK_SECTOR: u64 = 6144;
const QUICK_SECTORS: u64 = 16;
const TIMEOUT_US: u64 = 10_000_000;

/// Where request `i` of queue `q` goes: (first sector, length).
fn placement(q: usize, i: usize) -> (u64, u32) {
    let base = q as u64 * QUEUE_REGION;
    if i < SMALL_PER_QUEUE {
        (base + i as u64 * u64::from(SMALL_LEN) / SECTOR, SMALL_LEN)
    } else {
        (
            base + SMALL_PER_QUEUE as u64 * u64::from(SMALL_LEN) / SECTOR,
            BIG_LEN,
        )
    }
}

/// Largest data segment the device accepts for one descriptor.
fn max_segment(ctx: &Ctx<'_>) -> u32 {
    if ctx.dev.has(feature::SIZE_MAX) && ctx.dev.config().size_max != 0 {
        ctx.dev.config().size_max
    } else {
        u32::MAX
    }
}

macro_rules! fail {
    ($($arg:tt)*) => { return Ok(Outcome::fail(format_args!($($arg)*))) };
}

/// Runs `verify` (repeatedly with `verify.until_input=1`).
pub fn run(ctx: &mut Ctx<'_>) -> Outcome {
    let seed = ctx.seed;
    let outcome = match run_rounds(ctx) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::fail(format_args!("driver error: {}", e)),
    };
    ctx.seed = seed;
    outcome
}

/// Buffers of one round, allocated once.
struct Bufs {
    writes: &'static [ReqMem],
    reads: &'static [ReqMem],
    mem: ReqMem,
}

fn run_rounds(ctx: &mut Ctx<'_>) -> Result<Outcome, BlkError> {
    let slots = ctx.dev.nr_queues() * REQS_PER_QUEUE;
    let bufs = Bufs {
        writes: alloc_reqs(ctx, slots)?,
        reads: alloc_reqs(ctx, slots)?,
        mem: ReqMem::alloc(ctx.arena, BIG_LEN)?,
    };
    let seed = ctx.seed;
    let mut rounds: u64 = 0;
    loop {
        // A new pattern every round: data left by an earlier round never matches.
        ctx.seed = seed ^ rounds.wrapping_mul(0xd6e8_feb8_6659_fd93);
        let mut outcome = run_inner(ctx, &bufs)?;
        rounds += 1;
        let done = !ctx.cfg.verify_until_input || crate::serial::input_ready();
        if !outcome.pass || done {
            if ctx.cfg.verify_until_input {
                let _ = write!(outcome.detail, " rounds={}", rounds);
            }
            return Ok(outcome);
        }
    }
}

fn run_inner(ctx: &mut Ctx<'_>, bufs: &Bufs) -> Result<Outcome, BlkError> {
    let nq = ctx.dev.nr_queues();
    let read_only = ctx.dev.has(feature::RO);
    let capacity = ctx.dev.config().capacity;
    let big_len = BIG_LEN
        .min(max_segment(ctx) & !(SECTOR as u32 - 1))
        .max(SECTOR as u32);
    let mut detail = Detail::new();
    let _ = write!(detail, "queues={} seed={:#x}", nq, ctx.seed);

    // Buffers: one per request for writes and one per request for reads;
    // request `slot` belongs to queue `slot / REQS_PER_QUEUE`.
    let slots = nq * REQS_PER_QUEUE;
    let (writes, reads) = (bufs.writes, bufs.reads);
    let split = |slot: usize| (slot / REQS_PER_QUEUE, slot % REQS_PER_QUEUE);
    let len_of = |slot: usize| {
        let (q, i) = split(slot);
        if i < SMALL_PER_QUEUE {
            placement(q, i).1
        } else {
            big_len
        }
    };
    let sector_of = |slot: usize| {
        let (q, i) = split(slot);
        placement(q, i).0
    };

    if read_only {
        let mem = ReqMem::alloc(ctx.arena, SMALL_LEN)?;
        let status = ctx.dev.run(
            0,
            &mem,
            Op::Write {
                sector: 0,
                len: SMALL_LEN,
            },
        )?;
        if status != S_IOERR {
            fail!("{detail} read-only device: write returned status {status}, expected IOERR");
        }
        let _ = write!(detail, " ro_write=ioerr");
    } else {
        // 1. Distinct patterns, all queues in parallel.
        for (slot, mem) in writes.iter().enumerate() {
            let (sector, len) = (sector_of(slot), len_of(slot));
            fill_pattern(&mut mem.data()[..len as usize], ctx.seed, sector * SECTOR);
            ctx.dev
                .submit(split(slot).0, mem, Op::Write { sector, len }, slot as u32)?;
        }
        kick_all(ctx)?;
        if let Some((slot, status)) = wait_statuses(ctx, writes)? {
            let (q, i) = split(slot);
            fail!("{detail} write {i} on queue {q} returned status {status}");
        }
        let _ = write!(detail, " writes={}", slots);

        // 2. FLUSH on every queue.
        if ctx.dev.has(feature::FLUSH) {
            let flushes = &writes[..nq];
            for (q, mem) in flushes.iter().enumerate() {
                ctx.dev.submit(q, mem, Op::Flush, q as u32)?;
            }
            kick_all(ctx)?;
            if let Some((q, status)) = wait_statuses(ctx, flushes)? {
                fail!("{detail} flush on queue {q} returned status {status}");
            }
            let _ = write!(detail, " flush=ok");
        }
    }

    // 3. Read everything back, each region through the next queue.
    for (slot, mem) in reads.iter().enumerate() {
        let (sector, len) = (sector_of(slot), len_of(slot));
        mem.data().fill(0xa5);
        let rq = (split(slot).0 + 1) % nq;
        ctx.dev
            .submit(rq, mem, Op::Read { sector, len }, slot as u32)?;
    }
    kick_all(ctx)?;
    if let Some((slot, status)) = wait_statuses(ctx, reads)? {
        let (q, i) = split(slot);
        fail!("{detail} read {i} of queue {q}'s region returned status {status}");
    }
    if !read_only {
        for (slot, mem) in reads.iter().enumerate() {
            let (sector, len) = (sector_of(slot), len_of(slot) as usize);
            if let Some(off) = check_pattern(&mem.data()[..len], ctx.seed, sector * SECTOR) {
                let (q, i) = split(slot);
                fail!(
                    "{detail} data mismatch: queue {q} request {i} (sector {sector}) at byte {off}"
                );
            }
        }
        let _ = write!(detail, " readback=ok");
    } else {
        let _ = write!(detail, " reads=ok");
    }

    // 4. GET_ID.
    let mem = &bufs.mem;
    let status = ctx.dev.run(0, &mem, Op::GetId)?;
    if status != S_OK {
        fail!("{detail} GET_ID returned status {status}");
    }
    let id = &mem.data()[..ID_LEN as usize];
    let id_len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    // Keep the RESULT line parseable: no spaces or control characters.
    let _ = write!(detail, " id='");
    for &b in &id[..id_len] {
        let c = if b.is_ascii_graphic() {
            char::from(b)
        } else {
            '_'
        };
        let _ = write!(detail, "{}", c);
    }
    let _ = write!(detail, "'");

    // 5. Past the end: must fail with IOERR.
    for (sector, len) in [(capacity, SECTOR as u32), (capacity - 1, 2 * SECTOR as u32)] {
        let status = ctx.dev.run(0, &mem, Op::Read { sector, len })?;
        if status != S_IOERR {
            fail!("{detail} read of {len} bytes at sector {sector} (capacity {capacity}) returned status {status}, expected IOERR");
        }
    }
    let _ = write!(detail, " past_end=ioerr");

    if !read_only {
        // 6. DISCARD: must succeed; the data then reads back as zeros or unchanged.
        if ctx.dev.has(feature::DISCARD) {
            let kept = area_test(ctx, &mem, DISCARD_SECTOR, true)?;
            match kept {
                Ok(how) => {
                    let _ = write!(detail, " discard={}", how);
                }
                Err(msg) => fail!("{detail} discard: {msg}"),
            }
        }
        // 7. WRITE_ZEROES: must read back as zeros.
        if ctx.dev.has(feature::WRITE_ZEROES) {
            match area_test(ctx, &mem, WRITE_ZEROES_SECTOR, false)? {
                Ok(_) => {
                    let _ = write!(detail, " write_zeroes=ok");
                }
                Err(msg) => fail!("{detail} write_zeroes: {msg}"),
            }
        }
    }

    let bogus: u64 = (0..nq)
        .filter_map(|q| ctx.dev.queue(q).ok().map(|q| q.bogus_used))
        .sum();
    if bogus != 0 {
        fail!("{detail} device returned {bogus} used entries for descriptors not in flight");
    }
    Ok(Outcome::pass(format_args!("{}", detail.as_str())))
}

/// Allocates `n` requests with [`BIG_LEN`]-byte buffers.
fn alloc_reqs(ctx: &mut Ctx<'_>, n: usize) -> Result<&'static [ReqMem], BlkError> {
    let placeholder = ReqMem {
        hdr: 0,
        data: 0,
        cap: 0,
    };
    let reqs = ctx.arena.slice(n, placeholder)?;
    for req in reqs.iter_mut() {
        *req = ReqMem::alloc(ctx.arena, BIG_LEN)?;
    }
    Ok(reqs)
}

/// Notifies every queue that has new requests (as the device asks).
fn kick_all(ctx: &mut Ctx<'_>) -> Result<(), BlkError> {
    for q in 0..ctx.dev.nr_queues() {
        ctx.dev.kick(q)?;
    }
    Ok(())
}

/// Waits for all of `reqs` (submitted with their index as token) and
/// returns the first one that did not end with OK, with its status.
fn wait_statuses(ctx: &mut Ctx<'_>, reqs: &[ReqMem]) -> Result<Option<(usize, u8)>, BlkError> {
    let mut bad = None;
    ctx.dev.wait(reqs.len(), TIMEOUT_US, |_, used| {
        let slot = used.token as usize;
        let status = reqs.get(slot).map_or(S_PENDING, |m| m.status());
        if status != S_OK && bad.is_none() {
            bad = Some((slot, status));
        }
    })?;
    Ok(bad)
}

/// Writes a pattern over an area, then DISCARDs (`discard`) or
/// WRITE_ZEROES it and reads it back. `Ok(Ok(how))` on success.
fn area_test(
    ctx: &mut Ctx<'_>,
    mem: &ReqMem,
    sector: u64,
    discard: bool,
) -> Result<Result<&'static str, &'static str>, BlkError> {
    let c = *ctx.dev.config();
    let (max, align) = if discard {
        (c.max_discard_sectors, c.discard_sector_alignment.max(1))
    } else {
        (c.max_write_zeroes_sectors, 1)
    };
    let max = if max == 0 {
        AREA_SECTORS
    } else {
        max.min(AREA_SECTORS)
    };
    let sectors = (max / align * align).max(1);
    let len = sectors * SECTOR as u32;
    if len > mem.cap {
        return Ok(Err("area larger than the buffer"));
    }
    let data = &mut mem.data()[..len as usize];
    fill_pattern(data, ctx.seed, sector * SECTOR);
    if ctx.dev.run(0, mem, Op::Write { sector, len })? != S_OK {
        return Ok(Err("pattern write failed"));
    }
    let op = if discard {
        Op::Discard { sector, sectors }
    } else {
        Op::WriteZeroes { sector, sectors }
    };
    let status = ctx.dev.run(0, mem, op)?;
    if status != S_OK {
        return Ok(Err(if discard {
            "DISCARD returned an error status"
        } else {
            "WRITE_ZEROES returned an error status"
        }));
    }
    mem.data().fill(0xa5);
    if ctx.dev.run(0, mem, Op::Read { sector, len })? != S_OK {
        return Ok(Err("read back failed"));
    }
    let data = &mem.data()[..len as usize];
    if data.iter().all(|&b| b == 0) {
        Ok(Ok("zeroed"))
    } else if discard && check_pattern(data, ctx.seed, sector * SECTOR).is_none() {
        // The device may ignore discards (e.g. QEMU's default discard=ignore).
        Ok(Ok("kept"))
    } else {
        Ok(Err("area reads back neither zeros nor the old data"))
    }
}

/// Writes and reads back a few blocks on queue `q` only (used after
/// malformed requests, resets and idle periods). Read-only devices are only
/// read.
pub fn quick(ctx: &mut Ctx<'_>, q: usize) -> Result<Result<(), &'static str>, BlkError> {
    let sector = QUICK_SECTOR + (q % MAX_QUEUES) as u64 * QUICK_SECTORS;
    let len = (QUICK_SECTORS * SECTOR) as u32;
    let mem = ReqMem::alloc(ctx.arena, len)?;
    let salt = ctx.seed ^ crate::tsc::now();
    if !ctx.dev.has(feature::RO) {
        fill_pattern(mem.data(), salt, sector * SECTOR);
        if ctx.dev.run(q, &mem, Op::Write { sector, len })? != S_OK {
            return Ok(Err("write failed"));
        }
    }
    mem.data().fill(0xa5);
    if ctx.dev.run(q, &mem, Op::Read { sector, len })? != S_OK {
        return Ok(Err("read failed"));
    }
    if !ctx.dev.has(feature::RO) && check_pattern(mem.data(), salt, sector * SECTOR).is_some() {
        return Ok(Err("data mismatch"));
    }
    Ok(Ok(()))
}

//! `durability`: write and FLUSH block by block, and report on the serial
//! line what the device has acknowledged as durable, so that a host can kill
//! the VMM at any moment and check the image.
//!
//! For `k = 0 .. durability.blocks`: write 4 KiB block `k` at disk byte
//! offset `4096 * k` (sector `8k`) with the pattern of that offset
//! ([`fill_pattern`]: the u64 at disk offset `a` is
//! `a ^ seed * 0x9e3779b97f4a7c15`) on queue `k % queues`, wait for its OK,
//! then FLUSH on queue `(k + 1) % queues` (a flush must cover writes that
//! completed on any queue) and wait for its OK. Only one request is in
//! flight at any time. After every `durability.every` blocks (default 16)
//! and after the last one the guest prints `FLUSHED <k>`: every block
//! `0..=k` was written and flushed, both acknowledged with OK. Output is
//! kept this compact because every serial byte is a VM exit. At the end all
//! blocks are read back (through queue `(k + 2) % queues`) and compared.

use super::{check_pattern, fill_pattern, Ctx, Outcome};
use crate::blk::feature;
use crate::blk::request::{Op, ReqMem, SECTOR, S_OK};
use crate::blk::BlkError;
use crate::println;

/// Size of one block.
const BLOCK: u32 = 4096;
/// Sectors per block.
const BLOCK_SECTORS: u64 = BLOCK as u64 / SECTOR;
/// How long one request may take: a flush on a busy host file system can
/// take seconds.
const TIMEOUT_US: u64 = 60_000_000;

/// Runs `durability`.
pub fn run(ctx: &mut Ctx<'_>) -> Outcome {
    match run_inner(ctx) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::fail(format_args!("driver error: {}", e)),
    }
}

macro_rules! fail {
    ($($arg:tt)*) => { return Ok(Outcome::fail(format_args!($($arg)*))) };
}

fn run_inner(ctx: &mut Ctx<'_>) -> Result<Outcome, BlkError> {
    let d = ctx.cfg.durability;
    let seed = d.seed.unwrap_or(ctx.seed);
    let nq = ctx.dev.nr_queues();
    let capacity = ctx.dev.config().capacity;
    if ctx.dev.has(feature::RO) {
        fail!("read-only device");
    }
    if !ctx.dev.has(feature::FLUSH) {
        fail!("device does not offer VIRTIO_BLK_F_FLUSH: no durability guarantee");
    }
    let needed = d.blocks.checked_mul(BLOCK_SECTORS);
    if needed.is_none_or(|n| n > capacity) {
        fail!(
            "blocks={} need {} sectors, disk has {}",
            d.blocks,
            d.blocks.saturating_mul(BLOCK_SECTORS),
            capacity
        );
    }
    println!(
        "durability: blocks={} every={} queues={} seed={:#x}",
        d.blocks, d.every, nq, seed
    );
    let data = ReqMem::alloc(ctx.arena, BLOCK)?;
    let flush = ReqMem::alloc(ctx.arena, 0)?;
    let mut flushes: u64 = 0;
    for k in 0..d.blocks {
        let sector = k * BLOCK_SECTORS;
        fill_pattern(data.data(), seed, sector * SECTOR);
        let q = (k % nq as u64) as usize;
        let status = one(ctx, q, &data, Op::Write { sector, len: BLOCK })?;
        if status != S_OK {
            fail!(
                "blocks={} write of block {k} on queue {q} returned status {status}",
                d.blocks
            );
        }
        let fq = (q + 1) % nq;
        let status = one(ctx, fq, &flush, Op::Flush)?;
        if status != S_OK {
            fail!(
                "blocks={} flush after block {k} on queue {fq} returned status {status}",
                d.blocks
            );
        }
        flushes += 1;
        if (k + 1) % d.every == 0 || k + 1 == d.blocks {
            println!("FLUSHED {}", k);
        }
    }
    for k in 0..d.blocks {
        let sector = k * BLOCK_SECTORS;
        data.data().fill(0xa5);
        let q = ((k + 2) % nq as u64) as usize;
        let status = one(ctx, q, &data, Op::Read { sector, len: BLOCK })?;
        if status != S_OK {
            fail!(
                "blocks={} read-back of block {k} on queue {q} returned status {status}",
                d.blocks
            );
        }
        if let Some(off) = check_pattern(data.data(), seed, sector * SECTOR) {
            fail!(
                "blocks={} read-back of block {k}: mismatch at byte {off}",
                d.blocks
            );
        }
    }
    Ok(Outcome::pass(format_args!(
        "blocks={} flushes={} queues={} seed={:#x} readback=ok",
        d.blocks, flushes, nq, seed
    )))
}

/// Runs one request on queue `q` and waits for it alone; returns its status.
fn one(ctx: &mut Ctx<'_>, q: usize, mem: &ReqMem, op: Op) -> Result<u8, BlkError> {
    ctx.dev.submit(q, mem, op, 0)?;
    ctx.dev.kick(q)?;
    ctx.dev.wait(1, TIMEOUT_US, |_, _| {})?;
    Ok(mem.status())
}

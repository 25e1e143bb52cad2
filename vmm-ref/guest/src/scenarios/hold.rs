//! `hold`: keep the device active and idle for `hold.secs`, watching for
//! NEEDS_RESET, then check that every queue still works.

use super::{verify, Ctx, Outcome};
use crate::blk::BlkError;
use crate::tsc::{self, Deadline};

/// How often the device status is read while idle (each read is a VM exit).
const CHECK_US: u64 = 100_000;

/// Runs `hold`.
pub fn run(ctx: &mut Ctx<'_>) -> Outcome {
    match run_inner(ctx) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::fail(format_args!("driver error: {}", e)),
    }
}

fn run_inner(ctx: &mut Ctx<'_>) -> Result<Outcome, BlkError> {
    let secs = ctx.cfg.hold_secs;
    let end = Deadline::after_us(secs.saturating_mul(1_000_000));
    while !end.passed() {
        if ctx.dev.needs_reset() {
            return Ok(Outcome::fail(format_args!(
                "device set NEEDS_RESET while idle"
            )));
        }
        tsc::delay_us(CHECK_US);
    }
    for q in 0..ctx.dev.nr_queues() {
        if let Err(msg) = verify::quick(ctx, q)? {
            return Ok(Outcome::fail(format_args!(
                "queue {} after {} s idle: {}",
                q, secs, msg
            )));
        }
    }
    Ok(Outcome::pass(format_args!(
        "secs={} queues={}",
        secs,
        ctx.dev.nr_queues()
    )))
}

//! `reset`: device reset (status 0), a pause of `reset.pause_ms`, full
//! re-initialisation, then a quick write/read check on every queue.

use super::{verify, Ctx, Outcome};
use crate::blk::BlkError;
use crate::tsc;

/// Runs `reset`.
pub fn run(ctx: &mut Ctx<'_>) -> Outcome {
    match run_inner(ctx) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::fail(format_args!("driver error: {}", e)),
    }
}

fn run_inner(ctx: &mut Ctx<'_>) -> Result<Outcome, BlkError> {
    let start = tsc::now();
    ctx.dev.reset()?;
    let reset_us = tsc::ticks_to_us(tsc::now() - start);
    tsc::delay_us(ctx.cfg.reset_pause_ms.saturating_mul(1000));
    let start = tsc::now();
    ctx.dev.init(ctx.arena)?;
    let init_us = tsc::ticks_to_us(tsc::now() - start);
    for q in 0..ctx.dev.nr_queues() {
        if let Err(msg) = verify::quick(ctx, q)? {
            return Ok(Outcome::fail(format_args!(
                "queue {} after re-init: {}",
                q, msg
            )));
        }
    }
    Ok(Outcome::pass(format_args!(
        "queues={} pause_ms={} reset_us={:.0} init_us={:.0}",
        ctx.dev.nr_queues(),
        ctx.cfg.reset_pause_ms,
        reset_us,
        init_us
    )))
}

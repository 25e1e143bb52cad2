//! `bench`: the [`workload`](super::workload) on one device at a time: `qd`
//! requests in flight on every queue, random `bs`-sized reads, writes or a
//! mix over the whole disk, for `bench.secs` seconds or `bench.ios` I/Os.
//! Reports IOPS, latency percentiles (TSC) and notifications sent.

use core::fmt::Write;

use super::workload;
use super::{Ctx, Detail, Outcome};
use crate::blk::BlkError;
use crate::println;

/// Runs `bench`.
pub fn run(ctx: &mut Ctx<'_>) -> Outcome {
    match run_inner(ctx) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::fail(format_args!("driver error: {}", e)),
    }
}

fn run_inner(ctx: &mut Ctx<'_>) -> Result<Outcome, BlkError> {
    let b = &ctx.cfg.bench;
    let mut devs = [Some(&mut *ctx.dev)];
    let report = match workload::run(&mut devs, ctx.arena, b, ctx.seed)? {
        Ok(report) => report,
        Err(why) => return Ok(Outcome::fail(format_args!("{}", why))),
    };
    let t = &report.total;
    let iops = report.rate(t.ios);
    println!(
        "BENCH queues={} qd={} rw={} ios={} secs={:.3} iops={} lat_p50_us={:.1} lat_p99_us={:.1} kicks={} profile={} reads={} writes={}",
        t.queues,
        t.qd,
        b.rw.name(),
        t.ios,
        report.secs,
        iops,
        t.hist.percentile_us(50.0),
        t.hist.percentile_us(99.0),
        t.kicks,
        b.profile.profile_name(),
        t.reads,
        t.writes
    );
    let mut detail = Detail::new();
    let _ = write!(
        detail,
        "iops={} ios_per_kick={:.1} errors={}",
        iops,
        t.ios_per_kick(),
        t.errors
    );
    if t.errors != 0 {
        return Ok(Outcome::fail(format_args!("{}", detail.as_str())));
    }
    Ok(Outcome::pass(format_args!("{}", detail.as_str())))
}

//! `bench-all`: the [`workload`](super::workload) on all devices at once
//! (N devices x Q queues x `bench.qd`), the way a guest with many disks
//! loads its host: every queue of every device has `qd` requests in flight,
//! polled round-robin by the one vCPU.
//!
//! Output, right after the run (the host may take its end-of-run
//! measurements when it sees the first line):
//!
//! ```text
//! BENCHALL devices=<n> queues=<total> qd=<n> rw=<..> profile=<..> ios=<n> reads=<n> writes=<n> secs=<f> iops=<n> read_iops=<n> write_iops=<n> lat_p50_us=<f> lat_p90_us=<f> lat_p99_us=<f> lat_p999_us=<f> kicks=<n>
//! BENCHDEV dev=<addr> queues=<n> qd=<n> ios=<n> iops=<n> lat_p50_us=<f> lat_p99_us=<f> kicks=<n> errors=<n>   (one per device)
//! ```

use core::fmt::Write;

use super::workload::{self, Report};
use super::{Detail, Outcome};
use crate::blk::BlkDevice;
use crate::cmdline::BenchConfig;
use crate::mem::Arena;
use crate::println;

/// Runs `bench-all` on `devs`.
pub fn run(
    devs: &mut [Option<&mut BlkDevice>],
    arena: &mut Arena,
    b: &BenchConfig,
    seed: u64,
) -> Outcome {
    match workload::run(devs, arena, b, seed) {
        Ok(Ok(report)) => outcome(&report, b),
        Ok(Err(why)) => Outcome::fail(format_args!("{}", why)),
        Err(e) => Outcome::fail(format_args!("driver error: {}", e)),
    }
}

fn outcome(report: &Report, b: &BenchConfig) -> Outcome {
    let t = &report.total;
    let iops = report.rate(t.ios);
    println!(
        "BENCHALL devices={} queues={} qd={} rw={} profile={} ios={} reads={} writes={} secs={:.3} iops={} read_iops={} write_iops={} lat_p50_us={:.1} lat_p90_us={:.1} lat_p99_us={:.1} lat_p999_us={:.1} kicks={}",
        report.devices.iter().filter(|d| d.queues > 0).count(),
        t.queues,
        t.qd,
        b.rw.name(),
        b.profile.profile_name(),
        t.ios,
        t.reads,
        t.writes,
        report.secs,
        iops,
        report.rate(t.reads),
        report.rate(t.writes),
        t.hist.percentile_us(50.0),
        t.hist.percentile_us(90.0),
        t.hist.percentile_us(99.0),
        t.hist.percentile_us(99.9),
        t.kicks
    );
    let mut idle = 0;
    for d in report.devices.iter().filter(|d| d.queues > 0) {
        println!(
            "BENCHDEV dev={:#x} queues={} qd={} ios={} iops={} lat_p50_us={:.1} lat_p99_us={:.1} kicks={} errors={}",
            d.base,
            d.queues,
            d.qd,
            d.ios,
            report.rate(d.ios),
            d.hist.percentile_us(50.0),
            d.hist.percentile_us(99.0),
            d.kicks,
            d.errors
        );
        if d.ios == 0 {
            idle += 1;
        }
    }
    let mut detail = Detail::new();
    let _ = write!(
        detail,
        "devices={} iops={} ios_per_kick={:.1} errors={} idle_devices={}",
        report.devices.iter().filter(|d| d.queues > 0).count(),
        iops,
        t.ios_per_kick(),
        t.errors,
        idle
    );
    // Every device must have completed I/O without an error: a device that
    // the round-robin starved, or one that failed requests, fails the run.
    if t.errors != 0 || idle != 0 {
        Outcome::fail(format_args!("{}", detail))
    } else {
        Outcome::pass(format_args!("{}", detail))
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! aio-poll benchmark: a producer thread emulating a guest on virtqueues
//! against the loop in every polling mode, plus event-manager as the anchor.
//!
//! ```text
//! cargo run --release -p aio-poll --features event-manager --example bench            # ~100 s
//! cargo run --release -p aio-poll --features event-manager --example bench -- --quick # ~30 s
//! cargo run --release -p aio-poll --features event-manager --example bench -- --nested --rounds 5
//! ```
//! Options: `--nested` (only the nested-in-event-manager comparison: paired
//! rounds of busy poll / standalone / nested at 10 µs gaps, idle CPU and
//! dispatch cost, with per-round ratios; `--rounds N`, default 5),
//! `--dispatch-only` (just the same-thread dispatch cost of every
//! dispatch mode; with `--dispatch-mode NAME` only that mode, once, for
//! `callgrind.sh`; `--events N` events per run),
//! `--pattern SUBSTR` (only matching patterns), `--quick` (or `AIO_BENCH_QUICK=1`), `--duration-ms N` per
//! pattern and mode, `--work-ns N` emulated per-request device work (default
//! 500), `--boost` (or `AIO_BENCH_BOOST=1`): run producer and consumer at
//! nice -20 (needs CAP_SYS_NICE) on a loaded, shared machine, `--rt`: run
//! them in SCHED_FIFO (needs CAP_SYS_NICE; woken threads preempt CPU hogs
//! at once instead of at the next tick).

mod consumers;
mod dispatch;
mod nested;
mod workload;

use consumers::{idle_cpu_ns, run, Idle, Mode, RunResult};
use dispatch::{dispatch_cost_ns, dispatch_costs, print_dispatch_table, DispatchMode};
use workload::Gap;

use aio_poll::{PollAlgorithm, PollNsHistogram, PollParams};

struct Row {
    mode: Mode,
    r: RunResult,
}

pub(crate) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted.get(idx).copied().unwrap_or(0)) / 1000.0
}

impl Row {
    fn events_per_s(&self) -> f64 {
        self.r.events as f64 / (self.r.wall_ns as f64 / 1e9)
    }
    fn cpu_per_event_us(&self) -> f64 {
        if self.r.events == 0 {
            0.0
        } else {
            self.r.cpu_ns as f64 / self.r.events as f64 / 1000.0
        }
    }
    fn cpu_util(&self) -> f64 {
        self.r.cpu_ns as f64 / self.r.wall_ns as f64 * 100.0
    }
}

/// `--pattern SUBSTR`: run only the patterns whose name contains SUBSTR.
fn pattern_filter() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--pattern")
        .and_then(|i| args.get(i + 1).cloned())
}

fn parse_args() -> (u64, u64, bool) {
    if std::env::args().any(|a| a == "--dispatch-only") {
        dispatch_only();
    }
    if std::env::args().any(|a| a == "--nested") {
        nested::main();
    }
    if std::env::var("AIO_BENCH_BOOST").is_ok_and(|v| v != "0" && !v.is_empty()) {
        workload::BOOST.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let mut duration_ms = 1000u64;
    let mut work_ns = 500u64;
    let mut quick = std::env::var("AIO_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--boost" => workload::BOOST.store(true, std::sync::atomic::Ordering::Relaxed),
            "--rt" => workload::RT.store(true, std::sync::atomic::Ordering::Relaxed),
            "--duration-ms" => {
                duration_ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage("--duration-ms needs a number"))
            }
            "--work-ns" => {
                work_ns = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage("--work-ns needs a number"))
            }
            "--pattern" => {
                let _ = args.next();
            }
            "--dispatch-mode" | "--events" => usage(&format!("{a} needs --dispatch-only")),
            "--rounds" => usage("--rounds needs --nested"),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    if quick {
        duration_ms = duration_ms.min(300);
    }
    (duration_ms, work_ns, quick)
}

/// `--dispatch-only`: the same-thread dispatch cost, then exit. With
/// `--dispatch-mode NAME` one run of that mode only (what `callgrind.sh`
/// runs under valgrind), else every mode, minimum of five rotations.
fn dispatch_only() -> ! {
    let mut mode = None;
    let mut events = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dispatch-only" => {}
            "--dispatch-mode" => {
                let v = args.next().unwrap_or_default();
                mode = Some(
                    DispatchMode::parse(&v)
                        .unwrap_or_else(|| usage(&format!("unknown dispatch mode {v:?}"))),
                );
            }
            "--events" => {
                events = Some(
                    args.next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .filter(|n| *n > 0)
                        .unwrap_or_else(|| usage("--events needs a positive number")),
                );
            }
            "--rt" => workload::RT.store(true, std::sync::atomic::Ordering::Relaxed),
            "--boost" => workload::BOOST.store(true, std::sync::atomic::Ordering::Relaxed),
            other => usage(&format!("unknown argument with --dispatch-only: {other:?}")),
        }
    }
    workload::setup_thread(1);
    match mode {
        Some(m) => {
            let n = events.unwrap_or(100_000);
            let ns = dispatch_cost_ns(m, n);
            println!(
                "dispatch mode {}: {n} events, {ns:.0} CPU ns/event",
                m.flag()
            );
        }
        None => {
            let n = events.unwrap_or(200_000);
            print_dispatch_table(&dispatch_costs(n, 5), n, 5);
        }
    }
    std::process::exit(0)
}

pub(crate) fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("error: {msg}");
    }
    eprintln!(
        "usage: bench [--quick] [--boost] [--rt] [--duration-ms N] [--work-ns N] \
         [--pattern SUBSTR]\n       bench --dispatch-only [--dispatch-mode MODE] [--events N]\n       \
         bench --nested [--rounds N] [--rt] [--duration-ms N]\n       \
         MODE: em, blocking, weighted, em-wait, blocking-wait, weighted-wait, \
         nested-blocking, nested-weighted, em-floor"
    );
    std::process::exit(2)
}

fn main() {
    let (duration_ms, work_ns, quick) = parse_args();
    // The producer (this thread) on CPU 0, consumers on CPU 1.
    workload::setup_thread(0);
    let duration_ns = duration_ms * 1_000_000;
    let modes = [
        Mode::Blocking,
        Mode::Busy,
        Mode::Classic,
        Mode::Weighted(1),
        Mode::Weighted(2),
        Mode::Weighted(3),
        Mode::Weighted(4),
        Mode::Weighted(5),
        Mode::EventManager,
        Mode::Nested(3),
    ];
    let patterns: Vec<(&str, Vec<Gap>)> = vec![
        ("fixed 2 us", vec![Gap::Fixed(2_000)]),
        ("fixed 10 us", vec![Gap::Fixed(10_000)]),
        ("fixed 50 us", vec![Gap::Fixed(50_000)]),
        ("fixed 200 us", vec![Gap::Fixed(200_000)]),
        (
            "mixed A: fast exp(15 us) + slow exp(400 us)",
            vec![Gap::Exp(15_000), Gap::Exp(400_000)],
        ),
        (
            "mixed B: fast fixed 40 us + slow exp(400 us)",
            vec![Gap::Fixed(40_000), Gap::Exp(400_000)],
        ),
        (
            "mixed C: bursty (5 us for 2 ms every 20 ms) + steady fixed 100 us",
            vec![
                Gap::Burst {
                    gap: 5_000,
                    on: 2_000_000,
                    period: 20_000_000,
                },
                Gap::Fixed(100_000),
            ],
        ),
    ];
    println!(
        "aio-poll benchmark: {} ms per run, {} ns device work per request, closed loop \
         (iodepth 1 per queue), think time = pattern{}{}",
        duration_ms,
        work_ns,
        if quick { " (quick)" } else { "" },
        match (
            workload::BOOST.load(std::sync::atomic::Ordering::Relaxed),
            workload::RT.load(std::sync::atomic::Ordering::Relaxed),
        ) {
            (_, true) => ", producer and consumer in SCHED_FIFO",
            (true, false) => ", producer and consumer at nice -20",
            _ => "",
        }
    );
    println!(
        "CPU = consumer thread CPU (CLOCK_THREAD_CPUTIME_ID); latency = publish -> device \
         sees it; ratios vs classic from the same run.\n"
    );
    // Each pattern runs in `rounds` rounds of every mode (interleaved), so
    // that load changes on a shared machine hit all modes alike.
    let rounds: u64 = if quick { 1 } else { 3 };
    let mut summary = Vec::new();
    let filter = pattern_filter();
    for (name, gaps) in &patterns {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let mut results: Vec<Option<RunResult>> = modes.iter().map(|_| None).collect();
        for round in 0..rounds {
            // Rotate the order each round so that periodic disturbances
            // (e.g. the kernel's 1 s RT-throttling period) do not always hit
            // the same modes.
            for k in 0..modes.len() {
                let i = (k + round as usize * 4) % modes.len();
                let Some(mode) = modes.get(i).copied() else {
                    continue;
                };
                let r = run(mode, gaps, duration_ns / rounds, work_ns);
                if let Some(slot) = results.get_mut(i) {
                    match slot {
                        Some(acc) => merge(acc, r),
                        None => *slot = Some(r),
                    }
                }
                // Idle gap: keeps SCHED_FIFO use below the kernel's RT
                // bandwidth limit (95 % per second), so `--rt` runs are
                // never throttled mid-measurement.
                std::thread::sleep(std::time::Duration::from_millis(40));
            }
        }
        let mut rows: Vec<Row> = modes
            .iter()
            .zip(results)
            .filter_map(|(mode, r)| r.map(|r| Row { mode: *mode, r }))
            .collect();
        print_table(name, &mut rows);
        summary.push((name.to_string(), rows));
    }

    // Idle CPU and dispatch cost against event-manager.
    let idle_ms = if quick { 200 } else { 500 };
    let idle_em = idle_cpu_ns(Idle::EventManager, idle_ms);
    let idle_w = idle_cpu_ns(Idle::Aio(PollParams::default()), idle_ms);
    let idle_c = idle_cpu_ns(
        Idle::Aio(PollParams::default().with_algorithm(PollAlgorithm::Classic)),
        idle_ms,
    );
    let idle_b = idle_cpu_ns(Idle::Aio(PollParams::disabled()), idle_ms);
    let idle_n = idle_cpu_ns(Idle::Nested(PollParams::default()), idle_ms);
    let (dn, drounds) = if quick { (20_000, 5) } else { (100_000, 5) };
    let dcosts = dispatch_costs(dn, drounds);
    println!("## Idle CPU over {idle_ms} ms right after 100 events\n");
    println!("| consumer | idle CPU (us) |");
    println!("|---|---:|");
    println!("| event-manager | {:.1} |", idle_em as f64 / 1e3);
    println!(
        "| aio-poll blocking (max_ns=0) | {:.1} |",
        idle_b as f64 / 1e3
    );
    println!("| aio-poll weighted w=3 | {:.1} |", idle_w as f64 / 1e3);
    println!("| aio-poll classic | {:.1} |", idle_c as f64 / 1e3);
    println!(
        "| aio-poll weighted w=3 nested in event-manager | {:.1} |",
        idle_n as f64 / 1e3
    );
    println!();
    println!(
        "## Same-thread dispatch cost (eventfd write + one loop iteration that reads it; \
         instructions/event: examples/bench/callgrind.sh)\n"
    );
    print_dispatch_table(&dcosts, dn, drounds);
    let cost = |m: DispatchMode| {
        dcosts
            .iter()
            .find(|(x, _)| *x == m)
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN)
    };

    // Targets.
    println!("## Targets\n");
    let find = |pat: &str, m: Mode| -> Option<&Row> {
        summary
            .iter()
            .find(|(n, _)| n.starts_with(pat))
            .and_then(|(_, rows)| rows.iter().find(|r| r.mode == m))
    };
    for mixed in ["mixed A", "mixed B", "mixed C"] {
        if let (Some(w3), Some(c)) = (find(mixed, Mode::Weighted(3)), find(mixed, Mode::Classic)) {
            let cpu = w3.cpu_per_event_us() / c.cpu_per_event_us();
            let thr = w3.events_per_s() / c.events_per_s();
            println!(
                "- {mixed}, weighted(3) vs classic: CPU/event {:.2}x, throughput {:.3}x: {}",
                cpu,
                thr,
                regime(cpu, thr)
            );
            // What any mode reached on this load at the target's throughput:
            // if even the cheapest of those stays above 0.85x, no mode in
            // this table meets the target on this machine.
            let rows = summary.iter().find(|(n, _)| n.starts_with(mixed));
            if let Some(best) = rows.and_then(|(_, rows)| {
                rows.iter()
                    .filter(|r| r.events_per_s() >= 0.98 * c.events_per_s())
                    .min_by(|a, b| a.cpu_per_event_us().total_cmp(&b.cpu_per_event_us()))
            }) {
                println!(
                    "  (cheapest mode on {mixed} with >= 0.98x classic's throughput: {} at {:.2}x its CPU/event, {:.3}x its throughput)",
                    best.mode.name(),
                    best.cpu_per_event_us() / c.cpu_per_event_us(),
                    best.events_per_s() / c.events_per_s()
                );
            }
        }
    }
    if let (Some(w3), Some(b)) = (
        find("fixed 10 us", Mode::Weighted(3)),
        find("fixed 10 us", Mode::Busy),
    ) {
        let mut lw = w3.r.lat.clone();
        lw.sort_unstable();
        let mut lb = b.r.lat.clone();
        lb.sort_unstable();
        let (pw, pb) = (percentile(&lw, 0.5), percentile(&lb, 0.5));
        println!(
            "- fixed 10 us, p50 weighted(3) {:.2} us vs busy poll {:.2} us: {:.2}x (target <= 1.5x): {}",
            pw,
            pb,
            pw / pb.max(1e-9),
            verdict(pw <= 1.5 * pb)
        );
    }
    println!(
        "- idle CPU blocking {:.1} us vs event-manager {:.1} us: {}",
        idle_b as f64 / 1e3,
        idle_em as f64 / 1e3,
        if idle_b <= idle_em + 20_000 {
            "MET (difference < 20 us, the noise floor)"
        } else {
            "NOT MET"
        }
    );
    let max_ns = PollParams::default().max_ns.unsigned_abs();
    println!(
        "- idle CPU weighted(3) {:.1} us vs event-manager {:.1} us: {} (a polling loop may \
         spend one last window of up to max_ns = {} us before it sleeps)",
        idle_w as f64 / 1e3,
        idle_em as f64 / 1e3,
        if idle_w <= idle_em + max_ns + 20_000 {
            "MET"
        } else {
            "NOT MET"
        },
        max_ns / 1000
    );
    if let (Some(n), Some(w3), Some(b)) = (
        find("fixed 10 us", Mode::Nested(3)),
        find("fixed 10 us", Mode::Weighted(3)),
        find("fixed 10 us", Mode::Busy),
    ) {
        let p50 = |r: &Row| {
            let mut l = r.r.lat.clone();
            l.sort_unstable();
            percentile(&l, 0.5)
        };
        let (pn, pw, pb) = (p50(n), p50(w3), p50(b));
        println!(
            "- fixed 10 us, p50 nested {:.2} us vs busy poll {:.2} us: {:.2}x, vs standalone \
             weighted(3) {:.2} us: {:.2}x (target <= 1.5x): {}",
            pn,
            pb,
            pn / pb.max(1e-9),
            pw,
            pn / pw.max(1e-9),
            verdict(pn <= 1.5 * pb.max(pw))
        );
    }
    println!(
        "- idle CPU nested {:.1} us vs event-manager {:.1} us: {}",
        idle_n as f64 / 1e3,
        idle_em as f64 / 1e3,
        if idle_n <= idle_em + max_ns + 20_000 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    for m in [DispatchMode::NestedBlocking, DispatchMode::NestedWeighted] {
        if let Some(alone) = m.standalone() {
            let ratio = cost(m) / cost(alone);
            println!(
                "- dispatch cost {} {:.0} ns vs {} {:.0} ns: {:.2}x (target <= 1.1x): {}",
                m.describe(),
                cost(m),
                alone.describe(),
                cost(alone),
                ratio,
                verdict(ratio <= 1.1)
            );
        }
    }
    for m in [
        DispatchMode::Blocking,
        DispatchMode::Weighted,
        DispatchMode::BlockingWait,
    ] {
        let b = m.baseline();
        println!(
            "- dispatch cost {} {:.0} ns vs {} {:.0} ns: {}",
            m.describe(),
            cost(m),
            b.describe(),
            cost(b),
            no_worse(cost(m), cost(b))
        );
    }
}

/// What a mixed load's weighted(3)-vs-classic outcome says about its regime.
///
/// These loads (one or two handlers, 500 ns of device work, no storage, a
/// closed loop at iodepth 1) are not the experiment the weighted algorithm
/// was published with (16 virtio-blk drives on real storage, weight 3: 9.4 %
/// less CPU at 2.2 % less throughput; `ci/bench-poll.sh` measures that one),
/// so they are classified, not scored against its result. The published
/// direction and size: CPU <= 0.91x at throughput >= 0.97x.
fn regime(cpu: f64, thr: f64) -> &'static str {
    if cpu <= 0.91 && thr >= 0.97 {
        "the published direction (less CPU at about classic's throughput)"
    } else if thr > 1.02 && cpu > 1.0 {
        "polling's latency gain turns into throughput (more throughput for more CPU)"
    } else if thr < 0.97 {
        "less throughput than classic"
    } else {
        "more CPU at about classic's throughput (polling windows that do not pay off)"
    }
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "NOT MET"
    }
}

/// Verdict for "no worse than": strict, with a note when within 10 % noise.
fn no_worse(ours: f64, theirs: f64) -> String {
    let ratio = ours / theirs.max(1e-9);
    if ratio <= 1.0 {
        format!("{ratio:.2}x: MET")
    } else if ratio <= 1.10 {
        format!("{ratio:.2}x: NOT MET strictly (within 10 % run-to-run noise)")
    } else {
        format!("{ratio:.2}x: NOT MET")
    }
}

fn merge_hist(a: &mut PollNsHistogram, b: &PollNsHistogram) {
    for (x, y) in a.buckets.iter_mut().zip(b.buckets.iter()) {
        *x += *y;
    }
    a.samples += b.samples;
    a.sum_poll_ns = a.sum_poll_ns.saturating_add(b.sum_poll_ns);
    a.near_max_samples += b.near_max_samples;
    a.total_time_ns = a.total_time_ns.saturating_add(b.total_time_ns);
    a.near_max_time_ns = a.near_max_time_ns.saturating_add(b.near_max_time_ns);
    a.handler_updates += b.handler_updates;
    a.handler_resets += b.handler_resets;
    a.poll_ns_updates += b.poll_ns_updates;
    a.poll_ns_resets += b.poll_ns_resets;
}

fn merge(a: &mut RunResult, mut b: RunResult) {
    a.events += b.events;
    a.wall_ns += b.wall_ns;
    a.cpu_ns += b.cpu_ns;
    a.lat.append(&mut b.lat);
    a.kicks += b.kicks;
    a.kicks_avoided += b.kicks_avoided;
    if let (Some(sa), Some(sb)) = (a.stats.as_mut(), b.stats.as_ref()) {
        merge_hist(&mut sa.poll_ns_histogram, &sb.poll_ns_histogram);
        sa.grow_count += sb.grow_count;
        sa.shrink_count += sb.shrink_count;
    }
}

fn print_table(name: &str, rows: &mut [Row]) {
    println!("## {name}\n");
    println!(
        "| mode | events/s | CPU/event (us) | CPU % | p50 (us) | p99 (us) | kicks avoided | \
         mean poll_ns | reset rate | near max | CPU/ev vs classic | thr vs classic | p50 vs classic |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut p50s = Vec::new();
    for row in rows.iter_mut() {
        row.r.lat.sort_unstable();
        p50s.push(percentile(&row.r.lat, 0.5));
    }
    let classic = rows.iter().position(|r| r.mode == Mode::Classic);
    let (c_cpu, c_thr, c_p50) = match classic {
        Some(i) => (
            rows.get(i).map(|r| r.cpu_per_event_us()).unwrap_or(0.0),
            rows.get(i).map(|r| r.events_per_s()).unwrap_or(0.0),
            p50s.get(i).copied().unwrap_or(0.0),
        ),
        None => (0.0, 0.0, 0.0),
    };
    for (row, p50) in rows.iter().zip(p50s) {
        let p99 = percentile(&row.r.lat, 0.99);
        let total_pub = row.r.kicks + row.r.kicks_avoided;
        let avoided = if total_pub == 0 {
            0.0
        } else {
            row.r.kicks_avoided as f64 / total_pub as f64 * 100.0
        };
        let (mean, reset, near) = match &row.r.stats {
            Some(s) if s.params.max_ns > 0 => {
                let h = &s.poll_ns_histogram;
                (
                    format!("{:.0}", h.mean_poll_ns()),
                    format!("{:.1} %", h.reset_rate() * 100.0),
                    format!("{:.1} %", h.near_max_share() * 100.0),
                )
            }
            _ => ("-".into(), "-".into(), "-".into()),
        };
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "-".into()
            }
        };
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.1} % | {} | {} | {} | {} | {} | {} |",
            row.mode.name(),
            row.events_per_s(),
            row.cpu_per_event_us(),
            row.cpu_util(),
            p50,
            p99,
            avoided,
            mean,
            reset,
            near,
            ratio(row.cpu_per_event_us(), c_cpu),
            ratio(row.events_per_s(), c_thr),
            ratio(p50, c_p50),
        );
    }
    println!();
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Same-thread dispatch cost: eventfd events through aio-poll and rust-vmm
//! event-manager in one thread. Reports thread CPU time per event; under
//! `valgrind --tool=callgrind --toggle-collect='*dispatch_loop_*'` (see
//! `callgrind.sh`) the instructions executed inside the per-mode loop
//! functions give deterministic user-space instructions per event.
//!
//! Every event is: bump a "produced" counter, write 1 to the eventfd, one
//! loop iteration whose handler reads the eventfd and catches up with the
//! counter. Handlers do the same work in every mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aio_poll::{
    AioContext, FdHandler, Interest, NestedContext, PollHandler, PollParams, Readiness,
    SharedEventFd,
};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::workload::thread_cpu_time_ns;

/// One consumer configuration of the dispatch benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchMode {
    /// event-manager, `run_with_timeout(0)`.
    Em,
    /// aio-poll `max_ns = 0`, `poll(false)`.
    Blocking,
    /// aio-poll default parameters (Weighted, w=3), `poll(false)`.
    Weighted,
    /// event-manager, `run()` (blocking `epoll_wait`, event already pending).
    EmWait,
    /// aio-poll `max_ns = 0`, `poll(true)`: the may-sleep protocol and the
    /// blocking `epoll_wait` (event already pending).
    BlockingWait,
    /// aio-poll default parameters, `poll(true)`: the event is found by the
    /// handler's `poll()` in the polling window (no `epoll_wait`, except the
    /// fairness check every 16 iterations).
    WeightedWait,
    /// aio-poll `max_ns = 0` nested in event-manager: `run()` (outer
    /// `epoll_wait`, then the context's own non-blocking one).
    NestedBlocking,
    /// aio-poll default parameters nested in event-manager: `run()`; the
    /// context keeps its fd readable while polling and finds the event by
    /// `poll()`.
    NestedWeighted,
    /// The outer loop's own floor: event-manager `run()` handing one
    /// always-readable fd to a subscriber whose `process()` does nothing (no
    /// kick, no read). Every subscriber of an event-manager pays this per
    /// `run()`, whatever it nests; `nested - floor` is what nesting adds.
    EmFloor,
}

impl DispatchMode {
    /// Every mode, in report order.
    pub const ALL: [DispatchMode; 9] = [
        DispatchMode::Em,
        DispatchMode::Blocking,
        DispatchMode::Weighted,
        DispatchMode::EmWait,
        DispatchMode::BlockingWait,
        DispatchMode::WeightedWait,
        DispatchMode::NestedBlocking,
        DispatchMode::NestedWeighted,
        DispatchMode::EmFloor,
    ];

    /// The command-line name (`--dispatch-mode NAME`).
    pub fn flag(self) -> &'static str {
        match self {
            DispatchMode::Em => "em",
            DispatchMode::Blocking => "blocking",
            DispatchMode::Weighted => "weighted",
            DispatchMode::EmWait => "em-wait",
            DispatchMode::BlockingWait => "blocking-wait",
            DispatchMode::WeightedWait => "weighted-wait",
            DispatchMode::NestedBlocking => "nested-blocking",
            DispatchMode::NestedWeighted => "nested-weighted",
            DispatchMode::EmFloor => "em-floor",
        }
    }

    /// Parses a command-line name.
    pub fn parse(s: &str) -> Option<DispatchMode> {
        Self::ALL.into_iter().find(|m| m.flag() == s)
    }

    /// A human-readable description for tables.
    pub fn describe(self) -> &'static str {
        match self {
            DispatchMode::Em => "event-manager run_with_timeout(0)",
            DispatchMode::Blocking => "aio-poll max_ns=0, poll(false)",
            DispatchMode::Weighted => "aio-poll weighted w=3, poll(false)",
            DispatchMode::EmWait => "event-manager run() (event pending)",
            DispatchMode::BlockingWait => "aio-poll max_ns=0, poll(true) (event pending)",
            DispatchMode::WeightedWait => "aio-poll weighted w=3, poll(true) (found by poll())",
            DispatchMode::NestedBlocking => "aio-poll max_ns=0 nested in event-manager, run()",
            DispatchMode::NestedWeighted => "aio-poll weighted w=3 nested in event-manager, run()",
            DispatchMode::EmFloor => "event-manager run() floor (ready fd, empty process())",
        }
    }

    /// The event-manager mode this one is compared with.
    pub fn baseline(self) -> DispatchMode {
        match self {
            DispatchMode::Em | DispatchMode::Blocking | DispatchMode::Weighted => DispatchMode::Em,
            _ => DispatchMode::EmWait,
        }
    }

    /// The standalone aio-poll mode a nested one is compared with.
    pub fn standalone(self) -> Option<DispatchMode> {
        match self {
            DispatchMode::NestedBlocking => Some(DispatchMode::BlockingWait),
            DispatchMode::NestedWeighted => Some(DispatchMode::WeightedWait),
            _ => None,
        }
    }

    fn blocking_call(self) -> bool {
        !matches!(
            self,
            DispatchMode::Em | DispatchMode::Blocking | DispatchMode::Weighted
        )
    }

    fn nested(self) -> bool {
        matches!(
            self,
            DispatchMode::NestedBlocking | DispatchMode::NestedWeighted
        )
    }

    fn params(self) -> Option<PollParams> {
        match self {
            DispatchMode::Em | DispatchMode::EmWait | DispatchMode::EmFloor => None,
            DispatchMode::Blocking | DispatchMode::BlockingWait | DispatchMode::NestedBlocking => {
                Some(PollParams::disabled())
            }
            DispatchMode::Weighted | DispatchMode::WeightedWait | DispatchMode::NestedWeighted => {
                Some(PollParams::default())
            }
        }
    }
}

/// The event source: a "produced" counter (the avail ring) plus the eventfd.
struct Source {
    produced: Arc<AtomicU64>,
    efd: SharedEventFd,
}

impl Source {
    #[inline]
    fn kick(&self) {
        let p = self.produced.load(Ordering::Relaxed);
        self.produced.store(p + 1, Ordering::Release);
        let _ = self.efd.write(1);
    }
}

/// The consumer side, identical for both loops.
struct Sink {
    produced: Arc<AtomicU64>,
    efd: SharedEventFd,
    consumed: u64,
}

impl Sink {
    #[inline]
    fn consume(&mut self) {
        let _ = self.efd.read();
        self.consumed = self.produced.load(Ordering::Acquire);
    }
}

impl FdHandler for Sink {
    fn ready(&mut self, _ctx: &mut AioContext, _ready: Readiness) {
        self.consume();
    }
}

impl PollHandler for Sink {
    fn poll(&mut self) -> bool {
        self.produced.load(Ordering::Acquire) > self.consumed
    }
    fn poll_ready(&mut self, _ctx: &mut AioContext) {
        self.consume();
    }
}

impl MutEventSubscriber for Sink {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&*self.efd, EventSet::IN))
            .expect("register eventfd");
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.consume();
    }
}

fn pair() -> (Source, Sink) {
    let produced = Arc::new(AtomicU64::new(0));
    let efd = SharedEventFd::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let reader = efd.clone();
    (
        Source {
            produced: produced.clone(),
            efd,
        },
        Sink {
            produced,
            efd: reader,
            consumed: 0,
        },
    )
}

/// The measured aio-poll loop (the callgrind script collects inside it only).
#[inline(never)]
fn dispatch_loop_aio(ctx: &mut AioContext, src: &Source, n: u64, blocking: bool) {
    for _ in 0..n {
        src.kick();
        let _ = ctx.poll(blocking);
    }
}

/// The measured nested loop (the callgrind script collects inside it only).
#[inline(never)]
fn dispatch_loop_nested(em: &mut EventManager<NestedContext>, src: &Source, n: u64) {
    for _ in 0..n {
        src.kick();
        let _ = em.run();
    }
}

/// A subscriber whose fd stays readable and whose `process()` does nothing:
/// the outer loop's own per-`run()` cost.
struct Floor(SharedEventFd);

impl MutEventSubscriber for Floor {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&*self.0, EventSet::IN))
            .expect("register eventfd");
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
}

/// The measured floor loop (the callgrind script collects inside it only).
#[inline(never)]
fn dispatch_loop_floor(em: &mut EventManager<Floor>, n: u64) {
    for _ in 0..n {
        let _ = em.run();
    }
}

/// The measured event-manager loop (the callgrind script collects inside it only).
#[inline(never)]
fn dispatch_loop_em(em: &mut EventManager<Sink>, src: &Source, n: u64, blocking: bool) {
    for _ in 0..n {
        src.kick();
        let _ = if blocking {
            em.run()
        } else {
            em.run_with_timeout(0)
        };
    }
}

/// Runs `n` events through `mode`; returns thread CPU ns per event.
pub fn dispatch_cost_ns(mode: DispatchMode, n: u64) -> f64 {
    let (src, sink) = pair();
    let blocking = mode.blocking_call();
    let cpu = match mode.params() {
        None if mode == DispatchMode::EmFloor => {
            // Readable for good: written once, never read.
            src.kick();
            let mut em = EventManager::<Floor>::new().expect("event manager");
            em.add_subscriber(Floor(sink.efd.clone()));
            let cpu0 = thread_cpu_time_ns();
            dispatch_loop_floor(&mut em, n);
            thread_cpu_time_ns() - cpu0
        }
        Some(p) if mode.nested() => {
            let mut ctx = AioContext::with_params(p).expect("context");
            ctx.add_polled_fd_handler(sink.efd.clone(), Interest::READABLE, sink)
                .expect("add handler");
            let mut em = EventManager::<NestedContext>::new().expect("event manager");
            em.add_subscriber(NestedContext::new(ctx).expect("nest"));
            // The initial dispatch (work may be pending at nesting).
            let _ = em.run();
            let cpu0 = thread_cpu_time_ns();
            dispatch_loop_nested(&mut em, &src, n);
            thread_cpu_time_ns() - cpu0
        }
        Some(p) => {
            let mut ctx = AioContext::with_params(p).expect("context");
            ctx.add_polled_fd_handler(sink.efd.clone(), Interest::READABLE, sink)
                .expect("add handler");
            let cpu0 = thread_cpu_time_ns();
            dispatch_loop_aio(&mut ctx, &src, n, blocking);
            thread_cpu_time_ns() - cpu0
        }
        None => {
            let mut em = EventManager::<Sink>::new().expect("event manager");
            em.add_subscriber(sink);
            let cpu0 = thread_cpu_time_ns();
            dispatch_loop_em(&mut em, &src, n, blocking);
            thread_cpu_time_ns() - cpu0
        }
    };
    cpu as f64 / n.max(1) as f64
}

/// CPU ns per event of every mode: `rounds` rotations of `n` events each,
/// minimum per mode (the least disturbed run on a shared machine).
pub fn dispatch_costs(n: u64, rounds: u32) -> Vec<(DispatchMode, f64)> {
    let mut best = [f64::MAX; DispatchMode::ALL.len()];
    for round in 0..rounds as usize {
        for k in 0..DispatchMode::ALL.len() {
            let i = (k + round) % DispatchMode::ALL.len();
            if let (Some(mode), Some(b)) = (DispatchMode::ALL.get(i), best.get_mut(i)) {
                *b = b.min(dispatch_cost_ns(*mode, n));
            }
        }
    }
    DispatchMode::ALL.into_iter().zip(best).collect()
}

/// Prints the CPU-time table with ratios against the event-manager baseline
/// (and, for nested modes, against the standalone aio-poll mode).
pub fn print_dispatch_table(costs: &[(DispatchMode, f64)], n: u64, rounds: u32) {
    println!(
        "| dispatch mode | CPU ns/event (min of {rounds} x {n}) | vs event-manager | vs standalone aio-poll |"
    );
    println!("|---|---:|---:|---:|");
    let find = |m: DispatchMode| {
        costs
            .iter()
            .find(|(x, _)| *x == m)
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN)
    };
    for (mode, ns) in costs {
        let vs_alone = match mode.standalone() {
            Some(m) => format!("{:.2}x", ns / find(m)),
            None => "-".into(),
        };
        println!(
            "| {} | {:.0} | {:.2}x | {} |",
            mode.describe(),
            ns,
            ns / find(mode.baseline()),
            vs_alone
        );
    }
    println!();
}

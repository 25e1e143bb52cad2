// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device side in each benchmark mode, run on its own thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Barrier};

use aio_poll::{
    AioContext, FdHandler, Interest, NestedContext, PollAlgorithm, PollHandler, PollParams,
    Readiness, Stats,
};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};

use crate::workload::{
    clock_ns, monotonic_ns, run_producer, setup_thread, thread_cpu_time_ns, Gap, Queue,
};

/// A benchmark mode.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// aio-poll with `max_ns = 0`.
    Blocking,
    /// A consumer that spins on the rings forever (never sleeps, never kicked).
    Busy,
    /// aio-poll, classic algorithm, default parameters.
    Classic,
    /// aio-poll, weighted algorithm with this weight.
    Weighted(i64),
    /// rust-vmm event-manager, epoll only.
    EventManager,
    /// aio-poll, weighted with this weight, nested in event-manager
    /// (`NestedContext`).
    Nested(i64),
}

impl Mode {
    pub fn name(&self) -> String {
        match self {
            Mode::Blocking => "blocking (max_ns=0)".into(),
            Mode::Busy => "busy poll".into(),
            Mode::Classic => "classic".into(),
            Mode::Weighted(w) => format!("weighted w={w}"),
            Mode::EventManager => "event-manager".into(),
            Mode::Nested(w) => format!("nested in event-manager w={w}"),
        }
    }

    fn params(&self) -> Option<PollParams> {
        match self {
            Mode::Blocking => Some(PollParams::disabled()),
            Mode::Classic => Some(PollParams::default().with_algorithm(PollAlgorithm::Classic)),
            Mode::Weighted(w) | Mode::Nested(w) => Some(PollParams::default().with_weight(*w)),
            Mode::Busy | Mode::EventManager => None,
        }
    }
}

/// What one run measured.
pub struct RunResult {
    pub events: u64,
    pub wall_ns: u64,
    pub cpu_ns: u64,
    pub lat: Vec<u32>,
    pub kicks: u64,
    pub kicks_avoided: u64,
    pub stats: Option<Stats>,
}

/// The aio-poll device handler for one queue.
struct AioDev {
    q: Arc<Queue>,
    consumed: u64,
    lat: Vec<u32>,
    work_ns: u64,
    out: Sender<Vec<u32>>,
}

impl FdHandler for AioDev {
    fn ready(&mut self, _ctx: &mut AioContext, _ready: Readiness) {
        let _ = self.q.kick.read();
        self.q
            .process(&mut self.consumed, &mut self.lat, self.work_ns);
    }
}

impl PollHandler for AioDev {
    fn poll(&mut self) -> bool {
        self.q.has_work(self.consumed)
    }
    fn poll_ready(&mut self, _ctx: &mut AioContext) {
        self.q
            .process(&mut self.consumed, &mut self.lat, self.work_ns);
    }
    fn poll_begin(&mut self) {
        self.q.disable_notify();
    }
    fn poll_end(&mut self) {
        self.q.enable_notify();
    }
}

impl Drop for AioDev {
    fn drop(&mut self) {
        let _ = self.out.send(std::mem::take(&mut self.lat));
    }
}

/// The event-manager subscriber for one queue.
struct EmDev {
    q: Arc<Queue>,
    consumed: u64,
    lat: Vec<u32>,
    work_ns: u64,
}

impl MutEventSubscriber for EmDev {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.q.kick, EventSet::IN))
            .expect("register kick fd");
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.q.kick.read();
        self.q
            .process(&mut self.consumed, &mut self.lat, self.work_ns);
    }
}

fn lat_capacity(duration_ns: u64) -> usize {
    // At most one event per ~1 µs per queue.
    usize::try_from(duration_ns / 1000)
        .unwrap_or(1 << 20)
        .min(1 << 24)
}

/// Registers one polled device handler per queue.
fn add_devices(
    ctx: &mut AioContext,
    qs: &[Arc<Queue>],
    cap: usize,
    work_ns: u64,
    tx: &Sender<Vec<u32>>,
) {
    for q in qs {
        ctx.add_polled_fd_handler(
            q.kick.clone(),
            Interest::READABLE,
            AioDev {
                q: q.clone(),
                consumed: 0,
                lat: Vec::with_capacity(cap),
                work_ns,
                out: tx.clone(),
            },
        )
        .expect("add handler");
    }
}

/// Runs `mode` against `gaps` (one queue each) for `duration_ns`.
pub fn run(mode: Mode, gaps: &[Gap], duration_ns: u64, work_ns: u64) -> RunResult {
    let queues: Vec<(Arc<Queue>, Gap)> = gaps.iter().map(|g| (Queue::new(), *g)).collect();
    let ready = Arc::new(Barrier::new(2));
    let stop = Arc::new(AtomicBool::new(false));
    let cap = lat_capacity(duration_ns);

    let qs: Vec<Arc<Queue>> = queues.iter().map(|(q, _)| q.clone()).collect();
    let (r2, s2) = (ready.clone(), stop.clone());
    let (htx, hrx) = channel();
    let consumer = std::thread::Builder::new()
        .name("bench-consumer".into())
        .spawn(move || -> (u64, Vec<u32>, Option<Stats>) {
            setup_thread(1);
            match mode {
                Mode::Busy => {
                    for q in &qs {
                        q.disable_notify();
                    }
                    let mut consumed = vec![0u64; qs.len()];
                    let mut lat = Vec::with_capacity(cap);
                    r2.wait();
                    let cpu0 = thread_cpu_time_ns();
                    while !s2.load(Ordering::Relaxed) {
                        for (q, c) in qs.iter().zip(consumed.iter_mut()) {
                            if q.has_work(*c) {
                                q.process(c, &mut lat, work_ns);
                            }
                        }
                        std::hint::spin_loop();
                    }
                    (thread_cpu_time_ns() - cpu0, lat, None)
                }
                Mode::EventManager => {
                    let mut em = EventManager::<EmDev>::new().expect("event manager");
                    let mut ids = Vec::new();
                    for q in &qs {
                        use event_manager::SubscriberOps;
                        ids.push(em.add_subscriber(EmDev {
                            q: q.clone(),
                            consumed: 0,
                            lat: Vec::with_capacity(cap),
                            work_ns,
                        }));
                    }
                    r2.wait();
                    let cpu0 = thread_cpu_time_ns();
                    while !s2.load(Ordering::Acquire) {
                        let _ = em.run();
                    }
                    let cpu = thread_cpu_time_ns() - cpu0;
                    let mut lat = Vec::new();
                    for id in ids {
                        use event_manager::SubscriberOps;
                        if let Ok(d) = em.subscriber_mut(id) {
                            lat.append(&mut d.lat);
                        }
                    }
                    (cpu, lat, None)
                }
                Mode::Nested(_) => {
                    let params = mode.params().unwrap_or_default();
                    let mut ctx = AioContext::with_params(params).expect("context");
                    let (tx, rx) = channel();
                    add_devices(&mut ctx, &qs, cap, work_ns, &tx);
                    drop(tx);
                    htx.send(ctx.handle()).expect("send handle");
                    let mut em = EventManager::<NestedContext>::new().expect("event manager");
                    use event_manager::SubscriberOps;
                    let id = em.add_subscriber(NestedContext::new(ctx).expect("nest"));
                    r2.wait();
                    let cpu0 = thread_cpu_time_ns();
                    while !s2.load(Ordering::Acquire) {
                        let _ = em.run();
                    }
                    let cpu = thread_cpu_time_ns() - cpu0;
                    let nested = em.remove_subscriber(id).expect("subscriber");
                    let stats = nested.context().stats();
                    drop(nested);
                    drop(em);
                    let mut lat = Vec::new();
                    for mut l in rx.iter() {
                        lat.append(&mut l);
                    }
                    (cpu, lat, Some(stats))
                }
                _ => {
                    let params = mode.params().unwrap_or_default();
                    let mut ctx = AioContext::with_params(params).expect("context");
                    let (tx, rx) = channel();
                    add_devices(&mut ctx, &qs, cap, work_ns, &tx);
                    drop(tx);
                    htx.send(ctx.handle()).expect("send handle");
                    r2.wait();
                    let cpu0 = thread_cpu_time_ns();
                    ctx.run(|_| false).expect("loop");
                    let cpu = thread_cpu_time_ns() - cpu0;
                    let stats = ctx.stats();
                    drop(ctx);
                    let mut lat = Vec::new();
                    for mut l in rx.iter() {
                        lat.append(&mut l);
                    }
                    (cpu, lat, Some(stats))
                }
            }
        })
        .expect("spawn consumer");
    let handle = if mode.params().is_some() {
        Some(hrx.recv().expect("handle"))
    } else {
        None
    };
    ready.wait();
    let t0 = monotonic_ns();
    run_producer(&queues, duration_ns, &AtomicBool::new(false));
    let wall_ns = monotonic_ns() - t0;
    stop.store(true, Ordering::Release);
    if let Some(h) = &handle {
        // Standalone: leaves `run`; nested: wakes the outer loop, which then
        // sees `stop`.
        h.request_stop();
    }
    if let Some((q, _)) = queues.first() {
        // Wakes an event-manager consumer blocked in epoll_wait.
        let _ = q.kick.write(1);
    }
    let (cpu_ns, lat, stats) = consumer.join().expect("consumer panicked");
    let events = queues
        .iter()
        .map(|(q, _)| q.consumed.load(Ordering::Acquire))
        .sum();
    RunResult {
        events,
        wall_ns,
        cpu_ns,
        lat,
        kicks: queues
            .iter()
            .map(|(q, _)| q.kicks.load(Ordering::Relaxed))
            .sum(),
        kicks_avoided: queues
            .iter()
            .map(|(q, _)| q.kicks_avoided.load(Ordering::Relaxed))
            .sum(),
        stats,
    }
}

/// Which consumer an idle measurement runs.
#[derive(Clone, Copy, Debug)]
pub enum Idle {
    /// rust-vmm event-manager.
    EventManager,
    /// aio-poll standalone with these parameters.
    Aio(PollParams),
    /// aio-poll with these parameters nested in event-manager.
    Nested(PollParams),
}

/// CPU the consumer thread burns while idle for `idle_ms` right after some
/// activity: includes the last polling window before the loop sleeps,
/// excludes the final wake-up.
pub fn idle_cpu_ns(kind: Idle, idle_ms: u64) -> u64 {
    let q = Queue::new();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    let q2 = q.clone();
    let s2 = stop.clone();
    let t = std::thread::spawn(move || {
        setup_thread(1);
        idle_body(kind, q2, s2, tx)
    });
    let (handle, clock) = rx.recv().expect("handle");
    // Read the idle thread's CPU clock from here, so that neither its final
    // wake-up nor the measurement itself is counted.
    let cpu0 = clock_ns(clock);
    std::thread::sleep(std::time::Duration::from_millis(idle_ms));
    let cpu = clock_ns(clock).saturating_sub(cpu0);
    stop.store(true, Ordering::Release);
    match handle {
        Some(h) => h.request_stop(),
        None => {
            let _ = q.kick.write(1);
        }
    }
    t.join().expect("idle thread");
    cpu
}

/// The calling thread's CPU-time clock id (readable from other threads).
fn own_cpu_clock() -> libc::clockid_t {
    let mut id: libc::clockid_t = libc::CLOCK_THREAD_CPUTIME_ID;
    // SAFETY: pthread_self() is the calling thread; `id` is a valid out pointer.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) };
    if rc != 0 {
        eprintln!("warning: pthread_getcpuclockid failed ({rc})");
    }
    id
}

fn idle_body(
    kind: Idle,
    q2: Arc<Queue>,
    s2: Arc<AtomicBool>,
    tx: Sender<(Option<aio_poll::ContextHandle>, libc::clockid_t)>,
) {
    use event_manager::SubscriberOps;
    match kind {
        Idle::Aio(p) | Idle::Nested(p) => {
            let mut ctx = AioContext::with_params(p).expect("context");
            let (ltx, _lrx) = channel();
            add_devices(&mut ctx, std::slice::from_ref(&q2), 0, 0, &ltx);
            if let Idle::Nested(_) = kind {
                let mut em = EventManager::<NestedContext>::new().expect("em");
                let id = em.add_subscriber(NestedContext::new(ctx).expect("nest"));
                // Some activity so the handler is on the poll list.
                for i in 1..=100 {
                    q2.publish_for_bench();
                    while q2.consumed.load(Ordering::Acquire) < i {
                        let _ = em.run();
                    }
                }
                let handle = em
                    .subscriber_mut(id)
                    .expect("subscriber")
                    .context()
                    .handle();
                tx.send((Some(handle), own_cpu_clock())).expect("send");
                while !s2.load(Ordering::Acquire) {
                    let _ = em.run();
                }
                return;
            }
            for _ in 0..100 {
                q2.publish_for_bench();
                ctx.poll(true).expect("poll");
            }
            tx.send((Some(ctx.handle()), own_cpu_clock()))
                .expect("send");
            ctx.run(|_| false).expect("loop");
        }
        Idle::EventManager => {
            let mut em = EventManager::<EmDev>::new().expect("em");
            em.add_subscriber(EmDev {
                q: q2.clone(),
                consumed: 0,
                lat: Vec::new(),
                work_ns: 0,
            });
            for _ in 0..100 {
                q2.publish_for_bench();
                let _ = em.run();
            }
            tx.send((None, own_cpu_clock())).expect("send");
            while !s2.load(Ordering::Acquire) {
                let _ = em.run();
            }
        }
    }
}

//! The device side in each benchmark mode, run on its own thread.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Barrier};

use aio_poll::clock::thread_cpu_time_ns;
use aio_poll::{AioContext, FdHandler, Interest, PollAlgorithm, PollParams, Stats};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};

use crate::workload::{run_producer, setup_thread, Gap, Queue};

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
}

impl Mode {
    pub fn name(&self) -> String {
        match self {
            Mode::Blocking => "blocking (max_ns=0)".into(),
            Mode::Busy => "busy poll".into(),
            Mode::Classic => "classic".into(),
            Mode::Weighted(w) => format!("weighted w={w}"),
            Mode::EventManager => "event-manager".into(),
        }
    }

    fn params(&self) -> Option<PollParams> {
        match self {
            Mode::Blocking => Some(PollParams::disabled()),
            Mode::Classic => Some(PollParams::default().with_algorithm(PollAlgorithm::Classic)),
            Mode::Weighted(w) => Some(PollParams::default().with_weight(*w)),
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
    fn read(&mut self, _ctx: &mut AioContext) {
        let _ = self.q.kick.read();
        self.q
            .process(&mut self.consumed, &mut self.lat, self.work_ns);
    }
    fn has_poll(&self) -> bool {
        true
    }
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
                _ => {
                    let params = mode.params().unwrap_or_default();
                    let mut ctx = AioContext::with_params(params).expect("context");
                    let (tx, rx) = channel();
                    for q in &qs {
                        ctx.add_fd_handler(
                            q.kick.as_raw_fd(),
                            Interest::READABLE,
                            Box::new(AioDev {
                                q: q.clone(),
                                consumed: 0,
                                lat: Vec::with_capacity(cap),
                                work_ns,
                                out: tx.clone(),
                            }),
                        )
                        .expect("add handler");
                    }
                    drop(tx);
                    htx.send(ctx.handle()).expect("send handle");
                    r2.wait();
                    let cpu0 = thread_cpu_time_ns();
                    ctx.run(|_| false);
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
    let t0 = aio_poll::clock::monotonic_ns();
    run_producer(&queues, duration_ns, &AtomicBool::new(false));
    let wall_ns = aio_poll::clock::monotonic_ns() - t0;
    stop.store(true, Ordering::Release);
    if let Some(h) = &handle {
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

/// CPU the consumer thread burns while idle for `idle_ms` right after some
/// activity (aio-poll with `params`, or event-manager when `None`): includes
/// the last polling window before the loop sleeps, excludes the final wake-up.
pub fn idle_cpu_ns(params: Option<PollParams>, idle_ms: u64) -> u64 {
    let q = Queue::new();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    let q2 = q.clone();
    let s2 = stop.clone();
    let t = std::thread::spawn(move || {
        setup_thread(1);
        idle_body(params, q2, s2, tx)
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

fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn idle_body(
    params: Option<PollParams>,
    q2: Arc<Queue>,
    s2: Arc<AtomicBool>,
    tx: Sender<(Option<aio_poll::ContextHandle>, libc::clockid_t)>,
) {
    match params {
        Some(p) => {
            let mut ctx = AioContext::with_params(p).expect("context");
            let (ltx, _lrx) = channel();
            ctx.add_fd_handler(
                q2.kick.as_raw_fd(),
                Interest::READABLE,
                Box::new(AioDev {
                    q: q2.clone(),
                    consumed: 0,
                    lat: Vec::new(),
                    work_ns: 0,
                    out: ltx,
                }),
            )
            .expect("add");
            // Some activity so the handler is on the poll list.
            for _ in 0..100 {
                q2.publish_for_bench();
                ctx.poll(true);
            }
            tx.send((Some(ctx.handle()), own_cpu_clock()))
                .expect("send");
            ctx.run(|_| false);
        }
        None => {
            use event_manager::SubscriberOps;
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

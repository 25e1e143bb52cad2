// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An AioContext nested in a rust-vmm `event-manager` loop through
//! `NestedContext`: fd handlers, timers with no timeout plumbing, bottom
//! halves from other threads, adaptive polling kept, zero idle CPU.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use aio_poll::{AioContext, FnHandler, Interest, NestedContext, PollParams, SharedEventFd};
use common::{add_queue, eventfd, thread_cpu_time_ns, with_watchdog, Probe, Queue};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Outer loops in these tests always block without a timeout (`run()`):
/// only the nested context's fd can wake them.
fn nested(params: PollParams) -> (EventManager<NestedContext>, event_manager::SubscriberId) {
    let ctx = AioContext::with_params(params).unwrap();
    let mut em = EventManager::<NestedContext>::new().unwrap();
    let id = em.add_subscriber(NestedContext::new(ctx).unwrap());
    (em, id)
}

fn ctx_of(
    em: &mut EventManager<NestedContext>,
    id: event_manager::SubscriberId,
) -> &mut AioContext {
    em.subscriber_mut(id).unwrap().context_mut()
}

#[test]
fn fd_handler_and_timer_without_timeout_plumbing() {
    with_watchdog(60, || {
        let (mut em, id) = nested(PollParams::default());
        let (efd, writer) = eventfd();
        let reader = efd.clone();
        let reads = Arc::new(AtomicU64::new(0));
        let r = reads.clone();
        let ctx = ctx_of(&mut em, id);
        ctx.add_fd_handler(
            efd,
            Interest::READABLE,
            FnHandler::new(move |_, ready| {
                assert!(ready.is_readable());
                let _ = reader.read();
                r.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        let fired = Arc::new(AtomicU64::new(0));
        let f = fired.clone();
        let now = ctx.now_ns();
        let deadline = now + 20_000_000;
        ctx.add_timer(deadline, None, move |ctx| {
            assert!(ctx.now_ns() >= deadline, "timer fired early");
            f.fetch_add(1, Ordering::SeqCst);
        });
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1));
            writer.write(1).unwrap();
        });
        let mut outer_runs = 0u64;
        while reads.load(Ordering::SeqCst) < 1 || fired.load(Ordering::SeqCst) < 1 {
            // Blocks with no timeout: the timer wakes the loop through the
            // context's timerfd.
            em.run().unwrap();
            outer_runs += 1;
        }
        t.join().unwrap();
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        let sub = em.subscriber_mut(id).unwrap();
        assert!(sub.take_error().is_none());
        let s = sub.context().stats();
        assert_eq!(s.timer_runs, 1);
        assert_eq!(s.dispatches, 1);
        // A blocked outer loop, not a spinning one: a handful of wake-ups
        // (start, fd, timer, the polling window after the fd event), not
        // thousands of timeout-0 rounds.
        assert!(outer_runs < 1000, "outer loop ran {outer_runs} times");
    });
}

#[test]
fn periodic_timer_and_cancel_while_nested() {
    with_watchdog(60, || {
        let (mut em, id) = nested(PollParams::disabled());
        let ticks = Arc::new(AtomicU64::new(0));
        let t2 = ticks.clone();
        let ctx = ctx_of(&mut em, id);
        let now = ctx.now_ns();
        let periodic = ctx.add_timer(now + 2_000_000, Some(2_000_000), move |_| {
            t2.fetch_add(1, Ordering::SeqCst);
        });
        let never = ctx.add_timer(now + 1_000_000, None, |_| panic!("cancelled timer ran"));
        assert!(ctx.cancel_timer(never));
        while ticks.load(Ordering::SeqCst) < 5 {
            em.run().unwrap();
        }
        assert!(ctx_of(&mut em, id).cancel_timer(periodic));
        assert_eq!(ctx_of(&mut em, id).timer_count(), 0);
    });
}

#[test]
fn bottom_halves_from_other_threads_wake_the_outer_loop() {
    with_watchdog(120, || {
        let (mut em, id) = nested(PollParams::default());
        let handle = ctx_of(&mut em, id).handle();
        let runs = Arc::new(AtomicU64::new(0));
        const N: u64 = 2000;
        let r = runs.clone();
        let t = std::thread::spawn(move || {
            for i in 0..N {
                let r2 = r.clone();
                handle.schedule_oneshot(move |ctx| {
                    // Runs on the outer loop's thread, inside the context.
                    assert!(ctx.handle().is_loop_thread());
                    r2.fetch_add(1, Ordering::SeqCst);
                });
                if i % 8 == 0 {
                    // Let the outer loop go back to sleep now and then.
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        while runs.load(Ordering::SeqCst) < N {
            em.run().unwrap();
        }
        t.join().unwrap();
        let sub = em.subscriber_mut(id).unwrap();
        assert!(
            sub.context().handle().notify_syscalls() > 0,
            "the sleeping outer loop was woken through the eventfd"
        );
        assert_eq!(sub.context().stats().bh_runs, N);
        // Nothing left behind: the context goes back to sleep.
        assert!(!sub.dispatch().unwrap());
    });
}

/// Another subscriber of the same outer loop, counting its events.
struct Pinger {
    efd: EventFd,
    seen: Arc<AtomicU64>,
}

impl MutEventSubscriber for Pinger {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.efd, EventSet::IN)).unwrap();
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.efd.read();
        self.seen.fetch_add(1, Ordering::SeqCst);
    }
}

enum Sub {
    Aio(Box<NestedContext>),
    Ping(Pinger),
}

impl MutEventSubscriber for Sub {
    fn init(&mut self, ops: &mut EventOps) {
        match self {
            Sub::Aio(s) => s.init(ops),
            Sub::Ping(s) => s.init(ops),
        }
    }
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self {
            Sub::Aio(s) => s.process(events, ops),
            Sub::Ping(s) => s.process(events, ops),
        }
    }
}

/// While nested, the context still polls: a guest-like producer publishes
/// entries without kicking (notifications suppressed by `poll_begin`) and
/// the poll handler finds them, with no fd event. Meanwhile the outer loop
/// keeps serving its other subscriber.
#[test]
fn polling_happens_when_nested_and_other_subscribers_are_served() {
    with_watchdog(240, || {
        // A long window (10 ms max) so that the 100 µs gaps are polled for.
        let params = PollParams::default().with_max_ns(10_000_000);
        let mut ctx = AioContext::with_params(params).unwrap();
        let q = Queue::new();
        let probe = Probe::default();
        let qid = add_queue(&mut ctx, &q, &probe);
        let mut em = EventManager::<Sub>::new().unwrap();
        let aio = em.add_subscriber(Sub::Aio(Box::new(NestedContext::new(ctx).unwrap())));
        let ping_fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let ping_writer = ping_fd.try_clone().unwrap();
        let pings = Arc::new(AtomicU64::new(0));
        em.add_subscriber(Sub::Ping(Pinger {
            efd: ping_fd,
            seen: pings.clone(),
        }));

        const N: u64 = 2000;
        let q2 = q.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let producer = std::thread::spawn(move || {
            for i in 0..N {
                q2.push();
                // Wait until consumed, then think ~100 µs (closed loop).
                while q2.consumed.load(Ordering::SeqCst) <= i {
                    std::hint::spin_loop();
                    if s2.load(Ordering::SeqCst) {
                        return;
                    }
                }
                let t0 = std::time::Instant::now();
                while t0.elapsed() < Duration::from_micros(100) {
                    std::hint::spin_loop();
                }
            }
        });
        let pinger = std::thread::spawn(move || {
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(2));
                ping_writer.write(1).unwrap();
            }
        });
        while q.consumed.load(Ordering::SeqCst) < N || pings.load(Ordering::SeqCst) < 1 {
            em.run().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        producer.join().unwrap();
        pinger.join().unwrap();
        assert_eq!(q.consumed.load(Ordering::SeqCst), N);
        assert!(pings.load(Ordering::SeqCst) >= 1);
        let Ok(Sub::Aio(nested)) = em.subscriber_mut(aio) else {
            panic!("no aio subscriber");
        };
        let s = nested.context().stats();
        let kicks = q.kicks.load(Ordering::SeqCst);
        eprintln!(
            "nested polling: {N} entries, {kicks} kicks, successful_polls={} poll_ready={} \
             poll_time_ns={} poll_ns={}",
            s.successful_polls,
            Probe::get(&probe.poll_ready),
            s.poll_time_ns,
            s.poll_ns
        );
        assert!(nested.context().is_on_poll_list(qid));
        assert!(s.successful_polls > 0, "never found work by polling: {s:?}");
        assert!(
            Probe::get(&probe.poll_ready) > 0,
            "no entry was served by poll_ready"
        );
        assert!(
            kicks < N,
            "every entry needed a kick: notifications were never suppressed"
        );
        assert!(s.poll_time_ns > 0);
    });
}

/// After activity, a nested context with a poll handler goes idle: the outer
/// loop blocks and its thread burns (almost) no CPU.
#[test]
fn idle_nested_context_burns_no_cpu() {
    for params in [PollParams::default(), PollParams::disabled()] {
        let (cpu, runs) = with_watchdog(60, move || {
            let (tx, rx) = mpsc::channel();
            let t = std::thread::spawn(move || {
                let mut ctx = AioContext::with_params(params).unwrap();
                let q = Queue::new();
                let probe = Probe::default();
                add_queue(&mut ctx, &q, &probe);
                let mut em = EventManager::<NestedContext>::new().unwrap();
                let id = em.add_subscriber(NestedContext::new(ctx).unwrap());
                for i in 1..=100 {
                    q.push();
                    while q.consumed.load(Ordering::SeqCst) < i {
                        em.run().unwrap();
                    }
                }
                let handle = ctx_of(&mut em, id).handle();
                let stop = Arc::new(AtomicBool::new(false));
                tx.send((handle, stop.clone())).unwrap();
                let cpu0 = thread_cpu_time_ns();
                let mut runs = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    em.run().unwrap();
                    runs += 1;
                }
                (thread_cpu_time_ns() - cpu0, runs)
            });
            let (handle, stop) = rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::SeqCst);
            handle.notify();
            t.join().unwrap()
        });
        // Generous bound for a loaded machine: one last polling window
        // (<= 32 µs) plus the wake-ups.
        assert!(cpu < 20_000_000, "{params:?}: idle used {cpu} ns of CPU");
        assert!(
            runs < 100,
            "{params:?}: outer loop ran {runs} times while idle"
        );
    }
}

/// Issue #16 nested: with `poll-max-ns` and `poll-grow` at `i64::MAX` the
/// polling window becomes `i64::MAX`; an fd handler that is not on the poll
/// list and a periodic timer still get their turn.
#[test]
fn huge_poll_window_still_serves_fds_and_timers_when_nested() {
    with_watchdog(120, || {
        let params = PollParams::default()
            .with_max_ns(i64::MAX)
            .with_grow_shrink(i64::MAX, 0);
        let (mut em, id) = nested(params);
        let q = Queue::new();
        let probe = Probe::default();
        let ctx = ctx_of(&mut em, id);
        add_queue(ctx, &q, &probe);
        // A plain fd handler (never on the poll list).
        let plain = SharedEventFd::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let reader = plain.clone();
        let plain_reads = Arc::new(AtomicU64::new(0));
        let pr = plain_reads.clone();
        ctx.add_fd_handler(
            plain.clone(),
            Interest::READABLE,
            FnHandler::new(move |_, _| {
                // Writes may coalesce: count the eventfd's value.
                pr.fetch_add(reader.read().unwrap_or(0), Ordering::SeqCst);
            }),
        )
        .unwrap();
        // Grow the window: queue events with lengthening intervals; as soon
        // as the smoothed interval exceeds the window, one grow step
        // (x i64::MAX) saturates it.
        for i in 1..=12u64 {
            let q2 = q.clone();
            let producer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(1 << i.min(6)));
                q2.push();
            });
            while q.consumed.load(Ordering::SeqCst) < i {
                em.run().unwrap();
            }
            producer.join().unwrap();
            if ctx_of(&mut em, id).poll_ns() > 3_600_000_000_000 {
                break;
            }
        }
        // grow = i64::MAX saturates the window at i64::MAX (~292 years);
        // each later dispatch with a short interval halves it at most once.
        let window = ctx_of(&mut em, id).poll_ns();
        assert!(window > 3_600_000_000_000, "window {window} ns");
        let now = ctx_of(&mut em, id).now_ns();
        let ticks = Arc::new(AtomicU64::new(0));
        let t2 = ticks.clone();
        ctx_of(&mut em, id).add_timer(now + 2_000_000, Some(2_000_000), move |_| {
            t2.fetch_add(1, Ordering::SeqCst);
        });
        for k in 1..=3 {
            plain.write(1).unwrap();
            while plain_reads.load(Ordering::SeqCst) < k {
                em.run().unwrap();
            }
        }
        while ticks.load(Ordering::SeqCst) < 3 {
            em.run().unwrap();
        }
        // And the queue is still served.
        let consumed = q.consumed.load(Ordering::SeqCst);
        q.push();
        while q.consumed.load(Ordering::SeqCst) < consumed + 1 {
            em.run().unwrap();
        }
    });
}

#[test]
fn into_inner_runs_standalone_again() {
    with_watchdog(60, || {
        let (mut em, id) = nested(PollParams::default());
        let handle = ctx_of(&mut em, id).handle();
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        handle.schedule_oneshot(move |_| r.store(true, Ordering::SeqCst));
        while !ran.load(Ordering::SeqCst) {
            em.run().unwrap();
        }
        let nested = em.remove_subscriber(id).unwrap();
        let mut ctx = nested.into_inner();
        let r2 = ran.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            handle.schedule_oneshot(move |_| r2.store(false, Ordering::SeqCst));
        });
        ctx.run(|_| !ran.load(Ordering::SeqCst)).unwrap();
        t.join().unwrap();
    });
}

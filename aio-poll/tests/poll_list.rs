// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The poll list: join on first dispatch, poll mode begin/end, leave after
//! the (injected) idle timeout with a final poll; nothing at all with
//! `max_ns = 0`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use aio_poll::{AioContext, PollAlgorithm, PollParams};
use common::{add_queue, with_watchdog, Probe, Queue};

#[test]
fn no_poll_list_when_polling_disabled() {
    let mut ctx = AioContext::with_params(PollParams::disabled()).unwrap();
    let q = Queue::new();
    let probe = Probe::default();
    let id = add_queue(&mut ctx, &q, &probe);
    for _ in 0..10 {
        q.push();
        assert!(ctx.poll(true).unwrap());
    }
    assert!(!ctx.is_on_poll_list(id));
    assert_eq!(Probe::get(&probe.begins), 0);
    assert_eq!(Probe::get(&probe.ends), 0);
    assert_eq!(Probe::get(&probe.polls_true), 0);
    assert_eq!(Probe::get(&probe.reads), 10);
    let s = ctx.stats();
    assert_eq!(s.poll_time_ns, 0);
    assert_eq!(s.poll_ns_histogram.samples, 0);
    assert!(s.handlers.is_empty());
}

#[test]
fn join_on_dispatch_poll_mode_and_idle_leave() {
    with_watchdog(120, || {
        // Classic: the first dispatch grows ns to 4000 deterministically, so
        // the loop keeps polling (and checking idleness) on every iteration.
        let params = PollParams::default()
            .with_algorithm(PollAlgorithm::Classic)
            .with_max_ns(10_000_000);
        let mut ctx = AioContext::with_params(params).unwrap();
        ctx.set_poll_idle_timeout(Duration::from_millis(30));
        let q = Queue::new();
        let probe = Probe::default();
        let id = add_queue(&mut ctx, &q, &probe);
        assert!(!ctx.is_on_poll_list(id));
        q.push();
        assert!(ctx.poll(true).unwrap());
        assert!(ctx.is_on_poll_list(id), "joins on first dispatch");
        assert_eq!(Probe::get(&probe.reads), 1);
        let s = ctx.stats();
        assert_eq!(s.handlers.len(), 1);
        assert_eq!(s.handlers[0].ns, 4000);
        assert_eq!(s.poll_ns, 4000);

        // Entry published while the loop polls: found by poll(), no kick.
        q.push();
        assert!(ctx.poll(true).unwrap());
        assert!(Probe::get(&probe.poll_ready) >= 1 || Probe::get(&probe.reads) == 2);

        // Idle: a periodic timer keeps the loop iterating; after 30 ms without
        // dispatch the handler leaves the list (poll_end, final poll).
        let now = ctx.now_ns();
        ctx.add_timer(now + 2_000_000, Some(2_000_000), |_| {});
        let mut iterations = 0;
        while ctx.is_on_poll_list(id) {
            ctx.poll(true).unwrap();
            iterations += 1;
            assert!(iterations < 100_000, "never left the poll list");
        }
        assert!(!ctx.in_poll_mode() || ctx.stats().handlers.is_empty());
        assert!(ctx.stats().handlers.is_empty());
        // Classic window = max ns over the (now empty) poll list.
        assert_eq!(ctx.poll_ns(), 0);
        // Leaving poll mode re-enabled notifications: begins == ends.
        assert_eq!(Probe::get(&probe.begins), Probe::get(&probe.ends));
        assert!(q.notify_enabled.load(Ordering::SeqCst));
        // Rejoins on the next dispatch.
        q.push();
        while !ctx.is_on_poll_list(id) {
            ctx.poll(true).unwrap();
        }
        assert_eq!(q.consumed.load(Ordering::SeqCst), 3);
    });
}

#[test]
fn final_poll_catches_event_raced_with_poll_end() {
    // A handler whose poll_end publishes an entry (the race: the guest
    // added one while notifications were still suppressed, so no kick).
    use aio_poll::{FdHandler, PollHandler, Readiness};
    use std::sync::Arc;

    struct Racy {
        q: Arc<Queue>,
        inject: bool,
        ready_runs: u64,
    }
    impl FdHandler for Racy {
        fn ready(&mut self, _ctx: &mut AioContext, _ready: Readiness) {
            let _ = self.q.kick.read();
            let p = self.q.produced.load(Ordering::SeqCst);
            self.q.consumed.store(p, Ordering::SeqCst);
        }
    }
    impl PollHandler for Racy {
        fn poll(&mut self) -> bool {
            self.q.produced.load(Ordering::SeqCst) > self.q.consumed.load(Ordering::SeqCst)
        }
        fn poll_ready(&mut self, _ctx: &mut AioContext) {
            self.ready_runs += 1;
            let p = self.q.produced.load(Ordering::SeqCst);
            self.q.consumed.store(p, Ordering::SeqCst);
        }
        fn poll_begin(&mut self) {
            self.q.notify_enabled.store(false, Ordering::SeqCst);
        }
        fn poll_end(&mut self) {
            if self.inject {
                // Arrived before notifications were re-enabled: no kick.
                self.q.produced.fetch_add(1, Ordering::SeqCst);
                self.inject = false;
            }
            self.q.notify_enabled.store(true, Ordering::SeqCst);
        }
    }

    with_watchdog(60, || {
        let mut ctx = AioContext::with_params(
            PollParams::default()
                .with_algorithm(PollAlgorithm::Classic)
                .with_max_ns(10_000_000),
        )
        .unwrap();
        let q = Queue::new();
        ctx.add_polled_fd_handler(
            q.kick.clone(),
            aio_poll::Interest::READABLE,
            Racy {
                q: q.clone(),
                inject: true,
                ready_runs: 0,
            },
        )
        .unwrap();
        q.push();
        assert!(ctx.poll(true).unwrap()); // joins, ns = 4000
                                          // Next blocking poll: polls 4 µs, finds nothing, leaves poll mode;
                                          // poll_end injects an entry without a kick. Without the final poll
                                          // the loop would sleep forever (the watchdog would fire).
        assert!(ctx.poll(true).unwrap());
        assert_eq!(q.consumed.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn poll_only_handler() {
    use aio_poll::PollHandler;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    struct Ring {
        pending: Arc<AtomicU64>,
        done: Arc<AtomicU64>,
    }
    impl PollHandler for Ring {
        fn poll(&mut self) -> bool {
            self.pending.load(Ordering::SeqCst) > 0
        }
        fn poll_ready(&mut self, _ctx: &mut AioContext) {
            let n = self.pending.swap(0, Ordering::SeqCst);
            self.done.fetch_add(n, Ordering::SeqCst);
        }
    }

    with_watchdog(60, || {
        let pending = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let mut ctx = AioContext::new().unwrap();
        let id = ctx
            .add_poll_handler(Ring {
                pending: pending.clone(),
                done: done.clone(),
            })
            .unwrap();
        assert!(ctx.is_on_poll_list(id));
        assert!(matches!(
            ctx.set_interest(id, aio_poll::Interest::READABLE),
            Err(aio_poll::Error::NoFd(_))
        ));
        // Completions found by polling; a notify() wakes a sleeping loop so
        // that the next iteration polls.
        let handle = ctx.handle();
        let p2 = pending.clone();
        let t = std::thread::spawn(move || {
            for _ in 0..100 {
                p2.fetch_add(1, Ordering::SeqCst);
                handle.notify();
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        ctx.run(|_| done.load(Ordering::SeqCst) == 100).unwrap();
        t.join().unwrap();
        // Polling disabled: off the list; enabled again: back on it.
        ctx.set_poll_params(PollParams::disabled()).unwrap();
        assert!(!ctx.is_on_poll_list(id));
        ctx.set_poll_params(PollParams::default()).unwrap();
        assert!(ctx.is_on_poll_list(id));
        ctx.remove_handler(id).unwrap();
        assert_eq!(ctx.handler_count(), 0);
    });
}

/// Issue #16: with `poll-max-ns` and `poll-grow` at `i64::MAX` the window
/// grows to `i64::MAX` (~292 years) on the second dispatch. A handler on
/// the poll list whose `poll()` finds nothing must not keep the loop from
/// fd handlers that are not on the list, from timers, or from leaving the
/// poll list when idle.
#[test]
fn huge_window_does_not_starve_fds_timers_or_idle_removal() {
    use aio_poll::{FnHandler, Interest};
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    with_watchdog(120, || {
        let params = PollParams::default()
            .with_max_ns(i64::MAX)
            .with_grow_shrink(i64::MAX, 0);
        let mut ctx = AioContext::with_params(params).unwrap();
        ctx.set_poll_idle_timeout(Duration::from_millis(300));
        let q = Queue::new();
        let probe = Probe::default();
        let qid = add_queue(&mut ctx, &q, &probe);
        // Dispatches with lengthening intervals: as soon as the smoothed
        // interval exceeds the window, one grow step (x i64::MAX) saturates it.
        for i in 1..=12u64 {
            let q2 = q.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(1 << i.min(6)));
                q2.push();
            });
            while q.consumed.load(Ordering::SeqCst) < i {
                ctx.poll(true).unwrap();
            }
            t.join().unwrap();
            if ctx.poll_ns() > 3_600_000_000_000 {
                break;
            }
        }
        assert!(
            ctx.poll_ns() > 3_600_000_000_000,
            "window {}",
            ctx.poll_ns()
        );
        assert!(ctx.is_on_poll_list(qid));
        // A plain fd handler, never on the poll list.
        let (efd, writer) = common::eventfd();
        let reader = efd.clone();
        let reads = Arc::new(AtomicU64::new(0));
        let r = reads.clone();
        ctx.add_fd_handler(
            efd,
            Interest::READABLE,
            FnHandler::new(move |_, _| {
                // Writes may coalesce: count the eventfd's value.
                r.fetch_add(reader.read().unwrap_or(0), Ordering::SeqCst);
            }),
        )
        .unwrap();
        let t = std::thread::spawn(move || {
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(5));
                writer.write(1).unwrap();
            }
        });
        while reads.load(Ordering::SeqCst) < 3 {
            // Each blocking iteration polls the huge window; the fd must end
            // it through the periodic check.
            ctx.poll(true).unwrap();
        }
        t.join().unwrap();
        // A timer ends it too (the window is capped by the timeout).
        let fired = Arc::new(AtomicU64::new(0));
        let f = fired.clone();
        let now = ctx.now_ns();
        ctx.add_timer(now + 2_000_000, None, move |_| {
            f.fetch_add(1, Ordering::SeqCst);
        });
        while fired.load(Ordering::SeqCst) == 0 {
            ctx.poll(true).unwrap();
        }
        // Idle: the queue leaves the poll list (checked while polling), and
        // then the loop sleeps instead of polling for 292 years. (A periodic
        // timer wakes the sleeping loop so that this thread sees it.)
        let now = ctx.now_ns();
        let ticker = ctx.add_timer(now + 10_000_000, Some(10_000_000), |_| {});
        while ctx.is_on_poll_list(qid) {
            ctx.poll(true).unwrap();
        }
        let s = ctx.stats();
        assert_eq!(s.handlers.len(), 0);
        assert_eq!(Probe::get(&probe.begins), Probe::get(&probe.ends));
        assert!(ctx.cancel_timer(ticker));
        // The queue still works (through its kick, then by polling again).
        let consumed = q.consumed.load(Ordering::SeqCst);
        q.push();
        while q.consumed.load(Ordering::SeqCst) < consumed + 1 {
            ctx.poll(true).unwrap();
        }
    });
}

/// Two emulated virtqueues A (watching B) and B on one loop polling at most
/// 1 ms, both on the poll list, in poll group `group` if given.
struct TwoQueues {
    ctx: AioContext,
    a: std::sync::Arc<Queue>,
    b: std::sync::Arc<Queue>,
    pa: Probe,
    pb: Probe,
    seen: Seen,
}

impl TwoQueues {
    fn new(group: Option<u64>) -> TwoQueues {
        let params = PollParams::default()
            .with_algorithm(PollAlgorithm::Classic)
            .with_max_ns(1_000_000);
        let mut ctx = AioContext::with_params(params).unwrap();
        let (a, b) = (Queue::new(), Queue::new());
        let (pa, pb) = (Probe::default(), Probe::default());
        let seen = Seen::default();
        let ida = add_watching(&mut ctx, &a, &pa, &b, &seen);
        let idb = add_queue(&mut ctx, &b, &pb);
        if let Some(g) = group {
            ctx.set_poll_group(ida, g).unwrap();
            ctx.set_poll_group(idb, g).unwrap();
        }
        a.push();
        b.push();
        assert!(ctx.poll(true).unwrap());
        assert!(ctx.is_on_poll_list(ida) && ctx.is_on_poll_list(idb));
        seen.lock().unwrap().clear();
        TwoQueues {
            ctx,
            a,
            b,
            pa,
            pb,
            seen,
        }
    }

    /// Runs the loop until A's next entry is consumed; A is kicked 200 ms
    /// from now, when the loop (polling at most 1 ms) sleeps.
    fn sleep_until_a_kicked(&mut self) {
        let waits = self.ctx.stats().blocking_waits;
        let consumed = self.a.consumed.load(Ordering::SeqCst);
        let a = self.a.clone();
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            a.push();
        });
        while self.a.consumed.load(Ordering::SeqCst) <= consumed {
            self.ctx.poll(true).unwrap();
        }
        kicker.join().unwrap();
        assert!(
            self.ctx.stats().blocking_waits > waits,
            "the loop never slept"
        );
    }
}

#[test]
fn wake_up_resumes_poll_mode_for_the_queues_that_did_not_kick() {
    // After a sleep ended by queue A's kick, the loop re-enters poll mode
    // before dispatching: B (no event) gets poll_begin at once, so the guest
    // cannot kick it while A is being served; A is served outside poll mode
    // and begun by the next polling phase; every begin is ended before the
    // loop sleeps again.
    with_watchdog(60, || {
        let mut t = TwoQueues::new(None);
        t.sleep_until_a_kicked();
        let TwoQueues {
            ctx,
            a,
            b,
            pa,
            pb,
            seen,
        } = &mut t;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(true, false)],
            "A served outside poll mode, B already suppressed"
        );
        assert!(ctx.in_poll_mode());
        assert_eq!(
            Probe::get(&pa.begins),
            Probe::get(&pa.ends),
            "A not begun yet"
        );
        assert_eq!(Probe::get(&pb.begins), Probe::get(&pb.ends) + 1, "B begun");

        // The next polling phase begins A; the sleep after it ends both.
        let a_begins = Probe::get(&pa.begins);
        let now = ctx.now_ns();
        ctx.add_timer(now + 20_000_000, None, |_| {});
        let waits = ctx.stats().blocking_waits;
        while ctx.stats().blocking_waits == waits {
            ctx.poll(true).unwrap();
        }
        assert_eq!(
            Probe::get(&pa.begins),
            a_begins + 1,
            "A begun by the polling phase"
        );
        assert_eq!(Probe::get(&pa.begins), Probe::get(&pa.ends));
        assert_eq!(Probe::get(&pb.begins), Probe::get(&pb.ends));
        assert!(a.notify_enabled.load(Ordering::SeqCst) && b.notify_enabled.load(Ordering::SeqCst));
    });
}

#[test]
fn nested_wake_up_resumes_poll_mode_too() {
    // The same wake-up as above with the context nested in an outer loop
    // (here poll(2) on its fd): the dispatch that finishes the iteration the
    // outer loop slept for begins B before A is served.
    with_watchdog(60, || {
        let TwoQueues {
            ctx,
            a,
            pa,
            pb,
            seen,
            ..
        } = TwoQueues::new(None);
        let mut nested = aio_poll::NestedContext::new(ctx).unwrap();
        let consumed = a.consumed.load(Ordering::SeqCst);
        let kicked = a.clone();
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            kicked.push();
        });
        let mut longest = Duration::ZERO;
        while a.consumed.load(Ordering::SeqCst) <= consumed {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&nested),
                events: libc::POLLIN,
                revents: 0,
            };
            let start = std::time::Instant::now();
            // SAFETY: one valid pollfd, for the duration of the call.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, -1) }, 1);
            longest = longest.max(start.elapsed());
            nested.dispatch().unwrap();
        }
        kicker.join().unwrap();
        assert!(
            longest >= Duration::from_millis(100),
            "the outer loop never slept"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(true, false)],
            "A served outside poll mode, B already suppressed"
        );
        assert!(nested.context().in_poll_mode());
        assert_eq!(
            Probe::get(&pa.begins),
            Probe::get(&pa.ends),
            "A not begun yet"
        );
        assert_eq!(Probe::get(&pb.begins), Probe::get(&pb.ends) + 1, "B begun");
    });
}

#[test]
fn wake_up_leaves_the_woken_poll_group_alone() {
    // A and B in one poll group (say a virtqueue's kick handler and its
    // completion handler): A's event counts for B too, so nothing is begun
    // early: at A's dispatch after the sleep, B's notifications are still on.
    with_watchdog(60, || {
        let mut t = TwoQueues::new(Some(7));
        let gone = add_queue(&mut t.ctx, &Queue::new(), &Probe::default());
        t.ctx.remove_handler(gone).unwrap();
        assert!(t.ctx.set_poll_group(gone, 7).is_err(), "stale id accepted");
        t.sleep_until_a_kicked();
        assert_eq!(
            *t.seen.lock().unwrap(),
            vec![(true, true)],
            "B suppressed although its group woke the loop"
        );
        assert!(!t.ctx.in_poll_mode());
    });
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<(bool, bool)>>>;

/// A queue handler that records, at each `ready()`, whether its own and
/// another queue's notifications are enabled.
struct Watching {
    inner: common::QueueHandler,
    other: std::sync::Arc<Queue>,
    seen: Seen,
}

impl aio_poll::FdHandler for Watching {
    fn ready(&mut self, ctx: &mut AioContext, ready: aio_poll::Readiness) {
        let own = self.inner.q.notify_enabled.load(Ordering::SeqCst);
        let other = self.other.notify_enabled.load(Ordering::SeqCst);
        self.seen.lock().unwrap().push((own, other));
        aio_poll::FdHandler::ready(&mut self.inner, ctx, ready);
    }
}
impl aio_poll::PollHandler for Watching {
    fn poll(&mut self) -> bool {
        aio_poll::PollHandler::poll(&mut self.inner)
    }
    fn poll_ready(&mut self, ctx: &mut AioContext) {
        aio_poll::PollHandler::poll_ready(&mut self.inner, ctx)
    }
    fn poll_begin(&mut self) {
        aio_poll::PollHandler::poll_begin(&mut self.inner)
    }
    fn poll_end(&mut self) {
        aio_poll::PollHandler::poll_end(&mut self.inner)
    }
}

/// Adds a [`Watching`] handler for `q` watching `other`.
fn add_watching(
    ctx: &mut AioContext,
    q: &std::sync::Arc<Queue>,
    probe: &Probe,
    other: &std::sync::Arc<Queue>,
    seen: &Seen,
) -> aio_poll::HandlerId {
    ctx.add_polled_fd_handler(
        q.kick.clone(),
        aio_poll::Interest::READABLE,
        Watching {
            inner: common::QueueHandler {
                q: q.clone(),
                probe: probe.clone(),
            },
            other: other.clone(),
            seen: seen.clone(),
        },
    )
    .unwrap()
}

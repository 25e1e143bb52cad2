// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Cross-thread wake-ups: the notify_me protocol, stress without lost wake-ups.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use aio_poll::{AioContext, PollParams};
use common::{add_queue, with_watchdog, Probe, Queue};

const NOTIFIES: u64 = 1_000_000;

/// 1 M notifies from another thread; every so often the producer waits for
/// the consumer to catch up, so the loop goes to sleep and must be woken.
/// A lost wake-up hangs the consumer, which the watchdog turns into a failure.
fn notify_stress(params: PollParams) {
    with_watchdog(240, move || {
        let mut ctx = AioContext::with_params(params).unwrap();
        let handle = ctx.handle();
        let produced = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(AtomicU64::new(0));
        let p = produced.clone();
        let s = seen.clone();
        let producer = std::thread::spawn(move || {
            for i in 1..=NOTIFIES {
                p.store(i, Ordering::SeqCst);
                handle.notify();
                // Ping-pong every 64th notify: wait until the loop saw it,
                // so that the next notify often finds it asleep.
                if i % 64 == 0 {
                    while s.load(Ordering::SeqCst) < i {
                        std::thread::yield_now();
                    }
                }
            }
            handle.notify_syscalls()
        });
        let mut iterations = 0u64;
        loop {
            let p = produced.load(Ordering::SeqCst);
            seen.store(p, Ordering::SeqCst);
            if p == NOTIFIES {
                break;
            }
            ctx.poll(true).unwrap();
            iterations += 1;
        }
        let syscalls = producer.join().unwrap();
        assert!(iterations > 0);
        // As in QEMU, every notify() while the loop may sleep writes the
        // eventfd, so a burst against a sleeping loop costs one write each;
        // never more than one per notify.
        assert!(syscalls <= NOTIFIES, "syscalls {syscalls}");
        // Nothing is left behind: a non-blocking poll makes no progress.
        assert!(!ctx.poll(false).unwrap());
    });
}

#[test]
fn notify_stress_blocking_only() {
    notify_stress(PollParams::disabled());
}

#[test]
fn notify_stress_with_polling() {
    notify_stress(PollParams::default());
}

/// 100 k one-shot BHs from two threads: each runs exactly once.
#[test]
fn oneshot_bh_stress_exact_count() {
    with_watchdog(240, || {
        const PER_THREAD: u64 = 50_000;
        let mut ctx = AioContext::new().unwrap();
        let runs = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..2 {
            let h = ctx.handle();
            let r = runs.clone();
            threads.push(std::thread::spawn(move || {
                for _ in 0..PER_THREAD {
                    let r = r.clone();
                    h.schedule_oneshot(move |_| {
                        r.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }));
        }
        ctx.run(|_| runs.load(Ordering::SeqCst) == 2 * PER_THREAD)
            .unwrap();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!ctx.poll(false).unwrap());
        assert_eq!(runs.load(Ordering::SeqCst), 2 * PER_THREAD);
    });
}

/// The counter proof: while the loop is busy (inside a callback), notify()
/// performs no syscall at all.
#[test]
fn notify_is_free_while_loop_busy() {
    with_watchdog(120, || {
        let mut ctx = AioContext::with_params(PollParams::disabled()).unwrap();
        let handle = ctx.handle();
        let inside = Arc::new(Barrier::new(2));
        let done = Arc::new(AtomicBool::new(false));
        let (i2, d2) = (inside.clone(), done.clone());
        let h2 = handle.clone();
        let notifier = std::thread::spawn(move || {
            i2.wait();
            let before = h2.notify_syscalls();
            for _ in 0..10_000 {
                h2.notify();
            }
            let after = h2.notify_syscalls();
            d2.store(true, Ordering::SeqCst);
            after - before
        });
        let (i3, d3) = (inside.clone(), done.clone());
        ctx.schedule_oneshot(move |_ctx| {
            // The loop is busy running this BH.
            i3.wait();
            while !d3.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
        });
        assert!(ctx.poll(true).unwrap());
        assert_eq!(
            notifier.join().unwrap(),
            0,
            "notify() made syscalls while the loop was busy"
        );
        // The pending notification makes the next blocking poll return at once.
        assert!(!ctx.poll(true).unwrap());

        // A sleeping loop, on the other hand, needs the eventfd write.
        let mut woke_by_syscall = false;
        for _ in 0..50 {
            let h = handle.clone();
            let before = handle.notify_syscalls();
            let t = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                h.notify();
            });
            ctx.poll(true).unwrap();
            t.join().unwrap();
            if handle.notify_syscalls() > before {
                woke_by_syscall = true;
                break;
            }
        }
        assert!(
            woke_by_syscall,
            "a sleeping loop was never woken through the eventfd"
        );
        assert!(ctx.stats().eventfd_wakeups >= 1);
    });
}

/// A polling loop sees guest entries without any kick and without notify
/// syscalls; every entry is consumed (no lost event) with a live producer.
#[test]
fn virtqueue_producer_no_lost_events() {
    with_watchdog(240, || {
        let mut ctx =
            AioContext::with_params(PollParams::default().with_max_ns(2_000_000)).unwrap();
        let q = Queue::new();
        let probe = Probe::default();
        let id = add_queue(&mut ctx, &q, &probe);
        const N: u64 = 20_000;
        let q2 = q.clone();
        let producer = std::thread::spawn(move || {
            for i in 0..N {
                q2.push();
                if i % 16 == 0 {
                    // Let the consumer catch up sometimes (and go idle).
                    while q2.consumed.load(Ordering::SeqCst) < q2.produced.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                }
            }
        });
        ctx.run(|_| q.consumed.load(Ordering::SeqCst) == N).unwrap();
        producer.join().unwrap();
        assert_eq!(q.consumed.load(Ordering::SeqCst), N);
        assert!(ctx.is_on_poll_list(id));
        // poll_begin / poll_end alternate: never two begins without an end.
        let (b, e) = (Probe::get(&probe.begins), Probe::get(&probe.ends));
        assert!(b == e || b == e + 1, "begins {b} ends {e}");
        // Now idle: the loop must leave poll mode before sleeping, so the guest
        // kicks again.
        let q3 = q.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(10));
            q3.push();
        });
        ctx.run(|_| q.consumed.load(Ordering::SeqCst) == N + 1)
            .unwrap();
        t.join().unwrap();
    });
}

/// Deterministic proof for the polling phase: a notify() issued while the
/// loop busy-polls (here from a poll() callback, i.e. certainly inside the
/// polling window) costs no syscall and ends polling at once without being
/// counted as progress.
#[test]
fn notify_during_polling_is_free_and_ends_the_window() {
    use aio_poll::{ContextHandle, FdHandler, PollHandler, Readiness};

    struct Notifying {
        q: Arc<Queue>,
        handle: ContextHandle,
        armed: bool,
        polls_while_armed: Arc<AtomicU64>,
    }
    impl FdHandler for Notifying {
        fn ready(&mut self, _ctx: &mut AioContext, _ready: Readiness) {
            let _ = self.q.kick.read();
        }
    }
    impl PollHandler for Notifying {
        fn poll(&mut self) -> bool {
            if self.armed {
                // First poll() after poll_begin: inside the polling loop.
                self.armed = false;
                self.polls_while_armed.fetch_add(1, Ordering::SeqCst);
                self.handle.notify();
            }
            false
        }
        fn poll_ready(&mut self, _ctx: &mut AioContext) {}
        fn poll_begin(&mut self) {
            self.armed = true;
        }
    }

    with_watchdog(120, || {
        // A large max_ns so that the first interval (~20 ms) becomes the window.
        let mut ctx =
            AioContext::with_params(PollParams::default().with_max_ns(10_000_000_000)).unwrap();
        let q = Queue::new();
        let polls = Arc::new(AtomicU64::new(0));
        ctx.add_polled_fd_handler(
            q.kick.clone(),
            aio_poll::Interest::READABLE,
            Notifying {
                q: q.clone(),
                handle: ctx.handle(),
                armed: false,
                polls_while_armed: polls.clone(),
            },
        )
        .unwrap();
        let q2 = q.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            q2.kick.write(1).unwrap();
        });
        assert!(ctx.poll(true).unwrap()); // dispatched: joins the poll list
        t.join().unwrap();
        assert!(ctx.poll_ns() > 0, "window {}", ctx.poll_ns());
        let syscalls = ctx.handle().notify_syscalls();
        let before = ctx.stats();
        // Polls (poll_begin arms, first poll() notifies), stops at once.
        assert!(!ctx.poll(true).unwrap(), "a bare notify is not progress");
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        assert_eq!(
            ctx.handle().notify_syscalls(),
            syscalls,
            "notify() while polling made a syscall"
        );
        let after = ctx.stats();
        assert_eq!(
            after.blocking_waits, before.blocking_waits,
            "the loop must not have slept"
        );
    });
}

//! Nesting an AioContext inside a rust-vmm `event-manager` loop.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aio_poll::{AioContext, FnHandler, Interest};
use common::{eventfd, with_watchdog};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

/// The subscriber: watches the context's epoll fd; `prepare` before the
/// outer loop sleeps, `check_and_dispatch` when it fires.
struct AioSubscriber {
    ctx: AioContext,
    /// Longest sleep the context allows (timers), for `run_with_timeout`.
    next_timeout: Option<Duration>,
}

impl MutEventSubscriber for AioSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new_raw(self.ctx.as_raw_fd(), EventSet::IN))
            .expect("register epoll fd");
        self.next_timeout = self.ctx.prepare();
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.ctx.check_and_dispatch();
        self.next_timeout = self.ctx.prepare();
    }
}

fn timeout_ms(t: Option<Duration>) -> i32 {
    match t {
        None => -1,
        Some(d) => i32::try_from(d.as_millis() + 1).unwrap_or(i32::MAX),
    }
}

#[test]
fn bh_from_other_thread_wakes_outer_event_manager() {
    with_watchdog(60, || {
        let ctx = AioContext::new().unwrap();
        let handle = ctx.handle();
        let mut em = EventManager::<AioSubscriber>::new().unwrap();
        let id = em.add_subscriber(AioSubscriber {
            ctx,
            next_timeout: None,
        });
        let runs = Arc::new(AtomicU64::new(0));
        const N: u64 = 1000;
        let r = runs.clone();
        let t = std::thread::spawn(move || {
            for _ in 0..N {
                let r2 = r.clone();
                handle.schedule_oneshot(move |ctx| {
                    // Runs on the outer loop's thread, inside the context.
                    assert!(ctx.handle().is_loop_thread());
                    r2.fetch_add(1, Ordering::SeqCst);
                });
                // Let the outer loop go back to sleep now and then.
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        while runs.load(Ordering::SeqCst) < N {
            // Blocks in the outer epoll_wait (no timeout: only our fd can
            // wake it).
            let timeout = timeout_ms(em.subscriber_mut(id).unwrap().next_timeout);
            em.run_with_timeout(timeout).unwrap();
        }
        t.join().unwrap();
        let sub = em.subscriber_mut(id).unwrap();
        assert!(
            sub.ctx.handle().notify_syscalls() > 0,
            "woken through the eventfd"
        );
        assert_eq!(sub.ctx.stats().bh_runs, N);
    });
}

#[test]
fn nested_fd_handler_and_timer() {
    with_watchdog(60, || {
        let mut ctx = AioContext::new().unwrap();
        let (efd, writer) = eventfd();
        let reader = efd.try_clone().unwrap();
        let reads = Arc::new(AtomicU64::new(0));
        let r = reads.clone();
        ctx.add_fd_handler(
            efd.as_raw_fd(),
            Interest::READABLE,
            Box::new(FnHandler::read(move |_| {
                let _ = reader.read();
                r.fetch_add(1, Ordering::SeqCst);
            })),
        )
        .unwrap();
        let fired = Arc::new(AtomicU64::new(0));
        let f = fired.clone();
        let deadline = ctx.now_ns() + 5_000_000;
        ctx.add_timer(deadline, None, move |_| {
            f.fetch_add(1, Ordering::SeqCst);
        });
        let mut em = EventManager::<AioSubscriber>::new().unwrap();
        let id = em.add_subscriber(AioSubscriber {
            ctx,
            next_timeout: None,
        });
        assert!(
            em.subscriber_mut(id).unwrap().next_timeout.is_some(),
            "timer bounds the sleep"
        );
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1));
            writer.write(1).unwrap();
        });
        while reads.load(Ordering::SeqCst) < 1 || fired.load(Ordering::SeqCst) < 1 {
            let sub = em.subscriber_mut(id).unwrap();
            let timeout = timeout_ms(sub.next_timeout);
            if em.run_with_timeout(timeout).unwrap() == 0 {
                // Outer timeout expired: the context's timer is due.
                let sub = em.subscriber_mut(id).unwrap();
                sub.ctx.check_and_dispatch();
                sub.next_timeout = sub.ctx.prepare();
            }
        }
        t.join().unwrap();
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    });
}

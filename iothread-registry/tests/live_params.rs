// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live parameter changes visibly change the loop's behaviour, observed through the
//! IOThread statistics. Count-based: no timing assertions (the machine is shared).

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use aio_poll::{AioContext, FdHandler, Interest, PollHandler, Readiness};
use common::{held, wait_until, TIMEOUT};
use iothread_registry::aio_poll::PollParams;
use iothread_registry::{IoThreadParams, IoThreadRegistry};

/// A virtqueue-like handler: `kick()` adds work and writes an eventfd (like an
/// ioeventfd); `poll()` sees the work without a syscall.
struct Queue {
    fd: Arc<OwnedFd>,
    pending: AtomicU64,
    handled: AtomicU64,
}

impl Queue {
    fn new() -> Arc<Queue> {
        // SAFETY: eventfd(2) with valid flags; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(raw >= 0, "eventfd: {}", std::io::Error::last_os_error());
        Arc::new(Queue {
            // SAFETY: `raw` is a fresh fd owned by nobody else.
            fd: Arc::new(unsafe { OwnedFd::from_raw_fd(raw) }),
            pending: AtomicU64::new(0),
            handled: AtomicU64::new(0),
        })
    }

    fn kick(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(n, 8);
    }

    fn process(&self) {
        let n = self.pending.swap(0, Ordering::AcqRel);
        self.handled.fetch_add(n, Ordering::AcqRel);
    }
}

struct QueueHandler(Arc<Queue>);

impl FdHandler for QueueHandler {
    fn ready(&mut self, _ctx: &mut AioContext, _ready: Readiness) {
        let mut buf = 0u64;
        // SAFETY: reads at most 8 bytes into a valid u64; EAGAIN is fine.
        let _ = unsafe { libc::read(self.0.fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
        self.0.process();
    }
}

impl PollHandler for QueueHandler {
    fn poll(&mut self) -> bool {
        self.0.pending.load(Ordering::Acquire) > 0
    }
    fn poll_ready(&mut self, _ctx: &mut AioContext) {
        self.0.process();
    }
}

/// Kicks `n` times ping-pong style (each kick waits until it was handled).
fn kick_round(q: &Queue, n: u64) {
    for _ in 0..n {
        let target = q.handled.load(Ordering::Acquire) + 1;
        q.kick();
        let start = Instant::now();
        while q.handled.load(Ordering::Acquire) < target {
            assert!(start.elapsed() < TIMEOUT, "kick not handled");
            std::thread::yield_now();
        }
    }
}

fn setup(poll_max_ns: i64) -> (IoThreadRegistry, Arc<Queue>) {
    let r = IoThreadRegistry::new();
    r.create(
        "io0",
        IoThreadParams::default().with_poll(PollParams::default().with_max_ns(poll_max_ns)),
    )
    .unwrap();
    let q = Queue::new();
    let h = Arc::clone(&q);
    // Registered from outside through the IOThread's loop.
    held(&r, "io0")
        .call(move |ctx| {
            // The context keeps its own reference to the eventfd.
            let fd = Arc::clone(&h.fd);
            ctx.add_polled_fd_handler(fd, Interest::READABLE, QueueHandler(h))
        })
        .unwrap()
        .unwrap();
    (r, q)
}

#[test]
fn poll_max_ns_zero_disables_polling_and_nonzero_enables_it() {
    let (r, q) = setup(0);
    kick_round(&q, 500);
    // The snapshot is published at the end of each iteration: it may lag by one.
    assert!(wait_until(|| r.stats("io0").unwrap().poll.dispatches >= 500));
    let s = r.stats("io0").unwrap().poll;
    assert_eq!(s.poll_time_ns, 0, "{s:?}");
    assert_eq!(s.successful_polls, 0);
    assert_eq!(s.poll_ns, 0);

    // Turn polling on at run time (qom-set): keep kicking until the loop has polled.
    r.set_property("io0", "poll-max-ns", 50_000_000).unwrap();
    let start = Instant::now();
    let mut rounds = 0;
    loop {
        kick_round(&q, 50);
        rounds += 1;
        let s = r.stats("io0").unwrap().poll;
        if s.poll_time_ns > 0 && s.successful_polls > 0 {
            eprintln!(
                "polling on after {} kicks: poll_time_ns={} successful_polls={} poll_ns={} grow_count={}",
                rounds * 50,
                s.poll_time_ns,
                s.successful_polls,
                s.poll_ns,
                s.grow_count
            );
            break;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "no polling after {rounds} rounds: {s:?}"
        );
    }

    // And off again: no more polling time accrues.
    r.set_property("io0", "poll-max-ns", 0).unwrap();
    assert!(wait_until(
        || r.stats("io0").unwrap().poll.params.max_ns == 0
    ));
    let before = r.stats("io0").unwrap().poll;
    kick_round(&q, 500);
    let after = r.stats("io0").unwrap().poll;
    assert_eq!(after.poll_time_ns, before.poll_time_ns);
    assert_eq!(after.successful_polls, before.successful_polls);
    assert_eq!(after.poll_ns, 0);
    assert_eq!(q.pending.load(Ordering::Acquire), 0);
}

#[test]
fn poll_weight_change_reaches_the_loop() {
    let (r, q) = setup(50_000_000);
    kick_round(&q, 200);
    let before = r.stats("io0").unwrap().poll;
    assert_eq!(before.params.weight, 3);
    r.set_property("io0", "poll-weight", 7).unwrap();
    assert_eq!(r.get_property("io0", "poll-weight").unwrap(), 7);
    // The loop applies it (its own view of the parameters changes) ...
    assert!(wait_until(
        || r.stats("io0").unwrap().poll.params.weight == 7
    ));
    let after = r.stats("io0").unwrap().poll;
    assert!(after.param_updates > before.param_updates);
    // ... and keeps serving the queue with the new parameters.
    kick_round(&q, 200);
    assert!(wait_until(
        || r.stats("io0").unwrap().poll.dispatches >= after.dispatches + 200
    ));
    // 0 selects the default, reported as the value in use.
    r.set_property("io0", "poll-weight", 0).unwrap();
    assert_eq!(r.get_property("io0", "poll-weight").unwrap(), 3);
    assert!(wait_until(
        || r.stats("io0").unwrap().poll.params.weight == 3
    ));
}

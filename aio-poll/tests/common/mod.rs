// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use aio_poll::{AioContext, FdHandler, PollHandler, Readiness, SharedEventFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Runs `f` on its own thread and fails the test if it does not finish within
/// `secs` seconds (a lost wake-up must fail, never hang). The limit is
/// generous: the machine is shared and heavily loaded.
pub fn with_watchdog<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::Builder::new()
        .name("test-body".into())
        .spawn(move || {
            let r = f();
            let _ = tx.send(());
            r
        })
        .expect("spawn test body");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => t.join().expect("test body panicked"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: test body did not finish within {secs} s (lost wake-up / hang)")
        }
    }
}

/// A shared counter + flag set used to observe handler calls.
#[derive(Clone, Default)]
pub struct Probe {
    pub reads: Arc<AtomicU64>,
    pub writes: Arc<AtomicU64>,
    pub polls_true: Arc<AtomicU64>,
    pub poll_ready: Arc<AtomicU64>,
    pub begins: Arc<AtomicU64>,
    pub ends: Arc<AtomicU64>,
    pub dropped: Arc<AtomicBool>,
}

impl Probe {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

/// An eventfd pair: the registered fd and a clone for reading / writing
/// from handlers and tests.
pub fn eventfd() -> (SharedEventFd, SharedEventFd) {
    let a = SharedEventFd::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let b = a.clone();
    (a, b)
}

/// CPU time consumed by the calling thread (`CLOCK_THREAD_CPUTIME_ID`) in ns.
pub fn thread_cpu_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    u64::try_from(ts.tv_sec).unwrap() * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap()
}

/// Emulated virtqueue: a producer publishes entries and kicks the eventfd only
/// when notifications are enabled (virtio's NO_NOTIFY flag, toggled by
/// poll_begin / poll_end).
pub struct Queue {
    pub produced: AtomicU64,
    pub consumed: AtomicU64,
    pub notify_enabled: AtomicBool,
    pub kick: SharedEventFd,
    pub kicks: AtomicU64,
}

impl Queue {
    pub fn new() -> Arc<Queue> {
        Arc::new(Queue {
            produced: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            notify_enabled: AtomicBool::new(true),
            kick: SharedEventFd::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
            kicks: AtomicU64::new(0),
        })
    }

    /// Guest side: publish one entry, kick if the device wants notifications.
    pub fn push(&self) {
        self.produced.fetch_add(1, Ordering::SeqCst);
        if self.notify_enabled.load(Ordering::SeqCst) {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            let _ = self.kick.write(1);
        }
    }
}

/// Device side of [`Queue`], a poll handler.
pub struct QueueHandler {
    pub q: Arc<Queue>,
    pub probe: Probe,
}

impl QueueHandler {
    fn drain(&mut self) -> bool {
        let p = self.q.produced.load(Ordering::SeqCst);
        let c = self.q.consumed.load(Ordering::SeqCst);
        if p > c {
            self.q.consumed.store(p, Ordering::SeqCst);
            true
        } else {
            false
        }
    }
}

impl FdHandler for QueueHandler {
    fn ready(&mut self, _ctx: &mut AioContext, ready: Readiness) {
        assert!(ready.is_readable(), "{ready:?}");
        let _ = self.q.kick.read();
        self.probe.reads.fetch_add(1, Ordering::SeqCst);
        self.drain();
    }
}

impl PollHandler for QueueHandler {
    fn poll(&mut self) -> bool {
        let r = self.q.produced.load(Ordering::SeqCst) > self.q.consumed.load(Ordering::SeqCst);
        if r {
            self.probe.polls_true.fetch_add(1, Ordering::SeqCst);
        }
        r
    }
    fn poll_ready(&mut self, _ctx: &mut AioContext) {
        self.probe.poll_ready.fetch_add(1, Ordering::SeqCst);
        self.drain();
    }
    fn poll_begin(&mut self) {
        self.probe.begins.fetch_add(1, Ordering::SeqCst);
        self.q.notify_enabled.store(false, Ordering::SeqCst);
    }
    fn poll_end(&mut self) {
        self.probe.ends.fetch_add(1, Ordering::SeqCst);
        self.q.notify_enabled.store(true, Ordering::SeqCst);
    }
}

impl Drop for QueueHandler {
    fn drop(&mut self) {
        self.probe.dropped.store(true, Ordering::SeqCst);
    }
}

/// Registers a [`QueueHandler`] for `q`.
pub fn add_queue(ctx: &mut AioContext, q: &Arc<Queue>, probe: &Probe) -> aio_poll::HandlerId {
    ctx.add_polled_fd_handler(
        q.kick.clone(),
        aio_poll::Interest::READABLE,
        QueueHandler {
            q: q.clone(),
            probe: probe.clone(),
        },
    )
    .expect("add queue handler")
}

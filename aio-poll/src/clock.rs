// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Clocks: the monotonic clock the context runs on, an injectable manual clock
//! for tests, and the per-thread CPU clock used by tests and the benchmark.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A source of nanosecond timestamps. The context reads it for polling
/// windows, `block_ns`, timer deadlines and the poll-list idle timeout.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Current time in ns. Must never go backwards.
    fn now_ns(&self) -> u64;
}

fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        // Only possible for an invalid clock id, which we never pass.
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nsecs = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

/// `CLOCK_MONOTONIC` in ns.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time consumed by the calling thread (`CLOCK_THREAD_CPUTIME_ID`) in ns.
#[cfg(any(test, feature = "unstable"))]
pub fn thread_cpu_time_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The default clock: `CLOCK_MONOTONIC`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }
}

/// A clock that only moves when told to (tests). Cloning shares the time.
///
/// With polling enabled, a *blocking* `poll()` busy-polls until this clock
/// passes the polling window, so either advance it from another thread or
/// drive the context with `poll(false)` (as the crate's tests do). Blocking
/// timeouts are real `epoll_wait` timeouts computed from this clock.
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A manual clock starting at `start_ns`.
    pub fn new(start_ns: u64) -> Self {
        ManualClock {
            now: Arc::new(AtomicU64::new(start_ns)),
        }
    }

    /// Moves the clock forward by `delta_ns` (saturating).
    pub fn advance(&self, delta_ns: u64) {
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(delta_ns))
            });
    }

    /// Sets the clock; ignored if it would move backwards.
    pub fn set(&self, now_ns: u64) {
        self.now.fetch_max(now_ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_does_not_go_back() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
        assert!(thread_cpu_time_ns() > 0);
    }

    #[test]
    fn manual_clock() {
        let c = ManualClock::new(10);
        let c2 = c.clone();
        c.advance(5);
        assert_eq!(c2.now_ns(), 15);
        c.set(3);
        assert_eq!(c.now_ns(), 15);
        c.advance(u64::MAX);
        assert_eq!(c.now_ns(), u64::MAX);
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Statistics as data (serde with the `serde` feature): loop counters, the adaptive state and a
//! histogram of the polling window.
//!
//! See [`PollNsHistogram`] for the definitions of the derived statistics.

use std::sync::atomic::{fence, AtomicU64, Ordering};

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

use crate::params::PollParams;

/// Number of histogram buckets: bucket 0 holds `poll_ns == 0`, bucket `i > 0`
/// holds `2^(i-1) <= poll_ns < 2^i`.
pub const HISTOGRAM_BUCKETS: usize = 65;

/// Histogram and derived counters of the polling window.
///
/// Definitions used by the benchmark table (the seeds' columns):
///
/// * **mean poll_ns** — [`PollNsHistogram::mean_poll_ns`]: the polling window
///   (`poll_ns` at the start of an iteration, i.e. the longest it may poll)
///   averaged over every loop iteration run with polling enabled
///   (`max_ns > 0`). An iteration is sampled when the next one starts.
/// * **reset rate** — [`PollNsHistogram::reset_rate`]: of all per-handler `ns`
///   recomputations (weighted: each EWMA step of a dispatched handler plus each
///   ageing step of a non-dispatched handler with `ns != 0`; classic: each
///   adjustment of a dispatched handler), the fraction that ended at 0 because
///   the value exceeded `max_ns` (weighted) or a shrink reached 0 (classic).
///   [`PollNsHistogram::poll_ns_reset_rate`] is the same for the context-wide
///   window: the fraction of window updates that dropped it from non-zero to 0.
/// * **share of time near max** — [`PollNsHistogram::near_max_share`]: the
///   fraction of polling-enabled iterations whose window was
///   `>= 0.9 * max_ns` (each iteration weighs 1);
///   [`PollNsHistogram::near_max_time_share`] weighs each iteration by its
///   wall-clock duration instead.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[non_exhaustive]
pub struct PollNsHistogram {
    /// Iteration counts per log2 bucket of `poll_ns` (see [`HISTOGRAM_BUCKETS`]).
    pub buckets: Vec<u64>,
    /// Number of samples (polling-enabled iterations).
    pub samples: u64,
    /// Sum of the sampled `poll_ns` values (saturating).
    pub sum_poll_ns: u64,
    /// Samples with `poll_ns >= 0.9 * max_ns`.
    pub near_max_samples: u64,
    /// Sum of the durations of the sampled iterations in ns.
    pub total_time_ns: u64,
    /// Sum of the durations of the near-max iterations in ns.
    pub near_max_time_ns: u64,
    /// Per-handler `ns` recomputations.
    pub handler_updates: u64,
    /// Per-handler `ns` resets to 0.
    pub handler_resets: u64,
    /// Context window updates.
    pub poll_ns_updates: u64,
    /// Context window resets (non-zero to 0).
    pub poll_ns_resets: u64,
}

impl Default for PollNsHistogram {
    fn default() -> Self {
        PollNsHistogram {
            buckets: vec![0; HISTOGRAM_BUCKETS],
            samples: 0,
            sum_poll_ns: 0,
            near_max_samples: 0,
            total_time_ns: 0,
            near_max_time_ns: 0,
            handler_updates: 0,
            handler_resets: 0,
            poll_ns_updates: 0,
            poll_ns_resets: 0,
        }
    }
}

/// The histogram bucket index of a `poll_ns` value (internal; re-exported
/// by the `unstable` feature).
pub fn bucket_of(poll_ns: u64) -> usize {
    (u64::BITS - poll_ns.leading_zeros()) as usize
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl PollNsHistogram {
    /// Copies `o` into `self`, reusing the bucket allocation.
    pub(crate) fn copy_from(&mut self, o: &PollNsHistogram) {
        let PollNsHistogram {
            buckets,
            samples,
            sum_poll_ns,
            near_max_samples,
            total_time_ns,
            near_max_time_ns,
            handler_updates,
            handler_resets,
            poll_ns_updates,
            poll_ns_resets,
        } = o;
        self.buckets.clone_from(buckets);
        self.samples = *samples;
        self.sum_poll_ns = *sum_poll_ns;
        self.near_max_samples = *near_max_samples;
        self.total_time_ns = *total_time_ns;
        self.near_max_time_ns = *near_max_time_ns;
        self.handler_updates = *handler_updates;
        self.handler_resets = *handler_resets;
        self.poll_ns_updates = *poll_ns_updates;
        self.poll_ns_resets = *poll_ns_resets;
    }

    /// Records one iteration's window.
    pub(crate) fn record(&mut self, poll_ns: u64, max_ns: u64, duration_ns: u64) {
        if let Some(b) = self.buckets.get_mut(bucket_of(poll_ns)) {
            *b += 1;
        }
        self.samples += 1;
        self.sum_poll_ns = self.sum_poll_ns.saturating_add(poll_ns);
        self.total_time_ns = self.total_time_ns.saturating_add(duration_ns);
        // poll_ns >= 0.9 * max_ns, in integers.
        if max_ns > 0 && u128::from(poll_ns) * 10 >= u128::from(max_ns) * 9 {
            self.near_max_samples += 1;
            self.near_max_time_ns = self.near_max_time_ns.saturating_add(duration_ns);
        }
    }

    /// Mean window over the sampled iterations, in ns.
    pub fn mean_poll_ns(&self) -> f64 {
        ratio(self.sum_poll_ns, self.samples)
    }

    /// Fraction of handler `ns` recomputations that reset it to 0.
    pub fn reset_rate(&self) -> f64 {
        ratio(self.handler_resets, self.handler_updates)
    }

    /// Fraction of context window updates that reset it to 0.
    pub fn poll_ns_reset_rate(&self) -> f64 {
        ratio(self.poll_ns_resets, self.poll_ns_updates)
    }

    /// Fraction of sampled iterations with the window `>= 0.9 * max_ns`.
    pub fn near_max_share(&self) -> f64 {
        ratio(self.near_max_samples, self.samples)
    }

    /// Like [`near_max_share`](Self::near_max_share) but weighted by iteration duration.
    pub fn near_max_time_share(&self) -> f64 {
        ratio(self.near_max_time_ns, self.total_time_ns)
    }

    /// Difference `self - earlier` (for measuring a window of a run).
    pub fn since(&self, earlier: &PollNsHistogram) -> PollNsHistogram {
        PollNsHistogram {
            buckets: self
                .buckets
                .iter()
                .zip(earlier.buckets.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            samples: self.samples.saturating_sub(earlier.samples),
            sum_poll_ns: self.sum_poll_ns.saturating_sub(earlier.sum_poll_ns),
            near_max_samples: self
                .near_max_samples
                .saturating_sub(earlier.near_max_samples),
            total_time_ns: self.total_time_ns.saturating_sub(earlier.total_time_ns),
            near_max_time_ns: self
                .near_max_time_ns
                .saturating_sub(earlier.near_max_time_ns),
            handler_updates: self.handler_updates.saturating_sub(earlier.handler_updates),
            handler_resets: self.handler_resets.saturating_sub(earlier.handler_resets),
            poll_ns_updates: self.poll_ns_updates.saturating_sub(earlier.poll_ns_updates),
            poll_ns_resets: self.poll_ns_resets.saturating_sub(earlier.poll_ns_resets),
        }
    }
}

/// Per poll-list handler statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[non_exhaustive]
pub struct HandlerStats {
    /// [`HandlerId::as_u64`](crate::HandlerId::as_u64) of the handler.
    pub id: u64,
    /// The handler's adaptive `ns`.
    pub ns: i64,
    /// How many times it was dispatched (read, write or poll_ready).
    pub dispatch_count: u64,
}

/// A snapshot of the loop's statistics.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[non_exhaustive]
pub struct Stats {
    /// Loop iterations (`poll()` calls).
    pub iterations: u64,
    /// Time spent busy-polling in ns.
    pub poll_time_ns: u64,
    /// Iterations in which a poll handler's `poll()` returned true.
    pub successful_polls: u64,
    /// `epoll_wait` calls with a non-zero timeout (the loop was allowed to sleep).
    pub blocking_waits: u64,
    /// Times the notifier eventfd was found readable (a `notify()` syscall woke us).
    pub eventfd_wakeups: u64,
    /// Grow steps of the adaptive algorithm.
    pub grow_count: u64,
    /// Shrink steps of the adaptive algorithm.
    pub shrink_count: u64,
    /// The current polling window in ns.
    pub poll_ns: u64,
    /// Handlers currently on the poll list.
    pub handlers: Vec<HandlerStats>,
    /// Histogram of the window and the seeds' derived statistics.
    pub poll_ns_histogram: PollNsHistogram,
    /// Fd / poll handler dispatches.
    pub dispatches: u64,
    /// Bottom halves run (one-shot and reusable).
    pub bh_runs: u64,
    /// Timer callbacks run.
    pub timer_runs: u64,
    /// Times new polling parameters were applied.
    pub param_updates: u64,
    /// The parameters in use.
    pub params: PollParams,
    /// `epoll_wait` failures (other than EINTR); each one is also returned
    /// by [`AioContext::poll`](crate::AioContext::poll).
    pub epoll_errors: u64,
}

impl Stats {
    /// Copies `o` into `self`, reusing allocations (the loop publishes a
    /// snapshot every iteration).
    pub(crate) fn copy_from(&mut self, o: &Stats) {
        let Stats {
            iterations,
            poll_time_ns,
            successful_polls,
            blocking_waits,
            eventfd_wakeups,
            grow_count,
            shrink_count,
            poll_ns,
            handlers,
            poll_ns_histogram,
            dispatches,
            bh_runs,
            timer_runs,
            param_updates,
            params,
            epoll_errors,
        } = o;
        self.iterations = *iterations;
        self.poll_time_ns = *poll_time_ns;
        self.successful_polls = *successful_polls;
        self.blocking_waits = *blocking_waits;
        self.eventfd_wakeups = *eventfd_wakeups;
        self.grow_count = *grow_count;
        self.shrink_count = *shrink_count;
        self.poll_ns = *poll_ns;
        self.handlers.clone_from(handlers);
        self.poll_ns_histogram.copy_from(poll_ns_histogram);
        self.dispatches = *dispatches;
        self.bh_runs = *bh_runs;
        self.timer_runs = *timer_runs;
        self.param_updates = *param_updates;
        self.params = *params;
        self.epoll_errors = *epoll_errors;
    }
}

/// Number of scalar counters in [`PublishedCounters`].
const SCALARS: usize = 13;

/// The scalar fields of [`Stats`] as published by the loop for other
/// threads: plain atomics under a single-writer sequence lock, so that
/// publishing right before every sleep is a few stores (no lock, no
/// allocation). The vector-valued parts (histogram, per-handler list) and the
/// parameters are kept in a mutex and written only when they changed; the
/// sequence number covers them too, so a reader gets one consistent snapshot.
#[derive(Debug, Default)]
pub(crate) struct PublishedCounters {
    /// Odd while the loop is publishing.
    seq: AtomicU64,
    vals: [AtomicU64; SCALARS],
}

/// Readers spin this often when they race with a publish, then yield the
/// CPU between attempts (the loop thread may have been preempted in the
/// middle of a publish).
const READ_SPINS: u32 = 64;

impl PublishedCounters {
    /// Starts a publish (only the loop thread, which holds `&mut AioContext`,
    /// publishes). Returns the token for [`end`](Self::end).
    #[inline]
    pub(crate) fn begin(&self) -> u64 {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        seq
    }

    /// Stores the scalars of `s`, with `poll_ns` as the current window.
    #[inline]
    pub(crate) fn store(&self, s: &Stats, poll_ns: u64) {
        let [iterations, poll_time_ns, successful_polls, blocking_waits, eventfd_wakeups, grow_count, shrink_count, window, dispatches, bh_runs, timer_runs, param_updates, epoll_errors] =
            &self.vals;
        iterations.store(s.iterations, Ordering::Relaxed);
        poll_time_ns.store(s.poll_time_ns, Ordering::Relaxed);
        successful_polls.store(s.successful_polls, Ordering::Relaxed);
        blocking_waits.store(s.blocking_waits, Ordering::Relaxed);
        eventfd_wakeups.store(s.eventfd_wakeups, Ordering::Relaxed);
        grow_count.store(s.grow_count, Ordering::Relaxed);
        shrink_count.store(s.shrink_count, Ordering::Relaxed);
        window.store(poll_ns, Ordering::Relaxed);
        dispatches.store(s.dispatches, Ordering::Relaxed);
        bh_runs.store(s.bh_runs, Ordering::Relaxed);
        timer_runs.store(s.timer_runs, Ordering::Relaxed);
        param_updates.store(s.param_updates, Ordering::Relaxed);
        epoll_errors.store(s.epoll_errors, Ordering::Relaxed);
    }

    /// Ends the publish started by [`begin`](Self::begin).
    #[inline]
    pub(crate) fn end(&self, token: u64) {
        self.seq.store(token.wrapping_add(2), Ordering::Release);
    }

    /// A consistent snapshot: `rest()` reads the mutex-protected part, the
    /// scalars are filled in from the atomics of the same publish. Retries
    /// while a publish is in progress; a publish is a short straight-line
    /// sequence without panics or blocking other than the uncontended
    /// stats mutex, so the wait ends as soon as the loop thread runs.
    pub(crate) fn read(&self, mut rest: impl FnMut() -> Stats) -> Stats {
        let mut tries = 0u32;
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before & 1 == 0 {
                let mut v = [0u64; SCALARS];
                for (dst, src) in v.iter_mut().zip(self.vals.iter()) {
                    *dst = src.load(Ordering::Relaxed);
                }
                let mut s = rest();
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == before {
                    set_scalars(&mut s, v);
                    return s;
                }
            }
            tries = tries.saturating_add(1);
            if tries < READ_SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn set_scalars(s: &mut Stats, v: [u64; SCALARS]) {
    let [iterations, poll_time_ns, successful_polls, blocking_waits, eventfd_wakeups, grow_count, shrink_count, poll_ns, dispatches, bh_runs, timer_runs, param_updates, epoll_errors] =
        v;
    s.iterations = iterations;
    s.poll_time_ns = poll_time_ns;
    s.successful_polls = successful_polls;
    s.blocking_waits = blocking_waits;
    s.eventfd_wakeups = eventfd_wakeups;
    s.grow_count = grow_count;
    s.shrink_count = shrink_count;
    s.poll_ns = poll_ns;
    s.dispatches = dispatches;
    s.bh_runs = bh_runs;
    s.timer_runs = timer_runs;
    s.param_updates = param_updates;
    s.epoll_errors = epoll_errors;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(2), 2);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(4096), 13);
        assert_eq!(bucket_of(u64::MAX), 64);
    }

    #[test]
    fn published_counters_are_read_consistently() {
        // One writer publishes snapshots whose scalars are all equal; a
        // concurrent reader must never see a mix of two publishes.
        let p = std::sync::Arc::new(PublishedCounters::default());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p2, d2) = (p.clone(), done.clone());
        let writer = std::thread::spawn(move || {
            for k in 1..=200_000u64 {
                let s = Stats {
                    iterations: k,
                    poll_time_ns: k,
                    successful_polls: k,
                    blocking_waits: k,
                    eventfd_wakeups: k,
                    grow_count: k,
                    shrink_count: k,
                    dispatches: k,
                    bh_runs: k,
                    timer_runs: k,
                    param_updates: k,
                    epoll_errors: k,
                    ..Stats::default()
                };
                let t = p2.begin();
                p2.store(&s, k);
                p2.end(t);
            }
            d2.store(true, Ordering::Release);
        });
        let mut reads = 0u64;
        let mut last = 0;
        while !done.load(Ordering::Acquire) || reads == 0 {
            let s = p.read(Stats::default);
            let k = s.iterations;
            for v in [
                s.poll_time_ns,
                s.successful_polls,
                s.blocking_waits,
                s.eventfd_wakeups,
                s.grow_count,
                s.shrink_count,
                s.poll_ns,
                s.dispatches,
                s.bh_runs,
                s.timer_runs,
                s.param_updates,
                s.epoll_errors,
            ] {
                assert_eq!(v, k, "torn read: {s:?}");
            }
            assert!(k >= last, "went backwards: {k} < {last}");
            last = k;
            reads += 1;
        }
        writer.join().unwrap();
        assert_eq!(p.read(Stats::default).iterations, 200_000);
    }

    #[test]
    fn derived_statistics() {
        let mut h = PollNsHistogram::default();
        h.record(0, 1000, 100);
        h.record(900, 1000, 300);
        h.record(1000, 1000, 600);
        h.record(899, 1000, 0);
        assert_eq!(h.samples, 4);
        assert!((h.mean_poll_ns() - 699.75).abs() < 1e-9);
        assert!((h.near_max_share() - 0.5).abs() < 1e-9);
        assert!((h.near_max_time_share() - 0.9).abs() < 1e-9);
        h.handler_updates = 10;
        h.handler_resets = 7;
        assert!((h.reset_rate() - 0.7).abs() < 1e-9);
        let d = h.since(&PollNsHistogram::default());
        assert_eq!(d, h);
        assert_eq!(PollNsHistogram::default().reset_rate(), 0.0);
        let mut s = Stats::default();
        let o = Stats {
            iterations: 5,
            poll_ns_histogram: h.clone(),
            ..Stats::default()
        };
        s.copy_from(&o);
        assert_eq!(s, o);
        let p = PublishedCounters::default();
        let o = Stats {
            iterations: 1,
            poll_time_ns: 2,
            successful_polls: 3,
            blocking_waits: 4,
            eventfd_wakeups: 5,
            grow_count: 6,
            shrink_count: 7,
            poll_ns: 8,
            dispatches: 9,
            bh_runs: 10,
            timer_runs: 11,
            param_updates: 12,
            epoll_errors: 13,
            ..o
        };
        let t = p.begin();
        p.store(&o, 80);
        p.end(t);
        let back = p.read(|| s.clone());
        assert_eq!(
            back,
            Stats {
                poll_ns: 80,
                ..o.clone()
            }
        );
        #[cfg(feature = "serde")]
        {
            let json = serde_json::to_string(&s).unwrap();
            let back: Stats = serde_json::from_str(&json).unwrap();
            assert_eq!(back, s);
        }
    }
}

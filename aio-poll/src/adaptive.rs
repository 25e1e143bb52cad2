// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The adaptive polling arithmetic as a pure state machine (no syscalls, no
//! clock of its own: the caller passes timestamps or `block_ns`).
//!
//! Both algorithms of the design note are implemented line by line:
//!
//! * [`PollAlgorithm::Classic`] (QEMU 10.x): every handler owns a polling time
//!   `ns`; only handlers dispatched in this iteration are adjusted
//!   (sweet spot / shrink / grow from 4000 ns); the loop polls for the maximum
//!   `ns` over the poll list.
//! * [`PollAlgorithm::Weighted`] (2026 series): every handler's `ns` is an EWMA
//!   of its block interval with alpha = 2^-weight, non-dispatched handlers age
//!   (`ns += block_ns`), anything above `max_ns` resets to 0, and one
//!   context-wide `poll_ns` grows towards the largest dispatched `ns` or shrinks
//!   one step.
//!
//! All arithmetic saturates; negative `block_ns` (a clock that went backwards)
//! is treated as 0, so no `i64` input can overflow or panic, and the window is
//! always within `[0, max_ns]`.
//!
//! The window may legitimately be huge (`poll-max-ns` up to `i64::MAX`,
//! ~292 years). [`PollWindow`] is the deadline arithmetic of one polling
//! phase: whatever the window, it asks the loop to look at its fds, idle
//! handlers and timers at least every [`POLL_CHECK_INTERVAL_NS`], so a
//! handler that is not (yet) on the poll list is never starved by polling.
//!
//! This module is internal; the `unstable` feature re-exports it from
//! `aio_poll::unstable` for the fuzz targets and the benchmark.
//!
//! ```
//! # #[cfg(feature = "unstable")] {
//! use aio_poll::unstable::Adaptive;
//! use aio_poll::PollParams;
//!
//! let mut a = Adaptive::new(PollParams::default()).unwrap();
//! let mut ns = [0i64];
//! // One handler dispatched after blocking 10 µs.
//! a.update(10_000, ns.iter_mut().map(|n| (n, true)));
//! assert_eq!(ns[0], 10_000);
//! assert_eq!(a.poll_ns(), 10_000);
//! # }
//! ```

use crate::error::Result;
use crate::params::{PollAlgorithm, PollParams};

/// Classic algorithm: first polling time when growing from 0.
pub const CLASSIC_GROW_START_NS: i64 = 4000;

/// Longest stretch a polling phase runs without the loop looking at its fds
/// (a non-blocking `epoll_wait`), idle poll handlers and the clock; a nested
/// context returns to its outer loop at this interval.
pub const POLL_CHECK_INTERVAL_NS: u64 = 1_000_000;

/// What the loop does next in a polling phase (see [`PollWindow::step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStep {
    /// Keep calling the poll handlers.
    Poll,
    /// Look at the fds, idle handlers and timers now, then keep polling.
    Check,
    /// The window has elapsed: stop polling.
    Expired,
}

/// The deadline arithmetic of one polling phase: a window of `window` ns
/// from `start`, with a [`PollStep::Check`] at least every
/// [`POLL_CHECK_INTERVAL_NS`]. Overflow-free for any `start` and `window`
/// (including `u64::MAX`); a clock that goes backwards is taken as standing
/// still.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    start: u64,
    window: u64,
    next_check: u64,
}

impl PollWindow {
    /// A window of `window` ns starting at `start`.
    pub fn new(start: u64, window: u64) -> PollWindow {
        PollWindow {
            start,
            window,
            next_check: start.saturating_add(POLL_CHECK_INTERVAL_NS),
        }
    }

    /// Time spent in the window at `now`.
    pub fn elapsed(&self, now: u64) -> u64 {
        now.saturating_sub(self.start)
    }

    /// What to do at `now`: [`PollStep::Expired`] once `window` ns have
    /// elapsed, else [`PollStep::Check`] whenever [`POLL_CHECK_INTERVAL_NS`]
    /// passed since the start or the last check, else [`PollStep::Poll`].
    #[inline]
    pub fn step(&mut self, now: u64) -> PollStep {
        if self.elapsed(now) >= self.window {
            return PollStep::Expired;
        }
        if now >= self.next_check {
            self.next_check = now.saturating_add(POLL_CHECK_INTERVAL_NS);
            return PollStep::Check;
        }
        PollStep::Poll
    }
}

/// What one [`Adaptive::update`] did (for statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adjustment {
    /// Grow steps (classic: per handler; weighted: the context `poll_ns`).
    pub grows: u64,
    /// Shrink steps (classic: per handler; weighted: the context `poll_ns`).
    pub shrinks: u64,
    /// Handler `ns` values recomputed (classic: dispatched handlers; weighted:
    /// dispatched handlers plus ageing handlers with `ns != 0`).
    pub handler_updates: u64,
    /// Of those, how many ended at 0 from a non-zero computed value
    /// (weighted: exceeded `max_ns`; classic: a shrink that reached 0).
    pub handler_resets: u64,
    /// Whether the context window was recomputed (weighted: some handler was
    /// dispatched; classic: always).
    pub poll_ns_updated: bool,
    /// Whether the context window went from non-zero to 0.
    pub poll_ns_reset: bool,
}

impl Adjustment {
    fn merge(&mut self, o: Adjustment) {
        self.grows += o.grows;
        self.shrinks += o.shrinks;
        self.handler_updates += o.handler_updates;
        self.handler_resets += o.handler_resets;
        self.poll_ns_updated |= o.poll_ns_updated;
        self.poll_ns_reset |= o.poll_ns_reset;
    }
}

/// The adaptive polling state of one context.
#[derive(Clone, Debug)]
pub struct Adaptive {
    params: PollParams,
    /// The window the loop polls for next (both algorithms), in `[0, max_ns]`.
    poll_ns: i64,
    /// Start of the current iteration, see [`Adaptive::start`].
    start_ns: u64,
}

impl Adaptive {
    /// New state with `poll_ns = 0`. The parameters are validated (effective
    /// values are stored).
    pub fn new(params: PollParams) -> Result<Self> {
        Ok(Adaptive {
            params: params.validate()?,
            poll_ns: 0,
            start_ns: 0,
        })
    }

    /// The effective parameters.
    pub fn params(&self) -> PollParams {
        self.params
    }

    /// Replaces the parameters and resets `poll_ns` to 0. The caller must also
    /// reset every handler's `ns` (see [`Adaptive::reset`]).
    pub fn set_params(&mut self, params: PollParams) -> Result<()> {
        self.params = params.validate()?;
        self.poll_ns = 0;
        Ok(())
    }

    /// Resets the context window and every given handler `ns` to 0.
    pub fn reset<'a>(&mut self, handlers: impl IntoIterator<Item = &'a mut i64>) {
        self.poll_ns = 0;
        for ns in handlers {
            *ns = 0;
        }
    }

    /// Classic only: recomputes the window as the maximum `ns` over the poll
    /// list after handlers left it (the weighted window is context-wide and
    /// does not depend on list membership).
    pub fn refresh_window<'a>(&mut self, poll_list_ns: impl IntoIterator<Item = &'a i64>) {
        if self.params.algorithm == PollAlgorithm::Classic {
            self.poll_ns = poll_list_ns
                .into_iter()
                .map(|ns| (*ns).clamp(0, self.params.max_ns))
                .max()
                .unwrap_or(0);
        }
    }

    /// The polling window in ns for the next iteration (`0..=max_ns`).
    pub fn poll_ns(&self) -> i64 {
        self.poll_ns
    }

    /// Whether userspace polling is enabled at all (`max_ns > 0`).
    pub fn enabled(&self) -> bool {
        self.params.max_ns > 0
    }

    /// Records the start of an iteration (design note §1 step 1).
    pub fn start(&mut self, now_ns: u64) {
        self.start_ns = now_ns;
    }

    /// `block_ns` for an iteration started with [`Adaptive::start`] and whose
    /// wait ended at `now_ns` (step 6), clamped to `[0, i64::MAX]`.
    pub fn block_ns(&self, now_ns: u64) -> i64 {
        i64::try_from(now_ns.saturating_sub(self.start_ns)).unwrap_or(i64::MAX)
    }

    /// Step 8: updates the polling times from `block_ns` and the poll list.
    ///
    /// `handlers` yields every handler on the poll list as
    /// `(&mut ns, dispatched_this_iteration)`.
    #[inline]
    pub fn update<'a>(
        &mut self,
        block_ns: i64,
        handlers: impl IntoIterator<Item = (&'a mut i64, bool)>,
    ) -> Adjustment {
        if !self.enabled() {
            return Adjustment::default();
        }
        let block_ns = block_ns.max(0);
        match self.params.algorithm {
            PollAlgorithm::Classic => self.update_classic(block_ns, handlers),
            PollAlgorithm::Weighted => self.update_weighted(block_ns, handlers),
        }
    }

    fn update_classic<'a>(
        &mut self,
        block_ns: i64,
        handlers: impl IntoIterator<Item = (&'a mut i64, bool)>,
    ) -> Adjustment {
        let mut adj = Adjustment::default();
        let mut window = 0i64;
        for (ns, dispatched) in handlers {
            if dispatched {
                adj.merge(classic_adjust(&self.params, ns, block_ns));
            }
            window = window.max((*ns).clamp(0, self.params.max_ns));
        }
        adj.poll_ns_updated = true;
        adj.poll_ns_reset = self.poll_ns != 0 && window == 0;
        self.poll_ns = window;
        adj
    }

    #[inline]
    fn update_weighted<'a>(
        &mut self,
        block_ns: i64,
        handlers: impl IntoIterator<Item = (&'a mut i64, bool)>,
    ) -> Adjustment {
        let p = &self.params;
        let mut out = Adjustment::default();
        let mut adj: i64 = -1;
        for (ns, dispatched) in handlers {
            if dispatched {
                let next = weighted_ewma(*ns, block_ns, p.weight);
                out.handler_updates += 1;
                *ns = if next > p.max_ns {
                    out.handler_resets += 1;
                    0
                } else {
                    next
                };
                adj = adj.max(*ns);
            } else if *ns != 0 {
                out.handler_updates += 1;
                let next = ns.saturating_add(block_ns);
                *ns = if next > p.max_ns {
                    out.handler_resets += 1;
                    0
                } else {
                    next
                };
            }
        }
        if adj >= 0 {
            out.poll_ns_updated = true;
            let old = self.poll_ns;
            if adj > self.poll_ns {
                let grown = adj.max(p.grow.saturating_mul(self.poll_ns));
                self.poll_ns = grown.min(p.max_ns);
                out.grows += 1;
            } else if below_quotient(adj, self.poll_ns, p.shrink) {
                self.poll_ns /= p.shrink;
                out.shrinks += 1;
            }
            out.poll_ns_reset = old != 0 && self.poll_ns == 0;
        }
        out
    }
}

/// `adj < poll_ns / shrink` (integer division) for `adj >= 0`,
/// `poll_ns >= 0`, `shrink >= 1`, without dividing: the loop evaluates it on
/// every iteration and a 64-bit division costs tens of cycles. `floor(p / s)
/// > a` holds exactly when `p >= (a + 1) * s`; an overflowing product is
/// larger than any `p`.
#[inline]
fn below_quotient(adj: i64, poll_ns: i64, shrink: i64) -> bool {
    match adj.checked_add(1).and_then(|a| a.checked_mul(shrink)) {
        Some(limit) => poll_ns >= limit,
        None => false,
    }
}

/// The weighted EWMA step: `(ns == 0) ? block_ns : ns - (ns >> w) + (block_ns >> w)`,
/// saturating. `weight` outside `0..=63` is clamped.
#[inline]
pub fn weighted_ewma(ns: i64, block_ns: i64, weight: i64) -> i64 {
    let ns = ns.max(0);
    let block_ns = block_ns.max(0);
    if ns == 0 {
        return block_ns;
    }
    let w = u32::try_from(weight.clamp(0, 63)).unwrap_or(63);
    (ns - (ns >> w)).saturating_add(block_ns >> w)
}

/// The classic three-way rule for one dispatched handler (design note §2).
fn classic_adjust(p: &PollParams, ns: &mut i64, block_ns: i64) -> Adjustment {
    let mut adj = Adjustment {
        handler_updates: 1,
        ..Adjustment::default()
    };
    let cur = (*ns).max(0);
    if block_ns <= cur {
        // Sweet spot, no change.
    } else if block_ns > p.max_ns {
        let next = if p.shrink != 0 { cur / p.shrink } else { 0 };
        adj.shrinks = 1;
        if cur != 0 && next == 0 {
            adj.handler_resets = 1;
        }
        *ns = next;
    } else if cur < p.max_ns && block_ns < p.max_ns {
        let grow = if p.grow == 0 { 2 } else { p.grow };
        let next = if cur != 0 {
            cur.saturating_mul(grow)
        } else {
            CLASSIC_GROW_START_NS
        };
        *ns = next.min(p.max_ns);
        adj.grows = 1;
    }
    adj
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn classic(max_ns: i64) -> Adaptive {
        Adaptive::new(
            PollParams::default()
                .with_max_ns(max_ns)
                .with_algorithm(PollAlgorithm::Classic),
        )
        .unwrap()
    }

    fn weighted(max_ns: i64, weight: i64) -> Adaptive {
        Adaptive::new(
            PollParams::default()
                .with_max_ns(max_ns)
                .with_weight(weight),
        )
        .unwrap()
    }

    fn run(a: &mut Adaptive, block_ns: i64, hs: &mut [(i64, bool)]) -> Adjustment {
        a.update(block_ns, hs.iter_mut().map(|(n, d)| (n, *d)))
    }

    // ---- classic, design note §2 ----

    #[test]
    fn classic_sweet_spot_no_change() {
        let mut a = classic(32768);
        let mut hs = [(8000, true)];
        let adj = run(&mut a, 8000, &mut hs);
        assert_eq!(hs[0].0, 8000);
        assert_eq!((adj.grows, adj.shrinks), (0, 0));
        assert_eq!(a.poll_ns(), 8000);
    }

    #[test]
    fn classic_shrink_above_max() {
        let mut a = classic(32768);
        let mut hs = [(16000, true)];
        let adj = run(&mut a, 40000, &mut hs);
        assert_eq!(hs[0].0, 8000);
        assert_eq!(adj.shrinks, 1);
        // shrink = 0 selects the default (2), never a divide by zero.
        let mut a = Adaptive::new(
            PollParams::default()
                .with_algorithm(PollAlgorithm::Classic)
                .with_grow_shrink(0, 0),
        )
        .unwrap();
        let mut hs = [(16000, true)];
        run(&mut a, 40000, &mut hs);
        assert_eq!(hs[0].0, 8000);
        // Shrinking 1 -> 0 counts as a reset.
        let mut hs = [(1, true)];
        let adj = run(&mut a, 40000, &mut hs);
        assert_eq!((hs[0].0, adj.handler_resets), (0, 1));
    }

    #[test]
    fn classic_grow_from_zero_is_4000_then_times_grow_capped() {
        let mut a = classic(32768);
        let mut hs = [(0, true)];
        run(&mut a, 1000, &mut hs);
        assert_eq!(hs[0].0, 4000);
        run(&mut a, 5000, &mut hs);
        assert_eq!(hs[0].0, 8000);
        run(&mut a, 10000, &mut hs);
        assert_eq!(hs[0].0, 16000);
        run(&mut a, 20000, &mut hs);
        assert_eq!(hs[0].0, 32000);
        run(&mut a, 32100, &mut hs);
        assert_eq!(hs[0].0, 32768, "capped at max");
        assert_eq!(a.poll_ns(), 32768);
    }

    #[test]
    fn classic_no_grow_when_block_equals_max() {
        // block_ns == max_ns: not > max (no shrink) and not < max (no grow).
        let mut a = classic(32768);
        let mut hs = [(4000, true)];
        let adj = run(&mut a, 32768, &mut hs);
        assert_eq!(hs[0].0, 4000);
        assert_eq!((adj.grows, adj.shrinks), (0, 0));
    }

    #[test]
    fn classic_only_dispatched_adjusted_window_is_max() {
        let mut a = classic(32768);
        let mut hs = [(16000, false), (0, true)];
        run(&mut a, 1000, &mut hs);
        assert_eq!(hs[0].0, 16000);
        assert_eq!(hs[1].0, 4000);
        assert_eq!(a.poll_ns(), 16000);
    }

    #[test]
    fn classic_grow_factor() {
        let mut a = Adaptive::new(
            PollParams::default()
                .with_algorithm(PollAlgorithm::Classic)
                .with_grow_shrink(3, 4),
        )
        .unwrap();
        let mut hs = [(4000, true)];
        run(&mut a, 5000, &mut hs);
        assert_eq!(hs[0].0, 12000);
        run(&mut a, 100_000, &mut hs);
        assert_eq!(hs[0].0, 3000);
    }

    // ---- weighted, design note §3 ----

    #[test]
    fn weighted_first_sample_is_block_ns_and_poll_ns_jumps() {
        let mut a = weighted(32768, 3);
        let mut hs = [(0, true)];
        let adj = run(&mut a, 12345, &mut hs);
        assert_eq!(hs[0].0, 12345);
        assert_eq!(a.poll_ns(), 12345, "no 4000 ns start value");
        assert_eq!(adj.grows, 1);
    }

    #[test]
    fn weighted_ewma_formula() {
        let mut a = weighted(32768, 3);
        let mut hs = [(8000, true)];
        run(&mut a, 16000, &mut hs);
        assert_eq!(hs[0].0, 8000 - (8000 >> 3) + (16000 >> 3));
        assert_eq!(hs[0].0, 9000);
        assert_eq!(weighted_ewma(8000, 16000, 1), 8000 - 4000 + 8000);
    }

    #[test]
    fn weighted_reset_above_max() {
        let mut a = weighted(32768, 1);
        let mut hs = [(30000, true)];
        let adj = run(&mut a, 40000, &mut hs);
        // 30000 - 15000 + 20000 = 35000 > max -> 0
        assert_eq!(hs[0].0, 0);
        assert_eq!((adj.handler_updates, adj.handler_resets), (1, 1));
        // first sample above max also resets
        let mut hs = [(0, true)];
        run(&mut a, 40000, &mut hs);
        assert_eq!(hs[0].0, 0);
    }

    #[test]
    fn weighted_ageing_of_non_dispatched() {
        let mut a = weighted(32768, 3);
        let mut hs = [(10000, false), (0, false)];
        let adj = run(&mut a, 5000, &mut hs);
        assert_eq!(hs[0].0, 15000);
        assert_eq!(hs[1].0, 0, "ns == 0 does not age");
        assert!(
            !adj.poll_ns_updated,
            "nothing dispatched: poll_ns unchanged"
        );
        run(&mut a, 20000, &mut hs);
        assert_eq!(hs[0].0, 0, "aged above max -> 0");
    }

    #[test]
    fn weighted_adj_only_from_dispatched() {
        let mut a = weighted(32768, 3);
        let mut hs = [(30000, false), (0, true)];
        run(&mut a, 2000, &mut hs);
        assert_eq!(hs[0].0, 32000);
        assert_eq!(a.poll_ns(), 2000, "ageing handler does not inflate poll_ns");
    }

    #[test]
    fn weighted_grow_is_max_of_adj_and_grow_times_poll_ns() {
        let mut a = weighted(32768, 3);
        let mut hs = [(0, true)];
        run(&mut a, 3000, &mut hs);
        assert_eq!(a.poll_ns(), 3000);
        // adj slightly above poll_ns -> grow * poll_ns = 6000
        let mut hs = [(0, true)];
        run(&mut a, 3500, &mut hs);
        assert_eq!(a.poll_ns(), 6000);
        // adj far above -> adj, capped at max
        let mut hs = [(0, true)];
        run(&mut a, 20000, &mut hs);
        assert_eq!(a.poll_ns(), 20000);
        let mut hs = [(0, true)];
        run(&mut a, 32000, &mut hs);
        assert_eq!(a.poll_ns(), 32768);
    }

    #[test]
    fn weighted_shrink_one_step_only_below_poll_ns_over_shrink() {
        let mut a = weighted(32768, 3);
        let mut hs = [(0, true)];
        run(&mut a, 20000, &mut hs);
        assert_eq!(a.poll_ns(), 20000);
        // adj = 12000 >= 20000 / 2: no change
        let mut hs = [(0, true)];
        let adj = run(&mut a, 12000, &mut hs);
        assert_eq!(a.poll_ns(), 20000);
        assert_eq!((adj.grows, adj.shrinks), (0, 0));
        // adj = 1000 < 10000: one step to 10000 (not to 1000)
        let mut hs = [(0, true)];
        let adj = run(&mut a, 1000, &mut hs);
        assert_eq!(a.poll_ns(), 10000);
        assert_eq!(adj.shrinks, 1);
        // a reset handler (adj = 0) shrinks one step too
        let mut hs = [(0, true)];
        run(&mut a, 100_000, &mut hs);
        assert_eq!(a.poll_ns(), 5000);
    }

    #[test]
    fn classic_refresh_window_after_leave() {
        let mut a = classic(32768);
        let mut hs = [(16000, false), (0, true)];
        run(&mut a, 1000, &mut hs);
        assert_eq!(a.poll_ns(), 16000);
        // The 16000 handler left the poll list.
        a.refresh_window([hs[1].0].iter());
        assert_eq!(a.poll_ns(), 4000);
        a.refresh_window(std::iter::empty());
        assert_eq!(a.poll_ns(), 0);
        // Weighted: unaffected.
        let mut w = weighted(32768, 3);
        let mut hs = [(0, true)];
        run(&mut w, 1000, &mut hs);
        w.refresh_window(std::iter::empty());
        assert_eq!(w.poll_ns(), 1000);
    }

    #[test]
    fn disabled_does_nothing() {
        let mut a = weighted(0, 3);
        let mut hs = [(0, true)];
        assert_eq!(run(&mut a, 1000, &mut hs), Adjustment::default());
        assert_eq!((hs[0].0, a.poll_ns()), (0, 0));
    }

    #[test]
    fn set_params_resets() {
        let mut a = weighted(32768, 3);
        let mut hs = [(0, true)];
        run(&mut a, 1000, &mut hs);
        assert!(a.poll_ns() > 0);
        a.set_params(PollParams::default().with_weight(5)).unwrap();
        assert_eq!(a.poll_ns(), 0);
        assert_eq!(a.params().weight, 5);
        assert!(a.set_params(PollParams::default().with_weight(64)).is_err());
        a.reset(hs.iter_mut().map(|h| &mut h.0));
        assert_eq!(hs[0].0, 0);
    }

    #[test]
    fn poll_window_checks_and_expires() {
        let mut w = PollWindow::new(1_000, 3_500_000);
        assert_eq!(w.step(1_000), PollStep::Poll);
        assert_eq!(w.step(1_000_999), PollStep::Poll);
        assert_eq!(w.step(1_001_000), PollStep::Check);
        assert_eq!(w.step(1_500_000), PollStep::Poll);
        assert_eq!(w.step(2_001_000), PollStep::Check);
        assert_eq!(w.step(3_501_000), PollStep::Expired);
        // A short window never checks.
        let mut w = PollWindow::new(0, 32_768);
        assert_eq!(w.step(32_767), PollStep::Poll);
        assert_eq!(w.step(32_768), PollStep::Expired);
        // The issue #16 window: poll_ns = i64::MAX, start near the end of time.
        let mut w = PollWindow::new(u64::MAX - 10, i64::MAX as u64);
        assert_eq!(w.step(u64::MAX - 10), PollStep::Poll);
        assert_eq!(w.step(u64::MAX), PollStep::Check, "saturated check time");
        assert_eq!(w.step(u64::MAX), PollStep::Check);
        // Clock going back: standing still.
        let mut w = PollWindow::new(5_000_000, 10);
        assert_eq!(w.step(0), PollStep::Poll);
    }

    /// Issue #16: with `poll-max-ns` and `poll-grow` at `i64::MAX` the window
    /// jumps to `i64::MAX` (~292 years), and the polling phase must still
    /// hand control back every [`POLL_CHECK_INTERVAL_NS`].
    #[test]
    fn huge_grow_and_max_window_still_checks() {
        for algorithm in [PollAlgorithm::Weighted, PollAlgorithm::Classic] {
            let mut a = Adaptive::new(
                PollParams::default()
                    .with_max_ns(i64::MAX)
                    .with_grow_shrink(i64::MAX, 2)
                    .with_algorithm(algorithm),
            )
            .unwrap();
            let mut hs = [(0i64, true)];
            // Intervals that lengthen a little: one grow step saturates.
            for block_ns in [20_000, 40_000] {
                run(&mut a, block_ns, &mut hs);
            }
            assert_eq!(a.poll_ns(), i64::MAX, "{algorithm}");
            let window = u64::try_from(a.poll_ns()).unwrap();
            let mut w = PollWindow::new(7, window);
            let mut now = 7u64;
            let mut checks = 0;
            for _ in 0..10_000 {
                now += 997;
                match w.step(now) {
                    PollStep::Poll => {}
                    PollStep::Check => checks += 1,
                    PollStep::Expired => panic!("a 292-year window expired"),
                }
            }
            // 9.97 ms of polling: a check every ms.
            assert_eq!(checks, 9, "{algorithm}");
        }
    }

    #[test]
    fn block_ns_from_injected_timestamps() {
        let mut a = weighted(32768, 3);
        a.start(1_000);
        assert_eq!(a.block_ns(4_500), 3_500);
        assert_eq!(a.block_ns(500), 0, "clock going back clamps to 0");
        a.start(0);
        assert_eq!(a.block_ns(u64::MAX), i64::MAX);
    }

    fn any_params() -> impl Strategy<Value = PollParams> {
        (
            0i64..=i64::MAX,
            0i64..=i64::MAX,
            0i64..=63,
            any::<bool>(),
            prop_oneof![Just(0i64), 1i64..100_000_000, 0i64..=i64::MAX],
        )
            .prop_map(|(grow, shrink, weight, classic, max_ns)| PollParams {
                max_ns,
                grow,
                shrink,
                weight,
                algorithm: if classic {
                    PollAlgorithm::Classic
                } else {
                    PollAlgorithm::Weighted
                },
            })
    }

    proptest! {
        #[test]
        fn never_panics_and_stays_in_range(
            p in any_params(),
            steps in proptest::collection::vec(
                (any::<i64>(), proptest::collection::vec((any::<i64>(), any::<bool>()), 0..4)),
                1..40),
        ) {
            let mut a = Adaptive::new(p).unwrap();
            let max = a.params().max_ns;
            let mut hs: Vec<(i64, bool)> = Vec::new();
            for (block_ns, upd) in steps {
                if hs.len() < upd.len() {
                    // Handlers join the list with ns in range (as the context guarantees).
                    hs.resize(upd.len(), (0, false));
                }
                for (h, (seed, d)) in hs.iter_mut().zip(upd.iter()) {
                    h.1 = *d;
                    if h.0 == 0 && *seed > 0 { h.0 = seed % (max.saturating_add(1)).max(1); }
                }
                run(&mut a, block_ns, &mut hs);
                prop_assert!(a.poll_ns() >= 0 && a.poll_ns() <= max);
                for h in &hs {
                    prop_assert!(h.0 >= 0 && h.0 <= max, "ns {} max {}", h.0, max);
                }
            }
        }

        #[test]
        fn below_quotient_is_the_division(adj in 0i64..=i64::MAX, poll_ns in 0i64..=i64::MAX, shrink in 1i64..=i64::MAX) {
            prop_assert_eq!(below_quotient(adj, poll_ns, shrink), adj < poll_ns / shrink);
            let small = (adj % 100_000, poll_ns % 100_000, shrink % 9 + 1);
            prop_assert_eq!(below_quotient(small.0, small.1, small.2), small.0 < small.1 / small.2);
        }

        #[test]
        fn poll_window_never_polls_past_a_check(
            start in 0u64..u64::MAX / 2,
            window in prop_oneof![0u64..100_000_000, any::<u64>()],
            deltas in proptest::collection::vec(0u64..3_000_000, 1..200),
        ) {
            let mut w = PollWindow::new(start, window);
            let mut now = start;
            let mut last_check = start;
            for d in deltas {
                now = now.saturating_add(d);
                match w.step(now) {
                    PollStep::Expired => {
                        prop_assert!(now - start >= window);
                        break;
                    }
                    PollStep::Check => {
                        prop_assert!(now - last_check >= POLL_CHECK_INTERVAL_NS);
                        last_check = now;
                    }
                    PollStep::Poll => {
                        prop_assert!(now - start < window);
                        prop_assert!(now - last_check < POLL_CHECK_INTERVAL_NS);
                    }
                }
            }
        }

        #[test]
        fn ewma_between_old_and_new(ns in 1i64..=i64::MAX, block in 0i64..=i64::MAX, w in 1i64..=63) {
            let r = weighted_ewma(ns, block, w);
            let lo = ns.min(block);
            let hi = ns.max(block);
            // Rounding of the two shifts moves the result by at most 1.
            prop_assert!(r >= lo.saturating_sub(1) && r <= hi.saturating_add(1), "{} not in [{}, {}]", r, lo, hi);
        }

        #[test]
        fn ewma_any_input_no_panic(ns in any::<i64>(), block in any::<i64>(), w in any::<i64>()) {
            let r = weighted_ewma(ns, block, w);
            prop_assert!(r >= 0);
        }

        #[test]
        fn weight_validation(w in any::<i64>()) {
            let r = PollParams::default().with_weight(w).validate();
            if (0..=63).contains(&w) {
                let eff = r.unwrap().weight;
                prop_assert_eq!(eff, if w == 0 { 3 } else { w });
            } else {
                prop_assert!(r.is_err());
            }
        }
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One loop iteration (design note §1): timeout, polling, sleeping, bottom
//! halves, dispatch, timers. The steps are separate functions so that a
//! nested context ([`super::NestedContext`]) can hand its sleep to the
//! outer loop between them.

use std::sync::atomic::Ordering;

use super::{
    soonest, AioContext, EPOLL_FAIRNESS_INTERVAL, NOTIFIER_TOKEN, STATS_PUBLISH_INTERVAL,
    TIMER_TOKEN,
};
use crate::adaptive::{PollStep, PollWindow};
use crate::bh::{BhEntry, DELETED, IDLE, SCHEDULED};
use crate::error::{Error, Result};
use crate::handle::lock;
use crate::handler::{HandlerId, Readiness};

/// The state of one iteration between its steps.
#[derive(Debug)]
pub(super) struct Iteration {
    /// `poll(true)` (nested iterations are blocking ones).
    pub(super) blocking: bool,
    /// Polling was enabled when the iteration started.
    pub(super) polling: bool,
    /// Step 1's timestamp (0 when not needed).
    pub(super) start: u64,
    /// Step 2's timeout (`None` = infinite), reduced by the polling time.
    pub(super) timeout: Option<u64>,
    /// Polling found a ready handler or a notification.
    pub(super) poll_found: bool,
    /// When polling ended with work found (the end of the "block").
    pub(super) poll_end_ns: Option<u64>,
    /// epoll events already collected (by a check while polling).
    pub(super) nevents: Option<usize>,
    /// The fairness rule skipped the `epoll_wait` of this iteration.
    pub(super) skipped_epoll: bool,
    /// Polling time up to here is in `stats.poll_time_ns`.
    pub(super) poll_accounted: u64,
}

/// How a polling phase ended.
#[derive(Debug)]
pub(super) enum PollPhase {
    /// No polling (disabled, nothing to poll, timeout 0, or window 0).
    Skipped,
    /// Polling ended (work found, fd events collected, or window elapsed).
    Done,
    /// Nested only: a check is due; the outer loop gets a turn first.
    Sliced(PollWindow),
}

impl AioContext {
    pub(super) fn poll_inner(&mut self, blocking: bool) -> Result<bool> {
        let mut it = self.begin_iteration(blocking);
        self.poll_phase(&mut it, None, false);
        let nevents = self.wait_phase(&mut it);
        self.finish_iteration(it, nevents)
    }

    /// Steps 1 and 2: start time and timeout.
    #[inline(always)]
    pub(super) fn begin_iteration(&mut self, blocking: bool) -> Iteration {
        self.apply_pending_params();
        self.iteration = self.iteration.wrapping_add(1);
        self.stats.iterations += 1;
        let polling = self.adaptive.enabled();
        // 1. start (when polling, or for the timer timeout).
        // (QEMU reads the clock only when polling is enabled; a blocking
        // iteration also needs it for a timer deadline.)
        let start = if polling || (blocking && self.timers.len() > 0) {
            self.clock.now_ns()
        } else {
            0
        };
        self.adaptive.start(start);
        if polling {
            self.sample_window(start);
        }
        // 2. timeout
        let timeout = if blocking {
            self.compute_timeout(start)
        } else {
            Some(0)
        };
        Iteration {
            blocking,
            polling,
            start,
            timeout,
            poll_found: false,
            poll_end_ns: None,
            nevents: None,
            skipped_epoll: false,
            poll_accounted: start,
        }
    }

    /// Step 3: userspace polling. `resume` continues a nested polling phase
    /// that was sliced; `nested` slices instead of checking the fds itself.
    #[inline(always)]
    pub(super) fn poll_phase(
        &mut self,
        it: &mut Iteration,
        resume: Option<PollWindow>,
        nested: bool,
    ) -> PollPhase {
        let window = match resume {
            Some(w) if self.poll_list.is_empty() => {
                // Every handler left the list since the slice: polling is over.
                let now = self.clock.now_ns();
                self.account_poll_time(it, now);
                if let Some(t) = it.timeout {
                    it.timeout = Some(t.saturating_sub(w.elapsed(now)));
                }
                return PollPhase::Done;
            }
            Some(w) => w,
            None => {
                if it.polling && it.timeout != Some(0) && !self.poll_list.is_empty() {
                    let window = soonest(it.timeout, self.poll_ns());
                    if window == 0 {
                        return PollPhase::Skipped;
                    }
                    self.poll_set_started(true);
                    PollWindow::new(it.start, window)
                } else {
                    if it.timeout == Some(0) && self.poll_started {
                        // Notifications are suppressed: one round replaces
                        // the syscall (a pending notify() alone does not: fds
                        // may be ready too).
                        it.poll_found = self.run_poll_handlers_once().1;
                    }
                    return PollPhase::Skipped;
                }
            }
        };
        self.run_poll_handlers(it, window, nested)
    }

    /// Busy-polls in `window`, looking at the fds, idle handlers and the
    /// clock at every [`PollStep::Check`] (issue #16: a huge window must not
    /// starve handlers that are not on the poll list).
    fn run_poll_handlers(
        &mut self,
        it: &mut Iteration,
        mut window: PollWindow,
        nested: bool,
    ) -> PollPhase {
        let mut found;
        let mut now;
        loop {
            found = self.run_poll_handlers_once().0;
            now = self.clock.now_ns();
            if found {
                break;
            }
            match window.step(now) {
                PollStep::Poll => {}
                PollStep::Expired => break,
                PollStep::Check => {
                    // A long polling phase keeps the published statistics
                    // current (query-iothreads while it polls).
                    self.publish_stats();
                    if self.remove_idle_poll_handlers(now) {
                        found = true;
                        break;
                    }
                    if self.poll_list.is_empty() {
                        break;
                    }
                    if nested {
                        self.account_poll_time(it, now);
                        return PollPhase::Sliced(window);
                    }
                    if self.check_fds(it) {
                        break;
                    }
                }
            }
        }
        self.account_poll_time(it, now);
        if self.remove_idle_poll_handlers(now) {
            found = true;
        }
        if found {
            it.timeout = Some(0);
            it.poll_found = true;
            it.poll_end_ns = Some(now);
        } else if it.nevents.is_some() {
            it.timeout = Some(0);
        } else if let Some(t) = it.timeout {
            // Same end time as before polling.
            it.timeout = Some(t.saturating_sub(window.elapsed(now)));
        }
        PollPhase::Done
    }

    fn account_poll_time(&mut self, it: &mut Iteration, now: u64) {
        let spent = now.saturating_sub(it.poll_accounted);
        self.stats.poll_time_ns = self.stats.poll_time_ns.saturating_add(spent);
        it.poll_accounted = now;
    }

    /// A non-blocking `epoll_wait` during polling. Returns whether it found
    /// something to dispatch (events stay in the buffer for step 7). The
    /// notifier eventfd made readable by a nested context itself carries no
    /// news and does not count.
    pub(super) fn check_fds(&mut self, it: &mut Iteration) -> bool {
        let n = match self.epoll.wait(&mut self.events, Some(0)) {
            Ok(n) => n,
            Err(e) => {
                self.stats.epoll_errors += 1;
                self.iteration_error
                    .get_or_insert(Error::io("epoll_wait", e));
                it.nevents = Some(0);
                return true;
            }
        };
        self.poll_streak = 0;
        let kicked = self.nested_kicked();
        let news = self
            .events
            .iter()
            .take(n)
            .any(|ev| !(kicked && ev.u64 == NOTIFIER_TOKEN));
        if news {
            it.nevents = Some(n);
        }
        news
    }

    /// Steps 4 and 5 of a standalone iteration: may sleep, `epoll_wait`,
    /// accept the notification. Returns the number of epoll events.
    #[inline(always)]
    pub(super) fn wait_phase(&mut self, it: &mut Iteration) -> usize {
        let mut announced = false;
        if it.timeout != Some(0) {
            announced = true;
            if self.shared.notifier.begin_may_sleep() {
                // A notification is pending: we will not sleep, so poll mode
                // (and the guest's suppressed kicks) can stay as it is.
                it.timeout = Some(0);
            } else if self.poll_started && self.poll_set_started(false) {
                // The final poll after poll_end found work.
                it.timeout = Some(0);
            }
            if it.timeout != Some(0) {
                // About to sleep: make the snapshot current first.
                self.publish_stats();
            }
        }
        let slept = it.timeout != Some(0) && it.nevents.is_none();
        let nevents = self.collect_events(it);
        if slept && nevents > 0 && it.polling {
            self.resume_poll_mode(nevents);
        }
        // 5. (As in QEMU, only a blocking iteration accepts the notification:
        // a non-blocking one leaves `notified` set, which at worst makes the
        // next blocking iteration return at once — never a lost wake-up.)
        if announced {
            self.shared.notifier.end_may_sleep();
        }
        self.accept_and_poll_only(it);
        nevents
    }

    /// The `epoll_wait` of step 4 with `it.timeout`, unless events were
    /// collected already or the fairness rule skips it.
    #[inline(always)]
    pub(super) fn collect_events(&mut self, it: &mut Iteration) -> usize {
        if let Some(n) = it.nevents {
            return n;
        }
        if it.poll_found && self.poll_streak < EPOLL_FAIRNESS_INTERVAL {
            self.poll_streak += 1;
            it.skipped_epoll = true;
            return 0;
        }
        self.poll_streak = 0;
        if it.timeout != Some(0) {
            self.stats.blocking_waits += 1;
        }
        match self.epoll.wait(&mut self.events, it.timeout) {
            Ok(n) => n,
            Err(e) => self.wait_failed(e),
        }
    }

    #[cold]
    fn wait_failed(&mut self, e: std::io::Error) -> usize {
        self.stats.epoll_errors += 1;
        self.iteration_error
            .get_or_insert(Error::io("epoll_wait", e));
        0
    }

    /// End of step 5: a blocking iteration accepts the notification; poll-only
    /// handlers get their poll after the wait.
    #[inline(always)]
    pub(super) fn accept_and_poll_only(&mut self, it: &Iteration) {
        if it.blocking {
            self.shared.notifier.accept();
        }
        if self.poll_only > 0 && it.polling {
            // Nothing wakes the loop for poll-only handlers: check them after
            // every wait.
            self.poll_poll_only_handlers();
        }
    }

    /// Steps 6 to 8: `block_ns`, bottom halves, dispatch, adaptive update,
    /// timers. Returns the progress, or the iteration's first error.
    #[inline(always)]
    pub(super) fn finish_iteration(&mut self, it: Iteration, nevents: usize) -> Result<bool> {
        // 6. block_ns excludes handler run time (only used when polling).
        let end = match (it.polling, it.skipped_epoll, it.poll_end_ns) {
            (false, _, _) => it.start,
            (true, true, Some(t)) => t,
            (true, _, _) => self.clock.now_ns(),
        };
        let block_ns = self.adaptive.block_ns(end);

        // 7. bottom halves, then fd and poll handlers.
        let mut progress = self.run_bhs();
        progress |= self.dispatch(nevents, end);

        // 8. polling times, then timers.
        if it.polling && self.adaptive.enabled() {
            self.update_polling(block_ns);
        }
        progress |= self.run_timers();
        if self.iteration % STATS_PUBLISH_INTERVAL == 0 {
            self.publish_stats();
        }
        match self.iteration_error.take() {
            None => Ok(progress),
            Some(e) => Err(e),
        }
    }

    #[inline(always)]
    pub(super) fn run_bhs(&mut self) -> bool {
        if !self.shared.has_bhs() {
            return false;
        }
        self.run_bhs_slow()
    }

    #[inline(never)]
    fn run_bhs_slow(&mut self) -> bool {
        let mut batch = std::mem::take(&mut self.bh_batch);
        self.shared.take_bhs(&mut batch);
        if batch.is_empty() {
            self.bh_batch = batch;
            return false;
        }
        let mut progress = false;
        for entry in batch.drain(..) {
            match entry {
                BhEntry::Oneshot(f) => {
                    f(self);
                    self.stats.bh_runs += 1;
                    progress = true;
                }
                BhEntry::Reusable(inner) => {
                    let old = inner.flags.fetch_and(!(SCHEDULED | IDLE), Ordering::AcqRel);
                    if old & DELETED != 0 || old & SCHEDULED == 0 {
                        continue;
                    }
                    {
                        let mut cb = lock(&inner.cb);
                        (*cb)(self);
                    }
                    self.stats.bh_runs += 1;
                    if old & IDLE == 0 {
                        progress = true;
                    }
                }
            }
        }
        // Keep the allocation unless a nested poll() stored one meanwhile.
        if self.bh_batch.capacity() == 0 {
            self.bh_batch = batch;
        }
        progress
    }

    /// Builds the dispatch list from the epoll events and the poll-ready
    /// handlers, then dispatches it.
    #[inline(always)]
    pub(super) fn dispatch(&mut self, nevents: usize, now: u64) -> bool {
        if self.ready_poll.is_empty() {
            // Fast paths: nothing, or a single epoll event (the common
            // wake-up). It is copied out of the buffer before its callback
            // runs (a nested poll() reuses the buffer), and needs no
            // dispatch list: epoll reports each fd at most once per call.
            match nevents {
                0 => return false,
                1 => {
                    let Some(ev) = self.events.first().copied() else {
                        return false;
                    };
                    return self.dispatch_event(ev, now);
                }
                _ => {}
            }
        } else if nevents == 0 && self.ready_poll.len() == 1 {
            // One handler found ready by poll() and no fd event: the common
            // polling hit, dispatched without building a list.
            let Some(id) = self.ready_poll.pop() else {
                return false;
            };
            return match self.entry_mut(id) {
                Some(e) if e.poll_ready && !e.queued => self.dispatch_one(id, 0, now),
                _ => false,
            };
        }
        let mut list = std::mem::take(&mut self.dispatch_list);
        list.clear();
        for i in 0..nevents.min(self.events.len()) {
            let Some(ev) = self.events.get(i).copied() else {
                break;
            };
            let token = ev.u64;
            if token >= TIMER_TOKEN {
                self.internal_event(token);
                continue;
            }
            let id = HandlerId(token);
            if let Some(e) = self.entry_mut(id) {
                e.revents |= ev.events;
                if !e.queued {
                    e.queued = true;
                    list.push(id);
                }
            }
        }
        if !self.ready_poll.is_empty() {
            let mut ready = std::mem::take(&mut self.ready_poll);
            for id in &ready {
                if let Some(e) = self.entry_mut(*id) {
                    if e.poll_ready && !e.queued {
                        e.queued = true;
                        list.push(*id);
                    }
                }
            }
            ready.clear();
            // Nothing can have been pushed meanwhile (no callback ran).
            self.ready_poll = ready;
        }
        let mut progress = false;
        for id in list.iter().copied() {
            progress |= self.dispatch_one(id, 0, now);
        }
        list.clear();
        if self.dispatch_list.capacity() == 0 {
            self.dispatch_list = list;
        }
        progress
    }

    /// The notifier or the nested timerfd was reported readable.
    #[cold]
    fn internal_event(&mut self, token: u64) {
        if token == NOTIFIER_TOKEN {
            // A nested context keeps the eventfd readable on purpose while
            // it polls (so that the outer loop does not block): leave it.
            if !self.nested_kicked() {
                self.shared.notifier.drain();
                self.stats.eventfd_wakeups += 1;
            }
        } else {
            self.nested_timer_fired();
        }
    }

    /// Dispatches the handler of one epoll event (or drains the notifier).
    #[inline]
    fn dispatch_event(&mut self, ev: libc::epoll_event, now: u64) -> bool {
        let token = ev.u64;
        if token >= TIMER_TOKEN {
            self.internal_event(token);
            return false;
        }
        self.dispatch_one(HandlerId(token), ev.events, now)
    }

    /// Dispatches one handler: takes it out of its slot while calling it, so
    /// that it may remove itself (tombstone) or anything else.
    /// `events` are epoll events not yet merged into the entry's `revents`.
    #[inline]
    pub(super) fn dispatch_one(&mut self, id: HandlerId, events: u32, now: u64) -> bool {
        let iteration = self.iteration;
        let join = self.adaptive.enabled();
        let started = self.poll_started;
        let Some(e) = self.entry_mut(id) else {
            return false;
        };
        let revents = std::mem::take(&mut e.revents) | events;
        let poll_ready = std::mem::take(&mut e.poll_ready);
        e.queued = false;
        let ready = Readiness::from_epoll(revents, e.interest);
        let Some(mut h) = e.handler.take() else {
            // Running already (nested poll from its own callback).
            return false;
        };
        let run_poll_ready = poll_ready && revents == 0;
        let will_run = run_poll_ready || !ready.is_empty();
        let mut joined = false;
        if will_run {
            e.last_dispatch_ns = now;
            e.dispatched_iter = iteration;
            if join && e.has_poll && !e.on_poll_list {
                // Activity is likely to continue: start polling this handler.
                e.on_poll_list = true;
                if started {
                    h.poll_begin();
                    e.poll_begun = true;
                }
                joined = true;
            }
        }
        if joined {
            self.poll_list.push(id);
        }
        if run_poll_ready {
            h.poll_ready(self);
        } else if will_run {
            h.ready(self, ready);
        }

        // Put the handler back, or finish a removal made while it ran.
        let removed = match self.slots.get_mut(id.index()) {
            Some(slot) if slot.generation == id.generation() => match slot.entry.as_mut() {
                Some(e) if !e.removed => {
                    if will_run {
                        e.dispatch_count += 1;
                    }
                    e.handler = Some(h);
                    return self.note_dispatch(will_run);
                }
                Some(_) => true,
                None => false,
            },
            _ => false,
        };
        if removed {
            drop(self.free_slot(id));
        }
        drop(h);
        self.note_dispatch(will_run)
    }

    pub(super) fn note_dispatch(&mut self, ran: bool) -> bool {
        if ran {
            self.stats.dispatches += 1;
        }
        ran
    }

    #[inline(always)]
    pub(super) fn run_timers(&mut self) -> bool {
        if self.timers.len() == 0 {
            return false;
        }
        self.run_timers_slow()
    }

    #[inline(never)]
    fn run_timers_slow(&mut self) -> bool {
        let now = self.clock.now_ns();
        let limit = self.timers.id_limit();
        let mut progress = false;
        while let Some((id, mut cb)) = self.timers.take_expired(now, limit) {
            cb(self);
            self.stats.timer_runs += 1;
            progress = true;
            self.timers.finish(id, cb, now);
        }
        progress
    }
}

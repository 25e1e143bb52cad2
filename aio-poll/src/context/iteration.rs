//! One loop iteration (design note §1): timeout, polling, sleeping, bottom halves, dispatch, timers.

use std::sync::atomic::Ordering;

use super::{soonest, AioContext, EPOLL_FAIRNESS_INTERVAL, NOTIFIER_TOKEN, STATS_PUBLISH_INTERVAL};
use crate::bh::{BhEntry, DELETED, IDLE, SCHEDULED};
use crate::handle::lock;
use crate::handler::HandlerId;

impl AioContext {
    pub(super) fn poll_inner(&mut self, blocking: bool) -> bool {
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
        let mut timeout = if blocking {
            self.compute_timeout(start)
        } else {
            Some(0)
        };
        let mut poll_found = false;
        // When polling ended with work found, the time it ended is the end
        // of the "block" too (no wait follows): saves a clock read.
        let mut poll_end_ns = None;

        // 3. userspace polling
        if polling && timeout != Some(0) && !self.poll_list.is_empty() {
            let window = soonest(timeout, self.poll_ns());
            if window > 0 {
                self.poll_set_started(true);
                let (found, elapsed) = self.run_poll_handlers(window, start);
                if found {
                    timeout = Some(0);
                    poll_found = true;
                    poll_end_ns = Some(start.saturating_add(elapsed));
                } else if let Some(t) = timeout {
                    // Same end time as before polling.
                    timeout = Some(t.saturating_sub(elapsed));
                }
            }
        } else if timeout == Some(0) && self.poll_started {
            // Notifications are suppressed: one round replaces the syscall
            // (a pending notify() alone does not: fds may be ready too).
            poll_found = self.run_poll_handlers_once().1;
        }

        // 4. may sleep
        let mut announced = false;
        if timeout != Some(0) {
            announced = true;
            if self.shared.notifier.begin_may_sleep() {
                // A notification is pending: we will not sleep, so poll mode
                // (and the guest's suppressed kicks) can stay as it is.
                timeout = Some(0);
            } else if self.poll_started && self.poll_set_started(false) {
                // The final poll after poll_end found work.
                timeout = Some(0);
            }
            if timeout != Some(0) {
                // About to sleep: make the snapshot current first.
                self.publish_stats();
            }
        }
        let skip_epoll = poll_found && self.poll_streak < EPOLL_FAIRNESS_INTERVAL;
        let nevents = if skip_epoll {
            self.poll_streak += 1;
            0
        } else {
            self.poll_streak = 0;
            if timeout != Some(0) {
                self.stats.blocking_waits += 1;
            }
            match self.epoll.wait(&mut self.events, timeout) {
                Ok(n) => n,
                Err(_) => {
                    self.stats.epoll_errors += 1;
                    0
                }
            }
        };
        // 5. (As in QEMU, only a blocking iteration accepts the notification:
        // a non-blocking one leaves `notified` set, which at worst makes the
        // next blocking iteration return at once — never a lost wake-up.)
        if announced {
            self.shared.notifier.end_may_sleep();
        }
        if blocking {
            self.shared.notifier.accept();
        }
        if self.poll_only > 0 && polling {
            // Nothing wakes the loop for poll-only handlers: check them after
            // every wait.
            self.poll_poll_only_handlers();
        }

        // 6. block_ns excludes handler run time (only used when polling).
        let end = match (polling, skip_epoll, poll_end_ns) {
            (false, _, _) => start,
            (true, true, Some(t)) => t,
            (true, _, _) => self.clock.now_ns(),
        };
        let block_ns = self.adaptive.block_ns(end);

        // 7. bottom halves, then fd and poll handlers.
        let mut progress = self.run_bhs();
        progress |= self.dispatch(nevents, end);

        // 8. polling times, then timers.
        if polling && self.adaptive.enabled() {
            self.update_polling(block_ns);
        }
        progress |= self.run_timers();
        if self.iteration % STATS_PUBLISH_INTERVAL == 0 {
            self.publish_stats();
        }
        progress
    }

    pub(super) fn run_bhs(&mut self) -> bool {
        if !self.shared.has_bhs() {
            return false;
        }
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
            if token == NOTIFIER_TOKEN {
                self.shared.notifier.drain();
                self.stats.eventfd_wakeups += 1;
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

    /// Dispatches the handler of one epoll event (or drains the notifier).
    #[inline]
    fn dispatch_event(&mut self, ev: libc::epoll_event, now: u64) -> bool {
        let token = ev.u64;
        if token == NOTIFIER_TOKEN {
            self.shared.notifier.drain();
            self.stats.eventfd_wakeups += 1;
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
        let Some(e) = self.entry_mut(id) else {
            return false;
        };
        let revents = std::mem::take(&mut e.revents) | events;
        let poll_ready = std::mem::take(&mut e.poll_ready);
        e.queued = false;
        let interest = e.interest;
        let Some(mut h) = e.handler.take() else {
            // Running already (nested poll from its own callback).
            return false;
        };
        let readable = revents
            & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32
            != 0;
        let writable = revents & (libc::EPOLLOUT | libc::EPOLLERR) as u32 != 0;
        let will_run = (poll_ready && revents == 0)
            || (readable && interest.is_readable())
            || (writable && interest.is_writable());
        if will_run {
            e.last_dispatch_ns = now;
            e.dispatched_iter = iteration;
            if join && e.has_poll && !e.on_poll_list {
                // Activity is likely to continue: start polling this handler.
                self.join_poll_list(id, Some(&mut h), now);
            }
        }
        let mut ran = false;
        if poll_ready && revents == 0 {
            h.poll_ready(self);
            ran = true;
        } else {
            if readable && interest.is_readable() {
                h.read(self);
                ran = true;
            }
            if writable && interest.is_writable() && self.entry(id).is_some() {
                h.write(self);
                ran = true;
            }
        }

        // Put the handler back, or finish a removal made while it ran.
        let removed = match self.slots.get_mut(id.index()) {
            Some(slot) if slot.generation == id.generation() => match slot.entry.as_mut() {
                Some(e) if !e.removed => {
                    if ran {
                        e.dispatch_count += 1;
                    }
                    e.handler = Some(h);
                    return self.note_dispatch(ran);
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
        self.note_dispatch(ran)
    }

    pub(super) fn note_dispatch(&mut self, ran: bool) -> bool {
        if ran {
            self.stats.dispatches += 1;
        }
        ran
    }

    pub(super) fn run_timers(&mut self) -> bool {
        if self.timers.len() == 0 {
            return false;
        }
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

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Poll mode, the polling loop, the poll list's idle removal and the adaptive update.

use super::{AioContext, TIMER_TOKEN};
use crate::handler::HandlerId;

impl AioContext {
    /// Enters / leaves poll mode. Leaving calls `poll_end` then a final
    /// `poll()` on each handler (closes the race with an event that arrived
    /// while notifications were suppressed); returns whether that found work.
    pub(super) fn poll_set_started(&mut self, started: bool) -> bool {
        if started {
            // Also when already started: handlers left out by a resume
            // (`resume_poll_mode`) are begun now.
            if !self.poll_started || self.poll_stragglers {
                self.poll_started = true;
                self.begin_poll_list();
            }
            return false;
        }
        if !self.poll_started {
            return false;
        }
        self.poll_started = false;
        self.poll_stragglers = false;
        let mut found = false;
        for i in 0..self.poll_list.len() {
            let Some(id) = self.poll_list.get(i).copied() else {
                break;
            };
            let Some(e) = self.entry_mut(id) else {
                continue;
            };
            let Some(h) = e.handler.as_mut() else {
                continue;
            };
            if e.poll_begun {
                h.poll_end();
                e.poll_begun = false;
            }
            if h.poll() && !e.poll_ready {
                e.poll_ready = true;
                self.ready_poll.push(id);
                found = true;
            }
        }
        found
    }

    /// `poll_begin` on every handler of the poll list not begun yet.
    fn begin_poll_list(&mut self) {
        self.poll_stragglers = false;
        for i in 0..self.poll_list.len() {
            let Some(id) = self.poll_list.get(i).copied() else {
                break;
            };
            let Some(e) = self.entry_mut(id) else {
                continue;
            };
            if e.poll_begun {
                continue;
            }
            if let Some(h) = e.handler.as_mut() {
                h.poll_begin();
                e.poll_begun = true;
            }
        }
    }

    /// After a sleep that ended with events, while the next iteration will
    /// poll again: re-enters poll mode before dispatching, beginning every
    /// handler on the poll list that has no event of this wake-up, by itself
    /// or in its poll group (an extension beyond QEMU, which stays out of
    /// poll mode until its next polling phase). A virtqueue that did not
    /// kick is then suppressed again at once, instead of only after the
    /// dispatch of the ones that did: with several queues on one IOThread,
    /// the guest would otherwise kick each of them that it adds to in that
    /// time. Handlers with an event are dispatched as after any wake-up
    /// (outside poll mode) and begun by the next polling phase
    /// ([`Self::poll_set_started`]); if every handler had one, nothing
    /// changes. Poll mode still ends, with its final poll, before any sleep.
    pub(super) fn resume_poll_mode(&mut self, nevents: usize) {
        if self.poll_started || self.poll_list.is_empty() || self.poll_ns() == 0 {
            return;
        }
        let mut groups = std::mem::take(&mut self.woken_groups);
        groups.clear();
        for i in 0..nevents {
            let Some(token) = self.events.get(i).map(|ev| ev.u64) else {
                break;
            };
            if token >= TIMER_TOKEN {
                continue;
            }
            if let Some(e) = self.entry(HandlerId(token)) {
                if e.group != 0 {
                    groups.push(e.group);
                }
            }
        }
        // One pass: begin the handlers with no event in their group; poll
        // mode is on as soon as one was begun (none: nothing changes).
        let mut stragglers = false;
        for i in 0..self.poll_list.len() {
            let Some(id) = self.poll_list.get(i).copied() else {
                break;
            };
            let events = self.events.get(..nevents).unwrap_or(&[]);
            let Some(e) = self.entry(id) else {
                continue;
            };
            if events.iter().any(|ev| ev.u64 == id.0) || (e.group != 0 && groups.contains(&e.group))
            {
                stragglers = true;
                continue;
            }
            let Some(e) = self.entry_mut(id) else {
                continue;
            };
            if let Some(h) = e.handler.as_mut() {
                h.poll_begin();
                e.poll_begun = true;
                self.poll_started = true;
            }
        }
        self.poll_stragglers = self.poll_started && stragglers;
        self.woken_groups = groups;
    }

    /// One `poll()` on every poll-only handler (no fd) on the poll list.
    pub(super) fn poll_poll_only_handlers(&mut self) {
        for i in 0..self.poll_list.len() {
            let Some(id) = self.poll_list.get(i).copied() else {
                break;
            };
            let Some(e) = self.entry_mut(id) else {
                continue;
            };
            if e.fd.is_some() || e.poll_ready {
                continue;
            }
            if let Some(h) = e.handler.as_mut() {
                if h.poll() {
                    e.poll_ready = true;
                    self.ready_poll.push(id);
                }
            }
        }
    }

    /// One round over the poll list plus the notifier. Returns
    /// (anything ready including the notifier, a handler ready).
    pub(super) fn run_poll_handlers_once(&mut self) -> (bool, bool) {
        let mut found = self.shared.notifier.is_notified();
        let mut handler_found = false;
        for i in 0..self.poll_list.len() {
            let Some(id) = self.poll_list.get(i).copied() else {
                break;
            };
            let Some(slot) = self.slots.get_mut(id.index()) else {
                continue;
            };
            let Some(e) = slot.entry.as_mut() else {
                continue;
            };
            if e.removed || e.poll_ready {
                continue;
            }
            if let Some(h) = e.handler.as_mut() {
                if h.poll() {
                    e.poll_ready = true;
                    self.ready_poll.push(id);
                    handler_found = true;
                }
            }
        }
        if handler_found {
            self.stats.successful_polls += 1;
        }
        found |= handler_found;
        (found, handler_found)
    }

    /// Removes handlers without dispatch for the idle timeout from the poll
    /// list: `poll_end`, then one final `poll()`. Returns whether a final poll
    /// found work.
    pub(super) fn remove_idle_poll_handlers(&mut self, now: u64) -> bool {
        let before = self.poll_list.len();
        let found = self.remove_idle_inner(now);
        if self.poll_list.len() != before {
            self.refresh_window();
        }
        found
    }

    /// Classic: the window is the maximum `ns` over the (changed) poll list.
    pub(super) fn refresh_window(&mut self) {
        let slots = &self.slots;
        let ns = self.poll_list.iter().filter_map(|id| {
            let slot = slots.get(id.index())?;
            (slot.generation == id.generation())
                .then_some(())
                .and(slot.entry.as_ref())
                .map(|e| &e.ns)
        });
        self.adaptive.refresh_window(ns);
    }

    pub(super) fn remove_idle_inner(&mut self, now: u64) -> bool {
        let mut found = false;
        let mut i = 0;
        while i < self.poll_list.len() {
            let Some(id) = self.poll_list.get(i).copied() else {
                break;
            };
            let timeout = self.idle_timeout_ns;
            let started = self.poll_started;
            let Some(e) = self.entry_mut(id) else {
                self.poll_list.remove(i);
                continue;
            };
            if e.fd.is_none() || now.saturating_sub(e.last_dispatch_ns) < timeout {
                i += 1;
                continue;
            }
            e.on_poll_list = false;
            if let Some(h) = e.handler.as_mut() {
                if e.poll_begun {
                    h.poll_end();
                    e.poll_begun = false;
                    if started && h.poll() && !e.poll_ready {
                        e.poll_ready = true;
                        self.ready_poll.push(id);
                        found = true;
                    }
                }
            }
            self.poll_list.remove(i);
        }
        found
    }

    /// Step 8: the adaptive update over the poll list.
    pub(super) fn update_polling(&mut self, block_ns: i64) {
        let iteration = self.iteration;
        let refs = self
            .slots
            .iter_mut()
            .filter_map(|s| s.entry.as_mut())
            .filter(|e| e.on_poll_list && !e.removed)
            .map(|e| (&mut e.ns, e.dispatched_iter == iteration));
        let adj = self.adaptive.update(block_ns, refs);
        self.stats.grow_count += adj.grows;
        self.stats.shrink_count += adj.shrinks;
        self.snapshot_dirty = true;
        let h = &mut self.stats.poll_ns_histogram;
        h.handler_updates += adj.handler_updates;
        h.handler_resets += adj.handler_resets;
        if adj.poll_ns_updated {
            h.poll_ns_updates += 1;
        }
        if adj.poll_ns_reset {
            h.poll_ns_resets += 1;
        }
    }

    /// Histogram sampling: each polling-enabled iteration contributes the
    /// window it polls with, weighted by its duration (known when the next
    /// iteration starts, so no extra clock read is needed).
    pub(super) fn sample_window(&mut self, start: u64) {
        if let Some((poll_ns, max, prev_start)) = self.hist_pending.take() {
            let duration = start.saturating_sub(prev_start);
            self.stats.poll_ns_histogram.record(poll_ns, max, duration);
            self.snapshot_dirty = true;
        }
        let max = u64::try_from(self.adaptive.params().max_ns).unwrap_or(0);
        self.hist_pending = Some((self.poll_ns(), max, start));
    }
}

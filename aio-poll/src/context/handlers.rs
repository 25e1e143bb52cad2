// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Handler slot table: add / modify / remove (also from callbacks) and joining the poll list.

use std::os::fd::{AsFd, AsRawFd};

use super::{AioContext, Entry, OwnedHandlerFd, Slot};
use crate::error::{Error, Result};
use crate::handler::{Callbacks, FdHandler, HandlerId, Interest, PollHandler};
use crate::sys::epoll::Ctl;

impl AioContext {
    // ----- handlers -----

    pub(super) fn entry(&self, id: HandlerId) -> Option<&Entry> {
        let slot = self.slots.get(id.index())?;
        if slot.generation != id.generation() {
            return None;
        }
        slot.entry.as_ref().filter(|e| !e.removed)
    }

    pub(super) fn entry_mut(&mut self, id: HandlerId) -> Option<&mut Entry> {
        let slot = self.slots.get_mut(id.index())?;
        if slot.generation != id.generation() {
            return None;
        }
        slot.entry.as_mut().filter(|e| !e.removed)
    }

    pub(super) fn insert(&mut self, entry: Entry) -> Result<HandlerId> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| Error::TooManyHandlers)?;
                self.slots.push(Slot::default());
                i
            }
        };
        let Some(slot) = self.slots.get_mut(index as usize) else {
            // Unreachable: `index` came from the free list or was just pushed.
            return Err(Error::TooManyHandlers);
        };
        slot.entry = Some(entry);
        self.live_handlers += 1;
        Ok(HandlerId::new(index, slot.generation))
    }

    pub(super) fn free_slot(&mut self, id: HandlerId) -> Option<Entry> {
        let slot = self.slots.get_mut(id.index())?;
        if slot.generation != id.generation() {
            return None;
        }
        let entry = slot.entry.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index() as u32);
        self.live_handlers -= 1;
        Some(entry)
    }

    fn new_entry(fd: Option<OwnedHandlerFd>, interest: Interest, h: Callbacks) -> Entry {
        let raw_fd = fd.as_ref().map_or(-1, |f| f.as_fd().as_raw_fd());
        Entry {
            fd,
            raw_fd,
            interest,
            has_poll: h.has_poll(),
            handler: Some(h),
            removed: false,
            on_poll_list: false,
            poll_begun: false,
            group: 0,
            ns: 0,
            last_dispatch_ns: 0,
            dispatched_iter: 0,
            dispatch_count: 0,
            revents: 0,
            poll_ready: false,
            queued: false,
        }
    }

    fn add_with_fd(
        &mut self,
        fd: OwnedHandlerFd,
        interest: Interest,
        h: Callbacks,
    ) -> Result<HandlerId> {
        let entry = Self::new_entry(Some(fd), interest, h);
        let raw = entry.raw_fd;
        let id = self.insert(entry)?;
        if let Err(e) = self
            .epoll
            .ctl(Ctl::Add, raw, interest.epoll_events(), id.as_u64())
        {
            // Drops the fd and the handler: nothing was registered.
            drop(self.free_slot(id));
            return Err(Error::io(Ctl::Add.op_name(), e));
        }
        Ok(id)
    }

    /// Registers `handler` on `fd` (level-triggered) for `interest`.
    ///
    /// The context owns `fd` from now on: it leaves the epoll set and is
    /// dropped (closed, unless it is a shared handle such as an `Arc` or a
    /// [`SharedEventFd`](crate::SharedEventFd)) when the handler is removed
    /// or the context is dropped. On error both `fd` and `handler` are
    /// dropped.
    pub fn add_fd_handler(
        &mut self,
        fd: impl AsFd + Send + 'static,
        interest: Interest,
        handler: impl FdHandler + 'static,
    ) -> Result<HandlerId> {
        self.add_with_fd(Box::new(fd), interest, Callbacks::Fd(Box::new(handler)))
    }

    /// Like [`add_fd_handler`](Self::add_fd_handler) for a handler that can
    /// also be polled: it joins the poll list on its first dispatch while
    /// polling is enabled (QEMU's `aio_set_fd_handler` with `io_poll`) and
    /// leaves it after [`set_poll_idle_timeout`](Self::set_poll_idle_timeout)
    /// without dispatch.
    pub fn add_polled_fd_handler<H>(
        &mut self,
        fd: impl AsFd + Send + 'static,
        interest: Interest,
        handler: H,
    ) -> Result<HandlerId>
    where
        H: FdHandler + PollHandler + 'static,
    {
        self.add_with_fd(Box::new(fd), interest, Callbacks::FdPoll(Box::new(handler)))
    }

    /// Registers a poll-only handler (no fd), e.g. a completion ring check.
    /// It stays on the poll list while polling is enabled (`max_ns > 0`; it
    /// never idles out): it is polled in every polling window and once after
    /// every wait. Nothing wakes a sleeping loop for it, so whoever makes it
    /// ready must also call [`ContextHandle::notify`](crate::ContextHandle::notify).
    /// With polling disabled it is never polled.
    pub fn add_poll_handler(&mut self, handler: impl PollHandler + 'static) -> Result<HandlerId> {
        let id = self.insert(Self::new_entry(
            None,
            Interest::empty(),
            Callbacks::Poll(Box::new(handler)),
        ))?;
        self.poll_only += 1;
        if self.adaptive.enabled() {
            let now = self.clock.now_ns();
            self.join_poll_list(id, now);
        }
        Ok(id)
    }

    /// Changes the interest set of an fd handler.
    pub fn set_interest(&mut self, id: HandlerId, interest: Interest) -> Result<()> {
        let epoll_fd_events = interest.epoll_events();
        let entry = self.entry_mut(id).ok_or(Error::UnknownHandler(id))?;
        if entry.fd.is_none() {
            return Err(Error::NoFd(id));
        }
        let raw = entry.raw_fd;
        entry.interest = interest;
        self.epoll
            .ctl(Ctl::Modify, raw, epoll_fd_events, id.as_u64())
            .map_err(|e| Error::io(Ctl::Modify.op_name(), e))
    }

    /// Removes a handler (fd or poll-only) and drops it and its fd. Safe from
    /// inside any callback, including the handler's own: a running handler
    /// is dropped when its callback returns, and no further callback of it is
    /// made. `poll_end` is not called (as in QEMU).
    pub fn remove_handler(&mut self, id: HandlerId) -> Result<()> {
        let entry = self.entry_mut(id).ok_or(Error::UnknownHandler(id))?;
        let has_fd = entry.fd.is_some();
        let raw = entry.raw_fd;
        let running = entry.handler.is_none();
        entry.removed = true;
        let on_list = entry.on_poll_list;
        entry.on_poll_list = false;
        if !has_fd {
            self.poll_only = self.poll_only.saturating_sub(1);
        }
        if on_list {
            self.poll_list.retain(|x| *x != id);
            self.refresh_window();
        }
        self.ready_poll.retain(|x| *x != id);
        // The fd is still open (we own it), so the deletion only fails on a
        // broken epoll set; the handler is removed either way.
        let res = if has_fd {
            self.epoll.ctl(Ctl::Delete, raw, 0, 0)
        } else {
            Ok(())
        };
        if !running {
            // Drops the handler and its fd now (not re-entrantly: we are not
            // inside it).
            drop(self.free_slot(id));
        }
        res.map_err(|e| Error::io(Ctl::Delete.op_name(), e))
    }

    /// Number of registered handlers.
    pub fn handler_count(&self) -> usize {
        self.live_handlers
    }

    /// Whether `id` names a registered handler.
    pub fn contains_handler(&self, id: HandlerId) -> bool {
        self.entry(id).is_some()
    }

    /// Puts `id` in poll group `group` (0 = none, the default): handlers
    /// that serve one object, e.g. a virtqueue's notification handler and
    /// the handler of its I/O completions. After a sleep, the loop resumes
    /// poll mode before dispatching and calls `poll_begin` at once on the
    /// handlers of the poll list that had no event; an event of any handler
    /// of a group counts for all of the group (a virtqueue whose completion
    /// woke the loop is served as if it had been kicked). See the crate's
    /// design notes, "Resuming poll mode after a wake-up".
    pub fn set_poll_group(&mut self, id: HandlerId, group: u64) -> Result<()> {
        let e = self.entry_mut(id).ok_or(Error::UnknownHandler(id))?;
        e.group = group;
        Ok(())
    }

    /// Whether `id` is currently on the poll list.
    pub fn is_on_poll_list(&self, id: HandlerId) -> bool {
        self.entry(id).is_some_and(|e| e.on_poll_list)
    }

    /// Whether the loop is in poll mode (`poll_begin` called, `poll_end` not yet).
    pub fn in_poll_mode(&self) -> bool {
        self.poll_started
    }

    /// Puts `id` on the poll list (calling its `poll_begin` at once if the
    /// loop is in poll mode). A handler whose callback is running (taken out
    /// of its slot) gets its `poll_begin` from the dispatcher instead.
    pub(super) fn join_poll_list(&mut self, id: HandlerId, now: u64) {
        let started = self.poll_started;
        let Some(slot) = self.slots.get_mut(id.index()) else {
            return;
        };
        let Some(e) = slot.entry.as_mut() else {
            return;
        };
        if e.on_poll_list || e.removed || !e.has_poll {
            return;
        }
        e.on_poll_list = true;
        e.last_dispatch_ns = now;
        if started {
            if let Some(h) = e.handler.as_mut() {
                h.poll_begin();
                e.poll_begun = true;
            }
        }
        self.poll_list.push(id);
    }
}

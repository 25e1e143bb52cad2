//! Handler slot table: add / modify / remove (also from callbacks) and joining the poll list.

use std::os::fd::RawFd;

use super::{AioContext, Entry, Slot};
use crate::error::{Error, Result};
use crate::handler::{FdHandler, HandlerId, Interest};
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
                let i = u32::try_from(self.slots.len()).map_err(|e| {
                    Error::Io(std::io::Error::new(std::io::ErrorKind::OutOfMemory, e))
                })?;
                self.slots.push(Slot::default());
                i
            }
        };
        let slot = self
            .slots
            .get_mut(index as usize)
            .ok_or_else(|| Error::Io(std::io::Error::from(std::io::ErrorKind::NotFound)))?;
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

    pub(super) fn new_entry(fd: Option<RawFd>, interest: Interest, h: Box<dyn FdHandler>) -> Entry {
        Entry {
            fd,
            interest,
            has_poll: h.has_poll(),
            handler: Some(h),
            removed: false,
            on_poll_list: false,
            poll_begun: false,
            ns: 0,
            last_dispatch_ns: 0,
            dispatched_iter: 0,
            dispatch_count: 0,
            revents: 0,
            poll_ready: false,
            queued: false,
        }
    }

    /// Registers `h` on `fd` (level-triggered). The fd must stay open until
    /// the handler is removed; the context does not own it.
    pub fn add_fd_handler(
        &mut self,
        fd: RawFd,
        interest: Interest,
        h: Box<dyn FdHandler>,
    ) -> Result<HandlerId> {
        let id = self.insert(Self::new_entry(Some(fd), interest, h))?;
        if let Err(e) = self
            .epoll
            .ctl(Ctl::Add, fd, interest.epoll_events(), id.as_u64())
        {
            self.free_slot(id);
            return Err(Error::Io(e));
        }
        Ok(id)
    }

    /// Registers a poll-only handler (no fd), e.g. a completion ring check.
    /// It stays on the poll list while polling is enabled (`max_ns > 0`; it
    /// never idles out): it is polled in every polling window and once after
    /// every wait. Nothing wakes a sleeping loop for it, so whoever makes it
    /// ready must also call [`ContextHandle::notify`](crate::ContextHandle::notify). With polling disabled
    /// it is never polled.
    pub fn add_poll_handler(&mut self, h: Box<dyn FdHandler>) -> Result<HandlerId> {
        let id = self.insert(Self::new_entry(None, Interest::empty(), h))?;
        self.poll_only += 1;
        if self.adaptive.enabled() {
            let now = self.clock.now_ns();
            self.join_poll_list(id, None, now);
        }
        Ok(id)
    }

    /// Changes the interest set of an fd handler.
    pub fn modify_fd_handler(&mut self, id: HandlerId, interest: Interest) -> Result<()> {
        let epoll_fd_events = interest.epoll_events();
        let entry = self.entry_mut(id).ok_or(Error::UnknownHandler(id))?;
        let fd = entry.fd.ok_or(Error::NoFd(id))?;
        entry.interest = interest;
        self.epoll
            .ctl(Ctl::Modify, fd, epoll_fd_events, id.as_u64())
            .map_err(Error::Io)
    }

    /// Removes a handler. Safe from inside any callback, including the
    /// handler's own: a running handler is dropped when its callback returns,
    /// and no further callback of it is made. `poll_end` is not called (as in
    /// QEMU).
    pub fn remove_fd_handler(&mut self, id: HandlerId) -> Result<()> {
        let entry = self.entry_mut(id).ok_or(Error::UnknownHandler(id))?;
        let fd = entry.fd;
        if fd.is_none() {
            self.poll_only = self.poll_only.saturating_sub(1);
        }
        let entry = self.entry_mut(id).ok_or(Error::UnknownHandler(id))?;
        let running = entry.handler.is_none();
        entry.removed = true;
        let on_list = entry.on_poll_list;
        entry.on_poll_list = false;
        if on_list {
            self.poll_list.retain(|x| *x != id);
            self.refresh_window();
        }
        self.ready_poll.retain(|x| *x != id);
        let res = match fd {
            Some(fd) => self.epoll.ctl(Ctl::Delete, fd, 0, 0),
            None => Ok(()),
        };
        if !running {
            // Drops the handler now (not re-entrantly: we are not inside it).
            drop(self.free_slot(id));
        }
        match res {
            // The fd may have been closed already: the kernel dropped it from
            // the set on close, which is what we wanted.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::ENOENT)) => Ok(()),
            Err(e) => Err(Error::Io(e)),
            Ok(()) => Ok(()),
        }
    }

    /// Number of registered handlers.
    pub fn handler_count(&self) -> usize {
        self.live_handlers
    }

    /// Whether `id` names a registered handler.
    pub fn contains_handler(&self, id: HandlerId) -> bool {
        self.entry(id).is_some()
    }

    /// Whether `id` is currently on the poll list.
    pub fn is_on_poll_list(&self, id: HandlerId) -> bool {
        self.entry(id).is_some_and(|e| e.on_poll_list)
    }

    /// Whether the loop is in poll mode (`poll_begin` called, `poll_end` not yet).
    pub fn in_poll_mode(&self) -> bool {
        self.poll_started
    }

    /// `h` is the handler object when the caller holds it (during dispatch),
    /// `None` to use the one in the slot.
    pub(super) fn join_poll_list(
        &mut self,
        id: HandlerId,
        h: Option<&mut Box<dyn FdHandler>>,
        now: u64,
    ) {
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
            let h = match h {
                Some(h) => Some(h),
                None => e.handler.as_mut(),
            };
            if let Some(h) = h {
                h.poll_begin();
                e.poll_begun = true;
            }
        }
        self.poll_list.push(id);
    }
}

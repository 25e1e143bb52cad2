//! Fd handlers: the callback trait, the closure adapter, ids and interest sets.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};

use crate::context::AioContext;

/// Opaque id of a registered handler (slot index + generation, never reused
/// while the handler exists, stale ids are detected).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandlerId(pub(crate) u64);

impl HandlerId {
    pub(crate) fn new(index: u32, generation: u32) -> Self {
        HandlerId((u64::from(generation) << 32) | u64::from(index))
    }

    pub(crate) fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    pub(crate) fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The raw value (stable for the lifetime of the handler; for logs and stats).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for HandlerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handler#{}.{}", self.index(), self.generation())
    }
}

/// Which readiness an fd handler wants (a tiny bitflags type).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Interest(u8);

impl Interest {
    /// Call [`FdHandler::read`] when the fd is readable.
    pub const READABLE: Interest = Interest(1);
    /// Call [`FdHandler::write`] when the fd is writable.
    pub const WRITABLE: Interest = Interest(2);

    /// No interest: the fd stays registered but produces no events.
    pub const fn empty() -> Interest {
        Interest(0)
    }

    /// Whether READABLE is set.
    pub const fn is_readable(self) -> bool {
        self.0 & 1 != 0
    }

    /// Whether WRITABLE is set.
    pub const fn is_writable(self) -> bool {
        self.0 & 2 != 0
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn epoll_events(self) -> u32 {
        let mut ev = 0u32;
        if self.is_readable() {
            ev |= libc::EPOLLIN as u32;
        }
        if self.is_writable() {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }
}

impl BitOr for Interest {
    type Output = Interest;
    fn bitor(self, rhs: Interest) -> Interest {
        Interest(self.0 | rhs.0)
    }
}

impl BitOrAssign for Interest {
    fn bitor_assign(&mut self, rhs: Interest) {
        self.0 |= rhs.0;
    }
}

/// A handler registered on an fd (QEMU's `AioHandler`). All methods have
/// defaults. Callbacks get the context and may add, modify or remove any
/// handler, including themselves.
pub trait FdHandler: Send {
    /// The fd is readable (or in error / hang-up state).
    fn read(&mut self, _ctx: &mut AioContext) {}
    /// The fd is writable.
    fn write(&mut self, _ctx: &mut AioContext) {}
    /// Whether this handler implements userspace polling; if true the four
    /// methods below are used.
    fn has_poll(&self) -> bool {
        false
    }
    /// Cheap readiness check, no syscall (e.g. "does the avail ring have new
    /// entries?"). Returning true marks the handler ready and ends polling.
    fn poll(&mut self) -> bool {
        false
    }
    /// Dispatched after [`FdHandler::poll`] returned true.
    fn poll_ready(&mut self, _ctx: &mut AioContext) {}
    /// The loop enters poll mode (e.g. suppress guest notifications).
    fn poll_begin(&mut self) {}
    /// The loop leaves poll mode (e.g. re-enable guest notifications).
    fn poll_end(&mut self) {}
}

type Callback = Box<dyn FnMut(&mut AioContext) + Send>;

/// Closure adapter for handlers without polling.
///
/// ```
/// use aio_poll::{FdHandler, FnHandler};
/// let h = FnHandler::read(|_ctx| println!("readable")).on_write(|_ctx| println!("writable"));
/// assert!(!h.has_poll());
/// ```
#[derive(Default)]
pub struct FnHandler {
    read: Option<Callback>,
    write: Option<Callback>,
}

impl FnHandler {
    /// A handler whose read callback is `f`.
    pub fn read(f: impl FnMut(&mut AioContext) + Send + 'static) -> FnHandler {
        FnHandler {
            read: Some(Box::new(f)),
            write: None,
        }
    }

    /// A handler whose write callback is `f`.
    pub fn write(f: impl FnMut(&mut AioContext) + Send + 'static) -> FnHandler {
        FnHandler {
            read: None,
            write: Some(Box::new(f)),
        }
    }

    /// Builder: sets the read callback.
    pub fn on_read(mut self, f: impl FnMut(&mut AioContext) + Send + 'static) -> FnHandler {
        self.read = Some(Box::new(f));
        self
    }

    /// Builder: sets the write callback.
    pub fn on_write(mut self, f: impl FnMut(&mut AioContext) + Send + 'static) -> FnHandler {
        self.write = Some(Box::new(f));
        self
    }

    /// Boxes the handler for [`AioContext::add_fd_handler`].
    pub fn boxed(self) -> Box<dyn FdHandler> {
        Box::new(self)
    }
}

impl fmt::Debug for FnHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnHandler")
            .field("read", &self.read.is_some())
            .field("write", &self.write.is_some())
            .finish()
    }
}

impl FdHandler for FnHandler {
    fn read(&mut self, ctx: &mut AioContext) {
        if let Some(f) = self.read.as_mut() {
            f(ctx);
        }
    }

    fn write(&mut self, ctx: &mut AioContext) {
        if let Some(f) = self.write.as_mut() {
            f(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interest_bits() {
        let rw = Interest::READABLE | Interest::WRITABLE;
        assert!(rw.is_readable() && rw.is_writable());
        assert!(Interest::empty().is_empty());
        assert_eq!(Interest::empty().epoll_events(), 0);
        assert_eq!(rw.epoll_events(), (libc::EPOLLIN | libc::EPOLLOUT) as u32);
    }

    #[test]
    fn handler_id_roundtrip() {
        let id = HandlerId::new(5, 9);
        assert_eq!((id.index(), id.generation()), (5, 9));
        assert_eq!(id.to_string(), "handler#5.9");
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Handlers: the fd and poll callback traits, the closure adapter, ids,
//! interest and readiness sets, and the `EventFd` adapter.

use std::fmt;
use std::ops::{BitOr, BitOrAssign, Deref};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

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

/// Which readiness an fd handler asks for (a tiny bitflags type).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Interest(u8);

impl Interest {
    /// Report the fd when it is readable.
    pub const READABLE: Interest = Interest(1);
    /// Report the fd when it is writable.
    pub const WRITABLE: Interest = Interest(2);

    /// No interest: the fd stays registered; only errors and hang-ups are
    /// reported (the kernel always reports those).
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

/// What the kernel reported for an fd, passed to [`FdHandler::ready`].
///
/// Readable and writable are reported only when asked for in the handler's
/// [`Interest`]; error and hang-up are always reported. The fd is
/// level-triggered: a handler that leaves an error or hang-up unhandled is
/// called again at once, so it should remove itself
/// ([`AioContext::remove_handler`]) when its peer is gone.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Default)]
pub struct Readiness(u8);

impl Readiness {
    /// The fd is readable.
    pub const READABLE: Readiness = Readiness(1);
    /// The fd is writable.
    pub const WRITABLE: Readiness = Readiness(2);
    /// An error is pending on the fd (`EPOLLERR`).
    pub const ERROR: Readiness = Readiness(4);
    /// The peer hung up (`EPOLLHUP` or `EPOLLRDHUP`).
    pub const HANG_UP: Readiness = Readiness(8);

    /// Nothing.
    pub const fn empty() -> Readiness {
        Readiness(0)
    }

    /// Whether the fd is readable.
    pub const fn is_readable(self) -> bool {
        self.0 & Self::READABLE.0 != 0
    }

    /// Whether the fd is writable.
    pub const fn is_writable(self) -> bool {
        self.0 & Self::WRITABLE.0 != 0
    }

    /// Whether an error is pending.
    pub const fn is_error(self) -> bool {
        self.0 & Self::ERROR.0 != 0
    }

    /// Whether the peer hung up.
    pub const fn is_hang_up(self) -> bool {
        self.0 & Self::HANG_UP.0 != 0
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Readiness) -> bool {
        self.0 & other.0 == other.0
    }

    /// The readiness of epoll `events` that `interest` asked for (errors and
    /// hang-ups always).
    pub(crate) fn from_epoll(events: u32, interest: Interest) -> Readiness {
        let mut r = 0u8;
        if interest.is_readable() && events & libc::EPOLLIN as u32 != 0 {
            r |= Self::READABLE.0;
        }
        if interest.is_writable() && events & libc::EPOLLOUT as u32 != 0 {
            r |= Self::WRITABLE.0;
        }
        if events & libc::EPOLLERR as u32 != 0 {
            r |= Self::ERROR.0;
        }
        if events & (libc::EPOLLHUP | libc::EPOLLRDHUP) as u32 != 0 {
            r |= Self::HANG_UP.0;
        }
        Readiness(r)
    }
}

impl BitOr for Readiness {
    type Output = Readiness;
    fn bitor(self, rhs: Readiness) -> Readiness {
        Readiness(self.0 | rhs.0)
    }
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::READABLE, "READABLE"),
            (Self::WRITABLE, "WRITABLE"),
            (Self::ERROR, "ERROR"),
            (Self::HANG_UP, "HANG_UP"),
        ];
        let mut first = true;
        for (bit, name) in names {
            if self.contains(bit) {
                if !first {
                    f.write_str(" | ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("(empty)")?;
        }
        Ok(())
    }
}

/// A handler called when its fd is ready (QEMU's `io_read` / `io_write`).
///
/// Callbacks get the context and may add, modify or remove any handler,
/// including themselves.
pub trait FdHandler: Send {
    /// The fd is ready; `ready` says how.
    fn ready(&mut self, ctx: &mut AioContext, ready: Readiness);
}

/// Userspace polling (QEMU's `io_poll`, `io_poll_ready`, `io_poll_begin`,
/// `io_poll_end`): a cheap readiness check the loop calls in its polling
/// window instead of sleeping.
///
/// Register it on an fd together with an [`FdHandler`]
/// ([`AioContext::add_polled_fd_handler`]: it joins the poll list on its
/// first dispatch) or alone ([`AioContext::add_poll_handler`]: always on
/// the poll list while polling is enabled).
pub trait PollHandler: Send {
    /// Cheap readiness check, no syscall (e.g. "does the avail ring have new
    /// entries?"). Returning true marks the handler ready and ends polling.
    fn poll(&mut self) -> bool;
    /// Runs after [`poll`](Self::poll) returned true (unless the fd reported
    /// an event in the same iteration: then [`FdHandler::ready`] runs).
    fn poll_ready(&mut self, ctx: &mut AioContext);
    /// The loop enters poll mode (e.g. suppress guest notifications).
    fn poll_begin(&mut self) {}
    /// The loop leaves poll mode (e.g. re-enable guest notifications); the
    /// loop then calls [`poll`](Self::poll) once more before it sleeps.
    fn poll_end(&mut self) {}
}

impl<T: FdHandler + ?Sized> FdHandler for Box<T> {
    fn ready(&mut self, ctx: &mut AioContext, ready: Readiness) {
        (**self).ready(ctx, ready);
    }
}

impl<T: PollHandler + ?Sized> PollHandler for Box<T> {
    fn poll(&mut self) -> bool {
        (**self).poll()
    }
    fn poll_ready(&mut self, ctx: &mut AioContext) {
        (**self).poll_ready(ctx);
    }
    fn poll_begin(&mut self) {
        (**self).poll_begin();
    }
    fn poll_end(&mut self) {
        (**self).poll_end();
    }
}

/// A handler with both traits (stored as one object).
pub(crate) trait FdPollHandler: FdHandler + PollHandler {}

impl<T: FdHandler + PollHandler> FdPollHandler for T {}

/// The callbacks of a registered handler.
pub(crate) enum Callbacks {
    Fd(Box<dyn FdHandler>),
    FdPoll(Box<dyn FdPollHandler>),
    Poll(Box<dyn PollHandler>),
}

impl Callbacks {
    /// Whether the handler can be polled (joins the poll list).
    pub(crate) fn has_poll(&self) -> bool {
        !matches!(self, Callbacks::Fd(_))
    }

    #[inline]
    pub(crate) fn ready(&mut self, ctx: &mut AioContext, ready: Readiness) {
        match self {
            Callbacks::Fd(h) => h.ready(ctx, ready),
            Callbacks::FdPoll(h) => h.ready(ctx, ready),
            Callbacks::Poll(_) => {}
        }
    }

    #[inline]
    pub(crate) fn poll(&mut self) -> bool {
        match self {
            Callbacks::Fd(_) => false,
            Callbacks::FdPoll(h) => h.poll(),
            Callbacks::Poll(h) => h.poll(),
        }
    }

    #[inline]
    pub(crate) fn poll_ready(&mut self, ctx: &mut AioContext) {
        match self {
            Callbacks::Fd(_) => {}
            Callbacks::FdPoll(h) => h.poll_ready(ctx),
            Callbacks::Poll(h) => h.poll_ready(ctx),
        }
    }

    pub(crate) fn poll_begin(&mut self) {
        match self {
            Callbacks::Fd(_) => {}
            Callbacks::FdPoll(h) => h.poll_begin(),
            Callbacks::Poll(h) => h.poll_begin(),
        }
    }

    pub(crate) fn poll_end(&mut self) {
        match self {
            Callbacks::Fd(_) => {}
            Callbacks::FdPoll(h) => h.poll_end(),
            Callbacks::Poll(h) => h.poll_end(),
        }
    }
}

type Callback = Box<dyn FnMut(&mut AioContext, Readiness) + Send>;

/// Closure adapter for fd handlers.
///
/// ```
/// use aio_poll::{FnHandler, Readiness};
/// let h = FnHandler::new(|_ctx, ready: Readiness| {
///     if ready.is_hang_up() {
///         println!("peer gone");
///     }
/// });
/// # drop(h);
/// ```
pub struct FnHandler(Callback);

impl FnHandler {
    /// A handler that calls `f` with the readiness.
    pub fn new(f: impl FnMut(&mut AioContext, Readiness) + Send + 'static) -> FnHandler {
        FnHandler(Box::new(f))
    }
}

impl fmt::Debug for FnHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnHandler")
    }
}

impl FdHandler for FnHandler {
    fn ready(&mut self, ctx: &mut AioContext, ready: Readiness) {
        (self.0)(ctx, ready);
    }
}

/// A `vmm-sys-util` [`EventFd`] shared between the context and its user.
///
/// `EventFd` (vmm-sys-util 0.15) does not implement [`AsFd`], so it cannot be
/// handed to [`AioContext::add_fd_handler`] directly; this cheap, cloneable
/// wrapper can: register one clone, keep another in the handler to read it.
/// The eventfd is closed when the last clone is dropped.
///
/// ```
/// use aio_poll::{AioContext, FnHandler, Interest, SharedEventFd};
/// use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
///
/// let mut ctx = AioContext::new().unwrap();
/// let kick = SharedEventFd::new(EventFd::new(EFD_NONBLOCK).unwrap());
/// let reader = kick.clone();
/// ctx.add_fd_handler(kick.clone(), Interest::READABLE, FnHandler::new(move |_ctx, _| {
///     let _ = reader.read();
/// })).unwrap();
/// kick.write(1).unwrap();
/// assert!(ctx.poll(true).unwrap());
/// ```
#[derive(Clone, Debug)]
pub struct SharedEventFd(Arc<EventFd>);

impl SharedEventFd {
    /// Wraps `efd`.
    pub fn new(efd: EventFd) -> SharedEventFd {
        SharedEventFd(Arc::new(efd))
    }
}

impl From<EventFd> for SharedEventFd {
    fn from(efd: EventFd) -> SharedEventFd {
        SharedEventFd::new(efd)
    }
}

impl Deref for SharedEventFd {
    type Target = EventFd;
    fn deref(&self) -> &EventFd {
        &self.0
    }
}

impl AsFd for SharedEventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the `EventFd` owns its descriptor and closes it only when it
        // is dropped; it lives in the `Arc` at least as long as `&self`, so the
        // descriptor stays open for the returned borrow's lifetime.
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

impl AsRawFd for SharedEventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
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
    fn readiness_from_epoll() {
        let all = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32;
        let r = Readiness::from_epoll(all, Interest::READABLE);
        assert!(r.is_readable() && !r.is_writable() && r.is_error() && r.is_hang_up());
        assert_eq!(format!("{r:?}"), "READABLE | ERROR | HANG_UP");
        let r = Readiness::from_epoll(libc::EPOLLRDHUP as u32, Interest::empty());
        assert_eq!(r, Readiness::HANG_UP);
        let r = Readiness::from_epoll(libc::EPOLLIN as u32, Interest::WRITABLE);
        assert!(r.is_empty());
        assert_eq!(format!("{r:?}"), "(empty)");
        assert!((Readiness::READABLE | Readiness::WRITABLE).contains(Readiness::WRITABLE));
    }

    #[test]
    fn handler_id_roundtrip() {
        let id = HandlerId::new(5, 9);
        assert_eq!((id.index(), id.generation()), (5, 9));
        assert_eq!(id.to_string(), "handler#5.9");
    }
}

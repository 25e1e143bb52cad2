// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The cross-thread notifier and the `notify_me` protocol (design note §1).
//!
//! `notify()` sets `notified`, issues a full fence and writes the eventfd only
//! if `notify_me != 0`. The loop adds 2 to `notify_me` right before it may
//! sleep (and re-checks `notified` after a full fence), so a busy or polling
//! loop is woken with no syscall at all: its poll phase reads `notified`.
//! Bit 0 of `notify_me` is set by an embedder between
//! [`AioContext::prepare`](crate::AioContext::prepare) and
//! [`AioContext::check_and_dispatch`](crate::AioContext::check_and_dispatch)
//! (the glib `aio_ctx_prepare`/`aio_ctx_check` equivalent).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// The notifier state shared between the loop and every handle.
#[derive(Debug)]
pub(crate) struct Notifier {
    notify_me: AtomicU32,
    notified: AtomicBool,
    event: EventFd,
    syscalls: AtomicU64,
}

impl Notifier {
    pub(crate) fn new() -> io::Result<Notifier> {
        Ok(Notifier {
            notify_me: AtomicU32::new(0),
            notified: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            syscalls: AtomicU64::new(0),
        })
    }

    /// Wakes the loop; a syscall only when it may be sleeping.
    pub(crate) fn notify(&self) {
        // Publish the work (BH queue, params, stop flag) before `notified`.
        self.notified.store(true, Ordering::Release);
        // Order the `notified` store before the `notify_me` load; pairs with the
        // fence in `begin_may_sleep`.
        fence(Ordering::SeqCst);
        if self.notify_me.load(Ordering::Relaxed) != 0 {
            self.kick();
        }
    }

    /// Unconditionally makes the eventfd readable (counted).
    fn kick(&self) {
        self.syscalls.fetch_add(1, Ordering::Relaxed);
        // EAGAIN means the counter is saturated, i.e. already readable.
        let _ = self.event.write(1);
    }

    /// Makes the eventfd readable without counting it as a notify() syscall
    /// (used by `prepare` for embedders).
    pub(crate) fn self_kick(&self) {
        let _ = self.event.write(1);
    }

    /// Cheap check used as the notifier's `poll()`.
    #[inline]
    pub(crate) fn is_notified(&self) -> bool {
        self.notified.load(Ordering::Acquire)
    }

    /// "I may sleep": `notify_me += 2`, full fence, re-check `notified`.
    /// Returns true if a notification is already pending (do not sleep).
    pub(crate) fn begin_may_sleep(&self) -> bool {
        self.notify_me.fetch_add(2, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.notified.load(Ordering::Acquire)
    }

    /// `notify_me -= 2` after the wait.
    pub(crate) fn end_may_sleep(&self) {
        self.notify_me.fetch_sub(2, Ordering::Release);
    }

    /// Embedding: an outer loop may sleep on our fd (`notify_me |= 1`).
    /// Returns true if a notification is already pending.
    pub(crate) fn set_external(&self) -> bool {
        self.notify_me.fetch_or(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.notified.load(Ordering::Acquire)
    }

    /// Embedding: the outer loop woke up (`notify_me &= !1`).
    pub(crate) fn clear_external(&self) {
        self.notify_me.fetch_and(!1, Ordering::Release);
    }

    /// `notify_accept`: clear `notified`; the work it announced is processed
    /// after this point.
    pub(crate) fn accept(&self) {
        // Nothing to accept: skip the store and the fence (hot path of a
        // polling loop). A notify() racing with this load leaves `notified`
        // set, which only makes the next iteration return at once.
        if !self.notified.load(Ordering::Acquire) {
            return;
        }
        self.notified.store(false, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Reads (clears) the eventfd after epoll reported it readable.
    pub(crate) fn drain(&self) {
        let _ = self.event.read();
    }

    /// Number of eventfd writes done by `notify()`.
    pub(crate) fn syscalls(&self) -> u64 {
        self.syscalls.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn notify_me(&self) -> u32 {
        self.notify_me.load(Ordering::SeqCst)
    }
}

impl AsRawFd for Notifier {
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_without_sleeper_is_free() {
        let n = Notifier::new().unwrap();
        for _ in 0..1000 {
            n.notify();
        }
        assert_eq!(n.syscalls(), 0);
        assert!(n.is_notified());
        n.accept();
        assert!(!n.is_notified());
    }

    #[test]
    fn notify_with_sleeper_writes_eventfd() {
        let n = Notifier::new().unwrap();
        assert!(!n.begin_may_sleep());
        assert_eq!(n.notify_me(), 2);
        n.notify();
        assert_eq!(n.syscalls(), 1);
        n.end_may_sleep();
        n.accept();
        n.drain();
        // Second drain: EAGAIN, ignored.
        n.drain();
        assert!(!n.set_external());
        n.notify();
        assert_eq!(n.syscalls(), 2);
        n.clear_external();
        assert_eq!(n.notify_me(), 0);
        // A pending notification is seen by the re-check.
        assert!(n.begin_may_sleep());
        n.end_may_sleep();
    }
}

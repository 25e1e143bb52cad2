//! `aio-poll`: a single-thread event loop in the style of QEMU's `AioContext`.
//!
//! * fd handlers on epoll ([`FdHandler`]: read / write callbacks), added,
//!   modified and removed at any time — also from inside a callback, including
//!   the handler that is running;
//! * userspace poll handlers (`poll`, `poll_ready`, `poll_begin`, `poll_end`)
//!   with QEMU's poll list (join on first dispatch, leave after an idle
//!   timeout, final poll when leaving poll mode);
//! * bottom halves ([`Bh`], [`ContextHandle::schedule_oneshot`]) and timers;
//! * a `Send + Sync` [`ContextHandle`] whose `notify()` costs no syscall while
//!   the loop is busy (the `notify_me` protocol);
//! * adaptive polling ([`adaptive`]) with QEMU's classic algorithm and the
//!   2026 weighted one, tunable at run time ([`PollParams`]);
//! * statistics as data ([`Stats`]);
//! * embeddable in another epoll loop (rust-vmm `event-manager`) through its
//!   epoll fd, [`AioContext::prepare`] and [`AioContext::check_and_dispatch`].
//!
//! ```
//! use aio_poll::{AioContext, PollParams};
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::sync::Arc;
//!
//! let mut ctx = AioContext::with_params(PollParams::default()).unwrap();
//! let handle = ctx.handle();
//! let done = Arc::new(AtomicBool::new(false));
//! let d = done.clone();
//! let t = std::thread::spawn(move || {
//!     handle.schedule_oneshot(move |_ctx| d.store(true, Ordering::SeqCst));
//! });
//! ctx.run(|_ctx| done.load(Ordering::SeqCst));
//! t.join().unwrap();
//! ```
#![deny(missing_docs)]

pub mod adaptive;
mod bh;
pub mod clock;
mod context;
mod error;
mod handle;
mod handler;
mod notifier;
mod params;
mod stats;
mod sys;
mod timer;

pub use bh::Bh;
pub use clock::{Clock, ManualClock, MonotonicClock};
pub use context::{
    AioContext, DEFAULT_POLL_IDLE_TIMEOUT, EPOLL_FAIRNESS_INTERVAL, IDLE_BH_TIMEOUT_NS,
    STATS_PUBLISH_INTERVAL,
};
pub use error::{Error, Result};
pub use handle::ContextHandle;
pub use handler::{FdHandler, FnHandler, HandlerId, Interest};
pub use params::{
    ParamError, PollAlgorithm, PollParams, DEFAULT_GROW, DEFAULT_MAX_NS, DEFAULT_SHRINK,
    DEFAULT_WEIGHT, MAX_WEIGHT,
};
pub use stats::{HandlerStats, PollNsHistogram, Stats, HISTOGRAM_BUCKETS};
pub use timer::TimerId;

/// The crate README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}

    #[test]
    fn thread_safety_contract() {
        // Compile-time checks: the handle and BHs cross threads freely, the
        // context moves to the thread that runs it.
        send_sync::<ContextHandle>();
        send_sync::<Bh>();
        send_sync::<Stats>();
        send_sync::<PollParams>();
        send::<AioContext>();
        send::<Error>();
    }
}

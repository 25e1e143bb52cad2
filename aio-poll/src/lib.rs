// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `aio-poll`: a single-thread event loop in the style of QEMU's `AioContext`.
//!
//! * fd handlers on epoll ([`FdHandler`], called with a [`Readiness`]); the
//!   context owns each registered fd (`impl AsFd`) and drops it on removal;
//!   handlers are added, modified and removed at any time — also from inside
//!   a callback, including the handler that is running;
//! * userspace polling ([`PollHandler`]: `poll`, `poll_ready`, `poll_begin`,
//!   `poll_end`) with QEMU's poll list (join on first dispatch, leave after
//!   an idle timeout, final poll when leaving poll mode);
//! * bottom halves ([`Bh`], [`ContextHandle::schedule_oneshot`]) and timers;
//! * a `Send + Sync` [`ContextHandle`] whose `notify()` costs no syscall while
//!   the loop is busy (the `notify_me` protocol);
//! * adaptive polling with QEMU's classic algorithm and the weighted one of
//!   the 2026 series under review, tunable at run time ([`PollParams`]);
//! * statistics as data ([`Stats`]; serde with the `serde` feature);
//! * nesting in another epoll loop with polling and timers kept
//!   ([`NestedContext`]; a rust-vmm `event-manager` subscriber with the
//!   `event-manager` feature).
//!
//! Features: `event-manager` (the subscriber impl), `serde` (serialize
//! [`Stats`], [`PollParams`]), `unstable` (internals for fuzzing and
//! benchmarks, no stability promise).
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
//! ctx.run(|_ctx| done.load(Ordering::SeqCst)).unwrap();
//! t.join().unwrap();
//! ```
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod adaptive;
mod bh;
mod clock;
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
    AioContext, NestedContext, DEFAULT_POLL_IDLE_TIMEOUT, EPOLL_FAIRNESS_INTERVAL,
    IDLE_BH_TIMEOUT_NS, STATS_PUBLISH_INTERVAL,
};
pub use error::{Error, Result};
pub use handle::ContextHandle;
pub use handler::{
    FdHandler, FnHandler, HandlerId, Interest, PollHandler, Readiness, SharedEventFd,
};
pub use params::{
    ParamError, PollAlgorithm, PollParams, DEFAULT_GROW, DEFAULT_MAX_NS, DEFAULT_SHRINK,
    DEFAULT_WEIGHT, MAX_WEIGHT,
};
pub use stats::{HandlerStats, PollNsHistogram, Stats, HISTOGRAM_BUCKETS};
pub use timer::TimerId;

/// Longest stretch a polling phase runs without looking at the loop's fds,
/// idle poll handlers and timers (and, nested, without returning to the
/// outer loop), whatever `poll-max-ns` says.
pub const POLL_CHECK_INTERVAL: std::time::Duration =
    std::time::Duration::from_nanos(adaptive::POLL_CHECK_INTERVAL_NS);

/// Internals exposed for the fuzz targets and benchmarks: the pure adaptive
/// arithmetic, the histogram bucket function and the raw clocks. No
/// stability promise: they change with the implementation.
#[cfg(feature = "unstable")]
#[cfg_attr(docsrs, doc(cfg(feature = "unstable")))]
pub mod unstable {
    pub use crate::adaptive::{
        weighted_ewma, Adaptive, Adjustment, PollStep, PollWindow, CLASSIC_GROW_START_NS,
        POLL_CHECK_INTERVAL_NS,
    };
    pub use crate::clock::{monotonic_ns, thread_cpu_time_ns};
    pub use crate::stats::bucket_of;
}

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
        send_sync::<SharedEventFd>();
        send::<AioContext>();
        send::<NestedContext>();
        send::<Error>();
    }
}

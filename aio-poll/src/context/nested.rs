// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Nesting a context in an outer epoll loop (rust-vmm `event-manager`, or any
//! loop that can watch an fd) while keeping adaptive polling and timers.
//!
//! The outer loop watches the context's epoll fd for readability and calls
//! [`NestedContext::dispatch`] whenever it is readable. A dispatch runs the
//! context's iteration up to the point where a standalone loop would sleep
//! in `epoll_wait`, and hands that sleep to the outer loop:
//!
//! * **polling** (the context wants to poll: polling enabled, a non-empty
//!   poll list and a non-zero window): the notifier eventfd is made readable
//!   and left so, so the outer `epoll_wait` returns at once and the next
//!   dispatch polls again. Each dispatch polls for at most the window (and at
//!   most [`POLL_CHECK_INTERVAL_NS`](crate::adaptive::POLL_CHECK_INTERVAL_NS)
//!   at a time), so the outer loop's other subscribers get a turn between
//!   polling slices;
//! * **sleeping** (nothing to poll, or the window elapsed without work): the
//!   context leaves poll mode (`poll_end`, final poll), sets the embedder bit
//!   of `notify_me` (so [`ContextHandle::notify`](crate::ContextHandle::notify)
//!   writes the eventfd), drains its own kick and arms its timerfd (in its
//!   epoll set) for the next timer. The outer loop then blocks: 0 CPU. The
//!   iteration stays open and is finished by the next dispatch, so its
//!   `block_ns` includes the time the outer loop slept, as a standalone
//!   loop's would.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{fence, Ordering};

use super::iteration::{Iteration, PollPhase};
use super::{AioContext, TIMER_TOKEN};
use crate::adaptive::PollWindow;
use crate::error::{Error, Result};
use crate::handle::thread_token;
use crate::sys::epoll::Ctl;
use crate::sys::timerfd::TimerFd;

/// What the context left open when it returned to the outer loop.
#[derive(Debug)]
enum Pending {
    /// A polling phase sliced at a check: continue it.
    Polling(Iteration, PollWindow),
    /// The iteration sleeps in the outer loop: finish it.
    Sleeping(Iteration),
}

/// The nesting state inside the [`AioContext`].
#[derive(Debug)]
pub(crate) struct NestedState {
    timer: TimerFd,
    /// The context-clock deadline the timerfd is armed for.
    armed: Option<u64>,
    /// The notifier eventfd was made readable by the context itself.
    kicked: bool,
    pending: Option<Pending>,
}

/// How one step of a dispatch ended.
enum Step {
    /// An iteration finished.
    Finished,
    /// Returned to the outer loop, which will come back at once (polling).
    Yielded,
    /// Returned to the outer loop, which may block.
    Sleeping,
}

/// An [`AioContext`] nested in an outer epoll loop, keeping adaptive polling
/// and timers.
///
/// The outer loop watches [`as_fd`](AsFd::as_fd) for readability
/// (level-triggered) and calls [`dispatch`](Self::dispatch) whenever it is
/// readable. While the context polls, the fd stays readable (the outer loop
/// does not block, and each dispatch polls for at most the polling window);
/// otherwise the outer loop blocks until a handler fd, a notification
/// (bottom halves, [`ContextHandle::notify`](crate::ContextHandle::notify))
/// or a timer (an internal timerfd) wakes it: no timeout for the caller to
/// compute.
///
/// With the `event-manager` feature it is a rust-vmm `MutEventSubscriber`:
///
/// ```
/// # #[cfg(feature = "event-manager")] {
/// use aio_poll::{AioContext, NestedContext};
/// use event_manager::{EventManager, SubscriberOps};
///
/// let mut em = EventManager::<NestedContext>::new().unwrap();
/// let id = em.add_subscriber(NestedContext::new(AioContext::new().unwrap()).unwrap());
/// let nested = em.subscriber_mut(id).unwrap();
/// let now = nested.context().now_ns();
/// nested.context_mut().add_timer(now + 1_000_000, None, |_ctx| println!("tick"));
/// // Blocks until the timer fires: no timeout plumbing.
/// while em.subscriber_mut(id).unwrap().context().timer_count() > 0 {
///     em.run().unwrap();
/// }
/// # }
/// ```
///
/// Any other outer loop uses the same two calls:
///
/// ```
/// use aio_poll::{AioContext, NestedContext};
/// use std::os::fd::AsRawFd;
///
/// let mut nested = NestedContext::new(AioContext::new().unwrap()).unwrap();
/// let handle = nested.context().handle();
/// handle.schedule_oneshot(|_ctx| println!("bottom half"));
/// // The outer loop: wait for the fd, then dispatch.
/// let mut pfd = libc::pollfd { fd: nested.as_raw_fd(), events: libc::POLLIN, revents: 0 };
/// // SAFETY: one valid pollfd.
/// assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
/// assert!(nested.dispatch().unwrap());
/// ```
#[derive(Debug)]
pub struct NestedContext {
    ctx: AioContext,
    last_error: Option<Error>,
}

impl NestedContext {
    /// Nests `ctx`: creates its timerfd and makes the fd readable so that
    /// the outer loop dispatches once at start (work may be pending).
    pub fn new(mut ctx: AioContext) -> Result<NestedContext> {
        ctx.nest()?;
        Ok(NestedContext {
            ctx,
            last_error: None,
        })
    }

    /// The context (add handlers, timers, read stats...).
    pub fn context(&self) -> &AioContext {
        &self.ctx
    }

    /// The context, mutably. Do not run its loop (`poll`, `run`) from here:
    /// [`dispatch`](Self::dispatch) does (callbacks may run nested `poll`s).
    pub fn context_mut(&mut self) -> &mut AioContext {
        &mut self.ctx
    }

    /// Un-nests the context (it can then run standalone again).
    pub fn into_inner(mut self) -> AioContext {
        self.ctx.unnest();
        let NestedContext { ctx, .. } = self;
        ctx
    }

    /// Call when the fd is readable: runs the context up to its next sleep,
    /// or for one polling slice. Returns whether progress was made (a
    /// handler, bottom half or timer ran).
    pub fn dispatch(&mut self) -> Result<bool> {
        self.ctx.nested_dispatch()
    }

    /// The last error of a dispatch made by the `event-manager` subscriber
    /// (which cannot return it), taken.
    pub fn take_error(&mut self) -> Option<Error> {
        self.last_error.take()
    }
}

impl AsFd for NestedContext {
    /// The context's epoll fd: readable while the context wants to run.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ctx.epoll_fd()
    }
}

impl AsRawFd for NestedContext {
    fn as_raw_fd(&self) -> RawFd {
        self.ctx.epoll_fd().as_raw_fd()
    }
}

#[cfg(feature = "event-manager")]
#[cfg_attr(docsrs, doc(cfg(feature = "event-manager")))]
impl event_manager::MutEventSubscriber for NestedContext {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        if let Err(e) = ops.add(event_manager::Events::new(
            self,
            event_manager::EventSet::IN,
        )) {
            // Keep the cause: `take_error` reports it.
            self.last_error = Some(Error::io(
                "event-manager EventOps::add",
                std::io::Error::other(format!("{e:?}")),
            ));
        }
    }

    fn process(&mut self, _events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        if let Err(e) = self.dispatch() {
            self.last_error = Some(e);
        }
    }
}

impl AioContext {
    /// Whether the notifier eventfd was made readable by a nested context.
    #[inline]
    pub(super) fn nested_kicked(&self) -> bool {
        self.nested.as_ref().is_some_and(|n| n.kicked)
    }

    fn nest(&mut self) -> Result<()> {
        if self.nested.is_some() {
            return Ok(());
        }
        let timer = TimerFd::new().map_err(|e| Error::io("timerfd_create", e))?;
        self.epoll
            .ctl(
                Ctl::Add,
                timer.as_raw_fd(),
                libc::EPOLLIN as u32,
                TIMER_TOKEN,
            )
            .map_err(|e| Error::io(Ctl::Add.op_name(), e))?;
        self.nested = Some(Box::new(NestedState {
            timer,
            armed: None,
            kicked: false,
            pending: None,
        }));
        self.nested_kick();
        Ok(())
    }

    fn unnest(&mut self) {
        let Some(n) = self.nested.take() else {
            return;
        };
        if matches!(n.pending, Some(Pending::Sleeping(_))) {
            self.shared.notifier.clear_external();
        }
        if n.kicked {
            self.shared.notifier.drain();
        }
        // The timerfd is closed right after: a failed deletion only leaves a
        // registration that closing removes.
        let _ = self.epoll.ctl(Ctl::Delete, n.timer.as_raw_fd(), 0, 0);
    }

    /// Makes the notifier eventfd readable (the outer loop will not block).
    fn nested_kick(&mut self) {
        if let Some(n) = self.nested.as_mut() {
            if !n.kicked {
                n.kicked = true;
                self.shared.notifier.self_kick();
            }
        }
    }

    /// The timerfd fired (epoll reported it).
    pub(super) fn nested_timer_fired(&mut self) {
        if let Some(n) = self.nested.as_mut() {
            n.timer.drain();
            n.armed = None;
        }
    }

    /// A timer was added: re-arm the timerfd if it is now the soonest.
    pub(super) fn nested_timer_added(&mut self, deadline: u64) {
        let now = self.clock.now_ns();
        if let Some(n) = self.nested.as_mut() {
            if n.armed.is_none_or(|armed| deadline < armed) {
                match n.timer.set(Some(deadline.saturating_sub(now))) {
                    Ok(()) => n.armed = Some(deadline),
                    // Cannot sleep safely: keep the outer loop running.
                    Err(_) => self.nested_kick(),
                }
            }
        }
    }

    /// Arms the timerfd for a sleep of `timeout` from `now` (disarms it for
    /// an infinite one).
    fn nested_arm(&mut self, timeout: Option<u64>, now: u64) -> Result<()> {
        let Some(n) = self.nested.as_mut() else {
            return Ok(());
        };
        let deadline = timeout.map(|t| now.saturating_add(t));
        if deadline == n.armed || (deadline.is_none() && n.armed.is_none()) {
            return Ok(());
        }
        n.timer
            .set(timeout)
            .map_err(|e| Error::io("timerfd_settime", e))?;
        n.armed = deadline;
        Ok(())
    }

    /// Whether the next iteration would poll.
    fn wants_poll(&self) -> bool {
        self.adaptive.enabled() && !self.poll_list.is_empty() && self.poll_ns() > 0
    }

    fn nested_dispatch(&mut self) -> Result<bool> {
        if self.nested.is_none() {
            // Not nested (unreachable through `NestedContext`).
            return self.poll(false);
        }
        let me = thread_token();
        let prev = self.shared.loop_thread.load(Ordering::Relaxed);
        self.shared.loop_thread.store(me, Ordering::Release);
        let mut progress = false;
        let mut error = None;
        for round in 0..2 {
            match self.nested_step(&mut progress, &mut error) {
                Step::Yielded | Step::Sleeping => break,
                Step::Finished => {
                    // Polling next, or a second round that found work again
                    // (a BH rescheduling itself): let the outer loop run
                    // first and come back at once.
                    if self.wants_poll() || round == 1 {
                        self.nested_kick();
                        break;
                    }
                    // Else the next iteration goes straight to sleep.
                }
            }
        }
        self.shared.loop_thread.store(prev, Ordering::Release);
        match error {
            None => Ok(progress),
            Some(e) => Err(e),
        }
    }

    /// Continues the pending iteration or runs a new one, up to its end or
    /// its sleep.
    fn nested_step(&mut self, progress: &mut bool, error: &mut Option<Error>) -> Step {
        let pending = self.nested.as_mut().and_then(|n| n.pending.take());
        let (mut it, resume) = match pending {
            Some(Pending::Sleeping(mut it)) => {
                // The outer loop woke us: finish the iteration that slept,
                // re-entering poll mode first as a standalone loop does after
                // a sleep that ended with events.
                self.shared.notifier.clear_external();
                it.timeout = Some(0);
                let n = self.collect_events(&mut it);
                if n > 0 && it.polling {
                    self.resume_poll_mode(n);
                }
                self.accept_and_poll_only(&it);
                self.finish_nested(it, n, progress, error);
                return Step::Finished;
            }
            Some(Pending::Polling(mut it, window)) => {
                // A check of the sliced polling phase: fds first.
                if self.check_fds(&mut it) {
                    it.timeout = Some(0);
                    let n = self.collect_events(&mut it);
                    self.accept_and_poll_only(&it);
                    self.finish_nested(it, n, progress, error);
                    return Step::Finished;
                }
                (it, Some(window))
            }
            None => (self.begin_iteration(true), None),
        };
        if let PollPhase::Sliced(window) = self.poll_phase(&mut it, resume, true) {
            if let Some(n) = self.nested.as_mut() {
                n.pending = Some(Pending::Polling(it, window));
            }
            self.nested_kick();
            return Step::Yielded;
        }
        if it.timeout != Some(0) {
            // Step 4, nested: hand the sleep to the outer loop.
            // A pending notification, or work found by the final poll after
            // poll_end: no sleep.
            let busy = self.shared.notifier.set_external()
                || (self.poll_started && self.poll_set_started(false));
            if busy {
                it.timeout = Some(0);
            } else {
                self.nested_unkick();
                // The drain may have consumed a notify() made after
                // set_external; its `notified` store precedes its write.
                fence(Ordering::SeqCst);
                if self.shared.notifier.is_notified() {
                    it.timeout = Some(0);
                } else {
                    let now = self.clock.now_ns();
                    match self.nested_arm(it.timeout, now) {
                        Ok(()) => {
                            self.publish_stats();
                            if let Some(n) = self.nested.as_mut() {
                                n.pending = Some(Pending::Sleeping(it));
                            }
                            return Step::Sleeping;
                        }
                        Err(e) => {
                            // Without the timer the outer loop must not block.
                            self.iteration_error.get_or_insert(e);
                            it.timeout = Some(0);
                        }
                    }
                }
            }
            self.shared.notifier.clear_external();
        }
        let n = self.collect_events(&mut it);
        self.accept_and_poll_only(&it);
        self.finish_nested(it, n, progress, error);
        Step::Finished
    }

    fn finish_nested(
        &mut self,
        it: Iteration,
        nevents: usize,
        progress: &mut bool,
        error: &mut Option<Error>,
    ) {
        match self.finish_iteration(it, nevents) {
            Ok(p) => *progress |= p,
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }

    /// Drains the context's own kick before the outer loop may block.
    fn nested_unkick(&mut self) {
        if let Some(n) = self.nested.as_mut() {
            if n.kicked {
                n.kicked = false;
                self.shared.notifier.drain();
            }
        }
    }
}

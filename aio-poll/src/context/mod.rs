// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`AioContext`]: the event loop (QEMU's `AioContext` + `aio_poll`).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::adaptive::Adaptive;
use crate::bh::{Bh, BhEntry, BhFn};
use crate::clock::{Clock, MonotonicClock};
use crate::error::{Error, Result};
use crate::handle::{lock, thread_token, ContextHandle, Shared};
use crate::handler::{Callbacks, HandlerId, Interest};
use crate::notifier::Notifier;
use crate::params::PollParams;
use crate::stats::{HandlerStats, Stats};
use crate::sys::epoll::{empty_event, Ctl, Epoll};
use crate::timer::{TimerId, Timers};

mod handlers;
mod iteration;
mod nested;
mod polling;

pub use nested::NestedContext;
pub(crate) use nested::NestedState;

/// Default time without dispatch after which a handler leaves the poll list
/// (QEMU `POLL_IDLE_INTERVAL_NS`).
pub const DEFAULT_POLL_IDLE_TIMEOUT: Duration = Duration::from_secs(7);

/// Blocking timeout when only idle bottom halves are pending.
pub const IDLE_BH_TIMEOUT_NS: u64 = 10_000_000;

/// After this many consecutive iterations in which polling found work (and
/// `epoll_wait` was therefore skipped), one non-blocking `epoll_wait` is made
/// anyway so that fd handlers without `poll()` cannot starve.
pub const EPOLL_FAIRNESS_INTERVAL: u32 = 16;

/// A busy loop publishes its statistics snapshot every this many iterations
/// (and always right before it sleeps and after a parameter change).
pub const STATS_PUBLISH_INTERVAL: u64 = 16;

/// epoll token of the notifier eventfd.
const NOTIFIER_TOKEN: u64 = u64::MAX;

/// epoll token of the timerfd of a nested context.
const TIMER_TOKEN: u64 = u64::MAX - 1;

const EVENT_BATCH: usize = 64;

/// An fd owned by the context on behalf of a handler.
type OwnedHandlerFd = Box<dyn AsFd + Send>;

/// One registered handler.
struct Entry {
    /// The fd (dropped with the entry, after it left the epoll set).
    fd: Option<OwnedHandlerFd>,
    /// `fd`'s raw number, cached (-1 for poll-only handlers).
    raw_fd: RawFd,
    interest: Interest,
    /// `None` while one of its callbacks runs.
    handler: Option<Callbacks>,
    /// Removed while running: freed when the callback returns.
    removed: bool,
    has_poll: bool,
    on_poll_list: bool,
    /// `poll_begin` was called and `poll_end` not yet.
    poll_begun: bool,
    /// Handlers serving one object share a key ([`AioContext::set_poll_group`]);
    /// 0 = none.
    group: u64,
    /// Adaptive polling time (classic) / smoothed interval (weighted).
    ns: i64,
    last_dispatch_ns: u64,
    dispatched_iter: u64,
    dispatch_count: u64,
    /// epoll events collected for the current dispatch.
    revents: u32,
    /// `poll()` returned true; `poll_ready` pending.
    poll_ready: bool,
    /// Already in the current dispatch list.
    queued: bool,
}

#[derive(Default)]
struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

/// A single-threaded event loop with epoll fd handlers, userspace poll
/// handlers, bottom halves, timers and adaptive busy polling.
///
/// `Send` but not `Sync`: create it on (or move it to) the thread that runs
/// it; use [`ContextHandle`] from other threads.
///
/// ```
/// use aio_poll::{AioContext, FnHandler, Interest, SharedEventFd};
/// use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
///
/// let mut ctx = AioContext::new().unwrap();
/// let efd = SharedEventFd::new(EventFd::new(EFD_NONBLOCK).unwrap());
/// let reader = efd.clone();
/// // The context owns the registered clone and drops it on removal.
/// ctx.add_fd_handler(efd.clone(), Interest::READABLE, FnHandler::new(move |_ctx, _ready| {
///     let _ = reader.read();
/// })).unwrap();
/// efd.write(1).unwrap();
/// assert!(ctx.poll(true).unwrap());
/// assert!(!ctx.poll(false).unwrap());
/// ```
pub struct AioContext {
    epoll: Epoll,
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live_handlers: usize,
    /// Registered poll-only handlers (no fd).
    poll_only: usize,
    poll_list: Vec<HandlerId>,
    poll_started: bool,
    /// Poll mode was resumed after a wake-up with some handlers left out
    /// (those with an event); the next polling phase begins them.
    poll_stragglers: bool,
    /// Scratch for `resume_poll_mode`: the groups with an event.
    woken_groups: Vec<u64>,
    adaptive: Adaptive,
    timers: Timers,
    idle_timeout_ns: u64,
    events: Vec<libc::epoll_event>,
    ready_poll: Vec<HandlerId>,
    dispatch_list: Vec<HandlerId>,
    bh_batch: Vec<BhEntry>,
    iteration: u64,
    poll_streak: u32,
    stats: Stats,
    /// (window, max_ns, iteration start) awaiting its duration.
    hist_pending: Option<(u64, u64, u64)>,
    /// The histogram or the parameters changed since the last publish.
    snapshot_dirty: bool,
    /// The last publish had a non-empty per-handler list.
    handlers_published: bool,
    /// Set while the context is nested in an outer loop ([`NestedContext`]).
    nested: Option<Box<NestedState>>,
    /// The first error of the running iteration (returned when it finishes).
    iteration_error: Option<Error>,
}

impl fmt::Debug for AioContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioContext")
            .field("epoll_fd", &self.epoll.as_raw_fd())
            .field("handlers", &self.live_handlers)
            .field("poll_list", &self.poll_list.len())
            .field("params", &self.adaptive.params())
            .field("poll_ns", &self.adaptive.poll_ns())
            .finish()
    }
}

fn soonest(a: Option<u64>, b: u64) -> u64 {
    match a {
        Some(a) => a.min(b),
        None => b,
    }
}

impl AioContext {
    /// A context with the default parameters (weighted, 32768 ns max).
    pub fn new() -> Result<AioContext> {
        Self::with_params(PollParams::default())
    }

    /// A context with the given (validated) parameters.
    pub fn with_params(p: PollParams) -> Result<AioContext> {
        Self::with_clock(p, Arc::new(MonotonicClock))
    }

    /// A context on an injected clock (tests): polling windows, `block_ns`,
    /// timers and the poll-list idle timeout all use it.
    pub fn with_clock(p: PollParams, clock: Arc<dyn Clock>) -> Result<AioContext> {
        let adaptive = Adaptive::new(p)?;
        let params = adaptive.params();
        let epoll = Epoll::new().map_err(|e| Error::io("epoll_create1", e))?;
        let notifier = Notifier::new().map_err(|e| Error::io("eventfd", e))?;
        epoll
            .ctl(
                Ctl::Add,
                notifier.as_raw_fd(),
                libc::EPOLLIN as u32,
                NOTIFIER_TOKEN,
            )
            .map_err(|e| Error::io(Ctl::Add.op_name(), e))?;
        let shared = Arc::new(Shared::new(notifier, params));
        let stats = Stats {
            params,
            ..Stats::default()
        };
        lock(&shared.stats).clone_from(&stats);
        Ok(AioContext {
            epoll,
            shared,
            clock,
            slots: Vec::new(),
            free: Vec::new(),
            live_handlers: 0,
            poll_only: 0,
            poll_list: Vec::new(),
            poll_started: false,
            poll_stragglers: false,
            woken_groups: Vec::new(),
            adaptive,
            timers: Timers::default(),
            idle_timeout_ns: u64::try_from(DEFAULT_POLL_IDLE_TIMEOUT.as_nanos())
                .unwrap_or(u64::MAX),
            events: vec![empty_event(); EVENT_BATCH],
            ready_poll: Vec::new(),
            dispatch_list: Vec::new(),
            bh_batch: Vec::new(),
            iteration: 0,
            poll_streak: 0,
            stats,
            hist_pending: None,
            snapshot_dirty: false,
            handlers_published: false,
            nested: None,
            iteration_error: None,
        })
    }

    /// A `Send + Sync` handle to wake and control this context.
    pub fn handle(&self) -> ContextHandle {
        ContextHandle {
            shared: self.shared.clone(),
        }
    }

    /// The context clock (`CLOCK_MONOTONIC` ns unless injected).
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    // ----- bottom halves and timers -----

    /// A reusable bottom half running `cb` in this loop.
    pub fn new_bh(&mut self, cb: impl FnMut(&mut AioContext) + Send + 'static) -> Bh {
        let cb: BhFn = Box::new(cb);
        Bh::new(&self.shared, cb)
    }

    /// Runs `f` once at the next iteration (same as
    /// [`ContextHandle::schedule_oneshot`]).
    pub fn schedule_oneshot(&mut self, f: impl FnOnce(&mut AioContext) + Send + 'static) {
        self.handle().schedule_oneshot(f);
    }

    /// Adds a timer firing at `deadline_ns` on [`now_ns`](Self::now_ns)'s
    /// clock, then every `period_ns` if given (`Some(0)` means one-shot).
    /// Missed periods are skipped, not replayed.
    ///
    /// In a [`NestedContext`] the timer also wakes the outer loop (the
    /// context's timerfd is re-armed if this deadline is the soonest).
    pub fn add_timer(
        &mut self,
        deadline_ns: u64,
        period_ns: Option<u64>,
        cb: impl FnMut(&mut AioContext) + Send + 'static,
    ) -> TimerId {
        let id = self.timers.add(deadline_ns, period_ns, Box::new(cb));
        if self.nested.is_some() {
            self.nested_timer_added(deadline_ns);
        }
        id
    }

    /// Cancels a timer; false if it does not exist (fired one-shot, cancelled).
    pub fn cancel_timer(&mut self, id: TimerId) -> bool {
        self.timers.cancel(id)
    }

    /// Number of armed timers.
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    // ----- parameters and stats -----

    /// The effective parameters in use.
    pub fn poll_params(&self) -> PollParams {
        self.adaptive.params()
    }

    /// Validates and applies new parameters at once: every handler `ns` and
    /// `poll_ns` are reset to 0; with `max_ns == 0` the poll list is emptied.
    pub fn set_poll_params(&mut self, p: PollParams) -> Result<()> {
        let p = p.validate()?;
        self.apply_params(p);
        Ok(())
    }

    fn apply_params(&mut self, p: PollParams) {
        if self.adaptive.set_params(p).is_err() {
            return; // unreachable: validated by the caller
        }
        // What handles report is what the loop uses.
        *lock(&self.shared.params) = self.adaptive.params();
        let entries = self.slots.iter_mut().filter_map(|s| s.entry.as_mut());
        self.adaptive.reset(entries.map(|e| &mut e.ns));
        if !self.adaptive.enabled() {
            // Polling off: leave poll mode and empty the poll list.
            self.poll_set_started(false);
            for id in std::mem::take(&mut self.poll_list) {
                if let Some(e) = self.entry_mut(id) {
                    e.on_poll_list = false;
                }
            }
        } else {
            // Poll-only handlers are always on the list while polling is on.
            let ids: Vec<HandlerId> = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let e = s.entry.as_ref()?;
                    (e.fd.is_none() && !e.removed && !e.on_poll_list)
                        .then(|| HandlerId::new(i as u32, s.generation))
                })
                .collect();
            let now = self.clock.now_ns();
            for id in ids {
                self.join_poll_list(id, now);
            }
        }
        // A partial sample under the old parameters is dropped.
        self.hist_pending = None;
        self.stats.param_updates += 1;
        self.stats.params = self.adaptive.params();
        self.snapshot_dirty = true;
        // Visible at once, even if the loop now sleeps for a long time.
        self.publish_stats();
    }

    #[inline]
    fn apply_pending_params(&mut self) {
        // Plain load first: the common case must not pay for an RMW.
        if !self.shared.params_dirty.load(Ordering::Acquire)
            || !self.shared.params_dirty.swap(false, Ordering::AcqRel)
        {
            return;
        }
        let pending = lock(&self.shared.pending_params).take();
        if let Some(p) = pending {
            self.apply_params(p);
        }
    }

    /// The AIO batch limit (QEMU `aio-max-batch`).
    pub fn aio_max_batch(&self) -> u64 {
        self.shared.max_batch.load(Ordering::Relaxed)
    }

    /// Sets the AIO batch limit.
    pub fn set_aio_max_batch(&mut self, n: u64) {
        self.shared.max_batch.store(n, Ordering::Relaxed);
    }

    /// Sets how long a handler may go without dispatch before it leaves the
    /// poll list (default 7 s).
    pub fn set_poll_idle_timeout(&mut self, d: Duration) {
        self.idle_timeout_ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    }

    /// The current polling window in ns.
    pub fn poll_ns(&self) -> u64 {
        u64::try_from(self.adaptive.poll_ns()).unwrap_or(0)
    }

    /// A statistics snapshot (always current when called on the loop thread).
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        self.fill_stats(&mut s);
        s
    }

    /// Copies the statistics into `s`, reusing its allocations.
    fn fill_stats(&self, s: &mut Stats) {
        s.copy_from(&self.stats);
        s.poll_ns = self.poll_ns();
        self.fill_handlers(&mut s.handlers);
    }

    /// The per-handler statistics of the poll list.
    fn fill_handlers(&self, out: &mut Vec<HandlerStats>) {
        out.clear();
        for id in &self.poll_list {
            // Looked up by slot so that a handler whose callback is running
            // (nested poll) is still reported.
            let Some(slot) = self.slots.get(id.index()) else {
                continue;
            };
            if let Some(e) = slot.entry.as_ref() {
                out.push(HandlerStats {
                    id: id.as_u64(),
                    ns: e.ns,
                    dispatch_count: e.dispatch_count,
                });
            }
        }
    }

    /// Makes the statistics visible to [`ContextHandle::stats`]: the scalar
    /// counters through the seqlock (a few plain stores), the histogram and
    /// parameters only if they changed since the last publish, the
    /// per-handler list only if it is or was non-empty. A loop without
    /// polling therefore publishes without taking a lock.
    #[inline]
    fn publish_stats(&mut self) {
        let token = self.shared.counters.begin();
        if self.snapshot_dirty || self.handlers_published || !self.poll_list.is_empty() {
            self.publish_snapshot();
        }
        self.shared.counters.store(&self.stats, self.poll_ns());
        self.shared.counters.end(token);
    }

    /// The mutex-protected part of [`publish_stats`](Self::publish_stats).
    #[inline(never)]
    fn publish_snapshot(&mut self) {
        let dirty = std::mem::take(&mut self.snapshot_dirty);
        let handlers = !self.poll_list.is_empty() || self.handlers_published;
        self.handlers_published = !self.poll_list.is_empty();
        let mut guard = lock(&self.shared.stats);
        if dirty {
            guard
                .poll_ns_histogram
                .copy_from(&self.stats.poll_ns_histogram);
            guard.params = self.stats.params;
        }
        if handlers {
            self.fill_handlers(&mut guard.handlers);
        }
    }

    // ----- the loop -----

    /// Loops `poll(true)` until `stop` returns true (checked after every
    /// iteration) or [`ContextHandle::request_stop`] was called. Returns the
    /// first error of an iteration (the loop stops there).
    pub fn run(&mut self, mut stop: impl FnMut(&mut AioContext) -> bool) -> Result<()> {
        loop {
            if self.shared.stop.load(Ordering::Acquire)
                && self.shared.stop.swap(false, Ordering::AcqRel)
            {
                return Ok(());
            }
            self.poll(true)?;
            if stop(self) {
                return Ok(());
            }
        }
    }

    /// One iteration (QEMU `aio_poll`). With `blocking`, waits until something
    /// happens (fd event, poll handler, bottom half, timer, `notify()`).
    /// Returns true if progress was made: a handler, bottom half (not idle)
    /// or timer ran. A bare `notify()` is not progress.
    ///
    /// An `epoll_wait` failure (anything but `EINTR`) is returned as
    /// [`Error::Io`] after the rest of the iteration (bottom halves, poll
    /// handlers found ready, timers) ran; it is also counted in
    /// [`Stats::epoll_errors`].
    ///
    /// A context nested in an outer loop is driven by
    /// [`NestedContext::dispatch`]; calling `poll` from one of its callbacks
    /// (a nested wait, as QEMU's `AIO_WAIT_WHILE`) is fine.
    pub fn poll(&mut self, blocking: bool) -> Result<bool> {
        let me = thread_token();
        // Only the thread inside poll() (which holds `&mut self`) writes this,
        // so a plain load + store suffices (no locked RMW on the hot path).
        let prev = self.shared.loop_thread.load(Ordering::Relaxed);
        self.shared.loop_thread.store(me, Ordering::Release);
        let progress = self.poll_inner(blocking);
        self.shared.loop_thread.store(prev, Ordering::Release);
        progress
    }

    /// Step 2: the blocking timeout (`None` = infinite).
    fn compute_timeout(&mut self, now: u64) -> Option<u64> {
        if !self.ready_poll.is_empty() || self.shared.notifier.is_notified() {
            return Some(0);
        }
        let mut timeout = match self.shared.bh_pending() {
            Some(false) => return Some(0),
            Some(true) => Some(IDLE_BH_TIMEOUT_NS),
            None => None,
        };
        if self.timers.len() == 0 {
            return timeout;
        }
        if let Some(deadline) = self.timers.next_deadline() {
            let t = deadline.saturating_sub(now);
            timeout = Some(soonest(timeout, t));
        }
        timeout
    }
}

impl AioContext {
    /// The epoll fd (what an outer loop watches through [`NestedContext`]).
    pub(crate) fn epoll_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl Drop for AioContext {
    fn drop(&mut self) {
        // Queued BHs may hold handles to this context: drop them now.
        self.shared.close();
    }
}

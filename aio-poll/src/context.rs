//! [`AioContext`]: the event loop (QEMU's `AioContext` + `aio_poll`).

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::adaptive::Adaptive;
use crate::bh::{Bh, BhEntry, BhFn, DELETED, IDLE, SCHEDULED};
use crate::clock::{Clock, MonotonicClock};
use crate::error::{Error, Result};
use crate::handle::{lock, thread_token, ContextHandle, Shared};
use crate::handler::{FdHandler, HandlerId, Interest};
use crate::notifier::Notifier;
use crate::params::PollParams;
use crate::stats::{HandlerStats, Stats};
use crate::sys::epoll::{empty_event, Ctl, Epoll};
use crate::timer::{TimerId, Timers};

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

const EVENT_BATCH: usize = 64;

/// One registered handler.
struct Entry {
    fd: Option<RawFd>,
    interest: Interest,
    /// `None` while one of its callbacks runs.
    handler: Option<Box<dyn FdHandler>>,
    /// Removed while running: freed when the callback returns.
    removed: bool,
    has_poll: bool,
    on_poll_list: bool,
    /// `poll_begin` was called and `poll_end` not yet.
    poll_begun: bool,
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
/// use aio_poll::{AioContext, FnHandler, Interest};
/// use std::os::fd::AsRawFd;
/// use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
///
/// let mut ctx = AioContext::new().unwrap();
/// let efd = EventFd::new(EFD_NONBLOCK).unwrap();
/// let reader = efd.try_clone().unwrap();
/// ctx.add_fd_handler(efd.as_raw_fd(), Interest::READABLE, Box::new(FnHandler::read(move |_ctx| {
///     let _ = reader.read();
/// }))).unwrap();
/// efd.write(1).unwrap();
/// assert!(ctx.poll(true));
/// assert!(!ctx.poll(false));
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
        let epoll = Epoll::new()?;
        let notifier = Notifier::new()?;
        epoll.ctl(
            Ctl::Add,
            notifier.as_raw_fd(),
            libc::EPOLLIN as u32,
            NOTIFIER_TOKEN,
        )?;
        let shared = Arc::new(Shared::new(notifier, params));
        let stats = Stats {
            params,
            ..Stats::default()
        };
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

    // ----- handlers -----

    fn entry(&self, id: HandlerId) -> Option<&Entry> {
        let slot = self.slots.get(id.index())?;
        if slot.generation != id.generation() {
            return None;
        }
        slot.entry.as_ref().filter(|e| !e.removed)
    }

    fn entry_mut(&mut self, id: HandlerId) -> Option<&mut Entry> {
        let slot = self.slots.get_mut(id.index())?;
        if slot.generation != id.generation() {
            return None;
        }
        slot.entry.as_mut().filter(|e| !e.removed)
    }

    fn insert(&mut self, entry: Entry) -> Result<HandlerId> {
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

    fn free_slot(&mut self, id: HandlerId) -> Option<Entry> {
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

    fn new_entry(fd: Option<RawFd>, interest: Interest, h: Box<dyn FdHandler>) -> Entry {
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
    /// ready must also call [`ContextHandle::notify`]. With polling disabled
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
    fn join_poll_list(&mut self, id: HandlerId, h: Option<&mut Box<dyn FdHandler>>, now: u64) {
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
    pub fn add_timer(
        &mut self,
        deadline_ns: u64,
        period_ns: Option<u64>,
        cb: impl FnMut(&mut AioContext) + Send + 'static,
    ) -> TimerId {
        self.timers.add(deadline_ns, period_ns, Box::new(cb))
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
                self.join_poll_list(id, None, now);
            }
        }
        // A partial sample under the old parameters is dropped.
        self.hist_pending = None;
        self.stats.param_updates += 1;
        self.stats.params = self.adaptive.params();
        // Visible at once, even if the loop now sleeps for a long time.
        self.publish_stats();
    }

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
        s.handlers.clear();
        for id in &self.poll_list {
            // Looked up by slot so that a handler whose callback is running
            // (nested poll) is still reported.
            let Some(slot) = self.slots.get(id.index()) else {
                continue;
            };
            if let Some(e) = slot.entry.as_ref() {
                s.handlers.push(HandlerStats {
                    id: id.as_u64(),
                    ns: e.ns,
                    dispatch_count: e.dispatch_count,
                });
            }
        }
    }

    fn publish_stats(&mut self) {
        let mut guard = lock(&self.shared.stats);
        self.fill_stats(&mut guard);
    }

    // ----- the loop -----

    /// Loops `poll(true)` until `stop` returns true (checked after every
    /// iteration) or [`ContextHandle::request_stop`] was called.
    pub fn run(&mut self, mut stop: impl FnMut(&mut AioContext) -> bool) {
        loop {
            if self.shared.stop.load(Ordering::Acquire)
                && self.shared.stop.swap(false, Ordering::AcqRel)
            {
                break;
            }
            self.poll(true);
            if stop(self) {
                break;
            }
        }
    }

    /// One iteration (QEMU `aio_poll`). With `blocking`, waits until something
    /// happens (fd event, poll handler, bottom half, timer, `notify()`).
    /// Returns true if progress was made: a handler, bottom half (not idle)
    /// or timer ran. A bare `notify()` is not progress.
    pub fn poll(&mut self, blocking: bool) -> bool {
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
        if let Some(deadline) = self.timers.next_deadline() {
            let t = deadline.saturating_sub(now);
            timeout = Some(soonest(timeout, t));
        }
        timeout
    }

    fn poll_inner(&mut self, blocking: bool) -> bool {
        self.apply_pending_params();
        self.iteration = self.iteration.wrapping_add(1);
        self.stats.iterations += 1;
        let polling = self.adaptive.enabled();
        // 1. start (when polling, or for the timer timeout).
        let start = if polling || self.timers.len() > 0 {
            self.clock.now_ns()
        } else {
            0
        };
        self.adaptive.start(start);
        if polling {
            self.sample_window(start);
        }
        // 2. timeout
        let mut timeout = if blocking {
            self.compute_timeout(start)
        } else {
            Some(0)
        };
        let mut poll_found = false;
        // When polling ended with work found, the time it ended is the end
        // of the "block" too (no wait follows): saves a clock read.
        let mut poll_end_ns = None;

        // 3. userspace polling
        if polling && timeout != Some(0) && !self.poll_list.is_empty() {
            let window = soonest(timeout, self.poll_ns());
            if window > 0 {
                self.poll_set_started(true);
                let (found, elapsed) = self.run_poll_handlers(window, start);
                if found {
                    timeout = Some(0);
                    poll_found = true;
                    poll_end_ns = Some(start.saturating_add(elapsed));
                } else if let Some(t) = timeout {
                    // Same end time as before polling.
                    timeout = Some(t.saturating_sub(elapsed));
                }
            }
        } else if timeout == Some(0) && self.poll_started {
            // Notifications are suppressed: one round replaces the syscall
            // (a pending notify() alone does not: fds may be ready too).
            poll_found = self.run_poll_handlers_once().1;
        }

        // 4. may sleep
        let mut announced = false;
        if timeout != Some(0) {
            announced = true;
            if self.shared.notifier.begin_may_sleep() {
                timeout = Some(0);
            }
            if self.poll_set_started(false) {
                timeout = Some(0);
            }
            if timeout != Some(0) {
                // About to sleep: make the snapshot current first.
                self.publish_stats();
            }
        }
        let skip_epoll = poll_found && self.poll_streak < EPOLL_FAIRNESS_INTERVAL;
        let nevents = if skip_epoll {
            self.poll_streak += 1;
            0
        } else {
            self.poll_streak = 0;
            if timeout != Some(0) {
                self.stats.blocking_waits += 1;
            }
            match self.epoll.wait(&mut self.events, timeout) {
                Ok(n) => n,
                Err(_) => {
                    self.stats.epoll_errors += 1;
                    0
                }
            }
        };
        // 5. (As in QEMU, only a blocking iteration accepts the notification:
        // a non-blocking one leaves `notified` set, which at worst makes the
        // next blocking iteration return at once — never a lost wake-up.)
        if announced {
            self.shared.notifier.end_may_sleep();
        }
        if blocking {
            self.shared.notifier.accept();
        }
        if self.poll_only > 0 && polling {
            // Nothing wakes the loop for poll-only handlers: check them after
            // every wait.
            self.poll_poll_only_handlers();
        }

        // 6. block_ns excludes handler run time (only used when polling).
        let end = match (polling, skip_epoll, poll_end_ns) {
            (false, _, _) => start,
            (true, true, Some(t)) => t,
            (true, _, _) => self.clock.now_ns(),
        };
        let block_ns = self.adaptive.block_ns(end);

        // 7. bottom halves, then fd and poll handlers.
        let mut progress = self.run_bhs();
        progress |= self.dispatch(nevents, end);

        // 8. polling times, then timers.
        if polling && self.adaptive.enabled() {
            self.update_polling(block_ns);
        }
        progress |= self.run_timers();
        if self.iteration % STATS_PUBLISH_INTERVAL == 0 {
            self.publish_stats();
        }
        progress
    }

    /// Enters / leaves poll mode. Leaving calls `poll_end` then a final
    /// `poll()` on each handler (closes the race with an event that arrived
    /// while notifications were suppressed); returns whether that found work.
    fn poll_set_started(&mut self, started: bool) -> bool {
        if started == self.poll_started {
            return false;
        }
        self.poll_started = started;
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
            if started {
                h.poll_begin();
                e.poll_begun = true;
            } else {
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
        }
        found
    }

    /// One `poll()` on every poll-only handler (no fd) on the poll list.
    fn poll_poll_only_handlers(&mut self) {
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
    fn run_poll_handlers_once(&mut self) -> (bool, bool) {
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

    /// Busy-polls for up to `window` ns. Returns (found, elapsed ns).
    fn run_poll_handlers(&mut self, window: u64, start: u64) -> (bool, u64) {
        let mut found;
        let mut now;
        loop {
            found = self.run_poll_handlers_once().0;
            now = self.clock.now_ns();
            if found || now.saturating_sub(start) >= window {
                break;
            }
        }
        let elapsed = now.saturating_sub(start);
        self.stats.poll_time_ns = self.stats.poll_time_ns.saturating_add(elapsed);
        if self.remove_idle_poll_handlers(now) {
            found = true;
        }
        (found, elapsed)
    }

    /// Removes handlers without dispatch for the idle timeout from the poll
    /// list: `poll_end`, then one final `poll()`. Returns whether a final poll
    /// found work.
    fn remove_idle_poll_handlers(&mut self, now: u64) -> bool {
        let before = self.poll_list.len();
        let found = self.remove_idle_inner(now);
        if self.poll_list.len() != before {
            self.refresh_window();
        }
        found
    }

    /// Classic: the window is the maximum `ns` over the (changed) poll list.
    fn refresh_window(&mut self) {
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

    fn remove_idle_inner(&mut self, now: u64) -> bool {
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

    fn run_bhs(&mut self) -> bool {
        let mut batch = std::mem::take(&mut self.bh_batch);
        self.shared.take_bhs(&mut batch);
        if batch.is_empty() {
            self.bh_batch = batch;
            return false;
        }
        let mut progress = false;
        for entry in batch.drain(..) {
            match entry {
                BhEntry::Oneshot(f) => {
                    f(self);
                    self.stats.bh_runs += 1;
                    progress = true;
                }
                BhEntry::Reusable(inner) => {
                    let old = inner.flags.fetch_and(!(SCHEDULED | IDLE), Ordering::AcqRel);
                    if old & DELETED != 0 || old & SCHEDULED == 0 {
                        continue;
                    }
                    {
                        let mut cb = lock(&inner.cb);
                        (*cb)(self);
                    }
                    self.stats.bh_runs += 1;
                    if old & IDLE == 0 {
                        progress = true;
                    }
                }
            }
        }
        // Keep the allocation unless a nested poll() stored one meanwhile.
        if self.bh_batch.capacity() == 0 {
            self.bh_batch = batch;
        }
        progress
    }

    /// Builds the dispatch list from the epoll events and the poll-ready
    /// handlers, then dispatches it.
    fn dispatch(&mut self, nevents: usize, now: u64) -> bool {
        let mut list = std::mem::take(&mut self.dispatch_list);
        list.clear();
        for i in 0..nevents.min(self.events.len()) {
            let Some(ev) = self.events.get(i).copied() else {
                break;
            };
            let token = ev.u64;
            if token == NOTIFIER_TOKEN {
                self.shared.notifier.drain();
                self.stats.eventfd_wakeups += 1;
                continue;
            }
            let id = HandlerId(token);
            if let Some(e) = self.entry_mut(id) {
                e.revents |= ev.events;
                if !e.queued {
                    e.queued = true;
                    list.push(id);
                }
            }
        }
        let ready = std::mem::take(&mut self.ready_poll);
        for id in &ready {
            if let Some(e) = self.entry_mut(*id) {
                if e.poll_ready && !e.queued {
                    e.queued = true;
                    list.push(*id);
                }
            }
        }
        if self.ready_poll.capacity() == 0 {
            let mut ready = ready;
            ready.clear();
            self.ready_poll = ready;
        }
        let mut progress = false;
        for id in list.iter().copied() {
            progress |= self.dispatch_one(id, now);
        }
        list.clear();
        if self.dispatch_list.capacity() == 0 {
            self.dispatch_list = list;
        }
        progress
    }

    /// Dispatches one handler: takes it out of its slot while calling it, so
    /// that it may remove itself (tombstone) or anything else.
    fn dispatch_one(&mut self, id: HandlerId, now: u64) -> bool {
        let iteration = self.iteration;
        let join = self.adaptive.enabled();
        let Some(e) = self.entry_mut(id) else {
            return false;
        };
        let revents = std::mem::take(&mut e.revents);
        let poll_ready = std::mem::take(&mut e.poll_ready);
        e.queued = false;
        let interest = e.interest;
        let Some(mut h) = e.handler.take() else {
            // Running already (nested poll from its own callback).
            return false;
        };
        let join = join && e.has_poll && !e.on_poll_list;
        e.last_dispatch_ns = now;
        e.dispatched_iter = iteration;
        if join {
            // Activity is likely to continue: start polling this handler.
            self.join_poll_list(id, Some(&mut h), now);
        }

        let readable = revents
            & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32
            != 0;
        let writable = revents & (libc::EPOLLOUT | libc::EPOLLERR) as u32 != 0;
        let mut ran = false;
        if poll_ready && revents == 0 {
            h.poll_ready(self);
            ran = true;
        } else {
            if readable && interest.is_readable() {
                h.read(self);
                ran = true;
            }
            if writable && interest.is_writable() && self.entry(id).is_some() {
                h.write(self);
                ran = true;
            }
        }

        // Put the handler back, or finish a removal made while it ran.
        let removed = match self.slots.get_mut(id.index()) {
            Some(slot) if slot.generation == id.generation() => match slot.entry.as_mut() {
                Some(e) if !e.removed => {
                    if ran {
                        e.dispatch_count += 1;
                    }
                    e.handler = Some(h);
                    return self.note_dispatch(ran);
                }
                Some(_) => true,
                None => false,
            },
            _ => false,
        };
        if removed {
            drop(self.free_slot(id));
        }
        drop(h);
        self.note_dispatch(ran)
    }

    fn note_dispatch(&mut self, ran: bool) -> bool {
        if ran {
            self.stats.dispatches += 1;
        }
        ran
    }

    /// Step 8: the adaptive update over the poll list.
    fn update_polling(&mut self, block_ns: i64) {
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
    fn sample_window(&mut self, start: u64) {
        if let Some((poll_ns, max, prev_start)) = self.hist_pending.take() {
            let duration = start.saturating_sub(prev_start);
            self.stats.poll_ns_histogram.record(poll_ns, max, duration);
        }
        let max = u64::try_from(self.adaptive.params().max_ns).unwrap_or(0);
        self.hist_pending = Some((self.poll_ns(), max, start));
    }

    fn run_timers(&mut self) -> bool {
        if self.timers.len() == 0 {
            return false;
        }
        let now = self.clock.now_ns();
        let limit = self.timers.id_limit();
        let mut progress = false;
        while let Some((id, mut cb)) = self.timers.take_expired(now, limit) {
            cb(self);
            self.stats.timer_runs += 1;
            progress = true;
            self.timers.finish(id, cb, now);
        }
        progress
    }

    // ----- embedding -----

    /// Embedding, step 1 (glib `prepare`): call before the outer loop waits on
    /// [`as_raw_fd`](Self::as_raw_fd). From now on `notify()` writes the
    /// eventfd so the epoll fd becomes readable. Returns the longest time the
    /// outer loop may sleep (`None` = no limit; timers need it). If work is
    /// already pending, the eventfd is made readable as well, so an outer loop
    /// that ignores the returned timeout still wakes up at once.
    pub fn prepare(&mut self) -> Option<Duration> {
        self.apply_pending_params();
        let pending = self.shared.notifier.set_external();
        let now = self.clock.now_ns();
        let timeout = if pending {
            Some(0)
        } else {
            self.compute_timeout(now)
        };
        if timeout == Some(0) {
            self.shared.notifier.self_kick();
        }
        timeout.map(Duration::from_nanos)
    }

    /// Embedding, step 2 (glib `check` + `dispatch`): the outer loop woke up
    /// (our fd readable or its timeout expired). Runs one non-blocking
    /// iteration. Call [`prepare`](Self::prepare) again before the outer loop
    /// sleeps.
    pub fn check_and_dispatch(&mut self) -> bool {
        self.shared.notifier.clear_external();
        // Accept before processing (a non-blocking poll does not), so that
        // `prepare` does not see the old notification again.
        self.shared.notifier.accept();
        self.poll(false)
    }
}

impl AsRawFd for AioContext {
    /// The epoll fd: readable when a handler fd, the notifier or anything else
    /// registered is ready. An outer epoll (e.g. rust-vmm `event-manager`) can
    /// watch it for `EPOLLIN`; see [`AioContext::prepare`].
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl AioContext {
    /// The epoll fd (same as [`AsRawFd::as_raw_fd`]).
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for AioContext {
    fn drop(&mut self) {
        // Queued BHs may hold handles to this context: drop them now.
        self.shared.close();
    }
}

//! Per-queue request processing on an IOThread.
//!
//! A [`QueueWorker`] owns one virtqueue and its disk backend. Two aio-poll
//! handlers (three with io_uring) drive it on the queue's IOThread:
//! - [`QueueHandler`] on the queue's ioeventfd: `read()` drains the eventfd
//!   and processes the avail ring; `poll()` is one load of `avail.idx`
//!   compared with the last index consumed; `poll_begin()`/`poll_end()`
//!   suppress / re-enable guest notifications (the loop polls once more
//!   after `poll_end`, which closes the race with a driver that saw
//!   notifications disabled);
//! - [`CompletionHandler`] on the backend's completion descriptor (io_uring
//!   only: the ring's own fd, readable while completions wait): `poll()`
//!   checks the completion ring without a syscall; both paths reap
//!   completions, put them in the used ring and signal the guest when the
//!   driver asked for it;
//! - [`DeferTimerHandler`] on a timerfd that bounds a deferral (below).
//!
//! Guest notifications follow QEMU's `virtio_queue_set_notification`: see
//! `QueueWorker::suppress_notifications` (with EVENT_IDX, `avail_event` is
//! parked half the index space ahead of the avail index seen,
//! [`PARK_AHEAD`], while the IOThread polls, so that the driver does not
//! kick a thread that is watching the ring anyway, even in the middle of
//! its batch; QEMU leaves it at the index seen) and
//! `QueueWorker::enable_notifications` (`avail_event` = the avail index
//! seen now, full fence, final check). One extension beyond QEMU: while
//! requests are in flight, a queue whose IOThread polls leaves them off
//! instead of re-enabling them (`QueueWorker::defer_notifications`): the
//! completion wakes the IOThread, which then takes what the driver added,
//! and a timer re-enables them if the ring went [`DEFER_BOUND_NS`] without
//! a look.
//!
//! Both handlers share the worker through an `Arc<Mutex<_>>` that is only
//! ever contended while the device is being torn down.

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use aio_poll::{AioContext, FdHandler, PollHandler, Readiness, SharedEventFd};
use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::backend::{DiskBackend, DiskCompletion};
use super::request::{parse_request, DiskLimits, Prepared, Request, VIRTIO_BLK_ID_BYTES};
use super::DeviceName;
use crate::sigbus::LossWatch;
use crate::virtio::device::VirtioInterrupt;
use crate::virtio::guest_warn;

/// Counters of one queue (for `query-block`-style reports and benchmarks).
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Requests (descriptor chains) taken from the avail ring.
    pub requests: AtomicU64,
    /// Guest notifications (ioeventfd wake-ups; several kicks may coalesce).
    pub notifications: AtomicU64,
    /// Used-buffer interrupts sent to the guest.
    pub interrupts: AtomicU64,
    /// Requests completed with a non-OK status or rejected.
    pub errors: AtomicU64,
}

/// How long a deferral of guest notifications may go without a look at the
/// ring (`QueueWorker::defer_notifications`): the most a request the
/// driver adds while the queue waits for its storage can wait to be seen.
/// Short against a slow request it waits behind, long enough that its
/// timer seldom fires while completions keep coming.
pub const DEFER_BOUND_NS: u64 = 1_000_000;

/// Where a parked `avail_event` goes, past the avail index seen (EVENT_IDX,
/// `QueueWorker::suppress_notifications`): half the index space, out of
/// reach of any batch the driver can publish before we look again.
pub const PARK_AHEAD: u16 = 0x8000;

/// Fewest requests in flight for a deferral to start: with one, the driver
/// is most likely waiting for it (synchronous I/O) and adds nothing
/// meanwhile, so a deferral would only cost its timer.
pub const DEFER_MIN_IN_FLIGHT: usize = 2;

/// One queue's state, run on its IOThread.
pub struct QueueWorker {
    index: u16,
    /// The device, for messages.
    name: DeviceName,
    queue: Queue,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    backend: Box<dyn DiskBackend>,
    limits: DiskLimits,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    inflight: Vec<Option<Request>>,
    free: Vec<usize>,
    reaped: Vec<DiskCompletion>,
    polling: bool,
    /// While polling: notifications are suppressed (with EVENT_IDX: the
    /// avail index seen when `avail_event` was parked [`PARK_AHEAD`] past
    /// it, see `suppress_notifications`).
    parked: Option<u16>,
    /// Notifications were left disabled because the backend was full.
    stalled: bool,
    /// Bounds a deferral (see `QueueWorker::defer_notifications`); `None`
    /// if no timer could be created (then notifications are never deferred).
    defer_timer: Option<DeferTimer>,
    /// How long a deferral may go without a look at the ring, in ns
    /// ([`DEFER_BOUND_NS`]; 0: never defer, as when polling is off).
    defer_ns: u64,
    /// Notifications are left off while requests are in flight.
    deferred: bool,
    /// When the ring was last looked at during the deferral.
    last_look: Instant,
    /// The timer is armed (its expiry may not have been read yet).
    timer_pending: bool,
    /// The last deferral reached its bound: notifications are re-enabled as
    /// usual until the queue next enters poll mode.
    defer_expired: bool,
    broken: bool,
    /// Notices guest memory lost under its mapping (SIGBUS).
    lost: LossWatch,
    counters: Arc<QueueCounters>,
}

impl QueueWorker {
    /// A worker for queue `index`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: DeviceName,
        index: u16,
        queue: Queue,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        backend: Box<dyn DiskBackend>,
        limits: DiskLimits,
        id: [u8; VIRTIO_BLK_ID_BYTES],
        counters: Arc<QueueCounters>,
    ) -> QueueWorker {
        QueueWorker {
            index,
            name,
            queue,
            mem,
            interrupt,
            backend,
            limits,
            id,
            inflight: Vec::new(),
            free: Vec::new(),
            reaped: Vec::new(),
            polling: false,
            parked: None,
            stalled: false,
            defer_timer: DeferTimer::new()
                .inspect_err(|e| log::debug!("no deferral timer: {e}"))
                .ok(),
            defer_ns: 0,
            deferred: false,
            last_look: Instant::now(),
            timer_pending: false,
            defer_expired: false,
            broken: false,
            lost: LossWatch::default(),
            counters,
        }
    }

    /// Sets `aio-max-batch` on the backend (0 = engine default).
    pub fn set_max_batch(&mut self, n: u64) {
        self.backend
            .set_max_batch(usize::try_from(n).unwrap_or(usize::MAX));
    }

    /// A duplicate of the backend's completion descriptor, if it has one, for
    /// the IOThread's context to own (it closes its copy when the handler
    /// is removed; the backend keeps its own).
    pub fn completion_fd(&self) -> std::io::Result<Option<OwnedFd>> {
        let Some(raw) = self.backend.completion_fd() else {
            return Ok(None);
        };
        // SAFETY: the backend owns `raw` and keeps it open for as long as it
        // lives; `self` owns the backend and outlives this borrow, which ends
        // as soon as the duplicate is made.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        fd.try_clone_to_owned().map(Some)
    }

    /// Whether the driver made new requests available that we can take.
    /// One atomic load of `avail.idx`; no syscall.
    pub fn avail_pending(&self) -> bool {
        if self.broken || !self.backend.has_capacity() {
            return false;
        }
        match self.queue.avail_idx(&*self.mem, Ordering::Acquire) {
            Ok(idx) => idx != Wrapping(self.queue.next_avail()),
            Err(_) => false,
        }
    }

    /// Whether the queue must be processed again after completions: new
    /// requests wait, notifications were left off while the backend was
    /// full, or they were deferred and nothing is in flight any more (they
    /// must be re-enabled: no completion will come).
    pub fn needs_resume(&self) -> bool {
        !self.broken
            && (self.stalled
                || (self.deferred && self.backend.in_flight() == 0)
                || self.avail_pending())
    }

    /// Takes the IOThread's current `aio-max-batch`, and whether it polls
    /// (`poll-max-ns` > 0: notifications may be deferred).
    pub fn follow_params(&mut self, ctx: &AioContext) {
        self.set_max_batch(ctx.aio_max_batch());
        let polls = ctx.poll_params().max_ns > 0;
        self.set_defer_ns(if polls { DEFER_BOUND_NS } else { 0 });
    }

    /// After completions were reaped: takes the requests that waited for
    /// room or were added during a deferral, and re-enables notifications
    /// when a deferral has nothing in flight any more. Checking the ring is
    /// a look for the deferral's bound.
    pub fn resume_after_completions(&mut self, ctx: &AioContext) {
        if self.completion_needs_resume() {
            self.follow_params(ctx);
            self.process_queue();
        }
    }

    /// [`Self::needs_resume`] after completions, which counts as a look at
    /// the ring for a deferral's bound.
    fn completion_needs_resume(&mut self) -> bool {
        if self.deferred {
            self.last_look = Instant::now();
        }
        self.needs_resume()
    }

    /// How long a deferral of notifications may go without a look at the
    /// ring, in ns (0 never defers them).
    pub fn set_defer_ns(&mut self, ns: u64) {
        self.defer_ns = ns;
    }

    /// Never defers notifications (the timer could not be registered).
    pub fn disable_deferral(&mut self) {
        self.end_deferral();
        self.defer_timer = None;
    }

    /// A duplicate of the deferral timer's descriptor, for the IOThread's
    /// context to own (the worker keeps its own to arm and disarm it).
    pub fn defer_timer_fd(&self) -> std::io::Result<Option<OwnedFd>> {
        self.defer_timer.as_ref().map(DeferTimer::dup).transpose()
    }

    /// Whether the backend has completions to reap (no syscall).
    pub fn completions_pending(&mut self) -> bool {
        self.backend.has_completions()
    }

    fn fail(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if !self.broken {
            log::error!(
                "{} queue {}: {what}: {e}; device needs reset",
                self.name,
                self.index
            );
            self.broken = true;
            self.interrupt.set_needs_reset();
        }
    }

    /// Whether guest memory lost pages under its mapping (a vhost-user
    /// front-end shrank its memory file; see [`crate::sigbus`]). What was
    /// read from there is zeroes, what was written is gone: the request
    /// fails and the queue stops (needs reset), the process lives on.
    fn memory_lost(&mut self) -> bool {
        if !self.lost.lost(&self.mem) {
            return false;
        }
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.fail(
            "guest memory",
            &"pages lost under the mapping (the front-end shrank its memory file)",
        );
        true
    }

    /// Takes every available request (as far as the backend has room),
    /// submits the I/O, and completes whatever is finished.
    pub fn process_queue(&mut self) {
        loop {
            if self.broken {
                return;
            }
            if let Err(e) = self.suppress_notifications() {
                return self.fail("disable notification", &e);
            }
            if self.deferred {
                self.last_look = Instant::now();
            }
            self.take_requests();
            self.backend.flush_submissions();
            self.complete_ready();
            if self.avail_pending() && !self.polling {
                continue; // budget exhausted with more work waiting
            }
            self.stalled = !self.polling && !self.backend.has_capacity();
            if self.broken || self.polling || self.stalled {
                // Polling re-checks by itself; a full backend resumes when
                // completions free room (see `needs_resume`).
                return;
            }
            if self.defer_notifications() {
                return; // a completion (or the bound) brings us back
            }
            match self.enable_notifications() {
                Ok(true) => continue, // more arrived while notifications were off
                Ok(false) => return,
                Err(e) => return self.fail("enable notification", &e),
            }
        }
    }

    /// Guest address of the used ring's `avail_event` (EVENT_IDX).
    fn avail_event_addr(&self) -> Result<GuestAddress, virtio_queue::Error> {
        let off = 4 + 8 * u64::from(self.queue.size());
        self.queue
            .used_ring()
            .checked_add(off)
            .map(GuestAddress)
            .ok_or(virtio_queue::Error::AddressOverflow)
    }

    fn store_le16(&self, addr: GuestAddress, val: u16) -> Result<(), virtio_queue::Error> {
        self.mem
            .store(val.to_le(), addr, Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)
    }

    /// Stops (or keeps stopped) guest notifications while the queue is
    /// being served, as QEMU's `virtio_queue_set_notification(vq, 0)`.
    ///
    /// Without EVENT_IDX: `VRING_USED_F_NO_NOTIFY` in `used.flags`.
    ///
    /// With EVENT_IDX the driver ignores that flag (virtio 1.2 §2.7.10) and
    /// kicks when `vring_need_event(avail_event, new, old)`, i.e. when its
    /// publication moves `avail.idx` past `avail_event`. Outside poll mode
    /// nothing needs doing: we run because the driver kicked, i.e. it
    /// already went past `avail_event`, and it kicks again only after
    /// 2^16 more publications. QEMU leaves `avail_event` alone there too
    /// (`vring_set_avail_event` returns early while `vq->notification` is
    /// off, so neither `set_notification(vq, 0)` nor `virtqueue_pop`
    /// move it). In poll mode, though, `avail_event` is still where the
    /// last re-enable put it: if the loop started polling for another
    /// reason (a completion), the driver's next publication would kick us
    /// although we are polling the ring anyway. So while polling we park
    /// `avail_event` half the index space ahead of the index seen now
    /// ([`PARK_AHEAD`]). Not one behind it: a driver decides for what it
    /// added since its last decision (`old..new`), and `old` may lie before
    /// the index we saw: a driver that publishes each chain on its own and
    /// decides once per batch (Linux's `virtqueue_add` and
    /// `virtqueue_kick_prepare`, our guest's `alt` profile) is asked to kick
    /// if we park anywhere in its batch. Half the index space ahead is
    /// beyond anything it can publish before we see it again (its chains
    /// need descriptors we free only after taking them; each pass of
    /// `process_queue` in poll mode parks it again). Leaving poll mode
    /// re-enables notifications with the final check
    /// ([`Self::enable_notifications`]), which is what correctness rests
    /// on: a park only saves kicks.
    fn suppress_notifications(&mut self) -> Result<(), virtio_queue::Error> {
        if self.polling {
            return self.park();
        }
        if self.queue.event_idx_enabled() || (self.deferred && self.parked.is_some()) {
            return Ok(()); // nothing to do, or parked when the deferral began
        }
        self.store_le16(
            GuestAddress(self.queue.used_ring()),
            VRING_USED_F_NO_NOTIFY as u16,
        )
    }

    /// Parks notifications while the queue is watched anyway (poll mode, or
    /// a deferral): with EVENT_IDX `avail_event` [`PARK_AHEAD`] past the
    /// avail index seen now (see [`Self::suppress_notifications`]), without
    /// it `VRING_USED_F_NO_NOTIFY`.
    fn park(&mut self) -> Result<(), virtio_queue::Error> {
        if !self.queue.event_idx_enabled() {
            if self.parked.is_none() {
                self.store_le16(
                    GuestAddress(self.queue.used_ring()),
                    VRING_USED_F_NO_NOTIFY as u16,
                )?;
                self.parked = Some(0);
            }
            return Ok(());
        }
        let idx = self.queue.avail_idx(&*self.mem, Ordering::Relaxed)?;
        if self.parked == Some(idx.0) {
            return Ok(()); // already parked there: spare the store
        }
        self.store_le16(self.avail_event_addr()?, idx.0.wrapping_add(PARK_AHEAD))?;
        self.parked = Some(idx.0);
        Ok(())
    }

    /// Re-enables guest notifications, as QEMU's
    /// `virtio_queue_set_notification(vq, 1)` followed by its
    /// `virtio_queue_empty()` check: with EVENT_IDX, `avail_event` = the
    /// avail index seen now (not `next_avail`, which lags behind while the
    /// backend is full or while requests waited during polling: the driver
    /// is then asked to kick at its very next publication, and requests
    /// already published are found by the check below); without,
    /// `used.flags` = 0. Then a full fence, so that the driver either sees
    /// the new `avail_event` / flags before it decides whether to kick, or
    /// we see its new `avail.idx` here (its side: store `avail.idx`, full
    /// barrier, load `avail_event`). Returns whether requests are waiting:
    /// the caller must take them, the driver may not kick for them.
    fn enable_notifications(&mut self) -> Result<bool, virtio_queue::Error> {
        self.end_deferral();
        self.parked = None;
        if self.queue.event_idx_enabled() {
            let idx = self.queue.avail_idx(&*self.mem, Ordering::Relaxed)?;
            self.store_le16(self.avail_event_addr()?, idx.0)?;
        } else {
            self.store_le16(GuestAddress(self.queue.used_ring()), 0)?;
        }
        fence(Ordering::SeqCst);
        let now = self.queue.avail_idx(&*self.mem, Ordering::Acquire)?;
        Ok(now != Wrapping(self.queue.next_avail()))
    }

    fn take_requests(&mut self) {
        let mem = self.mem.clone();
        let mut added = false;
        // At most one ring's worth per pass, so that completions are
        // published even while the driver keeps adding requests.
        let mut budget = self.queue.size();
        loop {
            if !self.backend.has_capacity() || budget == 0 {
                break;
            }
            budget -= 1;
            let next = match self.queue.iter(&*mem) {
                Ok(mut it) => it.next(),
                Err(e) => return self.fail("avail ring", &e),
            };
            let Some(chain) = next else {
                break;
            };
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let parsed = parse_request(chain, &self.limits);
            if self.memory_lost() {
                return;
            }
            let req = match parsed {
                Ok(r) => r,
                Err(rej) => {
                    guest_warn!("{} queue {}: {}", self.name, self.index, rej.error);
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    let used = rej.complete(&*mem);
                    added = true;
                    if let Err(e) = self.queue.add_used(&*mem, rej.head_index, used) {
                        return self.fail("add_used", &e);
                    }
                    continue;
                }
            };
            let prepared = req.prepare(&mem, &self.id);
            if self.memory_lost() {
                return;
            }
            match prepared {
                Prepared::Done { used_len } => {
                    added = true;
                    if let Err(e) = self.queue.add_used(&*mem, req.head_index, used_len) {
                        return self.fail("add_used", &e);
                    }
                }
                Prepared::Io(op) => {
                    let slot = match self.free.pop() {
                        Some(s) => s,
                        None => {
                            self.inflight.push(None);
                            self.inflight.len() - 1
                        }
                    };
                    if let Some(s) = self.inflight.get_mut(slot) {
                        *s = Some(req);
                    }
                    self.backend.submit(op, slot as u64);
                }
            }
        }
        if added {
            self.signal_used();
        }
    }

    /// Reaps backend completions into the used ring and notifies the guest.
    pub fn complete_ready(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        self.backend.reap(&mut reaped);
        let mut added = false;
        let mut failure = None;
        let mut lost = false;
        for c in reaped.drain(..) {
            let slot = usize::try_from(c.user_data).unwrap_or(usize::MAX);
            let Some(req) = self.inflight.get_mut(slot).and_then(Option::take) else {
                log::error!(
                    "{} queue {}: completion for unknown request {slot}",
                    self.name,
                    self.index
                );
                continue;
            };
            self.free.push(slot);
            if c.result.is_err() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            let used = req.finish(&*self.mem, &c.result);
            if lost || self.lost.lost(&self.mem) {
                // Not published: the queue stops below.
                lost = true;
                continue;
            }
            added = true;
            if failure.is_none() {
                if let Err(e) = self.queue.add_used(&*self.mem, req.head_index, used) {
                    failure = Some(e);
                }
            }
        }
        self.reaped = reaped;
        if lost && self.memory_lost() {
            return;
        }
        if let Some(e) = failure {
            return self.fail("add_used", &e);
        }
        if added {
            self.signal_used();
        }
    }

    fn signal_used(&mut self) {
        let needed = if self.queue.event_idx_enabled() {
            match self.queue.needs_notification(&*self.mem) {
                Ok(n) => n,
                Err(e) => return self.fail("used_event", &e),
            }
        } else {
            // virtio-queue ignores VRING_AVAIL_F_NO_INTERRUPT; honour it.
            let flags: u16 = self
                .mem
                .read_obj(vm_memory::GuestAddress(self.queue.avail_ring()))
                .map(u16::from_le)
                .unwrap_or(0);
            flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
        };
        if needed {
            self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.interrupt.trigger_queue(self.index) {
                log::error!("{} queue {}: interrupt failed: {e}", self.name, self.index);
            }
        }
    }

    /// Enters or leaves poll mode (guest notifications off while polling).
    /// Leaving re-enables them; requests that arrived meanwhile are left to
    /// the loop's final poll after `poll_end` ([`Self::avail_pending`]).
    pub fn set_polling(&mut self, polling: bool) {
        if self.broken {
            self.polling = polling;
            return;
        }
        let r = if polling {
            self.polling = true;
            self.end_deferral();
            self.defer_expired = false;
            self.suppress_notifications()
        } else {
            self.polling = false;
            self.enable_notifications().map(|_| ())
        };
        if let Err(e) = r {
            self.fail("notification suppression", &e);
        }
    }

    /// Leaves poll mode before the IOThread sleeps (`poll_end`): as
    /// [`Self::set_polling`]`(false)`, except that with requests in flight
    /// notifications may stay off (`Self::defer_notifications`).
    pub fn leave_poll_mode(&mut self) {
        if self.broken {
            self.polling = false;
            return;
        }
        self.polling = false;
        if self.defer_notifications() {
            return;
        }
        if let Err(e) = self.enable_notifications() {
            self.fail("notification suppression", &e);
        }
    }

    /// Leaves guest notifications off while requests are in flight, instead
    /// of re-enabling them (an extension beyond QEMU). A completion wakes
    /// the IOThread, whose completion handler then takes what the driver
    /// added meanwhile ([`Self::needs_resume`]), so the driver need not kick
    /// for it: with the IOThread asleep waiting for the storage, every
    /// re-enable would otherwise cost the guest an exit for the first
    /// request it adds after reaping a completion.
    ///
    /// Bounded: a deferral that goes `defer_ns` ([`DEFER_BOUND_NS`]) without
    /// a look at the ring ends (the timer, [`Self::expire_deferral`]), and
    /// notifications are then re-enabled as usual until the queue next
    /// polls; so a request added behind slow ones (a long flush) waits at
    /// most that long to be seen. The timer is armed when a deferral starts
    /// if it is not armed already, and left alone when one ends: a look
    /// costs a clock read, not a syscall. Only while the IOThread polls
    /// (`poll-max-ns` > 0) and with a backend that signals completions
    /// (io_uring). Returns whether notifications stay off.
    fn defer_notifications(&mut self) -> bool {
        if self.defer_ns == 0
            || self.defer_expired
            || self.backend.in_flight() < DEFER_MIN_IN_FLIGHT
            || self.backend.completion_fd().is_none()
        {
            return false;
        }
        if self.deferred {
            return true;
        }
        let Some(timer) = self.defer_timer.as_mut() else {
            return false;
        };
        if !self.timer_pending {
            if let Err(e) = timer.arm(self.defer_ns) {
                log::debug!("{} queue {}: deferral timer: {e}", self.name, self.index);
                return false;
            }
            self.timer_pending = true;
        }
        self.deferred = true;
        self.last_look = Instant::now();
        if let Err(e) = self.park() {
            self.fail("disable notification", &e);
        }
        true
    }

    /// The deferral timer fired. A deferral that saw the ring less than
    /// `defer_ns` ago goes on (the timer is re-armed for the rest); one that
    /// did not ends: notifications are re-enabled, taking what the driver
    /// added meanwhile.
    pub fn expire_deferral(&mut self) {
        let Some(timer) = self.defer_timer.as_mut() else {
            return;
        };
        timer.consume();
        self.timer_pending = false;
        if !self.deferred {
            return;
        }
        let idle = u64::try_from(self.last_look.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if idle < self.defer_ns {
            match timer.arm(self.defer_ns - idle) {
                Ok(()) => {
                    self.timer_pending = true;
                    return;
                }
                Err(e) => log::debug!("{} queue {}: deferral timer: {e}", self.name, self.index),
            }
        }
        self.deferred = false;
        self.defer_expired = true;
        self.process_queue();
    }

    /// Whether notifications are deferred (tests, diagnostics).
    pub fn notifications_deferred(&self) -> bool {
        self.deferred
    }

    /// Ends a deferral (notifications are being re-enabled, or the queue
    /// polls). The timer stays armed; if it fires, nothing is deferred.
    fn end_deferral(&mut self) {
        self.deferred = false;
    }

    /// Waits for every in-flight operation and completes it (device
    /// teardown). Returns the number of operations drained.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while self.backend.in_flight() > 0 {
            let before = self.backend.in_flight();
            self.backend.flush_submissions();
            if let Err(e) = self.backend.wait() {
                log::error!("{} queue {}: waiting for I/O: {e}", self.name, self.index);
                break;
            }
            self.complete_ready();
            n += before.saturating_sub(self.backend.in_flight());
        }
        n
    }

    /// Requests submitted and not completed.
    pub fn in_flight(&self) -> usize {
        self.backend.in_flight()
    }
}

fn lock(w: &Mutex<QueueWorker>) -> MutexGuard<'_, QueueWorker> {
    // A panic inside a worker is contained by the IOThread; keep serving.
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// The handler on a queue's ioeventfd.
pub struct QueueHandler {
    worker: Arc<Mutex<QueueWorker>>,
    kick: SharedEventFd,
    counters: Arc<QueueCounters>,
}

impl QueueHandler {
    /// A handler for `worker` woken by `kick`.
    pub fn new(
        worker: Arc<Mutex<QueueWorker>>,
        kick: EventFd,
        counters: Arc<QueueCounters>,
    ) -> Self {
        QueueHandler {
            worker,
            kick: SharedEventFd::new(kick),
            counters,
        }
    }

    /// The ioeventfd, to register with the IOThread's context.
    pub fn kick(&self) -> SharedEventFd {
        self.kick.clone()
    }
}

impl FdHandler for QueueHandler {
    fn ready(&mut self, ctx: &mut AioContext, _ready: Readiness) {
        // Non-blocking eventfd: EAGAIN just means another wake-up already drained it.
        if self.kick.read().is_ok() {
            self.counters.notifications.fetch_add(1, Ordering::Relaxed);
        }
        let mut w = lock(&self.worker);
        w.follow_params(ctx);
        w.process_queue();
    }
}

impl PollHandler for QueueHandler {
    fn poll(&mut self) -> bool {
        lock(&self.worker).avail_pending()
    }

    fn poll_ready(&mut self, ctx: &mut AioContext) {
        let mut w = lock(&self.worker);
        w.follow_params(ctx);
        w.process_queue();
    }

    fn poll_begin(&mut self) {
        lock(&self.worker).set_polling(true);
    }

    fn poll_end(&mut self) {
        lock(&self.worker).leave_poll_mode();
    }
}

/// The one-shot timer that bounds a deferral of notifications: a
/// non-blocking `timerfd` (vmm-sys-util's, made non-blocking so that reading
/// it after a disarm cannot block the IOThread).
struct DeferTimer(TimerFd);

impl DeferTimer {
    fn new() -> std::io::Result<DeferTimer> {
        let t = TimerFd::new().map_err(std::io::Error::from)?;
        // SAFETY: F_GETFL/F_SETFL on a descriptor `t` owns; no memory is
        // passed and the return values are checked.
        let r = unsafe {
            let flags = libc::fcntl(t.as_raw_fd(), libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(t.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DeferTimer(t))
    }

    fn arm(&mut self, ns: u64) -> std::io::Result<()> {
        self.0
            .reset(Duration::from_nanos(ns), None)
            .map_err(std::io::Error::from)
    }

    /// Reads the expiry count, so that the descriptor stops being readable
    /// (EAGAIN when there is none: nothing to do).
    fn consume(&mut self) {
        let _ = self.0.wait();
    }

    fn dup(&self) -> std::io::Result<OwnedFd> {
        // SAFETY: `self.0` owns the descriptor and keeps it open for this
        // borrow, which ends as soon as the duplicate is made.
        let fd = unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) };
        fd.try_clone_to_owned()
    }
}

/// The handler on a queue's deferral timer (see
/// `QueueWorker::defer_notifications`).
pub struct DeferTimerHandler {
    worker: Arc<Mutex<QueueWorker>>,
}

impl DeferTimerHandler {
    /// A deferral timer handler for `worker`.
    pub fn new(worker: Arc<Mutex<QueueWorker>>) -> Self {
        DeferTimerHandler { worker }
    }
}

impl FdHandler for DeferTimerHandler {
    fn ready(&mut self, ctx: &mut AioContext, _ready: Readiness) {
        let mut w = lock(&self.worker);
        w.follow_params(ctx);
        w.expire_deferral();
    }
}

/// The handler on a backend's completion descriptor (io_uring: the ring fd).
pub struct CompletionHandler {
    worker: Arc<Mutex<QueueWorker>>,
}

impl CompletionHandler {
    /// A completion handler for `worker`.
    pub fn new(worker: Arc<Mutex<QueueWorker>>) -> Self {
        CompletionHandler { worker }
    }

    fn complete(&mut self, ctx: &mut AioContext, ack: bool) {
        let mut w = lock(&self.worker);
        if ack {
            w.backend.ack_completion_event();
        }
        w.complete_ready();
        w.resume_after_completions(ctx);
    }
}

impl FdHandler for CompletionHandler {
    fn ready(&mut self, ctx: &mut AioContext, _ready: Readiness) {
        self.complete(ctx, true);
    }
}

impl PollHandler for CompletionHandler {
    fn poll(&mut self) -> bool {
        lock(&self.worker).completions_pending()
    }

    fn poll_ready(&mut self, ctx: &mut AioContext) {
        self.complete(ctx, false);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::virtio::block::backend::DiskOpKind;
    use crate::virtio::block::request::{req_type, status};
    use crate::virtio::block::sync_engine::SyncEngine;
    use crate::virtio::block::testing::driver::{post, status_of, Req, Rings};
    use crate::virtio::block::testing::{limits, open_raw, temp_disk, FaultyBackend};
    use crate::virtio::block::BlockRole;

    const QSIZE: u16 = 16;

    #[derive(Default)]
    struct CountingInterrupt {
        queue: AtomicUsize,
        needs_reset: AtomicBool,
    }

    impl VirtioInterrupt for CountingInterrupt {
        fn trigger_queue(&self, _q: u16) -> std::io::Result<()> {
            self.queue.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn trigger_config(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn set_needs_reset(&self) {
            self.needs_reset.store(true, Ordering::SeqCst);
        }
    }

    struct Setup {
        mem: Arc<GuestMemoryMmap>,
        intr: Arc<CountingInterrupt>,
        worker: QueueWorker,
        _disk: vmm_sys_util::tempfile::TempFile,
    }

    fn setup(event_idx: bool, fail_writes: bool) -> Setup {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap());
        let rings = Rings::of(0, QSIZE);
        rings.clear(&mem);
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(rings.desc as u32), Some(0));
        q.set_avail_ring_address(Some(rings.avail as u32), Some(0));
        q.set_used_ring_address(Some(rings.used as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        let disk = temp_disk(1 << 20, 0);
        let inner: Box<dyn DiskBackend> = Box::new(SyncEngine::new(open_raw(&disk, false, false)));
        let backend: Box<dyn DiskBackend> = if fail_writes {
            Box::new(FaultyBackend::new(inner, |k| {
                matches!(k, DiskOpKind::Write { .. })
            }))
        } else {
            inner
        };
        let intr = Arc::new(CountingInterrupt::default());
        let worker = QueueWorker::new(
            DeviceName::new(BlockRole::Drive, "d0"),
            0,
            q,
            mem.clone(),
            intr.clone(),
            backend,
            limits(2048),
            *b"01234567890123456789",
            Arc::default(),
        );
        Setup {
            mem,
            intr,
            worker,
            _disk: disk,
        }
    }

    fn req(t: u32, buf: u64, write: bool) -> Req {
        Req {
            t,
            sector: 0,
            buf,
            len: 512,
            write,
        }
    }

    #[test]
    fn eio_from_backend_gives_ioerr_and_queue_keeps_working() {
        let mut s = setup(false, true);
        let w = req(req_type::OUT, 0x20_0000, false);
        let r = req(req_type::IN, 0x30_0000, true);
        post(&s.mem, 0, QSIZE, &[w, r], 0);
        assert!(s.worker.avail_pending());
        s.worker.process_queue();
        assert!(!s.worker.avail_pending());
        assert_eq!(status_of(&s.mem, &w), status::IOERR);
        assert_eq!(status_of(&s.mem, &r), status::OK);
        assert_eq!(Rings::of(0, QSIZE).used_idx(&s.mem), 2);
        assert!(!s.intr.needs_reset.load(Ordering::SeqCst));
        assert_eq!(s.worker.counters.errors.load(Ordering::SeqCst), 1);
        // And again: still serving.
        let r2 = req(req_type::IN, 0x40_0000, true);
        post(&s.mem, 0, QSIZE, &[r2], 6);
        s.worker.process_queue();
        assert_eq!(status_of(&s.mem, &r2), status::OK);
    }

    #[test]
    fn polling_suppresses_and_restores_notifications() {
        let mut s = setup(false, false);
        let rings = Rings::of(0, QSIZE);
        let used_flags =
            |m: &GuestMemoryMmap| -> u16 { m.read_obj(GuestAddress(rings.used)).unwrap() };
        s.worker.set_polling(true);
        assert_eq!(used_flags(&s.mem), VRING_USED_F_NO_NOTIFY as u16);
        let r = req(req_type::IN, 0x20_0000, true);
        post(&s.mem, 0, QSIZE, &[r], 0);
        assert!(s.worker.avail_pending());
        s.worker.process_queue();
        // Still polling: notifications stay off.
        assert_eq!(used_flags(&s.mem), VRING_USED_F_NO_NOTIFY as u16);
        s.worker.set_polling(false);
        assert_eq!(used_flags(&s.mem), 0);
        // Out of poll mode, processing leaves notifications enabled.
        post(&s.mem, 0, QSIZE, &[r], 3);
        s.worker.process_queue();
        assert_eq!(used_flags(&s.mem), 0);
        assert_eq!(rings.used_idx(&s.mem), 2);
    }

    #[test]
    fn event_idx_publishes_avail_event_and_honours_used_event() {
        let mut s = setup(true, false);
        let rings = Rings::of(0, QSIZE);
        let avail_event_addr = GuestAddress(rings.used + 4 + 8 * u64::from(QSIZE));
        let used_event_addr = GuestAddress(rings.avail + 4 + 2 * u64::from(QSIZE));
        // The driver wants an interrupt only after the 3rd completion.
        s.mem.write_obj(2u16, used_event_addr).unwrap();
        for i in 0..3u16 {
            let r = req(req_type::IN, 0x20_0000 + u64::from(i) * 0x1000, true);
            post(&s.mem, 0, QSIZE, &[r], i * 3);
            s.worker.process_queue();
            let ae: u16 = s.mem.read_obj(avail_event_addr).unwrap();
            assert_eq!(ae, i + 1, "avail_event follows next_avail");
        }
        assert_eq!(s.intr.queue.load(Ordering::SeqCst), 1);
    }

    fn avail_event(mem: &GuestMemoryMmap) -> u16 {
        let rings = Rings::of(0, QSIZE);
        mem.read_obj(GuestAddress(rings.used + 4 + 8 * u64::from(QSIZE)))
            .unwrap()
    }

    fn avail_idx(mem: &GuestMemoryMmap) -> u16 {
        let rings = Rings::of(0, QSIZE);
        mem.read_obj(GuestAddress(rings.avail + 2)).unwrap()
    }

    /// The driver's EVENT_IDX rule (virtio 1.2 §2.7.10, Linux's
    /// `vring_need_event`): after moving `avail.idx` from `old` to `new`,
    /// kick if that passed `avail_event`.
    fn driver_would_kick(mem: &GuestMemoryMmap, old: u16, new: u16) -> bool {
        new.wrapping_sub(avail_event(mem)).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// Posts one 512-byte read (descriptors from `first`) and returns
    /// whether the driver would kick for it.
    fn publish_read(s: &Setup, first: u16) -> bool {
        let old = avail_idx(&s.mem);
        let r = req(req_type::IN, 0x20_0000 + u64::from(first) * 0x1000, true);
        post(&s.mem, 0, QSIZE, &[r], first);
        driver_would_kick(&s.mem, old, avail_idx(&s.mem))
    }

    #[test]
    fn reenabling_publishes_the_avail_index_seen_now() {
        let mut s = setup(true, false);
        s.worker.set_polling(true);
        // Two requests arrive while polling and are not taken yet.
        post(
            &s.mem,
            0,
            QSIZE,
            &[
                req(req_type::IN, 0x20_0000, true),
                req(req_type::IN, 0x21_0000, true),
            ],
            0,
        );
        s.worker.set_polling(false);
        // Not the stale next_avail (0): the index seen when re-enabling.
        assert_eq!(avail_event(&s.mem), 2);
        assert!(s.worker.avail_pending(), "the final poll finds them");
        s.worker.process_queue();
        assert_eq!(Rings::of(0, QSIZE).used_idx(&s.mem), 2);
        assert_eq!(avail_event(&s.mem), 2);
        // The next publication kicks.
        assert!(publish_read(&s, 6));
    }

    #[test]
    fn final_check_after_reenabling_catches_a_late_request() {
        let mut s = setup(true, false);
        post(&s.mem, 0, QSIZE, &[req(req_type::IN, 0x20_0000, true)], 0);
        s.worker.process_queue();
        assert_eq!(s.worker.queue.next_avail(), 1);
        // Published between the last pop and re-enabling (the driver read
        // avail_event before we moved it: no kick). The final check must
        // report it, and avail_event must already ask for the next one.
        post(&s.mem, 0, QSIZE, &[req(req_type::IN, 0x21_0000, true)], 3);
        assert!(s.worker.enable_notifications().unwrap());
        assert_eq!(avail_event(&s.mem), 2);
        s.worker.process_queue();
        // Taken; nothing new: the check says so.
        assert_eq!(Rings::of(0, QSIZE).used_idx(&s.mem), 2);
        assert!(!s.worker.enable_notifications().unwrap());
    }

    /// A backend that publishes one more request (as a racing driver would,
    /// without a kick) the first time completions are reaped, i.e. after
    /// `process_queue` took the avail ring and before it re-enables
    /// notifications.
    struct RacingBackend {
        inner: Box<dyn DiskBackend>,
        mem: Arc<GuestMemoryMmap>,
        late: Option<Req>,
    }

    impl DiskBackend for RacingBackend {
        fn engine(&self) -> crate::virtio::block::backend::EngineKind {
            self.inner.engine()
        }
        fn has_capacity(&self) -> bool {
            self.inner.has_capacity()
        }
        fn submit(&mut self, op: crate::virtio::block::backend::DiskOp, user_data: u64) {
            self.inner.submit(op, user_data)
        }
        fn flush_submissions(&mut self) {
            self.inner.flush_submissions()
        }
        fn set_max_batch(&mut self, n: usize) {
            self.inner.set_max_batch(n)
        }
        fn has_completions(&mut self) -> bool {
            self.inner.has_completions()
        }
        fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
            if let Some(r) = self.late.take() {
                post(&self.mem, 0, QSIZE, &[r], 3);
            }
            self.inner.reap(out)
        }
        fn wait(&mut self) -> std::io::Result<()> {
            self.inner.wait()
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
        fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
            self.inner.completion_fd()
        }
    }

    #[test]
    fn process_queue_serves_a_request_published_while_it_ran() {
        for event_idx in [true, false] {
            let mut s = setup(event_idx, false);
            let disk = temp_disk(1 << 20, 0);
            s.worker.backend = Box::new(RacingBackend {
                inner: Box::new(SyncEngine::new(open_raw(&disk, false, false))),
                mem: s.mem.clone(),
                late: Some(req(req_type::IN, 0x21_0000, true)),
            });
            post(&s.mem, 0, QSIZE, &[req(req_type::IN, 0x20_0000, true)], 0);
            s.worker.process_queue();
            assert_eq!(Rings::of(0, QSIZE).used_idx(&s.mem), 2, "{event_idx}");
            assert!(!s.worker.avail_pending());
            if event_idx {
                assert_eq!(avail_event(&s.mem), 2);
            }
        }
    }

    #[test]
    fn a_park_in_the_middle_of_a_drivers_batch_saves_its_kick() {
        // A driver that publishes each chain on its own and decides once per
        // batch (Linux's virtio_ring, the guest's `alt` profile): its
        // decision covers old..new, and the device parks in between.
        let mut s = setup(true, false);
        let old = avail_idx(&s.mem);
        post(&s.mem, 0, QSIZE, &[req(req_type::IN, 0x20_0000, true)], 0);
        s.worker.set_polling(true);
        s.worker.process_queue();
        post(&s.mem, 0, QSIZE, &[req(req_type::IN, 0x21_0000, true)], 3);
        post(&s.mem, 0, QSIZE, &[req(req_type::IN, 0x22_0000, true)], 6);
        let new = avail_idx(&s.mem);
        assert_eq!(new.wrapping_sub(old), 3);
        assert!(
            !driver_would_kick(&s.mem, old, new),
            "parked at {} with the batch {old}..{new}",
            avail_event(&s.mem)
        );
        s.worker.process_queue();
        assert_eq!(Rings::of(0, QSIZE).used_idx(&s.mem), 3);
    }

    #[test]
    fn polling_with_event_idx_keeps_the_driver_from_kicking() {
        let mut s = setup(true, false);
        let rings = Rings::of(0, QSIZE);
        // Served once outside poll mode: avail_event = 1, the next
        // publication would kick.
        assert!(publish_read(&s, 0));
        s.worker.process_queue();
        assert_eq!(avail_event(&s.mem), 1);
        // The loop starts polling (e.g. woken by a completion).
        s.worker.set_polling(true);
        assert!(!publish_read(&s, 3), "kick while polling");
        assert!(s.worker.avail_pending());
        s.worker.process_queue();
        assert_eq!(rings.used_idx(&s.mem), 2);
        for i in 2..40u16 {
            assert!(
                !publish_read(&s, (i * 3) % QSIZE),
                "kick while polling ({i})"
            );
            s.worker.process_queue();
        }
        // Parked half the index space ahead of what was seen.
        assert_eq!(
            avail_event(&s.mem),
            avail_idx(&s.mem).wrapping_add(PARK_AHEAD)
        );
        assert_eq!(rings.used_idx(&s.mem), 40);
        // Leaving poll mode: the next publication kicks again.
        s.worker.set_polling(false);
        assert_eq!(avail_event(&s.mem), 40);
        assert!(publish_read(&s, 0));
        assert!(s.worker.avail_pending(), "the final poll finds it");
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let mut s = setup(false, false);
        let rings = Rings::of(0, QSIZE);
        s.mem
            .write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(rings.avail))
            .unwrap();
        post(&s.mem, 0, QSIZE, &[req(req_type::IN, 0x20_0000, true)], 0);
        s.worker.process_queue();
        assert_eq!(rings.used_idx(&s.mem), 1);
        assert_eq!(s.intr.queue.load(Ordering::SeqCst), 0);
        s.mem.write_obj(0u16, GuestAddress(rings.avail)).unwrap();
        post(&s.mem, 0, QSIZE, &[req(req_type::IN, 0x20_0000, true)], 3);
        s.worker.process_queue();
        assert_eq!(s.intr.queue.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn bogus_avail_index_breaks_the_queue_and_requests_reset() {
        let mut s = setup(false, false);
        let rings = Rings::of(0, QSIZE);
        // avail.idx jumps by more than the queue size.
        s.mem
            .write_obj(100u16, GuestAddress(rings.avail + 2))
            .unwrap();
        s.worker.process_queue();
        assert!(s.intr.needs_reset.load(Ordering::SeqCst));
        assert!(!s.worker.avail_pending());
        assert!(!s.worker.needs_resume());
        // A head index beyond the queue: used ring refuses it -> broken.
        let mut s = setup(false, false);
        s.mem
            .write_obj(1u16, GuestAddress(rings.avail + 2))
            .unwrap();
        s.mem
            .write_obj(500u16, GuestAddress(rings.avail + 4))
            .unwrap();
        s.worker.process_queue();
        assert!(s.intr.needs_reset.load(Ordering::SeqCst));
    }

    #[test]
    fn drain_waits_for_io_uring_completions() {
        let mut s = setup(false, false);
        let disk = temp_disk(1 << 20, 0x61);
        s.worker.backend = Box::new(
            crate::virtio::block::uring::IoUringEngine::new(open_raw(&disk, false, false), QSIZE)
                .unwrap(),
        );
        assert!(s.worker.completion_fd().unwrap().is_some());
        let reqs: Vec<Req> = (0..4)
            .map(|i| req(req_type::IN, 0x20_0000 + i * 0x1000, true))
            .collect();
        post(&s.mem, 0, QSIZE, &reqs, 0);
        s.worker.process_queue();
        let pending = s.worker.in_flight();
        assert_eq!(s.worker.drain(), pending);
        assert_eq!(s.worker.in_flight(), 0);
        assert_eq!(Rings::of(0, QSIZE).used_idx(&s.mem), 4);
        assert!(reqs.iter().all(|r| status_of(&s.mem, r) == status::OK));
    }

    #[test]
    fn drain_completes_in_flight_requests() {
        let mut s = setup(false, false);
        post(&s.mem, 0, QSIZE, &[req(req_type::IN, 0x20_0000, true)], 0);
        s.worker.process_queue();
        assert_eq!(s.worker.in_flight(), 0);
        assert_eq!(s.worker.drain(), 0);
        assert!(s.worker.completion_fd().unwrap().is_none());
    }

    /// Operations complete only when the test releases them; the backend
    /// has a completion descriptor, as io_uring does.
    #[derive(Clone, Default)]
    struct Held(Arc<Mutex<(Vec<u64>, Vec<u64>)>>);

    impl Held {
        /// Completes every operation submitted so far.
        fn release_all(&self) {
            let mut g = self.0.lock().unwrap();
            let (held, done) = &mut *g;
            done.append(held);
        }
        /// Completes the oldest operation.
        fn release_one(&self) {
            let mut g = self.0.lock().unwrap();
            let (held, done) = &mut *g;
            if !held.is_empty() {
                done.push(held.remove(0));
            }
        }
    }

    struct HoldingBackend {
        held: Held,
        evt: EventFd,
    }

    impl DiskBackend for HoldingBackend {
        fn engine(&self) -> crate::virtio::block::backend::EngineKind {
            crate::virtio::block::backend::EngineKind::IoUring
        }
        fn has_capacity(&self) -> bool {
            true
        }
        fn submit(&mut self, _op: crate::virtio::block::backend::DiskOp, user_data: u64) {
            self.held.0.lock().unwrap().0.push(user_data);
        }
        fn flush_submissions(&mut self) {}
        fn set_max_batch(&mut self, _n: usize) {}
        fn has_completions(&mut self) -> bool {
            !self.held.0.lock().unwrap().1.is_empty()
        }
        fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
            for user_data in self.held.0.lock().unwrap().1.drain(..) {
                out.push(DiskCompletion {
                    user_data,
                    result: Ok(512),
                });
            }
        }
        fn wait(&mut self) -> std::io::Result<()> {
            self.held.release_all();
            Ok(())
        }
        fn in_flight(&self) -> usize {
            let g = self.held.0.lock().unwrap();
            g.0.len() + g.1.len()
        }
        fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
            Some(self.evt.as_raw_fd())
        }
    }

    /// A worker on a [`HoldingBackend`] that may defer for `defer_ns`.
    fn setup_held(event_idx: bool, defer_ns: u64) -> (Setup, Held) {
        let mut s = setup(event_idx, false);
        let held = Held::default();
        s.worker.backend = Box::new(HoldingBackend {
            held: held.clone(),
            evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        });
        s.worker.set_defer_ns(defer_ns);
        (s, held)
    }

    /// Whether the driver would kick after publishing `old..new`, with or
    /// without EVENT_IDX.
    fn kicks(s: &Setup, event_idx: bool, first: u16) -> bool {
        if event_idx {
            return publish_read(s, first);
        }
        publish_read(s, first);
        let flags: u16 = s
            .mem
            .read_obj(GuestAddress(Rings::of(0, QSIZE).used))
            .unwrap();
        flags & VRING_USED_F_NO_NOTIFY as u16 == 0
    }

    /// What the completion handler does when the backend's descriptor fires.
    fn on_completion(s: &mut Setup) {
        s.worker.complete_ready();
        if s.worker.completion_needs_resume() {
            s.worker.process_queue();
        }
    }

    /// Publishes two reads (descriptors 0..6) at once.
    fn publish_two(s: &Setup) {
        post(
            &s.mem,
            0,
            QSIZE,
            &[
                req(req_type::IN, 0x20_0000, true),
                req(req_type::IN, 0x21_0000, true),
            ],
            0,
        );
    }

    #[test]
    fn notifications_stay_off_while_requests_are_in_flight() {
        for event_idx in [true, false] {
            let (mut s, held) = setup_held(event_idx, 1_000_000_000);
            let rings = Rings::of(0, QSIZE);
            publish_two(&s);
            s.worker.process_queue();
            assert_eq!(s.worker.in_flight(), 2);
            assert!(s.worker.notifications_deferred(), "{event_idx}");
            // Added while those are in flight: no kick; they are taken when
            // a completion wakes the IOThread.
            assert!(!kicks(&s, event_idx, 6), "kick while deferred");
            assert!(!kicks(&s, event_idx, 9), "kick while deferred");
            held.release_one();
            on_completion(&mut s);
            assert_eq!(s.worker.queue.next_avail(), 4, "taken at the completion");
            assert_eq!(rings.used_idx(&s.mem), 1);
            assert!(s.worker.notifications_deferred());
            assert!(!kicks(&s, event_idx, 12), "kick while deferred");
            // Fewer than two in flight: re-enabled (the driver is likely
            // waiting for the last one), with the final check.
            held.release_all();
            on_completion(&mut s);
            assert_eq!(s.worker.queue.next_avail(), 5);
            assert_eq!(rings.used_idx(&s.mem), 4);
            assert_eq!(s.worker.in_flight(), 1);
            assert!(!s.worker.notifications_deferred());
            assert!(kicks(&s, event_idx, 0), "re-enabled");
            held.release_all();
            on_completion(&mut s);
            assert_eq!(rings.used_idx(&s.mem), 5);
            held.release_all();
            on_completion(&mut s);
            assert_eq!(rings.used_idx(&s.mem), 6);
            assert_eq!(s.worker.in_flight(), 0);
            assert!(!s.worker.needs_resume());
        }
    }

    #[test]
    fn leaving_poll_mode_with_requests_in_flight_defers() {
        for event_idx in [true, false] {
            let (mut s, held) = setup_held(event_idx, 1_000_000_000);
            s.worker.set_polling(true);
            publish_two(&s);
            s.worker.process_queue();
            s.worker.leave_poll_mode();
            assert!(s.worker.notifications_deferred());
            assert!(!kicks(&s, event_idx, 6), "kick after poll_end");
            // Entering poll mode again ends the deferral (the ring is
            // watched anyway); leaving with nothing in flight re-enables.
            s.worker.set_polling(true);
            assert!(!s.worker.notifications_deferred());
            s.worker.process_queue();
            held.release_all();
            on_completion(&mut s);
            assert_eq!(s.worker.in_flight(), 0);
            s.worker.leave_poll_mode();
            assert!(!s.worker.notifications_deferred());
            assert!(kicks(&s, event_idx, 9), "{event_idx}");
        }
    }

    #[test]
    fn a_deferral_ends_within_its_bound() {
        for event_idx in [true, false] {
            const BOUND_MS: u64 = 20;
            let (mut s, _held) = setup_held(event_idx, BOUND_MS * 1_000_000);
            let timer = s.worker.defer_timer_fd().unwrap().expect("a timer");
            // Requests that never complete (a hung device, say).
            publish_two(&s);
            let start = std::time::Instant::now();
            s.worker.process_queue();
            assert!(s.worker.notifications_deferred());
            assert!(!kicks(&s, event_idx, 6));
            // The timer fires after the bound.
            let fired = wait_readable(&timer);
            assert!(fired.duration_since(start) >= Duration::from_millis(BOUND_MS - 1));
            s.worker.expire_deferral();
            // The request added meanwhile is taken, and notifications are
            // back on: the next request kicks, and they stay on while the
            // first ones still hang.
            assert_eq!(s.worker.queue.next_avail(), 3);
            assert!(!s.worker.notifications_deferred());
            assert!(kicks(&s, event_idx, 9), "{event_idx}");
            s.worker.process_queue();
            assert!(!s.worker.notifications_deferred(), "deferred again");
            // A timer read again after it was consumed does not block.
            s.worker.expire_deferral();
        }
    }

    /// Waits up to 5 s for `fd` to become readable; returns when it did.
    fn wait_readable(fd: &OwnedFd) -> std::time::Instant {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1, "the timer fired");
        std::time::Instant::now()
    }

    #[test]
    fn a_look_at_the_ring_restarts_the_bound() {
        const BOUND: Duration = Duration::from_millis(40);
        let (mut s, held) = setup_held(true, BOUND.as_nanos() as u64);
        let timer = s.worker.defer_timer_fd().unwrap().expect("a timer");
        publish_two(&s);
        s.worker.process_queue();
        assert!(s.worker.notifications_deferred());
        // Half-way, a completion: the IOThread looks at the ring.
        std::thread::sleep(BOUND / 2);
        held.release_one();
        let look = std::time::Instant::now();
        on_completion(&mut s);
        assert!(s.worker.notifications_deferred(), "one is still in flight");
        // The timer fires at the first deadline, but the deferral saw the
        // ring since: it goes on, and ends one bound after that look.
        wait_readable(&timer);
        s.worker.expire_deferral();
        assert!(s.worker.notifications_deferred(), "ended early");
        let fired = wait_readable(&timer);
        assert!(fired.duration_since(look) >= BOUND - Duration::from_millis(1));
        s.worker.expire_deferral();
        assert!(!s.worker.notifications_deferred());
        assert!(publish_read(&s, 6), "re-enabled");
    }

    #[test]
    fn no_deferral_without_a_polling_budget_two_in_flight_or_a_completion_fd() {
        // poll-max-ns=0.
        let (mut s, _held) = setup_held(true, 0);
        publish_two(&s);
        s.worker.process_queue();
        assert_eq!(s.worker.in_flight(), 2);
        assert!(!s.worker.notifications_deferred());
        assert!(publish_read(&s, 6), "kicks with polling off");
        // One request in flight (synchronous I/O): nothing to gain.
        let (mut s, _held) = setup_held(true, 1_000_000_000);
        assert!(publish_read(&s, 0));
        s.worker.process_queue();
        assert_eq!(s.worker.in_flight(), 1);
        assert!(!s.worker.notifications_deferred());
        assert!(publish_read(&s, 3), "kicks with one in flight");
        // The synchronous engine: nothing stays in flight, nothing to wait for.
        let mut s = setup(true, false);
        s.worker.set_defer_ns(1_000_000_000);
        assert!(publish_read(&s, 0));
        s.worker.process_queue();
        assert!(!s.worker.notifications_deferred());
        assert!(publish_read(&s, 3));
    }
}

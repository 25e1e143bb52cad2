//! Per-queue request processing on an IOThread.
//!
//! A [`QueueWorker`] owns one virtqueue and its disk backend. Two aio-poll
//! handlers drive it on the queue's IOThread:
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
//!   driver asked for it.
//!
//! Guest notifications follow QEMU's `virtio_queue_set_notification`: see
//! `QueueWorker::suppress_notifications` (with EVENT_IDX, `avail_event` is
//! parked behind the avail index while the IOThread polls, so that the
//! driver does not kick a thread that is watching the ring anyway) and
//! `QueueWorker::enable_notifications` (`avail_event` = the avail index
//! seen now, full fence, final check).
//!
//! Both handlers share the worker through an `Arc<Mutex<_>>` that is only
//! ever contended while the device is being torn down.

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::os::fd::{BorrowedFd, OwnedFd};

use aio_poll::{AioContext, FdHandler, PollHandler, Readiness, SharedEventFd};
use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

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
    /// avail index `avail_event` was parked one behind, see
    /// `suppress_notifications`).
    parked: Option<u16>,
    /// Notifications were left disabled because the backend was full.
    stalled: bool,
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
    /// requests wait, or notifications were left off while the backend was full.
    pub fn needs_resume(&self) -> bool {
        !self.broken && (self.stalled || self.avail_pending())
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
    /// `avail_event` one behind the index seen now: every publication then
    /// starts at or after `avail_event + 1`, which `vring_need_event` never
    /// asks to kick for (until 2^16 publications later; each pass of
    /// `process_queue` in poll mode parks it again). Leaving poll mode
    /// re-enables notifications with the final check
    /// ([`Self::enable_notifications`]).
    fn suppress_notifications(&mut self) -> Result<(), virtio_queue::Error> {
        if !self.queue.event_idx_enabled() {
            if self.polling && self.parked.is_some() {
                return Ok(()); // set when polling began, kept since
            }
            self.store_le16(
                GuestAddress(self.queue.used_ring()),
                VRING_USED_F_NO_NOTIFY as u16,
            )?;
            if self.polling {
                self.parked = Some(0);
            }
            return Ok(());
        }
        if !self.polling {
            return Ok(());
        }
        let idx = self.queue.avail_idx(&*self.mem, Ordering::Relaxed)?;
        if self.parked == Some(idx.0) {
            return Ok(()); // already parked there: spare the store
        }
        self.store_le16(self.avail_event_addr()?, idx.0.wrapping_sub(1))?;
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
            self.suppress_notifications()
        } else {
            self.polling = false;
            self.enable_notifications().map(|_| ())
        };
        if let Err(e) = r {
            self.fail("notification suppression", &e);
        }
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
        w.set_max_batch(ctx.aio_max_batch());
        w.process_queue();
    }
}

impl PollHandler for QueueHandler {
    fn poll(&mut self) -> bool {
        lock(&self.worker).avail_pending()
    }

    fn poll_ready(&mut self, ctx: &mut AioContext) {
        let mut w = lock(&self.worker);
        w.set_max_batch(ctx.aio_max_batch());
        w.process_queue();
    }

    fn poll_begin(&mut self) {
        lock(&self.worker).set_polling(true);
    }

    fn poll_end(&mut self) {
        lock(&self.worker).set_polling(false);
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
        // Completions freed room: take requests that waited for it.
        if w.needs_resume() {
            w.set_max_batch(ctx.aio_max_batch());
            w.process_queue();
        }
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
        // Parked one behind what was seen, so never past 2^16 publications.
        assert_eq!(avail_event(&s.mem), avail_idx(&s.mem).wrapping_sub(1));
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
}

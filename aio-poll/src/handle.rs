// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! State shared between the loop and other threads, and the `Send + Sync`
//! [`ContextHandle`].

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bh::{BhEntry, OneshotFn};
use crate::context::AioContext;
use crate::error::Result;
use crate::notifier::Notifier;
use crate::params::PollParams;
use crate::stats::{PublishedCounters, Stats};

/// Locks a mutex, ignoring poisoning (a panicking callback must not make the
/// loop or its handles panic too; the protected data stay consistent because
/// every critical section here is a plain read or write).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// 0 until the thread first asks (a const initialiser: no lazy-init
    /// check or destructor registration on the loop's hot path).
    static THREAD_TOKEN: Cell<u64> = const { Cell::new(0) };
}

/// A non-zero id of the calling thread.
#[inline]
pub(crate) fn thread_token() -> u64 {
    THREAD_TOKEN.with(|t| {
        let v = t.get();
        if v != 0 {
            return v;
        }
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let v = NEXT.fetch_add(1, Ordering::Relaxed);
        t.set(v);
        v
    })
}

/// Everything other threads may touch.
pub(crate) struct Shared {
    pub(crate) notifier: Notifier,
    bh_queue: Mutex<Vec<BhEntry>>,
    bh_queued: AtomicUsize,
    /// Parameters as last set (validated, effective).
    pub(crate) params: Mutex<PollParams>,
    pub(crate) pending_params: Mutex<Option<PollParams>>,
    pub(crate) params_dirty: AtomicBool,
    pub(crate) max_batch: AtomicU64,
    /// Histogram, per-handler list and parameters of the last publish (the
    /// scalar fields in it are stale: `counters` holds them).
    pub(crate) stats: Mutex<Stats>,
    /// The scalar statistics, published before every sleep.
    pub(crate) counters: PublishedCounters,
    pub(crate) stop: AtomicBool,
    pub(crate) loop_thread: AtomicU64,
    pub(crate) closed: AtomicBool,
}

impl Shared {
    pub(crate) fn new(notifier: Notifier, params: PollParams) -> Shared {
        Shared {
            notifier,
            bh_queue: Mutex::new(Vec::new()),
            bh_queued: AtomicUsize::new(0),
            params: Mutex::new(params),
            pending_params: Mutex::new(None),
            params_dirty: AtomicBool::new(false),
            max_batch: AtomicU64::new(0),
            stats: Mutex::new(Stats::default()),
            counters: PublishedCounters::default(),
            stop: AtomicBool::new(false),
            loop_thread: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Queues a BH entry (the caller notifies). Dropped if the context is gone.
    pub(crate) fn push_bh(&self, e: BhEntry) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut q = lock(&self.bh_queue);
        q.push(e);
        self.bh_queued.store(q.len(), Ordering::Release);
    }

    /// Whether any BH entry is queued (one atomic load: the loop's fast path).
    #[inline]
    pub(crate) fn has_bhs(&self) -> bool {
        self.bh_queued.load(Ordering::Acquire) != 0
    }

    /// Moves every queued entry into `out` (which must be empty).
    pub(crate) fn take_bhs(&self, out: &mut Vec<BhEntry>) {
        if self.bh_queued.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut q = lock(&self.bh_queue);
        std::mem::swap(&mut *q, out);
        self.bh_queued.store(0, Ordering::Release);
    }

    /// `None` if no BH is pending, `Some(true)` if only idle BHs are,
    /// `Some(false)` if a normal BH is.
    #[inline]
    pub(crate) fn bh_pending(&self) -> Option<bool> {
        if self.bh_queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.bh_pending_slow()
    }

    fn bh_pending_slow(&self) -> Option<bool> {
        let q = lock(&self.bh_queue);
        let mut res = None;
        for e in q.iter() {
            match e.pending() {
                Some(false) => return Some(false),
                Some(true) => res = Some(true),
                None => {}
            }
        }
        res
    }

    /// Drops every queued BH (context teardown: breaks reference cycles).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let drained = std::mem::take(&mut *lock(&self.bh_queue));
        self.bh_queued.store(0, Ordering::Release);
        drop(drained);
    }

    pub(crate) fn set_params(&self, p: PollParams) -> Result<PollParams> {
        let p = p.validate()?;
        *lock(&self.params) = p;
        *lock(&self.pending_params) = Some(p);
        self.params_dirty.store(true, Ordering::Release);
        Ok(p)
    }
}

/// A cheap, cloneable, `Send + Sync` handle to wake and control an
/// [`AioContext`] from any thread.
#[derive(Clone)]
pub struct ContextHandle {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for ContextHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextHandle")
            .field("notify_syscalls", &self.notify_syscalls())
            .finish()
    }
}

impl ContextHandle {
    /// Wakes the loop (the notify_me protocol): sets `notified`; writes the
    /// eventfd only if the loop may be sleeping. A busy or polling loop is
    /// woken with no syscall.
    pub fn notify(&self) {
        self.shared.notifier.notify();
    }

    /// Runs `f` once in the loop thread (QEMU `aio_bh_schedule_oneshot`) and
    /// wakes the loop. Dropped without running if the context is dropped.
    pub fn schedule_oneshot(&self, f: impl FnOnce(&mut AioContext) + Send + 'static) {
        let f: OneshotFn = Box::new(f);
        self.shared.push_bh(BhEntry::Oneshot(f));
        self.notify();
    }

    /// Validates `p` now; the loop applies it before its next iteration:
    /// every handler `ns` and `poll_ns` are reset to 0. Wakes the loop.
    pub fn set_poll_params(&self, p: PollParams) -> Result<()> {
        self.shared.set_params(p)?;
        self.notify();
        Ok(())
    }

    /// The effective parameters as last set.
    pub fn poll_params(&self) -> PollParams {
        *lock(&self.shared.params)
    }

    /// Sets the AIO batch limit (QEMU `aio-max-batch`; 0 = backend default).
    /// Stored for backends to read with [`aio_max_batch`](Self::aio_max_batch).
    pub fn set_aio_max_batch(&self, n: u64) {
        self.shared.max_batch.store(n, Ordering::Relaxed);
        self.notify();
    }

    /// The AIO batch limit.
    pub fn aio_max_batch(&self) -> u64 {
        self.shared.max_batch.load(Ordering::Relaxed)
    }

    /// The statistics snapshot published by the loop: current whenever the
    /// loop sleeps (it publishes right before blocking and after applying new
    /// parameters); while it is busy, at most
    /// [`STATS_PUBLISH_INTERVAL`](crate::STATS_PUBLISH_INTERVAL) iterations old.
    pub fn stats(&self) -> Stats {
        self.shared
            .counters
            .read(|| lock(&self.shared.stats).clone())
    }

    /// Makes [`AioContext::run`] return after the current iteration (or at
    /// once if it is not running: the request is kept until `run` sees it).
    pub fn request_stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.notify();
    }

    /// True when called on the thread currently inside `poll()`/`run()` of
    /// this context.
    pub fn is_loop_thread(&self) -> bool {
        self.shared.loop_thread.load(Ordering::Acquire) == thread_token()
    }

    /// Eventfd writes performed by `notify()` (diagnostic counter).
    pub fn notify_syscalls(&self) -> u64 {
        self.shared.notifier.syscalls()
    }
}

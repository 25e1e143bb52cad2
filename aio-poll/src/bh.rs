// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bottom halves: one-shot closures and reusable [`Bh`] objects schedulable
//! from any thread (QEMU's `QEMUBH`).

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::context::AioContext;
use crate::handle::Shared;

pub(crate) const SCHEDULED: u8 = 1;
pub(crate) const IDLE: u8 = 2;
pub(crate) const DELETED: u8 = 4;

pub(crate) type OneshotFn = Box<dyn FnOnce(&mut AioContext) + Send>;
pub(crate) type BhFn = Box<dyn FnMut(&mut AioContext) + Send>;

/// An entry of the scheduled-BH queue.
pub(crate) enum BhEntry {
    Oneshot(OneshotFn),
    Reusable(Arc<BhInner>),
}

impl BhEntry {
    /// Whether this entry should still run, and if so whether it is idle.
    pub(crate) fn pending(&self) -> Option<bool> {
        match self {
            BhEntry::Oneshot(_) => Some(false),
            BhEntry::Reusable(inner) => {
                let f = inner.flags.load(Ordering::Acquire);
                if f & SCHEDULED != 0 && f & DELETED == 0 {
                    Some(f & IDLE != 0)
                } else {
                    None
                }
            }
        }
    }
}

pub(crate) struct BhInner {
    pub(crate) flags: AtomicU8,
    pub(crate) cb: Mutex<BhFn>,
}

struct BhOwner {
    inner: Arc<BhInner>,
    shared: Weak<Shared>,
}

impl Drop for BhOwner {
    fn drop(&mut self) {
        self.inner.flags.fetch_or(DELETED, Ordering::AcqRel);
    }
}

/// A reusable bottom half. `Send + Sync + Clone`; dropping every clone deletes
/// it (a pending run is then skipped).
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
/// let mut ctx = aio_poll::AioContext::new().unwrap();
/// let runs = Arc::new(AtomicU32::new(0));
/// let r = runs.clone();
/// let bh = ctx.new_bh(move |_ctx| { r.fetch_add(1, Ordering::SeqCst); });
/// bh.schedule();
/// bh.schedule(); // still one pending run
/// assert!(ctx.poll(false).unwrap());
/// assert_eq!(runs.load(Ordering::SeqCst), 1);
/// ```
#[derive(Clone)]
pub struct Bh {
    owner: Arc<BhOwner>,
}

impl fmt::Debug for Bh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bh")
            .field("flags", &self.owner.inner.flags.load(Ordering::Relaxed))
            .finish()
    }
}

impl Bh {
    pub(crate) fn new(shared: &Arc<Shared>, cb: BhFn) -> Bh {
        Bh {
            owner: Arc::new(BhOwner {
                inner: Arc::new(BhInner {
                    flags: AtomicU8::new(0),
                    cb: Mutex::new(cb),
                }),
                shared: Arc::downgrade(shared),
            }),
        }
    }

    fn enqueue(&self, idle: bool) {
        let inner = &self.owner.inner;
        let mut old = 0;
        let _ = inner
            .flags
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                old = f;
                // A normal schedule wins over an idle one.
                let keep_idle = idle && (f & SCHEDULED == 0 || f & IDLE != 0);
                let mut n = (f | SCHEDULED) & !IDLE;
                if keep_idle {
                    n |= IDLE;
                }
                Some(n)
            });
        let Some(shared) = self.owner.shared.upgrade() else {
            return;
        };
        if old & SCHEDULED == 0 {
            shared.push_bh(BhEntry::Reusable(inner.clone()));
        }
        shared.notifier.notify();
    }

    /// Runs the BH once in the loop thread, as soon as possible. Scheduling an
    /// already scheduled BH does nothing more.
    pub fn schedule(&self) {
        self.enqueue(false);
    }

    /// Like [`schedule`](Self::schedule) but idle: the loop does not wake for
    /// it at once; it runs within about 10 ms (or with other work), and does
    /// not count as progress.
    pub fn schedule_idle(&self) {
        self.enqueue(true);
    }

    /// Cancels a pending run (no effect if not scheduled).
    pub fn cancel(&self) {
        self.owner
            .inner
            .flags
            .fetch_and(!(SCHEDULED | IDLE), Ordering::AcqRel);
    }

    /// Whether a run is pending.
    pub fn is_scheduled(&self) -> bool {
        self.owner.inner.flags.load(Ordering::Acquire) & SCHEDULED != 0
    }
}

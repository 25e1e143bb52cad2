// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`HolderGuard`]: a registered use of an IOThread's context.

use std::fmt;
use std::sync::Arc;

use aio_poll::AioContext;

use crate::error::{Error, Result};
use crate::holder::IoThreadHolder;
use crate::iothread::Remote;
use crate::registry::WeakInner;

/// Returned by [`IoThreadRegistry::acquire`](crate::IoThreadRegistry::acquire): the
/// holder registration plus the only way to run work on the IOThread's event loop
/// ([`submit`](Self::submit), [`call`](Self::call)), released when the guard is
/// dropped (or explicitly with [`release`](Self::release)). The guard does not hand
/// out the loop's `ContextHandle`, so no use of the context outlives the
/// registration.
///
/// The guard does not keep the registry alive: once the last registry clone is
/// dropped the IOThread stops, work submitted through the guard is no longer run and
/// [`call`](Self::call) returns [`Error::ThreadGone`].
pub struct HolderGuard {
    registry: WeakInner,
    remote: Arc<Remote>,
    holder: IoThreadHolder,
    released: bool,
}

impl HolderGuard {
    pub(crate) fn new(registry: WeakInner, remote: Arc<Remote>, holder: IoThreadHolder) -> Self {
        HolderGuard {
            registry,
            remote,
            holder,
            released: false,
        }
    }

    /// Id of the held IOThread.
    pub fn iothread_id(&self) -> &str {
        self.remote.id()
    }

    /// The registered holder.
    pub fn holder(&self) -> &IoThreadHolder {
        &self.holder
    }

    pub(crate) fn serial(&self) -> u64 {
        self.remote.serial()
    }

    /// Marks the registration as already gone (moved by a re-mapping), so that
    /// dropping the guard releases nothing.
    pub(crate) fn forget(mut self) {
        self.released = true;
    }

    /// `aio-max-batch` in use by the IOThread (0 = engine default).
    pub fn aio_max_batch(&self) -> u64 {
        self.remote.handle().aio_max_batch()
    }

    /// Wakes the IOThread's loop (e.g. after making a poll-only handler ready).
    pub fn notify(&self) {
        self.remote.handle().notify();
    }

    /// Runs `f` inside the IOThread's loop without waiting. Dropped silently when the
    /// loop no longer runs (use [`call`](Self::call) to learn about that).
    pub fn submit(&self, f: impl FnOnce(&mut AioContext) + Send + 'static) {
        // Err only means the loop is gone, which this convenience API ignores by
        // contract.
        let _ = self.remote.submit(f);
    }

    /// Runs `f` inside the IOThread's loop and waits for its result.
    ///
    /// Returns [`Error::WouldDeadlock`] when called on that IOThread, and
    /// [`Error::ThreadGone`] (never hangs) when the loop stopped or panicked before
    /// running `f`.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut AioContext) -> R + Send + 'static,
    ) -> Result<R> {
        self.remote.call(f)
    }

    /// Releases the registration now. Errors with [`Error::ThreadGone`] when the
    /// registry no longer exists.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.do_release()
    }

    fn do_release(&self) -> Result<()> {
        let inner = self.registry.upgrade().ok_or_else(|| Error::ThreadGone {
            id: self.remote.id().to_owned(),
        })?;
        inner.release(self)
    }
}

impl Drop for HolderGuard {
    fn drop(&mut self) {
        if !self.released {
            // Nothing to report to in Drop: a registry that is gone has no holder
            // list left, and the guard's own registration cannot be missing otherwise.
            let _ = self.do_release();
        }
    }
}

impl fmt::Debug for HolderGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HolderGuard")
            .field("iothread", &self.remote.id())
            .field("holder", &self.holder)
            .finish()
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`VqAssignment`]: an applied `iothread-vq-mapping` with its holder registrations.

use std::fmt;

use crate::error::{Error, Result};
use crate::holder::IoThreadHolder;
use crate::mapping::IoThreadVqMapping;
use crate::registry::WeakInner;
use crate::remote::HolderGuard;

/// Result of
/// [`IoThreadRegistry::acquire_vq_mapping`](crate::IoThreadRegistry::acquire_vq_mapping):
/// one [`HolderGuard`] per mapped IOThread (in mapping order) and, per queue, which
/// of them serves it. Dropping it releases every registration;
/// [`remap`](Self::remap) moves them to another mapping in one step.
pub struct VqAssignment {
    registry: WeakInner,
    holder: IoThreadHolder,
    mapping: Vec<IoThreadVqMapping>,
    num_queues: u16,
    guards: Vec<HolderGuard>,
    /// queue index -> index into `guards`.
    queue_guard: Vec<usize>,
}

impl VqAssignment {
    pub(crate) fn new(
        registry: WeakInner,
        holder: IoThreadHolder,
        mapping: Vec<IoThreadVqMapping>,
        num_queues: u16,
        guards: Vec<HolderGuard>,
        queue_guard: Vec<usize>,
    ) -> Self {
        VqAssignment {
            registry,
            holder,
            mapping,
            num_queues,
            guards,
            queue_guard,
        }
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queue_guard.len()
    }

    /// The registered holder.
    pub fn holder(&self) -> &IoThreadHolder {
        &self.holder
    }

    /// The mapping this assignment applies.
    pub fn mapping(&self) -> &[IoThreadVqMapping] {
        &self.mapping
    }

    /// The guard (IOThread id, work submission) serving `queue`, if it exists.
    pub fn guard_for_queue(&self, queue: u16) -> Option<&HolderGuard> {
        let index = *self.queue_guard.get(usize::from(queue))?;
        self.guards.get(index)
    }

    /// Id of the IOThread serving `queue`, if it exists.
    pub fn iothread_for_queue(&self, queue: u16) -> Option<&str> {
        self.guard_for_queue(queue).map(HolderGuard::iothread_id)
    }

    /// One guard per mapped IOThread, in mapping order.
    pub fn guards(&self) -> &[HolderGuard] {
        &self.guards
    }

    /// Moves the holder to the IOThreads of `mapping` (same number of queues),
    /// validated like [`acquire_vq_mapping`](crate::IoThreadRegistry::acquire_vq_mapping)
    /// (the six `iothread-vq-mapping` rules against the IOThreads that exist now).
    ///
    /// Atomic: in one critical section of the registry the holder leaves every old
    /// IOThread and joins every new one, so a concurrent
    /// [`all_holders`](crate::IoThreadRegistry::all_holders) or `query-iothreads`
    /// sees it on the old set or on the new set, never on neither or both. On error
    /// nothing changes. Work that runs on the old IOThreads must be stopped first:
    /// after the call the old guards are gone.
    ///
    /// ```
    /// use iothread_registry::{IoThreadHolder, IoThreadParams, IoThreadRegistry, IoThreadVqMapping};
    ///
    /// let r = IoThreadRegistry::new();
    /// for id in ["io0", "io1", "io2"] {
    ///     r.create(id, IoThreadParams::default())?;
    /// }
    /// let dev = IoThreadHolder::qom_object("/machine/peripheral/d0/virtio-backend");
    /// let mut a = r.acquire_vq_mapping(&[IoThreadVqMapping::new("io0")], 2, dev.clone())?;
    /// a.remap(&[IoThreadVqMapping::new("io1"), IoThreadVqMapping::new("io2")])?;
    /// assert_eq!(a.iothread_for_queue(1), Some("io2"));
    /// assert!(r.holders("io0")?.is_empty());
    /// assert_eq!(r.holders("io1")?, [dev.clone()]);
    /// // Validation failure: the old mapping stays.
    /// assert!(a.remap(&[IoThreadVqMapping::new("io9")]).is_err());
    /// assert_eq!(r.holders("io2")?, [dev]);
    /// # Ok::<(), iothread_registry::Error>(())
    /// ```
    pub fn remap(&mut self, mapping: &[IoThreadVqMapping]) -> Result<()> {
        let registry = self.registry.upgrade().ok_or_else(|| Error::ThreadGone {
            id: self
                .guards
                .first()
                .map(|g| g.iothread_id().to_owned())
                .unwrap_or_default(),
        })?;
        let (guards, queue_guard) =
            registry.remap(&self.guards, &self.holder, mapping, self.num_queues)?;
        for old in std::mem::replace(&mut self.guards, guards) {
            old.forget();
        }
        self.queue_guard = queue_guard;
        self.mapping = mapping.to_vec();
        Ok(())
    }

    /// Releases every registration now, reporting the first error (all are tried).
    pub fn release(self) -> Result<()> {
        let mut first_err = None;
        for guard in self.guards {
            if let Err(e) = guard.release() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl fmt::Debug for VqAssignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_queue: Vec<&str> = (0..self.queue_guard.len())
            .filter_map(|q| u16::try_from(q).ok())
            .filter_map(|q| self.iothread_for_queue(q))
            .collect();
        f.debug_struct("VqAssignment")
            .field("holder", &self.holder)
            .field("per_queue", &per_queue)
            .finish()
    }
}

//! [`VqAssignment`]: an applied `iothread-vq-mapping` with its holder registrations.

use std::fmt;

use crate::remote::HolderGuard;

/// Result of
/// [`IoThreadRegistry::acquire_vq_mapping`](crate::IoThreadRegistry::acquire_vq_mapping):
/// one [`HolderGuard`] per mapped IOThread (in mapping order) and, per queue, which
/// of them serves it. Dropping it releases every registration.
pub struct VqAssignment {
    guards: Vec<HolderGuard>,
    /// queue index -> index into `guards`.
    queue_guard: Vec<usize>,
}

impl VqAssignment {
    pub(crate) fn new(guards: Vec<HolderGuard>, queue_guard: Vec<usize>) -> Self {
        VqAssignment {
            guards,
            queue_guard,
        }
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queue_guard.len()
    }

    /// The guard (context handle, IOThread id) serving `queue`, if it exists.
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

    /// Releases every registration now, reporting the first error (all are tried).
    pub fn release(self) -> crate::Result<()> {
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
            .field("per_queue", &per_queue)
            .finish()
    }
}

//! virtio-blk device model (virtio 1.2 §5.2) with multiple queues, each
//! served by the IOThread its `iothread-vq-mapping` names.
//!
//! - [`request`]: pure parsing/validation of descriptor chains and the
//!   status byte of every failure;
//! - [`backend`]: the submission/completion interface of disk engines,
//!   [`raw`] the image file (buffered or `O_DIRECT`),
//!   [`sync_engine`] and [`uring`] the two engines, [`mem_disk`] an
//!   in-memory backend for fuzzing;
//! - [`handler`]: per-queue processing and the aio-poll handlers;
//! - this module: the [`Block`] device (features, configuration space,
//!   activation on IOThreads, reset, shutdown, live re-mapping) and its
//!   [`BlockHandle`].
//!
//! Holders follow attachment: [`Block::new`] registers
//! [`BlockConfig::holder`] (`qom-object /machine/peripheral/<id>/virtio-backend`
//! for a guest drive, `block-node <node-name>` for a block export) on every
//! IOThread its mapping lists, and keeps them until the device is shut down
//! or dropped (detached), whatever the driver does: queue handlers come and
//! go with activation and reset, holders do not. Every use of an IOThread
//! (handler registration and removal) goes through those holder guards.
//! [`BlockHandle::set_iothreads`] moves a running drive to other IOThreads.

pub mod backend;
pub mod handler;
pub mod lock;
pub mod mapped;
pub mod mem_disk;
pub mod raw;
pub mod request;
pub mod sync_engine;
pub mod uring;

#[cfg(test)]
pub(crate) mod testing;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aio_poll::{HandlerId, Interest};
use iothread_registry::{
    HolderGuard, IoThreadHolder, IoThreadRegistry, IoThreadVqMapping, VqAssignment,
};
use virtio_bindings::virtio_blk::*;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use self::backend::{create_backend, resolve_engine, BackendError, BlockEngine, EngineKind};
use self::handler::{
    CompletionHandler, DeferTimerHandler, QueueCounters, QueueHandler, QueueWorker,
};
use self::raw::RawFile;
use self::request::{DiskLimits, SECTOR_SHIFT, VIRTIO_BLK_ID_BYTES};
use crate::virtio::device::{
    feature, read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt,
    TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::mmio::error_chain;

/// Largest number of queues a drive may have.
pub const MAX_QUEUES: u16 = 64;
/// `size_max` offered: largest data segment in bytes.
pub const SIZE_MAX: u32 = 1 << 20;
/// `max_discard_sectors` / `max_write_zeroes_sectors` offered (QEMU's
/// `BDRV_REQUEST_MAX_SECTORS`).
pub const MAX_DWZ_SECTORS: u32 = (i32::MAX as u32 & !511) >> SECTOR_SHIFT;
/// Size of the configuration space exposed (through `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_SPACE_SIZE: usize = 60;

/// Configuration of one drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Drive id (QOM path `/machine/peripheral/<id>`).
    pub id: String,
    /// Raw image path.
    pub path: PathBuf,
    /// Number of virtqueues (1..=64).
    pub num_queues: u16,
    /// Maximum size of each virtqueue (power of two, 2..=32768).
    pub queue_size: u16,
    /// Read-only drive.
    pub readonly: bool,
    /// Open with `O_DIRECT`.
    pub direct: bool,
    /// The IOThreads serving the queues, as QEMU's `iothread-vq-mapping` (a
    /// single `iothread=` is a one-entry mapping). Every IOThread listed is
    /// held, even one that round-robin leaves without a queue.
    pub iothreads: Vec<IoThreadVqMapping>,
    /// I/O engine.
    pub engine: BlockEngine,
    /// `GET_ID` string (at most 20 bytes used); the drive id when `None`.
    pub serial: Option<String>,
    /// Who the device is in `query-iothreads` while attached (see the module
    /// documentation): [`Block::device_holder`] for a guest drive.
    pub holder: IoThreadHolder,
    /// What the device serves, for messages ("drive 'd0'", "export 'e0'").
    pub role: BlockRole,
}

/// What a device model serves: a guest drive (`--drive`, `device_add`) or
/// a block export (`--export`, `block-export-add`), whose device model has
/// the export's id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlockRole {
    /// A guest drive.
    #[default]
    Drive,
    /// A block export.
    Export,
}

/// How errors and logs name a device model: `drive 'd0'` or `export 'e0'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceName {
    role: BlockRole,
    id: String,
}

impl DeviceName {
    /// The device `id` serving as `role`.
    pub fn new(role: BlockRole, id: impl Into<String>) -> DeviceName {
        DeviceName {
            role,
            id: id.into(),
        }
    }

    /// The drive or export id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the device serves.
    pub fn role(&self) -> BlockRole {
        self.role
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.role {
            BlockRole::Drive => "drive",
            BlockRole::Export => "export",
        };
        write!(f, "{what} '{}'", self.id)
    }
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// `num-queues` out of range.
    #[error("{device}: num-queues {value} must be between 1 and {MAX_QUEUES}")]
    NumQueues {
        /// The device.
        device: DeviceName,
        /// Value.
        value: u16,
    },
    /// `queue-size` not a power of two in 4..=32768 (a request takes 3
    /// descriptors; QEMU: "must be > 2").
    #[error("{device}: queue-size {value} must be a power of two between 4 and 32768")]
    QueueSize {
        /// The device.
        device: DeviceName,
        /// Value.
        value: u16,
    },
    /// The IOThreads of the mapping cannot be held (the mapping is invalid, or
    /// an IOThread does not exist).
    #[error("{device}: invalid IOThread mapping")]
    IoThreads {
        /// The device.
        device: DeviceName,
        /// Cause, with QEMU's `iothread-vq-mapping` message.
        #[source]
        source: iothread_registry::Error,
    },
    /// The device was shut down (detached): it holds no IOThreads any more.
    #[error("{device} is detached")]
    Detached {
        /// The device.
        device: DeviceName,
    },
    /// A queue notification eventfd could not be duplicated.
    #[error("{device}: cannot duplicate the notification eventfd of queue {queue}")]
    Kick {
        /// The device.
        device: DeviceName,
        /// Queue.
        queue: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image cannot be opened.
    #[error("{device}: cannot open '{}'", path.display())]
    Open {
        /// The device.
        device: DeviceName,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image is smaller than one sector.
    #[error("{device}: image '{}' is smaller than 512 bytes", path.display())]
    TooSmall {
        /// The device.
        device: DeviceName,
        /// Path.
        path: PathBuf,
    },
    /// The requested engine is unavailable.
    #[error("{device}: engine")]
    Engine {
        /// The device.
        device: DeviceName,
        /// Cause.
        #[source]
        source: BackendError,
    },
    /// Using an IOThread failed (it stopped or panicked).
    #[error("{device}: IOThread '{iothread}'")]
    IoThread {
        /// The device.
        device: DeviceName,
        /// IOThread id.
        iothread: String,
        /// Cause.
        #[source]
        source: iothread_registry::Error,
    },
    /// The backend's completion eventfd could not be duplicated for the IOThread.
    #[error("{device}: cannot duplicate the completion eventfd of queue {queue}")]
    CompletionFd {
        /// The device.
        device: DeviceName,
        /// Queue.
        queue: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Registering a queue handler on its IOThread failed.
    #[error("{device}: cannot register queue {queue} on IOThread '{iothread}'")]
    Handler {
        /// The device.
        device: DeviceName,
        /// Queue.
        queue: u16,
        /// IOThread id.
        iothread: String,
        /// Cause.
        #[source]
        source: aio_poll::Error,
    },
}

/// Counters of one queue, as reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueueInfo {
    /// Queue index.
    pub index: u16,
    /// IOThread serving it.
    pub iothread: String,
    /// Requests taken from the avail ring.
    pub requests: u64,
    /// Guest notifications (ioeventfd wake-ups).
    pub notifications: u64,
    /// Interrupts sent.
    pub interrupts: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// Drive status for QMP `query-block`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInfo {
    /// Drive id.
    pub id: String,
    /// Image path.
    pub file: String,
    /// Read-only.
    pub read_only: bool,
    /// `O_DIRECT`.
    pub direct: bool,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Number of queues.
    pub num_queues: u16,
    /// Engine in use.
    pub engine: EngineKind,
    /// Whether the driver activated the device.
    pub activated: bool,
    /// Per-queue IOThread and counters.
    pub queues: Vec<QueueInfo>,
}

struct Shared {
    /// The id with its role (messages say "drive 'd0'").
    name: DeviceName,
    file: Arc<RawFile>,
    capacity: u64,
    num_queues: u16,
    engine: EngineKind,
    registry: IoThreadRegistry,
    /// IOThread id per queue (follows re-mapping).
    queue_iothreads: Mutex<Vec<String>>,
    counters: Vec<Arc<QueueCounters>>,
    activated: AtomicBool,
    /// io_uring could not be set up for a queue and the sync engine runs it.
    uring_fallback: AtomicBool,
    /// Held IOThreads and running queues. Lock order: the transport's lock (when
    /// the transport calls in), then this one; handlers on IOThreads never take it.
    attachment: Mutex<Attachment>,
}

/// What the device holds and runs.
struct Attachment {
    /// The held IOThreads; `None` once detached (shut down).
    iothreads: Option<VqAssignment>,
    /// The queues being served, while the driver has the device activated.
    active: Option<Active>,
    /// The VM is stopped ([`BlockHandle::pause`]): the queues are quiesced
    /// (no handler on any IOThread) until [`BlockHandle::resume`].
    paused: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A cloneable handle on a block device for the control plane: status for
/// `query-block`, flush for a clean shutdown, and live re-mapping.
#[derive(Clone)]
pub struct BlockHandle {
    shared: Arc<Shared>,
}

impl BlockHandle {
    /// Current status.
    pub fn info(&self) -> BlockInfo {
        let s = &self.shared;
        let iothreads = lock(&s.queue_iothreads).clone();
        BlockInfo {
            id: s.name.id().to_owned(),
            file: s.file.path().display().to_string(),
            read_only: s.file.read_only(),
            direct: s.file.is_direct(),
            capacity: s.capacity,
            num_queues: s.num_queues,
            engine: if s.uring_fallback.load(Ordering::SeqCst) {
                EngineKind::Sync
            } else {
                s.engine
            },
            activated: s.activated.load(Ordering::SeqCst),
            queues: s
                .counters
                .iter()
                .zip(iothreads)
                .enumerate()
                .map(|(i, (c, io))| QueueInfo {
                    index: i as u16,
                    iothread: io,
                    requests: c.requests.load(Ordering::Relaxed),
                    notifications: c.notifications.load(Ordering::Relaxed),
                    interrupts: c.interrupts.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// `fdatasync` on the image (safe while the queues run).
    pub fn flush(&self) -> io::Result<()> {
        if self.shared.file.read_only() {
            return Ok(());
        }
        self.shared.file.fdatasync()
    }

    /// QMP `stop`, as QEMU's `vm_stop` does for its block devices (drain all,
    /// then flush all): every running queue quiesces (its handlers leave its
    /// IOThread, so requests the driver queues are left in the ring; its
    /// in-flight requests complete), then the image is flushed. When this
    /// returns, the image holds every write the guest was told is complete and
    /// none changes it until [`BlockHandle::resume`]. Idempotent.
    pub fn pause(&self) -> io::Result<()> {
        let s = &*self.shared;
        let mut att = lock(&s.attachment);
        if att.paused {
            return Ok(());
        }
        att.paused = true;
        let Attachment {
            iothreads, active, ..
        } = &mut *att;
        if let (Some(assignment), Some(active)) = (iothreads.as_ref(), active.as_mut()) {
            active.quiesce(&s.name, assignment);
        }
        drop(att);
        self.flush()
    }

    /// QMP `cont`: the queues quiesced by [`BlockHandle::pause`] go back on
    /// their IOThreads and first take what the driver queued meanwhile (a
    /// reset while stopped left none: the driver activates the device again).
    /// If a queue cannot be registered again the device is marked as needing
    /// a reset (the guest sees `DEVICE_NEEDS_RESET`) and the error returned.
    pub fn resume(&self) -> Result<(), BlockError> {
        let s = &*self.shared;
        let mut att = lock(&s.attachment);
        if !att.paused {
            return Ok(());
        }
        att.paused = false;
        let Attachment {
            iothreads, active, ..
        } = &mut *att;
        let (Some(assignment), Some(active)) = (iothreads.as_ref(), active.as_mut()) else {
            return Ok(());
        };
        active.resume(&s.name, assignment).inspect_err(|_| {
            active.interrupt.set_needs_reset();
        })
    }

    /// Moves the drive's queues to the IOThreads of `mapping` while it runs
    /// (`x-drive-set-iothreads`).
    ///
    /// `mapping` is validated like at start-up (QEMU's six `iothread-vq-mapping`
    /// rules against the IOThreads that exist now) before anything stops. Then
    /// every running queue quiesces: its handlers leave its IOThread (so it takes
    /// no new request there) and its in-flight requests complete; the holder
    /// moves from the old IOThreads to the new ones in one step (a concurrent
    /// `query-iothreads` sees the drive on the old set or on the new set, never
    /// on neither or both); the queues resume on their new IOThreads and first
    /// take what the driver queued meanwhile. Not activated, or after a reset,
    /// only the holders move. On error the old mapping stays in place and the
    /// queues resume there.
    pub fn set_iothreads(&self, mapping: &[IoThreadVqMapping]) -> Result<(), BlockError> {
        let s = &*self.shared;
        let mapping_err = |source| BlockError::IoThreads {
            device: s.name.clone(),
            source,
        };
        let mut att = lock(&s.attachment);
        let Attachment {
            iothreads,
            active,
            paused,
        } = &mut *att;
        // While the VM is stopped the queues are quiesced already and stay
        // so: only the holders move (the queues resume there at `cont`).
        let mut active = if *paused { None } else { active.as_mut() };
        let assignment = iothreads.as_mut().ok_or_else(|| BlockError::Detached {
            device: s.name.clone(),
        })?;
        // Refuse a bad mapping before disturbing the queues (the move re-checks it
        // atomically, in case an IOThread disappears in between).
        iothread_registry::assign_vqs(mapping, s.num_queues, |id| s.registry.contains(id))
            .map_err(mapping_err)?;
        let old_mapping = assignment.mapping().to_vec();
        if let Some(active) = &mut active {
            active.quiesce(&s.name, assignment);
        }
        let moved = assignment.remap(mapping).map_err(mapping_err);
        let mut result = moved;
        if let Some(active) = &mut active {
            if let Err(e) = active.resume(&s.name, assignment) {
                // Could not start on the new IOThreads: go back to the old ones.
                log::error!("{}: {}", s.name, error_chain(&e));
                active.quiesce(&s.name, assignment);
                let back = assignment.remap(&old_mapping).map_err(mapping_err);
                if let Err(e2) = back.and_then(|()| active.resume(&s.name, assignment)) {
                    log::error!(
                        "{}: cannot resume on the old IOThreads: {}",
                        s.name,
                        error_chain(&e2)
                    );
                    active.interrupt.set_needs_reset();
                }
                result = Err(e);
            }
        }
        *lock(&s.queue_iothreads) = per_queue(assignment, s.num_queues);
        result
    }
}

/// The IOThread id of every queue.
fn per_queue(assignment: &VqAssignment, num_queues: u16) -> Vec<String> {
    (0..num_queues)
        .map(|q| {
            assignment
                .iothread_for_queue(q)
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// The guard of the IOThread serving `queue`.
fn guard_for<'a>(
    name: &DeviceName,
    assignment: &'a VqAssignment,
    queue: u16,
) -> Result<&'a HolderGuard, BlockError> {
    assignment
        .guard_for_queue(queue)
        .ok_or_else(|| BlockError::Detached {
            device: name.clone(),
        })
}

struct ActiveQueue {
    index: u16,
    /// Handlers registered on the queue's IOThread (empty while quiesced).
    handlers: Vec<HandlerId>,
    worker: Arc<Mutex<QueueWorker>>,
    /// A duplicate of the queue's notification eventfd, to register it again
    /// (the registered handler owns and closes its own).
    kick: EventFd,
    counters: Arc<QueueCounters>,
}

struct Active {
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl ActiveQueue {
    /// Registers the queue's handlers on `guard`'s IOThread; with `resume`, the
    /// queue is processed once there right away (requests the driver added while
    /// no handler ran, possibly without a notification).
    fn register(
        &mut self,
        name: &DeviceName,
        guard: &HolderGuard,
        resume: bool,
    ) -> Result<(), BlockError> {
        let kick = self.kick.try_clone().map_err(|source| BlockError::Kick {
            device: name.clone(),
            queue: self.index,
            source,
        })?;
        let qh = QueueHandler::new(self.worker.clone(), kick, self.counters.clone());
        let completion_fd =
            lock(&self.worker)
                .completion_fd()
                .map_err(|source| BlockError::CompletionFd {
                    device: name.clone(),
                    queue: self.index,
                    source,
                })?;
        let ch = completion_fd.map(|fd| (fd, CompletionHandler::new(self.worker.clone())));
        // The deferral timer only matters with completions to wake the loop.
        let timer = match &ch {
            Some(_) => {
                let mut w = lock(&self.worker);
                match w.defer_timer_fd() {
                    Ok(fd) => fd.map(|fd| (fd, DeferTimerHandler::new(self.worker.clone()))),
                    Err(e) => {
                        log::debug!("{name} queue {}: no deferral timer: {e}", self.index);
                        w.disable_deferral();
                        None
                    }
                }
            }
            None => None,
        };
        let worker = self.worker.clone();
        // The worker's address: unique to the queue while its handlers exist.
        let group = Arc::as_ptr(&self.worker) as usize as u64;
        let registered = guard
            .call(move |aio| -> Result<Vec<HandlerId>, aio_poll::Error> {
                let ids = add_queue_handlers(aio, qh, ch, timer, group)?;
                if resume {
                    let mut w = lock(&worker);
                    w.follow_params(aio);
                    w.process_queue();
                }
                Ok(ids)
            })
            .map_err(|source| BlockError::IoThread {
                device: name.clone(),
                iothread: guard.iothread_id().to_owned(),
                source,
            })?;
        self.handlers = registered.map_err(|source| BlockError::Handler {
            device: name.clone(),
            queue: self.index,
            iothread: guard.iothread_id().to_owned(),
            source,
        })?;
        Ok(())
    }

    /// Removes the queue's handlers from `guard`'s IOThread (after this returns
    /// none of them runs), leaves poll mode and completes the in-flight requests.
    fn quiesce(&mut self, name: &DeviceName, guard: Option<&HolderGuard>) {
        let ids = std::mem::take(&mut self.handlers);
        if !ids.is_empty() {
            let removed = match guard {
                Some(g) => g.call(move |aio| {
                    for id in ids {
                        if let Err(e) = aio.remove_handler(id) {
                            log::error!("removing virtio-blk handler: {e}");
                        }
                    }
                }),
                None => Ok(()),
            };
            if let Err(e) = removed {
                log::error!(
                    "{name} queue {}: cannot remove handlers: {}",
                    self.index,
                    error_chain(&e)
                );
            }
        }
        let mut w = lock(&self.worker);
        // Removal does not call poll_end: restore notifications ourselves.
        w.set_polling(false);
        let drained = w.drain();
        if drained > 0 {
            log::debug!("{name} queue {}: drained {drained} requests", self.index);
        }
    }
}

/// Adds a queue's handlers to `aio` (completion handler first); nothing stays
/// registered on error.
/// Registers a queue's handlers: its notification handler and, with io_uring,
/// its completion handler, in one poll group (`group`, non-zero and unique to
/// the queue), so that a wake-up by either counts as the queue's own: the
/// loop then suppresses notifications at once only on the other queues of the
/// IOThread ([`aio_poll::AioContext::set_poll_group`]).
fn add_queue_handlers(
    aio: &mut aio_poll::AioContext,
    qh: QueueHandler,
    ch: Option<(std::os::fd::OwnedFd, CompletionHandler)>,
    timer: Option<(std::os::fd::OwnedFd, DeferTimerHandler)>,
    group: u64,
) -> Result<Vec<HandlerId>, aio_poll::Error> {
    let mut ids = Vec::new();
    let added = (|| {
        if let Some((fd, ch)) = ch {
            ids.push(aio.add_polled_fd_handler(fd, Interest::READABLE, ch)?);
        }
        if let Some((fd, th)) = timer {
            ids.push(aio.add_fd_handler(fd, Interest::READABLE, th)?);
        }
        ids.push(aio.add_polled_fd_handler(qh.kick(), Interest::READABLE, qh)?);
        for &id in &ids {
            aio.set_poll_group(id, group)?;
        }
        Ok(())
    })();
    if let Err(e) = added {
        for id in ids {
            let _ = aio.remove_handler(id);
        }
        return Err(e);
    }
    Ok(ids)
}

impl Active {
    /// Quiesces every queue on its current IOThread.
    fn quiesce(&mut self, name: &DeviceName, assignment: &VqAssignment) {
        for q in &mut self.queues {
            q.quiesce(name, assignment.guard_for_queue(q.index));
        }
    }

    /// Registers every queue on its IOThread in `assignment` and processes it
    /// once; on error the queues registered so far are quiesced again.
    fn resume(&mut self, name: &DeviceName, assignment: &VqAssignment) -> Result<(), BlockError> {
        for i in 0..self.queues.len() {
            let Some(q) = self.queues.get_mut(i) else {
                break;
            };
            let registered =
                guard_for(name, assignment, q.index).and_then(|g| q.register(name, g, true));
            if let Err(e) = registered {
                self.quiesce(name, assignment);
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The virtio-blk device.
pub struct Block {
    cfg: BlockConfig,
    file: Arc<RawFile>,
    capacity_sectors: u64,
    avail_features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: Vec<u16>,
    id_bytes: [u8; VIRTIO_BLK_ID_BYTES],
    shared: Arc<Shared>,
}

impl Block {
    /// Opens the image, builds the device and attaches it to its IOThreads:
    /// `cfg.holder` is registered on every IOThread of `cfg.iothreads` (validated
    /// like QEMU's `iothread-vq-mapping`) until the device is shut down or
    /// dropped. No queue runs until the driver activates it.
    pub fn new(cfg: BlockConfig, registry: IoThreadRegistry) -> Result<Block, BlockError> {
        let name = DeviceName::new(cfg.role, cfg.id.clone());
        if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
            return Err(BlockError::NumQueues {
                device: name,
                value: cfg.num_queues,
            });
        }
        if cfg.queue_size <= 2 || !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(BlockError::QueueSize {
                device: name,
                value: cfg.queue_size,
            });
        }
        if cfg.engine == BlockEngine::IoUring {
            uring::IoUringEngine::probe().map_err(|source| BlockError::Engine {
                device: name.clone(),
                source: BackendError::IoUringUnavailable(source),
            })?;
        }
        let open_err = |source| BlockError::Open {
            device: name.clone(),
            path: cfg.path.clone(),
            source,
        };
        let file = RawFile::open(&cfg.path, cfg.readonly, cfg.direct).map_err(open_err)?;
        let engine = resolve_engine(cfg.engine, &file);
        let size = file.size().map_err(open_err)?;
        let capacity_sectors = size >> SECTOR_SHIFT;
        if capacity_sectors == 0 {
            return Err(BlockError::TooSmall {
                device: name,
                path: cfg.path.clone(),
            });
        }
        if size % 512 != 0 {
            log::warn!(
                "{name}: image size {size} is not a multiple of 512; the last {} bytes are not visible",
                size % 512
            );
        }
        let file = Arc::new(file);

        let mut avail_features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if cfg.readonly {
            avail_features |= feature(VIRTIO_BLK_F_RO);
        } else {
            avail_features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if cfg.num_queues > 1 {
            avail_features |= feature(VIRTIO_BLK_F_MQ);
        }

        let seg_max = seg_max(cfg.queue_size);
        let config_space = config_space(capacity_sectors, seg_max, cfg.num_queues);
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        let serial = cfg.serial.as_deref().unwrap_or(&cfg.id).as_bytes();
        let n = serial.len().min(VIRTIO_BLK_ID_BYTES);
        id_bytes[..n].copy_from_slice(&serial[..n]);

        // Attach last: nothing above can fail after the holders are registered.
        let assignment = registry
            .acquire_vq_mapping(&cfg.iothreads, cfg.num_queues, cfg.holder.clone())
            .map_err(|source| BlockError::IoThreads {
                device: name.clone(),
                source,
            })?;
        let shared = Arc::new(Shared {
            name: name.clone(),
            file: file.clone(),
            capacity: capacity_sectors << SECTOR_SHIFT,
            num_queues: cfg.num_queues,
            engine,
            registry,
            queue_iothreads: Mutex::new(per_queue(&assignment, cfg.num_queues)),
            counters: (0..cfg.num_queues).map(|_| Arc::default()).collect(),
            activated: AtomicBool::new(false),
            uring_fallback: AtomicBool::new(false),
            attachment: Mutex::new(Attachment {
                iothreads: Some(assignment),
                active: None,
                paused: false,
            }),
        });
        Ok(Block {
            queue_sizes: vec![cfg.queue_size; usize::from(cfg.num_queues)],
            cfg,
            file,
            capacity_sectors,
            avail_features,
            config_space,
            id_bytes,
            shared,
        })
    }

    /// A handle for `query-block`, flush and re-mapping (usable after the device
    /// was boxed into its transport).
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            shared: self.shared.clone(),
        }
    }

    /// Current status (see [`BlockHandle::info`]).
    pub fn info(&self) -> BlockInfo {
        self.handle().info()
    }

    /// `fdatasync` on the image.
    pub fn flush(&self) -> io::Result<()> {
        self.handle().flush()
    }

    /// The holder of a guest-facing drive `id`:
    /// `qom-object /machine/peripheral/<id>/virtio-backend`.
    pub fn device_holder(id: &str) -> IoThreadHolder {
        IoThreadHolder::qom_object(format!("/machine/peripheral/{id}/virtio-backend"))
    }

    /// The holder the device is registered as.
    pub fn holder(&self) -> &IoThreadHolder {
        &self.cfg.holder
    }

    fn limits(&self, acked: u64) -> DiskLimits {
        DiskLimits {
            capacity_sectors: self.capacity_sectors,
            read_only: self.cfg.readonly,
            seg_max: seg_max(self.cfg.queue_size),
            size_max: SIZE_MAX,
            discard: acked & feature(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: acked & feature(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            max_discard_sectors: MAX_DWZ_SECTORS,
            max_write_zeroes_sectors: MAX_DWZ_SECTORS,
        }
    }

    /// Builds the workers of the enabled queues and registers their handlers on
    /// the held IOThreads, recording everything in `active` (so that a failure
    /// part-way can be undone by [`Block::stop`]).
    fn start(
        &self,
        ctx: ActivateContext,
        assignment: &VqAssignment,
        active: &mut Active,
    ) -> Result<(), BlockError> {
        let mem = ctx.mem.memory().into_inner();
        let limits = self.limits(ctx.acked_features);
        let name = &self.shared.name;
        let parts = ctx.queues.into_iter().zip(ctx.queue_evts).enumerate();
        for (i, (queue, kick)) in parts {
            let index = i as u16;
            if !virtio_queue::QueueT::ready(&queue) {
                continue;
            }
            let guard = guard_for(name, assignment, index)?;
            let size = virtio_queue::QueueT::size(&queue);
            let backend =
                create_backend(self.file.clone(), self.cfg.engine, size).map_err(|source| {
                    BlockError::Engine {
                        device: name.clone(),
                        source,
                    }
                })?;
            if backend.engine() != self.shared.engine {
                self.shared.uring_fallback.store(true, Ordering::SeqCst);
            }
            let counters = self.shared.counters.get(i).cloned().unwrap_or_default();
            let mut w = QueueWorker::new(
                name.clone(),
                index,
                queue,
                mem.clone(),
                ctx.interrupt.clone(),
                backend,
                limits,
                self.id_bytes,
                counters.clone(),
            );
            w.set_max_batch(guard.aio_max_batch());
            active.queues.push(ActiveQueue {
                index,
                handlers: Vec::new(),
                worker: Arc::new(Mutex::new(w)),
                kick,
                counters,
            });
            if let Some(q) = active.queues.last_mut() {
                q.register(name, guard, false)?;
            }
        }
        Ok(())
    }

    /// Stops the queues: removes the handlers from their IOThreads, waits for
    /// in-flight I/O and flushes. The IOThreads stay held.
    ///
    /// `activated` is cleared first and set last in `activate`, so an
    /// observer that sees `activated` also sees the handlers.
    fn stop(&self, att: &mut Attachment) {
        let Some(mut active) = att.active.take() else {
            return;
        };
        self.shared.activated.store(false, Ordering::SeqCst);
        for q in &mut active.queues {
            let guard = att
                .iothreads
                .as_ref()
                .and_then(|a| a.guard_for_queue(q.index));
            q.quiesce(&self.shared.name, guard);
        }
        if let Err(e) = self.flush() {
            log::error!("{}: flush failed: {e}", self.shared.name);
        }
    }

    /// Stops the queues and releases the IOThreads (detach).
    fn detach(&mut self) {
        let mut att = lock(&self.shared.attachment);
        self.stop(&mut att);
        if let Some(assignment) = att.iothreads.take() {
            if let Err(e) = assignment.release() {
                log::error!(
                    "{}: releasing its IOThreads: {}",
                    self.shared.name,
                    error_chain(&e)
                );
            }
        }
    }
}

/// `seg_max` offered: a chain holds the data segments plus header and
/// status, and one vectored syscall takes at most [`raw::IOV_MAX`] buffers.
pub fn seg_max(queue_size: u16) -> u32 {
    (u32::from(queue_size) - 2).min(raw::IOV_MAX as u32 - 2)
}

/// Serialises the virtio-blk configuration space (little endian).
fn config_space(capacity: u64, seg_max: u32, num_queues: u16) -> [u8; CONFIG_SPACE_SIZE] {
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &seg_max.to_le_bytes());
    put(20, &512u32.to_le_bytes()); // blk_size
    put(34, &num_queues.to_le_bytes());
    put(36, &MAX_DWZ_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    put(44, &1u32.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_DWZ_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // `writeback` (CONFIG_WCE) is not offered: nothing is writable.
        crate::virtio::guest_warn!(
            "virtio-blk {}: write of {} bytes to read-only config offset {offset:#x} ignored",
            self.shared.name,
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let n = self.queue_sizes.len();
        if ctx.queues.len() != n || ctx.queue_evts.len() != n {
            return Err(ActivateError::QueueCount {
                expected: n,
                queues: ctx.queues.len(),
                evts: ctx.queue_evts.len(),
            });
        }
        let shared = self.shared.clone();
        let mut att = lock(&shared.attachment);
        self.stop(&mut att);
        let mut active = Active {
            queues: Vec::new(),
            interrupt: ctx.interrupt.clone(),
        };
        let result = match att.iothreads.as_ref() {
            Some(assignment) => self.start(ctx, assignment, &mut active),
            None => Err(BlockError::Detached {
                device: self.shared.name.clone(),
            }),
        };
        if result.is_ok() && att.paused {
            // Only a vCPU activates a drive, and none runs while the VM is
            // stopped; should another caller do it, the queues still wait
            // for `cont` like the others.
            if let Some(assignment) = att.iothreads.as_ref() {
                active.quiesce(&self.shared.name, assignment);
            }
        }
        att.active = Some(active);
        match result {
            Ok(()) => {
                self.shared.activated.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                self.stop(&mut att);
                Err(ActivateError::Device(Box::new(e)))
            }
        }
    }

    fn reset(&mut self) {
        let shared = self.shared.clone();
        self.stop(&mut lock(&shared.attachment));
    }

    fn shutdown(&mut self) {
        self.detach();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use iothread_registry::{IoThreadParams, IoThreadVqMapping};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::request::{req_type, status};
    use super::testing::driver::{bring_up, post, rd, status_of, wait_used, wr, Req};
    use super::testing::temp_disk;
    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::mmio::{regs, status as dev_status, MmioTransport};

    const NQ: u16 = 4;
    const QSIZE: u16 = 16;
    const DISK: usize = 1 << 20;

    fn registry() -> IoThreadRegistry {
        let r = IoThreadRegistry::new();
        r.create("io0", IoThreadParams::default()).unwrap();
        r.create("io1", IoThreadParams::default()).unwrap();
        r
    }

    fn cfg(path: &std::path::Path, engine: BlockEngine) -> BlockConfig {
        BlockConfig {
            id: "d0".into(),
            path: path.to_path_buf(),
            num_queues: NQ,
            queue_size: QSIZE,
            readonly: false,
            direct: false,
            iothreads: vec![IoThreadVqMapping::new("io0"), IoThreadVqMapping::new("io1")],
            engine,
            serial: Some("serial-0".into()),
            holder: Block::device_holder("d0"),
            role: BlockRole::Drive,
        }
    }

    struct Vm {
        t: MmioTransport,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        irq: EventFd,
        kicks: Vec<EventFd>,
        handle: BlockHandle,
    }

    fn vm(block: Block) -> Vm {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
        );
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let evts: Vec<EventFd> = (0..NQ)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let handle = block.handle();
        let t = MmioTransport::new(Box::new(block), mem.clone(), irq.try_clone().unwrap(), evts)
            .unwrap();
        Vm {
            t,
            mem,
            irq,
            kicks,
            handle,
        }
    }

    fn holder() -> IoThreadHolder {
        IoThreadHolder::qom_object("/machine/peripheral/d0/virtio-backend")
    }

    const WANT: u64 = (1 << 32)
        | (1 << VIRTIO_BLK_F_MQ)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_DISCARD)
        | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE);

    fn run_workload(v: &mut Vm) {
        let gm = v.mem.memory();
        let mem = &*gm;
        // Per queue: a 4 KiB pattern write; all queues kicked at once.
        let mut used = [0u16; NQ as usize];
        for q in 0..NQ {
            let buf = 0x20_0000 + u64::from(q) * 0x10_000;
            let pattern = vec![0x10 + q as u8; 4096];
            mem.write_slice(&pattern, GuestAddress(buf)).unwrap();
            let r = Req {
                t: req_type::OUT,
                sector: u64::from(q) * 8,
                buf,
                len: 4096,
                write: false,
            };
            post(mem, q, QSIZE, &[r], 0);
        }
        for q in 0..NQ {
            v.kicks[q as usize].write(1).unwrap();
        }
        for q in 0..NQ {
            used[q as usize] += 1;
            assert!(
                wait_used(mem, q, QSIZE, used[q as usize]),
                "queue {q} write"
            );
            let r = Req {
                t: 0,
                sector: 0,
                buf: 0x20_0000 + u64::from(q) * 0x10_000,
                len: 0,
                write: false,
            };
            assert_eq!(status_of(mem, &r), status::OK);
        }
        // Queue 1 (on io1): flush, read back, GET_ID, read past the end,
        // write-zeroes — several requests in one kick, via the MMIO register.
        let rb = 0x60_0000;
        let reqs = [
            Req {
                t: req_type::FLUSH,
                sector: 0,
                buf: 0x50_0000,
                len: 0,
                write: false,
            },
            Req {
                t: req_type::IN,
                sector: 16,
                buf: rb,
                len: 4096,
                write: true,
            },
            Req {
                t: req_type::GET_ID,
                sector: 0,
                buf: 0x62_0000,
                len: 20,
                write: true,
            },
            Req {
                t: req_type::IN,
                sector: (DISK / 512) as u64,
                buf: 0x64_0000,
                len: 512,
                write: true,
            },
        ];
        post(mem, 1, QSIZE, &reqs, 3);
        wr(&mut v.t, regs::QUEUE_NOTIFY, 1);
        used[1] += reqs.len() as u16;
        assert!(wait_used(mem, 1, QSIZE, used[1]));
        let st: Vec<u8> = reqs.iter().map(|r| status_of(mem, r)).collect();
        assert_eq!(st, [status::OK, status::OK, status::OK, status::IOERR]);
        // Used lengths: bytes written to the guest including the status.
        let rings = super::testing::driver::Rings::of(1, QSIZE);
        let mut lens: Vec<(u32, u32)> = (1..5).map(|i| rings.used_elem(mem, i)).collect();
        lens.sort_unstable();
        assert_eq!(lens, [(3, 1), (5, 4097), (8, 21), (11, 1)]);
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(rb)).unwrap();
        assert!(
            back.iter().all(|&b| b == 0x12),
            "queue 2's write read back on queue 1"
        );
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x62_0000)).unwrap();
        assert_eq!(&id[..8], b"serial-0");
        assert!(id[8..].iter().all(|&b| b == 0));
        // An interrupt reached the irqfd, and InterruptStatus says "used buffer".
        assert!(v.irq.read().unwrap() >= 1);
        assert_eq!(rd(&mut v.t, regs::INTERRUPT_STATUS) & 1, 1);
        wr(&mut v.t, regs::INTERRUPT_ACK, 1);
        // A malformed request (data outside guest memory) on queue 3, then
        // a good one: IOERR, and the queue keeps working.
        let bad = Req {
            t: req_type::IN,
            sector: 0,
            buf: 0x70_0000,
            len: 512,
            write: true,
        };
        post(mem, 3, QSIZE, &[bad], 3);
        // Point the data descriptor (index 4) outside memory.
        let q3 = super::testing::driver::Rings::of(3, QSIZE).desc;
        mem.write_obj(1u64 << 40, GuestAddress(q3 + 4 * 16))
            .unwrap();
        v.kicks[3].write(1).unwrap();
        used[3] += 1;
        assert!(wait_used(mem, 3, QSIZE, used[3]));
        assert_eq!(status_of(mem, &bad), status::IOERR);
        let good = Req {
            t: req_type::IN,
            sector: 0,
            buf: 0x72_0000,
            len: 512,
            write: true,
        };
        post(mem, 3, QSIZE, &[good], 6);
        v.kicks[3].write(1).unwrap();
        used[3] += 1;
        assert!(wait_used(mem, 3, QSIZE, used[3]));
        assert_eq!(status_of(mem, &good), status::OK);
        assert_eq!(
            rd(&mut v.t, regs::STATUS) & dev_status::DEVICE_NEEDS_RESET,
            0
        );
    }

    fn end_to_end(engine: BlockEngine) {
        let reg = registry();
        let disk = temp_disk(DISK, 0);
        let block = Block::new(cfg(disk.as_path(), engine), reg.clone()).unwrap();
        let mut v = vm(block);
        // Attached: held before the driver touches the device.
        assert_eq!(reg.holders("io0").unwrap(), vec![holder()]);
        assert!(!v.handle.info().activated);
        let gm = v.mem.memory();
        let s = bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
        assert_eq!(s & dev_status::DRIVER_OK, dev_status::DRIVER_OK);
        assert_eq!(s & dev_status::DEVICE_NEEDS_RESET, 0);
        // Config space: num_queues, blk_size, capacity.
        let mut nq = [0u8; 2];
        v.t.read(regs::CONFIG + 34, &mut nq);
        assert_eq!(u16::from_le_bytes(nq), NQ);
        let mut cap = [0u8; 8];
        v.t.read(regs::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), (DISK / 512) as u64);
        // Holders: one per IOThread, visible in query-iothreads.
        assert_eq!(reg.holders("io0").unwrap(), vec![holder()]);
        assert_eq!(reg.holders("io1").unwrap(), vec![holder()]);
        let q = reg.query_iothreads();
        assert!(q.iter().all(|t| t.holders == vec![holder()]));
        let info = v.handle.info();
        assert!(info.activated);
        assert_eq!(
            info.engine,
            resolve_engine(engine, &RawFile::open(disk.as_path(), true, false).unwrap())
        );

        run_workload(&mut v);
        let img = std::fs::read(disk.as_path()).unwrap();
        for q in 0..NQ as usize {
            assert!(img[q * 4096..(q + 1) * 4096]
                .iter()
                .all(|&b| b == 0x10 + q as u8));
        }
        assert!(img[NQ as usize * 4096..].iter().all(|&b| b == 0));
        let info = v.handle.info();
        assert!(info.queues.iter().map(|q| q.requests).sum::<u64>() >= 10);
        assert_eq!(info.queues[1].iothread, "io1");

        // Reset stops the queues; the holders stay (attachment, not activation).
        wr(&mut v.t, regs::STATUS, 0);
        assert_eq!(reg.holders("io0").unwrap(), vec![holder()]);
        assert_eq!(reg.holders("io1").unwrap(), vec![holder()]);
        assert!(!v.handle.info().activated);
        let err = reg.delete("io1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "IOThread 'io1' is in use by qom-object /machine/peripheral/d0/virtio-backend"
        );
        let s = bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
        assert_eq!(s & dev_status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(reg.holders("io1").unwrap(), vec![holder()]);
        // The rings start from scratch after reset.
        let r = Req {
            t: req_type::IN,
            sector: 0,
            buf: 0x20_0000,
            len: 4096,
            write: true,
        };
        post(&gm, 2, QSIZE, &[r], 0);
        v.kicks[2].write(1).unwrap();
        assert!(wait_used(&gm, 2, QSIZE, 1));
        assert_eq!(status_of(&gm, &r), status::OK);
        v.handle.flush().unwrap();
        // Dropping the transport shuts the device down and releases holders.
        drop(v);
        assert!(reg.holders("io0").unwrap().is_empty());
        assert!(reg.holders("io1").unwrap().is_empty());
    }

    #[test]
    fn end_to_end_sync_engine() {
        end_to_end(BlockEngine::Sync);
    }

    #[test]
    fn end_to_end_io_uring_engine() {
        end_to_end(BlockEngine::IoUring);
    }

    #[test]
    fn reset_with_requests_in_flight() {
        for engine in [BlockEngine::IoUring, BlockEngine::Sync] {
            let reg = registry();
            let disk = temp_disk(DISK, 0);
            let mut v = vm(Block::new(cfg(disk.as_path(), engine), reg.clone()).unwrap());
            let gm = v.mem.memory();
            for round in 0..3 {
                bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
                for q in 0..NQ {
                    let reqs: Vec<Req> = (0..5u64)
                        .map(|k| Req {
                            t: if k % 2 == 0 {
                                req_type::OUT
                            } else {
                                req_type::IN
                            },
                            sector: k * 8,
                            buf: 0x20_0000 + (u64::from(q) * 5 + k) * 0x2000,
                            len: 4096,
                            write: k % 2 == 1,
                        })
                        .collect();
                    post(&gm, q, QSIZE, &reqs, 0);
                    v.kicks[q as usize].write(1).unwrap();
                }
                // Reset at once: handlers go, in-flight I/O drains, holders stay.
                wr(&mut v.t, regs::STATUS, 0);
                assert_eq!(reg.holders("io0").unwrap(), vec![holder()], "round {round}");
                assert_eq!(reg.holders("io1").unwrap(), vec![holder()], "round {round}");
                for q in 0..NQ {
                    let used = super::testing::driver::Rings::of(q, QSIZE).used_idx(&gm);
                    assert!(used <= 5, "queue {q}: used {used}");
                }
            }
        }
    }

    /// A 4 KiB write at `sector`, data at `buf`.
    fn write_req(sector: u64, buf: u64) -> Req {
        Req {
            t: req_type::OUT,
            sector,
            buf,
            len: 4096,
            write: false,
        }
    }

    /// Requests taken from each queue's avail ring so far.
    fn requests_taken(h: &BlockHandle) -> Vec<u64> {
        h.info().queues.iter().map(|q| q.requests).collect()
    }

    #[test]
    fn pause_completes_what_is_in_flight_and_takes_nothing_until_resume() {
        for engine in [BlockEngine::IoUring, BlockEngine::Sync] {
            let reg = registry();
            let disk = temp_disk(DISK, 0);
            let mut v = vm(Block::new(cfg(disk.as_path(), engine), reg.clone()).unwrap());
            let gm = v.mem.memory();
            bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
            // Four writes per queue (12 of the 16 descriptors), kicked, and the VM stopped at once: when
            // pause returns, every request taken has completed.
            for q in 0..NQ {
                let reqs: Vec<Req> = (0..4u64)
                    .map(|k| {
                        write_req(
                            (u64::from(q) * 4 + k) * 8,
                            0x20_0000 + (u64::from(q) * 4 + k) * 0x2000,
                        )
                    })
                    .collect();
                for r in &reqs {
                    gm.write_slice(&[0x40 + q as u8; 4096], GuestAddress(r.buf))
                        .unwrap();
                }
                post(&gm, q, QSIZE, &reqs, 0);
                v.kicks[q as usize].write(1).unwrap();
            }
            v.handle.pause().unwrap();
            let taken = requests_taken(&v.handle);
            for q in 0..NQ {
                let used = super::testing::driver::Rings::of(q, QSIZE).used_idx(&gm);
                assert_eq!(
                    u64::from(used),
                    taken[q as usize],
                    "{engine:?} queue {q}: taken, not completed"
                );
            }
            // Requests queued while stopped stay in the ring: nothing is
            // taken, nothing reaches the image.
            let before = std::fs::read(disk.as_path()).unwrap();
            let late = write_req(200 * 8, 0x70_0000);
            gm.write_slice(&[0x77; 4096], GuestAddress(late.buf))
                .unwrap();
            post(&gm, 0, QSIZE, &[late], 4 * 3);
            v.kicks[0].write(1).unwrap();
            wr(&mut v.t, regs::QUEUE_NOTIFY, 0);
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert_eq!(
                requests_taken(&v.handle),
                taken,
                "{engine:?}: a request was taken while stopped"
            );
            assert!(
                std::fs::read(disk.as_path()).unwrap() == before,
                "{engine:?}: the image changed while stopped"
            );
            // A second stop is a no-op; the holders stay.
            v.handle.pause().unwrap();
            assert_eq!(reg.holders("io0").unwrap(), vec![holder()]);
            // A re-mapping while stopped moves the holders, not the queues
            // back into service.
            v.handle.set_iothreads(&names(&["io1"])).unwrap();
            assert!(reg.holders("io0").unwrap().is_empty());
            assert_eq!(reg.holders("io1").unwrap(), vec![holder()]);
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert_eq!(
                requests_taken(&v.handle),
                taken,
                "{engine:?}: a re-mapping while stopped restarted the queues"
            );
            // cont: the queues take what waited (every request of the
            // first batch completes too, whatever pause caught in flight).
            v.handle.resume().unwrap();
            v.handle.resume().unwrap();
            assert!(wait_used(&gm, 0, QSIZE, 5), "{engine:?}: the late write");
            for q in 1..NQ {
                assert!(wait_used(&gm, q, QSIZE, 4), "{engine:?}: queue {q}");
            }
            assert_eq!(status_of(&gm, &late), status::OK);
            let img = std::fs::read(disk.as_path()).unwrap();
            assert!(img[200 * 4096..201 * 4096].iter().all(|&b| b == 0x77));
            for q in 0..NQ as usize {
                for k in 0..4 {
                    let at = (q * 4 + k) * 4096;
                    assert!(
                        img[at..at + 4096].iter().all(|&b| b == 0x40 + q as u8),
                        "{engine:?} q{q} k{k}"
                    );
                }
            }
        }
    }

    #[test]
    fn block_node_holder_serves_and_holds_for_the_device_life() {
        let reg = registry();
        let disk = temp_disk(DISK, 0);
        let mut c = cfg(disk.as_path(), BlockEngine::Auto);
        let node = IoThreadHolder::block_node("disk0");
        c.holder = node.clone();
        let mut v = vm(Block::new(c, reg.clone()).unwrap());
        assert_eq!(reg.holders("io0").unwrap(), vec![node.clone()]);
        let gm = v.mem.memory();
        bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
        run_workload(&mut v);
        assert!(v.handle.info().queues.iter().all(|q| q.requests > 0));
        wr(&mut v.t, regs::STATUS, 0);
        assert_eq!(reg.holders("io1").unwrap(), vec![node]);
        drop(v);
        assert!(reg.holders("io0").unwrap().is_empty());
        assert!(reg.holders("io1").unwrap().is_empty());
    }

    #[test]
    fn every_listed_iothread_is_held_whatever_the_driver_enables() {
        let reg = registry();
        let ids = ["io0", "io1", "io2", "io3", "io4"];
        for id in &ids[2..] {
            reg.create(id, IoThreadParams::default()).unwrap();
        }
        let disk = temp_disk(DISK, 0);
        let mut c = cfg(disk.as_path(), BlockEngine::Auto);
        // io4 gets no queue at all (4 queues, 5 IOThreads, round-robin).
        c.iothreads = ids.map(IoThreadVqMapping::new).to_vec();
        let mut v = vm(Block::new(c, reg.clone()).unwrap());
        for id in ids {
            assert_eq!(reg.holders(id).unwrap(), vec![holder()], "{id}");
        }
        let gm = v.mem.memory();
        // The driver enables only queue 0.
        bring_up(&mut v.t, &gm, WANT, 1, QSIZE);
        assert!(v.handle.info().activated);
        for id in ids {
            let err = reg.delete(id).unwrap_err();
            assert!(err.to_string().contains("virtio-backend"), "{err}");
        }
    }

    /// Which IOThreads list d0 (sorted), from one consistent snapshot.
    fn held_by_d0(reg: &IoThreadRegistry) -> Vec<String> {
        let mut on: Vec<String> = reg
            .all_holders()
            .into_iter()
            .filter(|(_, hs)| {
                let n = hs.iter().filter(|h| **h == holder()).count();
                assert!(n <= 1, "d0 listed {n} times");
                n == 1
            })
            .map(|(id, _)| id)
            .collect();
        on.sort();
        on
    }

    fn names(ids: &[&str]) -> Vec<IoThreadVqMapping> {
        ids.iter().map(|id| IoThreadVqMapping::new(*id)).collect()
    }

    #[test]
    fn remap_not_activated_idle_mid_io_and_after_reset() {
        for engine in [BlockEngine::IoUring, BlockEngine::Sync] {
            let reg = registry();
            reg.create("io2", IoThreadParams::default()).unwrap();
            reg.create("io3", IoThreadParams::default()).unwrap();
            let disk = temp_disk(DISK, 0);
            let mut v = vm(Block::new(cfg(disk.as_path(), engine), reg.clone()).unwrap());
            let h = v.handle.clone();
            let sides = [names(&["io0", "io1"]), names(&["io2", "io3"])];
            let side_ids = [vec!["io0", "io1"], vec!["io2", "io3"]];
            // A watcher sees d0 on one whole side at every instant.
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (reg, stop) = (reg.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let on = held_by_d0(&reg);
                        assert!(
                            on == ["io0", "io1"] || on == ["io2", "io3"],
                            "d0 on neither or both sides: {on:?}"
                        );
                        n += 1;
                    }
                    n
                })
            };
            // Not activated: only the holders move.
            h.set_iothreads(&sides[1]).unwrap();
            assert_eq!(held_by_d0(&reg), side_ids[1]);
            let iothreads: Vec<String> = h.info().queues.into_iter().map(|q| q.iothread).collect();
            assert_eq!(iothreads, ["io2", "io3", "io2", "io3"]);
            reg.delete("io0")
                .unwrap_or_else(|e| panic!("io0 still held: {e}"));
            reg.create("io0", IoThreadParams::default()).unwrap();
            let gm = v.mem.memory();
            bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
            // Idle, activated: the queues serve on their new IOThreads.
            h.set_iothreads(&sides[0]).unwrap();
            run_workload(&mut v);
            let mut used = [0u16; NQ as usize];
            let rings = |q: u16| super::testing::driver::Rings::of(q, QSIZE);
            for q in 0..NQ {
                used[q as usize] = rings(q).used_idx(&gm);
            }
            // Mid-I/O: requests on every queue when the re-mapping starts; every
            // other round they are not even kicked (the driver relies on the
            // device to pick them up).
            for round in 0..40u16 {
                let mut reqs = Vec::new();
                for q in 0..NQ {
                    let r: Vec<Req> = (0..4u64)
                        .map(|k| Req {
                            t: if k % 2 == 0 {
                                req_type::OUT
                            } else {
                                req_type::IN
                            },
                            sector: u64::from(q) * 64 + k * 8,
                            buf: 0x20_0000 + (u64::from(q) * 4 + k) * 0x2000,
                            len: 4096,
                            write: k % 2 == 1,
                        })
                        .collect();
                    for (k, req) in r.iter().enumerate() {
                        let fill = vec![(round as u8) ^ (q as u8 * 16 + k as u8); 4096];
                        if req.t == req_type::OUT {
                            gm.write_slice(&fill, GuestAddress(req.buf)).unwrap();
                        }
                    }
                    post(&gm, q, QSIZE, &r, 0);
                    if round % 2 == 0 {
                        v.kicks[q as usize].write(1).unwrap();
                    }
                    reqs.extend(r);
                }
                let to = usize::from(round % 2 == 0);
                h.set_iothreads(&sides[to]).unwrap();
                for q in 0..NQ {
                    used[q as usize] = used[q as usize].wrapping_add(4);
                    assert!(
                        wait_used(&gm, q, QSIZE, used[q as usize]),
                        "round {round} queue {q}: used {} want {}",
                        rings(q).used_idx(&gm),
                        used[q as usize]
                    );
                }
                assert!(
                    reqs.iter().all(|r| status_of(&gm, r) == status::OK),
                    "round {round}"
                );
                assert_eq!(held_by_d0(&reg), side_ids[to]);
                // Handlers left the old IOThreads and run on the new ones (each
                // serves two queues: two kick handlers, plus two completion
                // handlers with io_uring).
                for (side, ids) in side_ids.iter().enumerate() {
                    for id in ids {
                        let probe = reg
                            .acquire(id, IoThreadHolder::block_node("probe"))
                            .unwrap();
                        let n = probe.call(|ctx| ctx.handler_count()).unwrap();
                        if side == to {
                            assert!(n >= 2, "round {round}: {n} handlers on {id}");
                        } else {
                            assert_eq!(n, 0, "round {round}: handlers left on {id}");
                        }
                    }
                }
            }
            // No request was completed twice.
            std::thread::sleep(std::time::Duration::from_millis(20));
            for q in 0..NQ {
                assert_eq!(rings(q).used_idx(&gm), used[q as usize], "queue {q}");
            }
            v.handle.flush().unwrap();
            let img = std::fs::read(disk.as_path()).unwrap();
            for q in 0..NQ as usize {
                for k in [0usize, 2] {
                    let at = (q * 64 + k * 8) * 512;
                    assert!(
                        img[at..at + 4096]
                            .iter()
                            .all(|&b| b == 39u8 ^ (q as u8 * 16 + k as u8)),
                        "queue {q} write {k}: last round's data"
                    );
                }
            }
            // A bad mapping is refused and changes nothing; the queues still run.
            let before = held_by_d0(&reg);
            let e = h.set_iothreads(&names(&["io9"])).unwrap_err();
            assert_eq!(
                error_chain(&e),
                "drive 'd0': invalid IOThread mapping: IOThread \"io9\" object does not exist"
            );
            assert_eq!(held_by_d0(&reg), before);
            for q in 0..NQ {
                let r = Req {
                    t: req_type::IN,
                    sector: 0,
                    buf: 0x40_0000,
                    len: 512,
                    write: true,
                };
                post(&gm, q, QSIZE, &[r], 0);
                v.kicks[q as usize].write(1).unwrap();
                used[q as usize] = used[q as usize].wrapping_add(1);
                assert!(wait_used(&gm, q, QSIZE, used[q as usize]), "queue {q}");
                assert_eq!(status_of(&gm, &r), status::OK);
            }
            // After a reset: the holders move, the re-activated queues use them.
            wr(&mut v.t, regs::STATUS, 0);
            h.set_iothreads(&sides[1]).unwrap();
            assert_eq!(held_by_d0(&reg), side_ids[1]);
            bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
            run_workload(&mut v);
            stop.store(true, Ordering::SeqCst);
            assert!(watcher.join().unwrap() > 0);
            drop(v);
            assert!(held_by_d0(&reg).is_empty());
            // Detached: nothing left to move.
        }
    }

    #[test]
    fn new_validates_config() {
        let reg = registry();
        let disk = temp_disk(4096, 0);
        let ok = cfg(disk.as_path(), BlockEngine::Sync);
        let mut c = ok.clone();
        c.num_queues = 0;
        assert!(matches!(
            Block::new(c, reg.clone()),
            Err(BlockError::NumQueues { .. })
        ));
        let mut c = ok.clone();
        c.queue_size = 24;
        assert!(matches!(
            Block::new(c, reg.clone()),
            Err(BlockError::QueueSize { .. })
        ));
        let mut c = ok.clone();
        c.iothreads = vec![IoThreadVqMapping::with_vqs("io0", [0, 1])];
        let e = Block::new(c, reg.clone()).err().unwrap();
        assert_eq!(
            error_chain(&e),
            "drive 'd0': invalid IOThread mapping: missing vq 2 IOThread assignment in iothread-vq-mapping"
        );
        let mut c = ok.clone();
        c.iothreads[1] = IoThreadVqMapping::new("nope");
        assert!(matches!(
            Block::new(c, reg.clone()),
            Err(BlockError::IoThreads { .. })
        ));
        // A refused device holds nothing.
        assert!(reg.holders("io0").unwrap().is_empty());
        let mut c = ok.clone();
        c.path = "/nonexistent/disk.img".into();
        let e = Block::new(c, reg.clone()).err().unwrap();
        assert!(matches!(e, BlockError::Open { .. }));
        assert!(
            error_chain(&e).contains("No such file"),
            "{}",
            error_chain(&e)
        );
        let small = temp_disk(100, 0);
        let c = cfg(small.as_path(), BlockEngine::Sync);
        assert!(matches!(
            Block::new(c, reg.clone()),
            Err(BlockError::TooSmall { .. })
        ));
        assert!(Block::new(ok, reg).is_ok());
    }

    #[test]
    fn features_and_config_space() {
        let reg = registry();
        let disk = temp_disk(DISK + 100, 0);
        let mut c = cfg(disk.as_path(), BlockEngine::Sync);
        let b = Block::new(c.clone(), reg.clone()).unwrap();
        let f = b.avail_features();
        for bit in [
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_VERSION_1,
        ] {
            assert_ne!(f & feature(bit), 0, "bit {bit}");
        }
        assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0);
        let mut d = [0u8; 8];
        b.read_config(0, &mut d);
        assert_eq!(u64::from_le_bytes(d), (DISK / 512) as u64);
        let mut d = [0u8; 4];
        b.read_config(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::from(QSIZE) - 2);
        b.read_config(20, &mut d);
        assert_eq!(u32::from_le_bytes(d), 512);
        b.read_config(40, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        let mut one = [0u8; 1];
        b.read_config(56, &mut one);
        assert_eq!(one, [1]);
        b.read_config(1000, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(seg_max(32768), 1022);
        assert_eq!(seg_max(2), 0);
        assert_eq!(b.device_type(), 2);
        assert_eq!(b.queue_max_sizes(), &[QSIZE; 4]);
        assert_eq!(b.info().capacity, DISK as u64);
        c.readonly = true;
        c.num_queues = 1;
        c.iothreads.truncate(1);
        let b = Block::new(c, reg).unwrap();
        let f = b.avail_features();
        assert_ne!(f & feature(VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            f & (feature(VIRTIO_BLK_F_MQ)
                | feature(VIRTIO_BLK_F_DISCARD)
                | feature(VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );
        assert!(b.info().read_only);
        b.flush().unwrap();
    }

    #[test]
    fn read_only_drive_end_to_end() {
        let reg = registry();
        let disk = temp_disk(DISK, 0x33);
        let mut c = cfg(disk.as_path(), BlockEngine::Auto);
        c.readonly = true;
        let mut v = vm(Block::new(c, reg).unwrap());
        let gm = v.mem.memory();
        let s = bring_up(&mut v.t, &gm, WANT | (1 << VIRTIO_BLK_F_RO), NQ, QSIZE);
        assert_eq!(s & dev_status::DRIVER_OK, dev_status::DRIVER_OK);
        let w = Req {
            t: req_type::OUT,
            sector: 0,
            buf: 0x20_0000,
            len: 512,
            write: false,
        };
        let r = Req {
            t: req_type::IN,
            sector: 0,
            buf: 0x30_0000,
            len: 512,
            write: true,
        };
        post(&gm, 0, QSIZE, &[w, r], 0);
        v.kicks[0].write(1).unwrap();
        assert!(wait_used(&gm, 0, QSIZE, 2));
        assert_eq!(status_of(&gm, &w), status::IOERR);
        assert_eq!(status_of(&gm, &r), status::OK);
        drop(v);
        assert!(std::fs::read(disk.as_path())
            .unwrap()
            .iter()
            .all(|&b| b == 0x33));
    }

    #[test]
    fn activation_failure_stops_the_queues_and_keeps_the_holders() {
        let reg = registry();
        let disk = temp_disk(DISK, 0);
        let mut v = vm(Block::new(cfg(disk.as_path(), BlockEngine::Sync), reg.clone()).unwrap());
        // io1 dies after the device was built: activation fails part-way (queue 0
        // on io0 was already registered).
        let other = reg
            .acquire("io1", IoThreadHolder::block_node("killer"))
            .unwrap();
        other.submit(|_| panic!("io1 dies"));
        assert!(crate::virtio::block::testing::wait_for(|| {
            reg.state("io1").unwrap() != iothread_registry::IoThreadState::Running
        }));
        drop(other);
        let gm = v.mem.memory();
        let s = bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
        assert_eq!(
            s & dev_status::DEVICE_NEEDS_RESET,
            dev_status::DEVICE_NEEDS_RESET
        );
        assert!(!v.handle.info().activated);
        // Still attached: the holders stay until the device goes.
        assert_eq!(reg.holders("io0").unwrap(), vec![holder()]);
        drop(v);
        assert!(reg.holders("io0").unwrap().is_empty());
        reg.delete("io0").unwrap();
    }
}

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
//!   activation on IOThreads, reset, shutdown) and its [`BlockHandle`].
//!
//! Holders ([`HolderPolicy`]): by default, on activation the device
//! acquires every IOThread that serves at least one enabled queue **once**
//! (as QEMU does), as `qom-object /machine/peripheral/<id>/virtio-backend`,
//! and releases all of them on reset and shutdown. A block export holds
//! the IOThreads itself (as `block-node`) for its whole life, so the device
//! it drives takes no holder of its own ([`HolderPolicy::External`]).

pub mod backend;
pub mod handler;
pub mod mapped;
pub mod mem_disk;
pub mod raw;
pub mod request;
pub mod sync_engine;
pub mod uring;

#[cfg(test)]
pub(crate) mod testing;

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aio_poll::{HandlerId, Interest};
use iothread_registry::{HolderGuard, IoThreadHolder, IoThreadRegistry};
use virtio_bindings::virtio_blk::*;
use vm_memory::GuestAddressSpace;

use self::backend::{create_backend, resolve_engine, BackendError, BlockEngine, EngineKind};
use self::handler::{CompletionHandler, QueueCounters, QueueHandler, QueueWorker};
use self::raw::RawFile;
use self::request::{DiskLimits, SECTOR_SHIFT, VIRTIO_BLK_ID_BYTES};
use crate::virtio::device::{
    feature, read_config_bytes, ActivateContext, ActivateError, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
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
    /// IOThread id per queue (`iothread_registry::assign_vqs`).
    pub queue_iothreads: Vec<String>,
    /// I/O engine.
    pub engine: BlockEngine,
    /// `GET_ID` string (at most 20 bytes used); the drive id when `None`.
    pub serial: Option<String>,
    /// Who holds the IOThreads while the queues run.
    pub holders: HolderPolicy,
}

/// Who holds the IOThreads that serve a [`Block`]'s queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HolderPolicy {
    /// The device, as `qom-object /machine/peripheral/<id>/virtio-backend`,
    /// from activation to reset (a guest-facing device: `vmm-ref run`).
    #[default]
    Device,
    /// The owner of the device holds them for longer than the device runs
    /// (a block export holds `block-node <drive>` from its start to its
    /// deletion); the device takes no holder and reaches the IOThreads
    /// through the registry. If one is deleted anyway, activation fails.
    External,
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// `num-queues` out of range.
    #[error("drive '{id}': num-queues {value} must be between 1 and {MAX_QUEUES}")]
    NumQueues {
        /// Drive id.
        id: String,
        /// Value.
        value: u16,
    },
    /// `queue-size` not a power of two in 2..=32768.
    #[error("drive '{id}': queue-size {value} must be a power of two between 2 and 32768")]
    QueueSize {
        /// Drive id.
        id: String,
        /// Value.
        value: u16,
    },
    /// The IOThread mapping does not cover each queue exactly.
    #[error("drive '{id}': {got} queue IOThreads given for {num_queues} queues")]
    Mapping {
        /// Drive id.
        id: String,
        /// Entries given.
        got: usize,
        /// Queues.
        num_queues: u16,
    },
    /// A mapped IOThread does not exist.
    #[error("drive '{id}': IOThread '{iothread}' does not exist")]
    NoSuchIoThread {
        /// Drive id.
        id: String,
        /// IOThread id.
        iothread: String,
    },
    /// The image cannot be opened.
    #[error("drive '{id}': cannot open '{}'", path.display())]
    Open {
        /// Drive id.
        id: String,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image is smaller than one sector.
    #[error("drive '{id}': image '{}' is smaller than 512 bytes", path.display())]
    TooSmall {
        /// Drive id.
        id: String,
        /// Path.
        path: PathBuf,
    },
    /// The requested engine is unavailable.
    #[error("drive '{id}': engine")]
    Engine {
        /// Drive id.
        id: String,
        /// Cause.
        #[source]
        source: BackendError,
    },
    /// Acquiring or using an IOThread failed during activation.
    #[error("drive '{id}': IOThread '{iothread}'")]
    IoThread {
        /// Drive id.
        id: String,
        /// IOThread id.
        iothread: String,
        /// Cause.
        #[source]
        source: iothread_registry::Error,
    },
    /// The backend's completion eventfd could not be duplicated for the IOThread.
    #[error("drive '{id}': cannot duplicate the completion eventfd of queue {queue}")]
    CompletionFd {
        /// Drive id.
        id: String,
        /// Queue.
        queue: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Registering a queue handler on its IOThread failed.
    #[error("drive '{id}': cannot register queue {queue} on IOThread '{iothread}'")]
    Handler {
        /// Drive id.
        id: String,
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
    id: String,
    file: Arc<RawFile>,
    capacity: u64,
    num_queues: u16,
    engine: EngineKind,
    queue_iothreads: Vec<String>,
    counters: Vec<Arc<QueueCounters>>,
    activated: AtomicBool,
    /// io_uring could not be set up for a queue and the sync engine runs it.
    uring_fallback: AtomicBool,
}

/// A cloneable handle on a block device for the control plane: status for
/// `query-block`, and flush for a clean shutdown.
#[derive(Clone)]
pub struct BlockHandle {
    shared: Arc<Shared>,
}

impl BlockHandle {
    /// Current status.
    pub fn info(&self) -> BlockInfo {
        let s = &self.shared;
        BlockInfo {
            id: s.id.clone(),
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
                .zip(&s.queue_iothreads)
                .enumerate()
                .map(|(i, (c, io))| QueueInfo {
                    index: i as u16,
                    iothread: io.clone(),
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
}

struct ActiveQueue {
    index: u16,
    iothread: String,
    handlers: Vec<HandlerId>,
    worker: Arc<Mutex<QueueWorker>>,
}

struct Active {
    /// Held IOThreads ([`HolderPolicy::Device`]; empty for `External`).
    guards: BTreeMap<String, HolderGuard>,
    queues: Vec<ActiveQueue>,
}

impl Active {
    /// Runs `f` in IOThread `id`'s loop: through this device's guard when
    /// it holds one, else through the registry.
    fn call<R: Send + 'static>(
        &self,
        registry: &IoThreadRegistry,
        id: &str,
        f: impl FnOnce(&mut aio_poll::AioContext) -> R + Send + 'static,
    ) -> Result<R, iothread_registry::Error> {
        match self.guards.get(id) {
            Some(g) => g.call(f),
            None => registry.call(id, f),
        }
    }
}

/// The virtio-blk device.
pub struct Block {
    cfg: BlockConfig,
    registry: IoThreadRegistry,
    file: Arc<RawFile>,
    capacity_sectors: u64,
    avail_features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: Vec<u16>,
    id_bytes: [u8; VIRTIO_BLK_ID_BYTES],
    shared: Arc<Shared>,
    active: Option<Active>,
}

impl Block {
    /// Opens the image and builds the device. Nothing runs until the
    /// driver activates it.
    pub fn new(cfg: BlockConfig, registry: IoThreadRegistry) -> Result<Block, BlockError> {
        let id = cfg.id.clone();
        if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
            return Err(BlockError::NumQueues {
                id,
                value: cfg.num_queues,
            });
        }
        if cfg.queue_size < 2 || !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(BlockError::QueueSize {
                id,
                value: cfg.queue_size,
            });
        }
        if cfg.queue_iothreads.len() != usize::from(cfg.num_queues) {
            return Err(BlockError::Mapping {
                id,
                got: cfg.queue_iothreads.len(),
                num_queues: cfg.num_queues,
            });
        }
        if let Some(missing) = cfg.queue_iothreads.iter().find(|t| !registry.contains(t)) {
            return Err(BlockError::NoSuchIoThread {
                id,
                iothread: missing.clone(),
            });
        }
        if cfg.engine == BlockEngine::IoUring {
            uring::IoUringEngine::probe().map_err(|source| BlockError::Engine {
                id: id.clone(),
                source: BackendError::IoUringUnavailable(source),
            })?;
        }
        let open_err = |source| BlockError::Open {
            id: id.clone(),
            path: cfg.path.clone(),
            source,
        };
        let file = RawFile::open(&cfg.path, cfg.readonly, cfg.direct).map_err(open_err)?;
        let engine = resolve_engine(cfg.engine, &file);
        let size = file.size().map_err(open_err)?;
        let capacity_sectors = size >> SECTOR_SHIFT;
        if capacity_sectors == 0 {
            return Err(BlockError::TooSmall {
                id,
                path: cfg.path.clone(),
            });
        }
        if size % 512 != 0 {
            log::warn!(
                "drive '{}': image size {size} is not a multiple of 512; the last {} bytes are not visible",
                cfg.id,
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

        let shared = Arc::new(Shared {
            id: cfg.id.clone(),
            file: file.clone(),
            capacity: capacity_sectors << SECTOR_SHIFT,
            num_queues: cfg.num_queues,
            engine,
            queue_iothreads: cfg.queue_iothreads.clone(),
            counters: (0..cfg.num_queues).map(|_| Arc::default()).collect(),
            activated: AtomicBool::new(false),
            uring_fallback: AtomicBool::new(false),
        });
        Ok(Block {
            queue_sizes: vec![cfg.queue_size; usize::from(cfg.num_queues)],
            cfg,
            registry,
            file,
            capacity_sectors,
            avail_features,
            config_space,
            id_bytes,
            shared,
            active: None,
        })
    }

    /// A handle for `query-block` and flush (usable after the device was
    /// boxed into its transport).
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

    /// The QOM path used as IOThread holder.
    pub fn holder(&self) -> IoThreadHolder {
        IoThreadHolder::qom_object(format!(
            "/machine/peripheral/{}/virtio-backend",
            self.cfg.id
        ))
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

    /// Acquires the IOThreads and registers the queue handlers, recording
    /// everything in `active` (so that a failure part-way can be undone by
    /// [`Block::stop`]).
    fn start(&self, ctx: ActivateContext, active: &mut Active) -> Result<(), BlockError> {
        let mem = ctx.mem.memory().into_inner();
        let limits = self.limits(ctx.acked_features);
        let holder = self.holder();
        let parts = ctx.queues.into_iter().zip(ctx.queue_evts).enumerate();
        for (i, (queue, kick)) in parts {
            let index = i as u16;
            if !virtio_queue::QueueT::ready(&queue) {
                continue;
            }
            let iothread = self.cfg.queue_iothreads.get(i).cloned().unwrap_or_default();
            let io_err = |source| BlockError::IoThread {
                id: self.cfg.id.clone(),
                iothread: iothread.clone(),
                source,
            };
            let max_batch = if self.cfg.holders == HolderPolicy::Device {
                let guard = match active.guards.entry(iothread.clone()) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(
                        self.registry
                            .acquire(&iothread, holder.clone())
                            .map_err(io_err)?,
                    ),
                };
                guard.context().aio_max_batch()
            } else {
                let batch = self
                    .registry
                    .params(&iothread)
                    .map_err(io_err)?
                    .aio_max_batch;
                u64::try_from(batch).unwrap_or(0)
            };
            let size = virtio_queue::QueueT::size(&queue);
            let backend =
                create_backend(self.file.clone(), self.cfg.engine, size).map_err(|source| {
                    BlockError::Engine {
                        id: self.cfg.id.clone(),
                        source,
                    }
                })?;
            if backend.engine() != self.shared.engine {
                self.shared.uring_fallback.store(true, Ordering::SeqCst);
            }
            let counters = self.shared.counters.get(i).cloned().unwrap_or_default();
            let mut w = QueueWorker::new(
                index,
                queue,
                mem.clone(),
                ctx.interrupt.clone(),
                backend,
                limits,
                self.id_bytes,
                counters.clone(),
            );
            w.set_max_batch(max_batch);
            let completion_fd = w
                .completion_fd()
                .map_err(|source| BlockError::CompletionFd {
                    id: self.cfg.id.clone(),
                    queue: index,
                    source,
                })?;
            let worker = Arc::new(Mutex::new(w));
            let qh = QueueHandler::new(worker.clone(), kick, counters);
            let ch = completion_fd.map(|fd| (fd, CompletionHandler::new(worker.clone())));
            let registered = active
                .call(
                    &self.registry,
                    &iothread,
                    move |aio| -> Result<Vec<HandlerId>, aio_poll::Error> {
                        let mut ids = Vec::new();
                        if let Some((fd, ch)) = ch {
                            ids.push(aio.add_polled_fd_handler(fd, Interest::READABLE, ch)?);
                        }
                        match aio.add_polled_fd_handler(qh.kick(), Interest::READABLE, qh) {
                            Ok(id) => ids.push(id),
                            Err(e) => {
                                for id in ids {
                                    let _ = aio.remove_handler(id);
                                }
                                return Err(e);
                            }
                        }
                        Ok(ids)
                    },
                )
                .map_err(io_err)?;
            let handlers = registered.map_err(|source| BlockError::Handler {
                id: self.cfg.id.clone(),
                queue: index,
                iothread: iothread.clone(),
                source,
            })?;
            active.queues.push(ActiveQueue {
                index,
                iothread,
                handlers,
                worker,
            });
        }
        Ok(())
    }

    /// Removes the handlers from their IOThreads, waits for in-flight I/O,
    /// flushes, and releases the holders.
    ///
    /// `activated` is cleared first and set last in `activate`, so an
    /// observer that sees `activated` also sees the holders.
    fn stop(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        self.shared.activated.store(false, Ordering::SeqCst);
        for q in &active.queues {
            let ids = q.handlers.clone();
            let removed = active.call(&self.registry, &q.iothread, move |aio| {
                for id in ids {
                    if let Err(e) = aio.remove_handler(id) {
                        log::error!("removing virtio-blk handler: {e}");
                    }
                }
            });
            if let Err(e) = removed {
                log::error!(
                    "drive '{}' queue {}: cannot remove handlers: {}",
                    self.cfg.id,
                    q.index,
                    error_chain(&e)
                );
            }
            let drained = q.worker.lock().unwrap_or_else(|e| e.into_inner()).drain();
            if drained > 0 {
                log::debug!(
                    "drive '{}' queue {}: drained {drained} requests",
                    self.cfg.id,
                    q.index
                );
            }
        }
        if let Err(e) = self.flush() {
            log::error!("drive '{}': flush failed: {e}", self.cfg.id);
        }
        for (id, g) in active.guards {
            if let Err(e) = g.release() {
                log::error!(
                    "drive '{}': releasing IOThread '{id}': {}",
                    self.cfg.id,
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
            "virtio-blk '{}': write of {} bytes to read-only config offset {offset:#x} ignored",
            self.cfg.id,
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
        self.stop();
        let mut active = Active {
            guards: BTreeMap::new(),
            queues: Vec::new(),
        };
        let result = self.start(ctx, &mut active);
        self.active = Some(active);
        match result {
            Ok(()) => {
                self.shared.activated.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                self.stop();
                Err(ActivateError::Device(Box::new(e)))
            }
        }
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn shutdown(&mut self) {
        self.stop();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use iothread_registry::IoThreadParams;
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
            queue_iothreads: ["io0", "io1", "io0", "io1"].map(String::from).to_vec(),
            engine,
            serial: Some("serial-0".into()),
            holders: HolderPolicy::Device,
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
        assert!(reg.holders("io0").unwrap().is_empty());
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

        // Reset releases the holders; activation takes them again.
        wr(&mut v.t, regs::STATUS, 0);
        assert!(reg.holders("io0").unwrap().is_empty());
        assert!(reg.holders("io1").unwrap().is_empty());
        assert!(!v.handle.info().activated);
        reg.delete("io1")
            .unwrap_or_else(|e| panic!("io1 still held: {e}"));
        reg.create("io1", IoThreadParams::default()).unwrap();
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
                // Reset at once: handlers go, in-flight I/O drains, holders go.
                wr(&mut v.t, regs::STATUS, 0);
                assert!(reg.holders("io0").unwrap().is_empty(), "round {round}");
                assert!(reg.holders("io1").unwrap().is_empty(), "round {round}");
                for q in 0..NQ {
                    let used = super::testing::driver::Rings::of(q, QSIZE).used_idx(&gm);
                    assert!(used <= 5, "queue {q}: used {used}");
                }
            }
        }
    }

    #[test]
    fn external_holder_policy_serves_without_holders() {
        let reg = registry();
        let disk = temp_disk(DISK, 0);
        let mut c = cfg(disk.as_path(), BlockEngine::Auto);
        c.holders = HolderPolicy::External;
        let mut v = vm(Block::new(c, reg.clone()).unwrap());
        let gm = v.mem.memory();
        bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
        assert!(v.handle.info().activated);
        // Someone else holds the IOThreads: the device adds nobody...
        assert!(reg.holders("io0").unwrap().is_empty());
        assert!(reg.holders("io1").unwrap().is_empty());
        // ...and still serves every queue through the registry.
        run_workload(&mut v);
        assert!(v.handle.info().queues.iter().all(|q| q.requests > 0));
        // Reset removes its handlers; the IOThreads stay (nobody held them).
        wr(&mut v.t, regs::STATUS, 0);
        assert!(!v.handle.info().activated);
        assert!(reg.contains("io0") && reg.contains("io1"));
        // Activation fails cleanly when an IOThread is gone.
        reg.delete("io1").unwrap();
        bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
        assert!(!v.handle.info().activated);
    }

    #[test]
    fn only_enabled_queues_take_holders() {
        let reg = registry();
        let disk = temp_disk(DISK, 0);
        let mut c = cfg(disk.as_path(), BlockEngine::Auto);
        c.queue_iothreads = ["io0", "io0", "io0", "io1"].map(String::from).to_vec();
        let mut v = vm(Block::new(c, reg.clone()).unwrap());
        let gm = v.mem.memory();
        // The driver enables only queues 0 and 1 (both on io0).
        bring_up(&mut v.t, &gm, WANT, 2, QSIZE);
        assert_eq!(reg.holders("io0").unwrap(), vec![holder()]);
        assert!(reg.holders("io1").unwrap().is_empty());
        let err = reg.delete("io0").unwrap_err();
        assert!(err.to_string().contains("virtio-backend"), "{err}");
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
        c.queue_iothreads.pop();
        assert!(matches!(
            Block::new(c, reg.clone()),
            Err(BlockError::Mapping { .. })
        ));
        let mut c = ok.clone();
        c.queue_iothreads[2] = "nope".into();
        assert!(matches!(
            Block::new(c, reg.clone()),
            Err(BlockError::NoSuchIoThread { .. })
        ));
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
        c.queue_iothreads.truncate(1);
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
    fn activation_failure_releases_everything() {
        let reg = registry();
        let disk = temp_disk(DISK, 0);
        let mut v = vm(Block::new(cfg(disk.as_path(), BlockEngine::Sync), reg.clone()).unwrap());
        // io1 disappears after the device was built: activation fails
        // part-way (queue 0 on io0 was already registered).
        reg.delete("io1").unwrap();
        let gm = v.mem.memory();
        let s = bring_up(&mut v.t, &gm, WANT, NQ, QSIZE);
        assert_eq!(
            s & dev_status::DEVICE_NEEDS_RESET,
            dev_status::DEVICE_NEEDS_RESET
        );
        assert!(reg.holders("io0").unwrap().is_empty());
        assert!(!v.handle.info().activated);
        reg.delete("io0").unwrap();
    }
}

//! virtio-blk drives on virtio-mmio: creating the device model
//! ([`crate::virtio::block::Block`]) inside its transport
//! ([`crate::virtio::mmio::MmioTransport`]), and wiring it into KVM: the
//! transport on the MMIO bus at its 4 KiB slot, its interrupt eventfd as an
//! irqfd on the slot's GSI, each queue's notification eventfd as an ioeventfd
//! on `QueueNotify` (slot + 0x50) matching the queue index, so that guest
//! kicks go straight from KVM to the queue's IOThread.

use std::sync::{Arc, Mutex, MutexGuard};

use iothread_registry::{IoThreadRegistry, IoThreadVqMapping};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::config::{AioMode, ValidDrive};
use crate::qmp::BlockInfo;
use crate::virtio::block::backend::BlockEngine;
use crate::virtio::block::{Block, BlockConfig, BlockError, BlockHandle, BlockRole};
use crate::virtio::device::VirtioDevice;
use crate::virtio::mmio::{MmioError, MmioTransport};
use crate::vm::iobus::{IoBus, IoBusError};
use crate::vm::layout::{self, VIRTIO_MMIO_SLOT_SIZE};
use crate::vm::{Vm, VmError};

/// virtio-mmio `QueueNotify` register offset.
const QUEUE_NOTIFY: u64 = 0x50;
/// virtio-mmio `Status` register offset (writing 0 resets the device).
const STATUS: u64 = 0x70;

/// Errors attaching a drive.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// No virtio-mmio slot / GSI left.
    #[error("no virtio-mmio slot left for device number {0}")]
    NoSlot(usize),
    /// The device model refused the configuration or the image.
    #[error("cannot create the virtio-blk device")]
    Block(#[source] BlockError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The transport refused the device.
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] MmioError),
    /// Registering the irqfd failed.
    #[error("cannot register the interrupt (GSI {gsi})")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// Cause.
        #[source]
        source: VmError,
    },
    /// Registering a queue's ioeventfd failed.
    #[error("cannot register the notification of queue {queue}")]
    Ioevent {
        /// The queue.
        queue: usize,
        /// Cause.
        #[source]
        source: VmError,
    },
    /// The vhost-user-blk device could not reach or use its back-end.
    #[error("cannot set up the vhost-user-blk device")]
    VhostUser(#[source] crate::virtio::vhost_user_blk::VhostUserBlkError),
    /// The slot is already taken on the MMIO bus.
    #[error("cannot map the device")]
    Bus(#[source] IoBusError),
}

/// Puts `device` in a virtio-mmio transport on the slot at `base` with
/// interrupt `gsi`: `irq` becomes the slot's irqfd, each of `queue_evts` an
/// ioeventfd on `QueueNotify` matching its queue index, the transport goes on
/// the MMIO bus.
pub(crate) fn plug(
    vm: &Vm,
    mmio: &mut IoBus,
    (base, gsi): (u64, u32),
    device: Box<dyn VirtioDevice>,
    irq: EventFd,
    queue_evts: Vec<EventFd>,
) -> Result<Arc<Mutex<MmioTransport>>, DriveError> {
    let transport = MmioTransport::new(device, vm.memory().clone(), irq, queue_evts)
        .map_err(DriveError::Transport)?;
    vm.register_irqfd(transport.irq_evt(), gsi)
        .map_err(|source| DriveError::Irqfd { gsi, source })?;
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY, queue as u32)
            .map_err(|source| DriveError::Ioevent { queue, source })?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(base, VIRTIO_MMIO_SLOT_SIZE, transport.clone())
        .map_err(DriveError::Bus)?;
    Ok(transport)
}

/// An attached drive.
pub struct Drive {
    config: ValidDrive,
    base: u64,
    gsi: u32,
    transport: Arc<Mutex<MmioTransport>>,
    handle: BlockHandle,
}

fn engine(aio: AioMode) -> BlockEngine {
    match aio {
        AioMode::Auto => BlockEngine::Auto,
        AioMode::IoUring => BlockEngine::IoUring,
        AioMode::Threads => BlockEngine::Sync,
    }
}

impl Drive {
    /// Creates the device for `d` and wires it into virtio-mmio slot `index`.
    pub fn attach(
        vm: &Vm,
        mmio: &mut IoBus,
        registry: &IoThreadRegistry,
        index: usize,
        d: &ValidDrive,
    ) -> Result<Drive, DriveError> {
        let (base, gsi) = layout::virtio_mmio_slot(index).ok_or(DriveError::NoSlot(index))?;
        let c = &d.config;
        let cfg = BlockConfig {
            id: c.id.clone(),
            path: c.file.clone(),
            num_queues: c.num_queues,
            queue_size: c.queue_size,
            readonly: c.readonly,
            direct: c.direct,
            iothreads: d.mapping.clone(),
            engine: engine(c.aio),
            serial: c.serial.clone(),
            holder: Block::device_holder(&c.id),
            role: BlockRole::Drive,
        };
        let block = Block::new(cfg, registry.clone()).map_err(DriveError::Block)?;
        let handle = block.handle();
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DriveError::EventFd)?;
        let queue_evts = (0..c.num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DriveError::EventFd)?;
        let transport = plug(vm, mmio, (base, gsi), Box::new(block), irq, queue_evts)?;
        Ok(Drive {
            config: d.clone(),
            base,
            gsi,
            transport,
            handle,
        })
    }

    /// QMP `stop`: the drive's queues quiesce (in-flight requests complete,
    /// new ones wait in the rings) and the image is flushed (see
    /// [`BlockHandle::pause`]).
    pub fn pause(&self) -> std::io::Result<()> {
        self.handle.pause()
    }

    /// QMP `cont`: the queues run again (see [`BlockHandle::resume`]).
    pub fn resume(&self) -> Result<(), BlockError> {
        self.handle.resume()
    }

    /// `x-drive-set-iothreads`: moves the drive's queues to the IOThreads of
    /// `mapping` (see [`BlockHandle::set_iothreads`]).
    pub fn set_iothreads(&self, mapping: &[IoThreadVqMapping]) -> Result<(), BlockError> {
        self.handle.set_iothreads(mapping)
    }

    fn transport(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Guest-physical base of the slot.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// GSI of the slot.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The drive id.
    pub fn id(&self) -> &str {
        &self.config.config.id
    }

    /// `query-block` information.
    pub fn info(&self) -> BlockInfo {
        let b = self.handle.info();
        let qdev = format!("/machine/peripheral/{}/virtio-backend", b.id);
        let device = b.id.clone();
        BlockInfo::from_device(b, device, qdev, self.config.config.queue_size)
    }

    /// Device reset, as if the driver wrote 0 to the status register: the queues
    /// stop until the driver activates the device again. The drive keeps holding
    /// its IOThreads (holders follow attachment, not activation).
    pub fn reset(&self) {
        self.transport().write(STATUS, &0u32.to_le_bytes());
    }

    /// Shutdown (detach): stop the queues, release the IOThreads, make the data
    /// durable.
    pub fn shutdown(&self) {
        self.transport().shutdown();
        if let Err(e) = self.handle.flush() {
            log::error!("drive '{}': flush failed: {e}", self.id());
        }
    }
}

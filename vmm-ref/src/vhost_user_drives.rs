//! vhost-user-blk devices on virtio-mmio: the device model
//! ([`crate::virtio::vhost_user_blk::VhostUserBlk`]) in its transport, on the
//! slot after the drives, wired like a drive (`drives::plug`) - but
//! the irqfd and the ioeventfds are handed to the back-end, which then talks
//! to KVM directly: guest kicks wake the back-end, its completions interrupt
//! the guest, vmm-ref stays out of the data path.

use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::config::vhost_user::ValidVhostUserBlk;
use crate::drives::{plug, DriveError};
use crate::qmp::{BlockInfo, VhostUserBlockInfo};
use crate::virtio::mmio::{regs, MmioTransport};
use crate::virtio::vhost_user_blk::{Params, VhostUserBlk, VhostUserBlkHandle};
use crate::vm::iobus::IoBus;
use crate::vm::layout;
use crate::vm::Vm;

/// An attached vhost-user-blk device.
pub struct VhostUserDrive {
    id: String,
    base: u64,
    gsi: u32,
    transport: Arc<Mutex<MmioTransport>>,
    handle: VhostUserBlkHandle,
}

impl VhostUserDrive {
    /// Connects device `d` to its back-end and wires it into virtio-mmio
    /// slot `index`. The VM's RAM must be shareable.
    pub fn attach(
        vm: &Vm,
        mmio: &mut IoBus,
        index: usize,
        d: &ValidVhostUserBlk,
    ) -> Result<VhostUserDrive, DriveError> {
        let (base, gsi) = layout::virtio_mmio_slot(index).ok_or(DriveError::NoSlot(index))?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DriveError::EventFd)?;
        let call = irq.try_clone().map_err(DriveError::EventFd)?;
        let params = Params {
            id: d.id.clone(),
            chardev: d.chardev.clone(),
            socket: d.socket.clone(),
            num_queues: d.num_queues,
            queue_size: d.queue_size,
            reconnect: d.reconnect,
        };
        let (device, handle) = VhostUserBlk::new(params, call).map_err(DriveError::VhostUser)?;
        let queue_evts = (0..d.num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DriveError::EventFd)?;
        let transport = plug(vm, mmio, (base, gsi), Box::new(device), irq, queue_evts)?;
        Ok(VhostUserDrive {
            id: d.id.clone(),
            base,
            gsi,
            transport,
            handle,
        })
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

    /// The device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `query-block` information: the back-end's socket as `file`, format
    /// `vhost-user-blk`, no per-queue IOThreads (the back-end has its own),
    /// and the connection state under `vhost-user`.
    pub fn info(&self) -> BlockInfo {
        let i = self.handle.info();
        let path = i.params.socket.display().to_string();
        BlockInfo {
            device: i.params.id.clone(),
            qdev: format!("/machine/peripheral/{}/virtio-backend", i.params.id),
            file: path.clone(),
            read_only: i.read_only,
            direct: false,
            format: "vhost-user-blk".to_owned(),
            engine: "vhost-user".to_owned(),
            num_queues: i.params.num_queues,
            queue_size: i.params.queue_size,
            activated: i.activated,
            queues: Vec::new(),
            vhost_user: Some(VhostUserBlockInfo {
                chardev: i.params.chardev.clone(),
                path,
                connected: i.connected,
                connections: i.connections,
                disconnects: i.disconnects,
                reconnects: i.reconnects,
                protocol_errors: i.protocol_errors,
                reconnect: i.params.reconnect.map(|d| d.as_secs()),
                inflight: i.inflight,
                protocol_features: i.protocol_features,
                last_error: i.last_error,
            }),
        }
    }

    /// QMP `stop`: the back-end stops the rings (see
    /// [`VhostUserBlkHandle::pause`]).
    pub fn pause(&self) {
        self.handle.pause();
    }

    /// QMP `cont`: the rings start again where they stood.
    pub fn resume(&self) {
        self.handle.resume();
    }

    /// Device reset, as if the driver wrote 0 to the status register: the
    /// back-end stops the rings.
    pub fn reset(&self) {
        self.transport().write(regs::STATUS, &0u32.to_le_bytes());
    }

    /// Shutdown: stop the rings and close the connection. (Durability is the
    /// back-end's: what the guest flushed was acknowledged by it.)
    pub fn shutdown(&self) {
        self.transport().shutdown();
    }
}

//! virtio-blk drives on virtio-mmio: device creation and KVM wiring.
//! (Interim: the virtio helper's device model has not landed yet.)

use crate::config::ValidDrive;
use crate::vm::iobus::IoBus;
use crate::vm::Vm;
use iothread_registry::IoThreadRegistry;

/// Errors attaching a drive.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// No virtio-blk device model in this build.
    #[error("virtio-blk is not available in this build yet")]
    Unavailable,
}

/// An attached drive.
pub struct Drive {
    base: u64,
    gsi: u32,
    info: crate::qmp::BlockInfo,
}

impl Drive {
    /// Creates the device and wires it into slot `index`.
    pub fn attach(
        _vm: &Vm,
        _mmio: &mut IoBus,
        _registry: &IoThreadRegistry,
        _index: usize,
        _d: &ValidDrive,
    ) -> Result<Drive, DriveError> {
        Err(DriveError::Unavailable)
    }
    /// Slot base.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// Slot GSI.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
    /// query-block info.
    pub fn info(&self) -> crate::qmp::BlockInfo {
        self.info.clone()
    }
    /// Device reset.
    pub fn reset(&self) {}
    /// Device shutdown.
    pub fn shutdown(&self) {}
}

//! The interface between a virtio transport and a virtio device model.
//!
//! A device model ([`VirtioDevice`]) describes itself (type, queues,
//! features, configuration space) and is handed everything it needs to run
//! in one [`ActivateContext`] when the driver sets `DRIVER_OK`. It never sees
//! transport registers; it reaches the guest only through guest memory, the
//! queues and a [`VirtioInterrupt`].

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Virtio device id of a block device (virtio 1.2 §5).
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

/// Feature bit: the device complies with virtio 1.0 or later (bit 32).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: indirect descriptors (bit 28).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 =
    virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bit: `used_event`/`avail_event` notification suppression (bit 29).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Returns the feature mask with bit `bit` set (`bit` < 64).
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// How a device signals the driver. Implemented by the transport.
pub trait VirtioInterrupt: Send + Sync {
    /// Used-buffer notification for queue `queue_index`.
    fn trigger_queue(&self, queue_index: u16) -> io::Result<()>;
    /// Configuration-change notification.
    fn trigger_config(&self) -> io::Result<()>;
    /// The device hit an error it cannot recover from: the transport sets
    /// `DEVICE_NEEDS_RESET` in the device status and sends a
    /// configuration-change notification (virtio 1.2 §2.1.2).
    fn set_needs_reset(&self);
}

/// Everything a device needs to start serving its queues.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// One entry per queue the device declared, in order, configured by the
    /// driver. Queues whose `ready()` is false were not enabled by the
    /// driver and must not be used; ready queues were validated against
    /// guest memory (`Queue::is_valid`).
    pub queues: Vec<Queue>,
    /// Queue notification eventfds (clones of those the VMM registered as
    /// KVM ioeventfds), same order as `queues`.
    pub queue_evts: Vec<EventFd>,
    /// The interrupt to signal used buffers and configuration changes.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features the driver accepted (a subset of the offered features).
    pub acked_features: u64,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivateError {
    /// The context does not carry one queue and one eventfd per device queue.
    #[error(
        "expected {expected} queues and queue eventfds, got {queues} queues and {evts} eventfds"
    )]
    QueueCount {
        /// Queues the device declared.
        expected: usize,
        /// Queues passed.
        queues: usize,
        /// Eventfds passed.
        evts: usize,
    },
    /// A device-specific failure.
    #[error("device activation failed")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (e.g. [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    /// Every size is a power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (device-specific bits plus any
    /// transport-independent bits the device supports; the transport adds
    /// `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Reads `data.len()` bytes of configuration space at `offset`. Any
    /// offset and length are accepted: bytes outside the configuration
    /// space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes configuration space. Any offset and length are accepted;
    /// writes to read-only or non-existent fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device (the driver set `DRIVER_OK`).
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device and returns it to its initial state (the driver
    /// wrote 0 to the status register). Must not fail; problems are logged.
    fn reset(&mut self);
    /// Stops the device for VMM shutdown: like [`VirtioDevice::reset`], and
    /// makes everything written so far durable.
    fn shutdown(&mut self);
    /// Whether used-buffer notifications bypass [`VirtioInterrupt`]: a
    /// vhost-user back-end writes the interrupt eventfd (KVM irqfd) itself,
    /// so the transport never learns about them. While such a device runs,
    /// the transport reports a used-buffer notification as always pending,
    /// so that a driver that reads its interrupt status before scanning the
    /// rings (Linux's virtio-mmio does) still scans them. Default: `false`.
    fn notifies_used_buffers_directly(&self) -> bool {
        false
    }
}

/// Copies `data.len()` bytes of `config` starting at `offset` into `data`;
/// bytes past the end of `config` (or an offset beyond it) read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        if let (Some(dst), Some(src)) = (data.get_mut(..n), src.get(..n)) {
            dst.copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_config_bytes_bounds() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 2];
        read_config_bytes(&cfg, 1, &mut d);
        assert_eq!(d, [2, 3]);
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 4, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn feature_bits() {
        assert_eq!(feature(VIRTIO_F_VERSION_1), 1 << 32);
        assert_eq!(feature(VIRTIO_RING_F_EVENT_IDX), 1 << 29);
        assert_eq!(TYPE_BLOCK, 2);
    }
}

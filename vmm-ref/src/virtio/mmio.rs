//! virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).
//!
//! [`MmioTransport`] owns the register file and the device status state
//! machine and drives a [`VirtioDevice`]. Every access comes straight from
//! the guest and is validated: registers below 0x100 are 32-bit wide and
//! only aligned 4-byte accesses reach them (others read 0 / are ignored);
//! the configuration space from 0x100 accepts any width; a `QueueSel` that
//! names no queue makes queue registers read 0 and ignore writes.
//!
//! Queue notifications normally never reach this code: the VMM registers
//! each of [`MmioTransport::queue_evts`] as a KVM ioeventfd on
//! `base + 0x50` with datamatch = queue index. A `QueueNotify` write that
//! does reach userspace is forwarded to the same eventfd.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::virtio::device::{
    feature, ActivateContext, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::virtio::guest_warn;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version implemented (modern virtio-mmio).
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the driver.
pub const MMIO_VENDOR_ID: u32 = 0;
/// Size of the register window of one virtio-mmio device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
pub mod regs {
    /// Magic value "virt" (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Device version number, 2 (R).
    pub const VERSION: u64 = 0x004;
    /// Virtio subsystem device id (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// Virtio subsystem vendor id (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features, 32 bits selected by `DEVICE_FEATURES_SEL` (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Device feature word selection (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features, 32 bits selected by `DRIVER_FEATURES_SEL` (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Driver feature word selection (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue index selection (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum queue size of the selected queue (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Queue size chosen by the driver (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// Queue ready bit (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notifier (W), value = queue index.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (RW).
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits (W).
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits (W).
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits (W).
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits (W).
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Shared memory region selection (W).
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory region length, low 32 bits (R).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high 32 bits (R).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Shared memory region base, low 32 bits (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Shared memory region base, high 32 bits (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Configuration atomicity value (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest OS found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// The driver acknowledged the features it understands.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// `InterruptStatus` bit: a used buffer notification is pending.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: a configuration change notification is pending.
pub const INT_CONFIG: u32 = 2;

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MmioError {
    /// The device declares a different number of queues than eventfds were passed.
    #[error("device has {queues} queues but {evts} queue eventfds were passed")]
    QueueEvtCount {
        /// Queues of the device.
        queues: usize,
        /// Eventfds passed.
        evts: usize,
    },
    /// The device declared an invalid maximum queue size.
    #[error("queue {index}: invalid maximum size {size} (must be a power of two <= 32768)")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// Declared maximum size.
        size: u16,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
}

/// Interrupt state shared between the transport and the running device.
///
/// Sets bits in `InterruptStatus` and signals the irqfd the VMM registered
/// with KVM.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl MmioInterrupt {
    fn new(irq: EventFd) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    /// Sets `bit` in InterruptStatus and signals the irqfd if the bit was
    /// clear. While a bit is pending the driver has not run its interrupt
    /// handler yet (it reads InterruptStatus, acknowledges, then scans the
    /// rings), so a second injection would find nothing new: skipping it
    /// saves an eventfd write and an interrupt per completion batch.
    fn raise(&self, bit: u32) -> io::Result<()> {
        let prev = self.status.fetch_or(bit, Ordering::SeqCst);
        if prev & bit == 0 {
            self.irq.write(1)?;
        }
        Ok(())
    }

    /// Current `InterruptStatus` value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Whether the device reported an unrecoverable error since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger_queue(&self, _queue_index: u16) -> io::Result<()> {
        // One interrupt line per virtio-mmio device, shared by all queues.
        self.raise(INT_VRING)
    }

    fn trigger_config(&self) -> io::Result<()> {
        self.raise(INT_CONFIG)
    }

    fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.trigger_config() {
                log::error!("virtio-mmio: cannot signal DEVICE_NEEDS_RESET: {e}");
            }
        }
    }
}

/// A virtio-mmio version 2 transport around one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: Arc<MmioInterrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Builds a transport for `device`.
    ///
    /// `irq` is signalled for every interrupt (the VMM registers it as a KVM
    /// irqfd); `queue_evts` holds one eventfd per device queue (the VMM
    /// registers each as a KVM ioeventfd on `base + 0x50` with datamatch =
    /// queue index as u32). Keep clones (`EventFd::try_clone`) for the KVM
    /// registration, or use [`MmioTransport::irq_evt`] and
    /// [`MmioTransport::queue_evts`].
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        irq: EventFd,
        queue_evts: Vec<EventFd>,
    ) -> Result<MmioTransport, MmioError> {
        let sizes = device.queue_max_sizes();
        if sizes.len() != queue_evts.len() {
            return Err(MmioError::QueueEvtCount {
                queues: sizes.len(),
                evts: queue_evts.len(),
            });
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|source| MmioError::QueueMaxSize {
                    index,
                    size,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt::new(irq)),
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The interrupt eventfd (register it with KVM as an irqfd).
    pub fn irq_evt(&self) -> &EventFd {
        &self.interrupt.irq
    }

    /// The queue notification eventfds, by queue index (register each with
    /// KVM as an ioeventfd on `base + 0x50`, datamatch = index as u32).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device status as the driver reads it.
    pub fn device_status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device is running (activated and not reset since).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features offered to the driver: the device's plus `VIRTIO_F_VERSION_1`.
    pub fn offered_features(&self) -> u64 {
        self.device.avail_features() | feature(VIRTIO_F_VERSION_1)
    }

    /// Features the driver acknowledged so far.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Stops the device for VMM shutdown (see [`VirtioDevice::shutdown`]).
    pub fn shutdown(&mut self) {
        self.device.shutdown();
        self.activated = false;
    }

    /// Signals a configuration change to the driver (bumps ConfigGeneration).
    pub fn notify_config_change(&mut self) -> io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.trigger_config()
    }

    fn selected_queue(&self) -> Option<&Queue> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK
    /// (virtio 1.2 §3.1.1 step 7), and not once the driver failed.
    fn queue_config_allowed(&self) -> bool {
        let s = self.status;
        s & status::FEATURES_OK != 0 && s & (status::DRIVER_OK | status::FAILED) == 0
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => MMIO_VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            regs::INTERRUPT_STATUS => {
                let direct = self.activated && self.device.notifies_used_buffers_directly();
                self.interrupt.status() | if direct { INT_VRING } else { 0 }
            }
            regs::STATUS => self.device_status(),
            // No shared memory regions: "reading from a non-existent region
            // results in a length of -1".
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => self.write_driver_features(v),
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM => self.write_queue_num(v),
            regs::QUEUE_READY => {
                if self.queue_config_allowed() {
                    if let Some(q) = self.selected_queue_mut() {
                        q.set_ready(v == 1);
                    }
                } else {
                    guest_warn!("virtio-mmio: QueueReady write outside queue setup ignored");
                }
            }
            regs::QUEUE_NOTIFY => self.notify_queue(v),
            regs::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            regs::STATUS => self.write_status(v),
            regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH => self.write_queue_addr(offset, v),
            // Accepted; the device has no shared memory regions.
            regs::SHM_SEL => {}
            _ => guest_warn!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        let s = self.status;
        if s & status::DRIVER == 0 || s & (status::FEATURES_OK | status::FAILED) != 0 {
            guest_warn!("virtio-mmio: DriverFeatures write in status {s:#x} ignored");
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            sel => guest_warn!("virtio-mmio: DriverFeatures write with selector {sel} ignored"),
        }
    }

    fn write_queue_num(&mut self, v: u32) {
        if !self.queue_config_allowed() {
            guest_warn!("virtio-mmio: QueueNum write outside queue setup ignored");
            return;
        }
        let Some(q) = self.selected_queue_mut() else {
            return;
        };
        if q.ready() {
            guest_warn!("virtio-mmio: QueueNum write to a ready queue ignored");
            return;
        }
        match u16::try_from(v) {
            Ok(size) if size != 0 && size.is_power_of_two() && size <= q.max_size() => {
                q.set_size(size)
            }
            _ => guest_warn!("virtio-mmio: invalid QueueNum {v} ignored"),
        }
    }

    fn write_queue_addr(&mut self, offset: u64, v: u32) {
        if !self.queue_config_allowed() {
            guest_warn!("virtio-mmio: queue address write outside queue setup ignored");
            return;
        }
        let Some(q) = self.selected_queue_mut() else {
            return;
        };
        if q.ready() {
            guest_warn!("virtio-mmio: queue address write to a ready queue ignored");
            return;
        }
        // Alignment per virtio 1.2 §2.7 (descriptor table 16, available
        // ring 2, used ring 4); checked here so that virtio-queue does not
        // log on every misaligned guest write.
        let (align, lo, hi) = match offset {
            regs::QUEUE_DESC_LOW => (16, Some(v), None),
            regs::QUEUE_DESC_HIGH => (16, None, Some(v)),
            regs::QUEUE_AVAIL_LOW => (2, Some(v), None),
            regs::QUEUE_AVAIL_HIGH => (2, None, Some(v)),
            regs::QUEUE_USED_LOW => (4, Some(v), None),
            _ => (4, None, Some(v)),
        };
        if lo.is_some_and(|lo| lo % align != 0) {
            guest_warn!("virtio-mmio: misaligned queue address {v:#x} at {offset:#x} ignored");
            return;
        }
        match offset {
            regs::QUEUE_DESC_LOW | regs::QUEUE_DESC_HIGH => q.set_desc_table_address(lo, hi),
            regs::QUEUE_AVAIL_LOW | regs::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(lo, hi),
            _ => q.set_used_ring_address(lo, hi),
        }
    }

    fn notify_queue(&self, v: u32) {
        let evt = usize::try_from(v).ok().and_then(|i| self.queue_evts.get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::error!("virtio-mmio: cannot signal queue {v}: {e}");
                }
            }
            None => guest_warn!("virtio-mmio: QueueNotify for non-existent queue {v}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            guest_warn!(
                "virtio-mmio: status {v:#x} clears bits of {old:#x} without reset; ignored"
            );
            return;
        }
        let new_bits = v & !old;
        let allowed = status::ACKNOWLEDGE
            | status::DRIVER
            | status::FEATURES_OK
            | status::DRIVER_OK
            | status::FAILED;
        if new_bits & !allowed != 0 {
            guest_warn!("virtio-mmio: status {v:#x} sets device-owned bits; ignored");
            return;
        }
        if new_bits & status::FAILED != 0 {
            // The driver gave up; nothing else it asks for matters now.
            self.status |= status::FAILED;
            return;
        }
        if old & status::FAILED != 0 {
            guest_warn!("virtio-mmio: status write after FAILED ignored (reset first)");
            return;
        }
        // Each step of the initialization sequence requires the previous
        // one (virtio 1.2 §3.1.1).
        let prerequisite = [
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, needs) in prerequisite {
            if new_bits & bit != 0 && v & needs == 0 {
                guest_warn!("virtio-mmio: status {v:#x} out of order (from {old:#x}); ignored");
                return;
            }
        }
        let mut next = v;
        if new_bits & status::FEATURES_OK != 0 && !self.features_acceptable() {
            guest_warn!(
                "virtio-mmio: driver features {:#x} not acceptable (offered {:#x}); FEATURES_OK not set",
                self.acked_features,
                self.offered_features()
            );
            next &= !(status::FEATURES_OK | status::DRIVER_OK);
        }
        self.status = next;
        if new_bits & status::DRIVER_OK != 0 && next & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// FEATURES_OK is kept only for a subset of the offered features that
    /// includes VERSION_1 (this is not a legacy device).
    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.offered_features() == 0
            && self.acked_features & feature(VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        if self.interrupt.needs_reset() {
            return;
        }
        let event_idx = self.acked_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mem = self.mem.memory();
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(&*mem) {
                guest_warn!("virtio-mmio: queue {index} does not fit in guest memory");
                self.fail_device();
                return;
            }
            match Queue::try_from(q.state()) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    guest_warn!("virtio-mmio: queue {index} state invalid: {e}");
                    self.fail_device();
                    return;
                }
            }
        }
        let mut queue_evts = Vec::with_capacity(self.queue_evts.len());
        for evt in &self.queue_evts {
            match evt.try_clone() {
                Ok(e) => queue_evts.push(e),
                Err(e) => {
                    log::error!("virtio-mmio: cannot clone queue eventfd: {e}");
                    self.fail_device();
                    return;
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                // Rate-limited: a guest can retry activation in a loop.
                guest_warn!("virtio-mmio: device activation failed: {}", error_chain(&e));
                self.fail_device();
            }
        }
    }

    fn fail_device(&mut self) {
        self.interrupt.set_needs_reset();
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.interrupt.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// Formats an error with all its causes, `a: b: c`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            let off = offset - regs::CONFIG;
            self.device.read_config(off, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            guest_warn!(
                "virtio-mmio: {}-byte read at {offset:#x} (registers are aligned 32-bit)",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            if self.status & status::DRIVER == 0 || self.status & status::FAILED != 0 {
                guest_warn!(
                    "virtio-mmio: config write in status {:#x} ignored",
                    self.status
                );
                return;
            }
            self.device.write_config(offset - regs::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored (registers are 32-bit)",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            guest_warn!("virtio-mmio: misaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.activated {
            self.device.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use proptest::prelude::*;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::device::{read_config_bytes, ActivateError};

    const MEM_SIZE: usize = 0x10_0000;
    const FEAT_A: u64 = 1 << 3;
    const FEAT_B: u64 = 1 << 40;

    #[derive(Default)]
    struct MockState {
        config: Vec<u8>,
        activations: Vec<(u64, Vec<virtio_queue::QueueState>, usize)>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        resets: usize,
        shutdowns: usize,
        fail_activate: bool,
        /// Answer of `notifies_used_buffers_directly`.
        direct: bool,
    }

    struct MockDevice {
        sizes: Vec<u16>,
        state: Arc<Mutex<MockState>>,
    }

    impl VirtioDevice for MockDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            FEAT_A | FEAT_B | feature(VIRTIO_RING_F_EVENT_IDX)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.state.lock().unwrap().config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut st = self.state.lock().unwrap();
            let off = offset as usize;
            if let Some(dst) = st.config.get_mut(off..off + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            let mut st = self.state.lock().unwrap();
            if st.fail_activate {
                return Err(ActivateError::Device("mock failure".into()));
            }
            let qs = ctx.queues.iter().map(|q| q.state()).collect();
            st.activations
                .push((ctx.acked_features, qs, ctx.queue_evts.len()));
            st.interrupt = Some(ctx.interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            self.state.lock().unwrap().resets += 1;
        }
        fn shutdown(&mut self) {
            self.state.lock().unwrap().shutdowns += 1;
        }
        fn notifies_used_buffers_directly(&self) -> bool {
            self.state.lock().unwrap().direct
        }
    }

    fn mem() -> GuestMemoryAtomic<GuestMemoryMmap> {
        GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        )
    }

    fn transport(sizes: &[u16]) -> (MmioTransport, Arc<Mutex<MockState>>) {
        let state = Arc::new(Mutex::new(MockState {
            config: (0u8..16).collect(),
            ..Default::default()
        }));
        let dev = MockDevice {
            sizes: sizes.to_vec(),
            state: state.clone(),
        };
        let evts = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let t = MmioTransport::new(
            Box::new(dev),
            mem(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            evts,
        )
        .unwrap();
        (t, state)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn ack_features(t: &mut MmioTransport, f: u64) {
        wr(t, regs::DRIVER_FEATURES_SEL, 0);
        wr(t, regs::DRIVER_FEATURES, f as u32);
        wr(t, regs::DRIVER_FEATURES_SEL, 1);
        wr(t, regs::DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// Drives the device to FEATURES_OK with `f` acknowledged.
    fn negotiate(t: &mut MmioTransport, f: u64) {
        wr(t, regs::STATUS, status::ACKNOWLEDGE);
        wr(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        ack_features(t, f);
        wr(
            t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    const S_FEAT: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    const S_OK: u32 = S_FEAT | status::DRIVER_OK;

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        wr(t, regs::QUEUE_SEL, index);
        wr(t, regs::QUEUE_NUM, size);
        let desc = base;
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        for (lo, hi, a) in [
            (regs::QUEUE_DESC_LOW, regs::QUEUE_DESC_HIGH, desc),
            (regs::QUEUE_AVAIL_LOW, regs::QUEUE_AVAIL_HIGH, avail),
            (regs::QUEUE_USED_LOW, regs::QUEUE_USED_HIGH, used),
        ] {
            wr(t, lo, a as u32);
            wr(t, hi, (a >> 32) as u32);
        }
        wr(t, regs::QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport(&[16]);
        assert_eq!(rd(&mut t, regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, regs::VERSION), 2);
        assert_eq!(rd(&mut t, regs::DEVICE_ID), 2);
        assert_eq!(rd(&mut t, regs::VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(rd(&mut t, regs::SHM_LEN_LOW), u32::MAX);
        assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), 0);
        // Write-only register reads 0.
        assert_eq!(rd(&mut t, regs::QUEUE_NUM), 0);
    }

    #[test]
    fn new_rejects_mismatched_eventfds() {
        let dev = MockDevice {
            sizes: vec![16, 16],
            state: Arc::default(),
        };
        let err = MmioTransport::new(
            Box::new(dev),
            mem(),
            EventFd::new(0).unwrap(),
            vec![EventFd::new(0).unwrap()],
        )
        .err()
        .unwrap();
        assert!(matches!(
            err,
            MmioError::QueueEvtCount { queues: 2, evts: 1 }
        ));
        let dev = MockDevice {
            sizes: vec![3],
            state: Arc::default(),
        };
        let err = MmioTransport::new(
            Box::new(dev),
            mem(),
            EventFd::new(0).unwrap(),
            vec![EventFd::new(0).unwrap()],
        )
        .err()
        .unwrap();
        assert!(matches!(
            err,
            MmioError::QueueMaxSize {
                index: 0,
                size: 3,
                ..
            }
        ));
    }

    #[test]
    fn odd_sized_and_misaligned_register_access() {
        let (mut t, _) = transport(&[16]);
        let mut d = [0xffu8; 2];
        t.read(regs::MAGIC_VALUE, &mut d);
        assert_eq!(d, [0, 0]);
        let mut d = [0xffu8; 4];
        t.read(regs::MAGIC_VALUE + 1, &mut d);
        assert_eq!(d, [0; 4]);
        let mut d = [0xffu8; 8];
        t.read(regs::MAGIC_VALUE, &mut d);
        assert_eq!(d, [0; 8]);
        // Writes of the wrong size or alignment do nothing.
        t.write(regs::STATUS, &[1]);
        t.write(regs::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        t.write(regs::STATUS - 2, &[0, 0, 1, 0]);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        // Empty accesses and far offsets do not panic.
        t.read(0, &mut []);
        t.write(0, &[]);
        t.read(u64::MAX, &mut [0u8; 4]);
        t.write(u64::MAX - 1, &[1, 2, 3, 4]);
    }

    #[test]
    fn device_features_by_selector() {
        let (mut t, _) = transport(&[16]);
        let offered = FEAT_A | FEAT_B | feature(VIRTIO_RING_F_EVENT_IDX) | (1 << 32);
        wr(&mut t, regs::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), offered as u32);
        wr(&mut t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), (offered >> 32) as u32);
        wr(&mut t, regs::DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 0);
        assert_eq!(t.offered_features(), offered);
    }

    #[test]
    fn driver_features_only_in_feature_phase() {
        let (mut t, _) = transport(&[16]);
        // Before DRIVER: ignored.
        ack_features(&mut t, FEAT_A);
        assert_eq!(t.acked_features(), 0);
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        ack_features(&mut t, FEAT_A);
        assert_eq!(t.acked_features(), 0);
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        ack_features(&mut t, FEAT_A | (1 << 32));
        assert_eq!(t.acked_features(), FEAT_A | (1 << 32));
        // Selector beyond 1 is ignored.
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 7);
        wr(&mut t, regs::DRIVER_FEATURES, u32::MAX);
        assert_eq!(t.acked_features(), FEAT_A | (1 << 32));
        wr(&mut t, regs::STATUS, S_FEAT);
        assert_eq!(rd(&mut t, regs::STATUS), S_FEAT);
        // After FEATURES_OK: frozen.
        ack_features(&mut t, FEAT_B | (1 << 32));
        assert_eq!(t.acked_features(), FEAT_A | (1 << 32));
    }

    #[test]
    fn features_ok_requires_subset_and_version_1() {
        let (mut t, _) = transport(&[16]);
        negotiate(&mut t, FEAT_A); // no VERSION_1
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        wr(&mut t, regs::STATUS, 0);
        negotiate(&mut t, (1 << 32) | (1 << 7)); // bit 7 not offered
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        wr(&mut t, regs::STATUS, 0);
        negotiate(&mut t, (1 << 32) | FEAT_A | FEAT_B);
        assert_eq!(rd(&mut t, regs::STATUS), S_FEAT);
    }

    #[test]
    fn status_state_machine_rejects_bad_transitions() {
        let (mut t, st) = transport(&[16]);
        // DRIVER without ACKNOWLEDGE.
        wr(&mut t, regs::STATUS, status::DRIVER);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        // Skipping FEATURES_OK.
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(
            &mut t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // Clearing a bit without reset.
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // The driver cannot set DEVICE_NEEDS_RESET.
        wr(
            &mut t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
        );
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // FAILED sticks and blocks further progress until reset.
        wr(
            &mut t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
        );
        let failed = status::ACKNOWLEDGE | status::DRIVER | status::FAILED;
        assert_eq!(rd(&mut t, regs::STATUS), failed);
        ack_features(&mut t, 1 << 32);
        wr(&mut t, regs::STATUS, failed | status::FEATURES_OK);
        assert_eq!(rd(&mut t, regs::STATUS), failed);
        assert!(st.lock().unwrap().activations.is_empty());
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        // A full sequence in one write is in order and works.
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        ack_features(&mut t, 1 << 32);
        wr(&mut t, regs::STATUS, S_OK);
        assert_eq!(rd(&mut t, regs::STATUS), S_OK);
        assert_eq!(st.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn queue_select_out_of_range_is_harmless() {
        let (mut t, _) = transport(&[16, 8]);
        negotiate(&mut t, 1 << 32);
        for sel in [2, 100, u32::MAX] {
            wr(&mut t, regs::QUEUE_SEL, sel);
            assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 0);
            assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
            wr(&mut t, regs::QUEUE_NUM, 4);
            wr(&mut t, regs::QUEUE_DESC_LOW, 0x1000);
            wr(&mut t, regs::QUEUE_READY, 1);
            assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
            wr(&mut t, regs::QUEUE_NOTIFY, sel);
        }
        wr(&mut t, regs::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 8);
        wr(&mut t, regs::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 16);
    }

    #[test]
    fn queue_num_must_be_power_of_two_within_max() {
        let (mut t, st) = transport(&[16]);
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 8, 0x1000);
        // Now try invalid sizes on a fresh (reset) device.
        wr(&mut t, regs::STATUS, S_OK);
        assert_eq!(st.lock().unwrap().activations[0].1[0].size, 8);
        wr(&mut t, regs::STATUS, 0);
        negotiate(&mut t, 1 << 32);
        wr(&mut t, regs::QUEUE_SEL, 0);
        for bad in [0, 3, 12, 32, 0x1_0000 + 4] {
            wr(&mut t, regs::QUEUE_NUM, bad);
        }
        wr(&mut t, regs::STATUS, S_OK);
        // Unchanged: the maximum (default) size.
        assert_eq!(st.lock().unwrap().activations[1].1[0].size, 16);
    }

    #[test]
    fn queue_registers_only_during_queue_setup() {
        let (mut t, st) = transport(&[16]);
        // Before FEATURES_OK: ignored.
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, regs::QUEUE_SEL, 0);
        wr(&mut t, regs::QUEUE_NUM, 4);
        wr(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        ack_features(&mut t, 1 << 32);
        wr(&mut t, regs::STATUS, S_FEAT);
        setup_queue(&mut t, 0, 4, 0x2000);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 1);
        // While ready: address and size writes are ignored.
        wr(&mut t, regs::QUEUE_DESC_LOW, 0x8000);
        wr(&mut t, regs::QUEUE_NUM, 2);
        wr(&mut t, regs::STATUS, S_OK);
        let q = st.lock().unwrap().activations[0].1[0];
        assert_eq!(q.desc_table, 0x2000);
        assert_eq!(q.size, 4);
        assert!(q.ready);
        // After DRIVER_OK: ignored.
        wr(&mut t, regs::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 1);
    }

    #[test]
    fn misaligned_queue_addresses_are_ignored() {
        let (mut t, st) = transport(&[16]);
        negotiate(&mut t, 1 << 32);
        wr(&mut t, regs::QUEUE_SEL, 0);
        wr(&mut t, regs::QUEUE_DESC_LOW, 0x1008);
        wr(&mut t, regs::QUEUE_AVAIL_LOW, 0x2001);
        wr(&mut t, regs::QUEUE_USED_LOW, 0x3002);
        wr(&mut t, regs::QUEUE_DESC_LOW, 0x1010);
        wr(&mut t, regs::QUEUE_AVAIL_LOW, 0x2002);
        wr(&mut t, regs::QUEUE_USED_LOW, 0x3004);
        wr(&mut t, regs::STATUS, S_OK);
        let q = st.lock().unwrap().activations[0].1[0];
        assert_eq!(
            (q.desc_table, q.avail_ring, q.used_ring),
            (0x1010, 0x2002, 0x3004)
        );
    }

    #[test]
    fn driver_ok_activates_with_validated_queues() {
        let (mut t, st) = transport(&[16, 16, 16]);
        let f = (1 << 32) | FEAT_B | feature(VIRTIO_RING_F_EVENT_IDX);
        negotiate(&mut t, f);
        setup_queue(&mut t, 0, 16, 0x1000);
        setup_queue(&mut t, 2, 8, 0x4000);
        assert!(!t.is_activated());
        wr(&mut t, regs::STATUS, S_OK);
        assert!(t.is_activated());
        assert_eq!(rd(&mut t, regs::STATUS), S_OK);
        let s = st.lock().unwrap();
        let (acked, qs, nevts) = &s.activations[0];
        assert_eq!(*acked, f);
        assert_eq!(*nevts, 3);
        assert!(qs[0].ready && !qs[1].ready && qs[2].ready);
        assert!(qs[0].event_idx_enabled);
        assert_eq!((qs[2].size, qs[2].desc_table), (8, 0x4000));
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let (mut t, st) = transport(&[16]);
        negotiate(&mut t, 1 << 32);
        // Descriptor table beyond guest memory.
        setup_queue(&mut t, 0, 16, MEM_SIZE as u64 - 0x40);
        wr(&mut t, regs::STATUS, S_OK);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, regs::STATUS), S_OK | status::DEVICE_NEEDS_RESET);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(t.irq_evt().read().unwrap(), 1);
        assert!(st.lock().unwrap().activations.is_empty());
        // Reset clears everything and the device can be set up again.
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 16, 0x1000);
        wr(&mut t, regs::STATUS, S_OK);
        assert!(t.is_activated());
    }

    #[test]
    fn device_activation_failure_sets_needs_reset() {
        let (mut t, st) = transport(&[16]);
        st.lock().unwrap().fail_activate = true;
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 16, 0x1000);
        wr(&mut t, regs::STATUS, S_OK);
        assert!(!t.is_activated());
        assert_eq!(
            rd(&mut t, regs::STATUS) & status::DEVICE_NEEDS_RESET,
            status::DEVICE_NEEDS_RESET
        );
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_CONFIG);
        // No reset callback for a device that never ran.
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(st.lock().unwrap().resets, 0);
    }

    #[test]
    fn reset_returns_everything_to_initial_state() {
        let (mut t, st) = transport(&[16]);
        negotiate(&mut t, (1 << 32) | FEAT_A);
        setup_queue(&mut t, 0, 4, 0x1000);
        wr(&mut t, regs::STATUS, S_OK);
        let intr = st.lock().unwrap().interrupt.clone().unwrap();
        intr.trigger_queue(0).unwrap();
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_VRING);
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(st.lock().unwrap().resets, 1);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
        assert_eq!(t.acked_features(), 0);
        wr(&mut t, regs::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        // The queue came back with its maximum size and no addresses.
        negotiate(&mut t, 1 << 32);
        wr(&mut t, regs::QUEUE_READY, 1);
        wr(&mut t, regs::STATUS, S_OK);
        let s = st.lock().unwrap();
        let q = s.activations[1].1[0];
        assert_eq!((q.size, q.desc_table, q.next_avail), (16, 0, 0));
    }

    #[test]
    fn direct_notifications_keep_vring_pending_while_running() {
        let (mut t, st) = transport(&[16]);
        st.lock().unwrap().direct = true;
        negotiate(&mut t, 1 << 32);
        // Not running yet: nothing pending.
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
        wr(&mut t, regs::STATUS, S_OK);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_VRING);
        // An acknowledgement cannot clear what the back-end signals itself.
        wr(&mut t, regs::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_VRING);
        // Configuration changes still come and go through the transport.
        let intr = st.lock().unwrap().interrupt.clone().unwrap();
        intr.trigger_config().unwrap();
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        wr(&mut t, regs::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_VRING);
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn interrupts_and_ack() {
        let (mut t, st) = transport(&[16]);
        negotiate(&mut t, 1 << 32);
        wr(&mut t, regs::STATUS, S_OK);
        let intr = st.lock().unwrap().interrupt.clone().unwrap();
        intr.trigger_queue(0).unwrap();
        intr.trigger_queue(0).unwrap(); // already pending: no second injection
        intr.trigger_config().unwrap();
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        assert_eq!(t.irq_evt().read().unwrap(), 2);
        // Once acknowledged, the next notification injects again.
        wr(&mut t, regs::INTERRUPT_ACK, INT_VRING);
        intr.trigger_queue(0).unwrap();
        assert_eq!(t.irq_evt().read().unwrap(), 1);
        wr(&mut t, regs::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_CONFIG);
        wr(&mut t, regs::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
        // A device error after activation: NEEDS_RESET + one config interrupt.
        intr.set_needs_reset();
        intr.set_needs_reset();
        assert_eq!(rd(&mut t, regs::STATUS), S_OK | status::DEVICE_NEEDS_RESET);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(t.irq_evt().read().unwrap(), 1);
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
    }

    #[test]
    fn queue_notify_reaching_userspace_signals_eventfd() {
        let (mut t, _) = transport(&[16, 16]);
        wr(&mut t, regs::QUEUE_NOTIFY, 1);
        wr(&mut t, regs::QUEUE_NOTIFY, 1);
        wr(&mut t, regs::QUEUE_NOTIFY, 5);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 2);
        assert!(t.queue_evts()[0].read().is_err()); // EAGAIN: nothing pending
    }

    #[test]
    fn config_space_access() {
        let (mut t, st) = transport(&[16]);
        let mut b = [0u8; 1];
        t.read(regs::CONFIG + 5, &mut b);
        assert_eq!(b, [5]);
        let mut d = [0u8; 8];
        t.read(regs::CONFIG + 12, &mut d);
        assert_eq!(d, [12, 13, 14, 15, 0, 0, 0, 0]);
        // Writes before DRIVER are ignored.
        t.write(regs::CONFIG, &[0xaa, 0xbb]);
        assert_eq!(st.lock().unwrap().config[0], 0);
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        t.write(regs::CONFIG, &[0xaa, 0xbb]);
        assert_eq!(st.lock().unwrap().config[..2], [0xaa, 0xbb]);
        assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), 0);
        t.notify_config_change().unwrap();
        assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), 1);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_CONFIG);
    }

    #[test]
    fn shutdown_and_drop_stop_an_active_device() {
        let (mut t, st) = transport(&[16]);
        negotiate(&mut t, 1 << 32);
        wr(&mut t, regs::STATUS, S_OK);
        t.shutdown();
        assert_eq!(st.lock().unwrap().shutdowns, 1);
        assert!(!t.is_activated());
        drop(t);
        assert_eq!(st.lock().unwrap().shutdowns, 1);
        let (mut t, st) = transport(&[16]);
        negotiate(&mut t, 1 << 32);
        wr(&mut t, regs::STATUS, S_OK);
        drop(t);
        assert_eq!(st.lock().unwrap().shutdowns, 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Read(u16, u8),
        Write(u16, u8, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        let off = prop_oneof![
            (0u16..0x40).prop_map(|x| x * 4),
            0u16..0x200,
            Just(regs::STATUS as u16),
            Just(regs::QUEUE_SEL as u16),
        ];
        let size = prop_oneof![Just(4u8), 1u8..=8];
        let val = prop_oneof![
            0u32..16,
            any::<u32>(),
            Just(1 << 0),
            Just(S_OK),
            Just(S_FEAT)
        ];
        prop_oneof![
            (off.clone(), size.clone()).prop_map(|(o, s)| Op::Read(o, s)),
            (off, size, val).prop_map(|(o, s, v)| Op::Write(o, s, v)),
        ]
    }

    proptest! {
        /// Arbitrary register traffic never panics and keeps the state
        /// machine's invariants.
        #[test]
        fn arbitrary_accesses_keep_invariants(ops in proptest::collection::vec(op(), 1..200)) {
            let (mut t, st) = transport(&[16, 4]);
            for op in ops {
                match op {
                    Op::Read(o, s) => {
                        let mut d = vec![0u8; s as usize];
                        t.read(u64::from(o), &mut d);
                    }
                    Op::Write(o, s, v) => {
                        let bytes = u64::from(v).to_le_bytes();
                        t.write(u64::from(o), &bytes[..s as usize]);
                    }
                }
                let s = t.device_status();
                if s & status::FEATURES_OK != 0 {
                    prop_assert_eq!(t.acked_features() & !t.offered_features(), 0);
                    prop_assert!(t.acked_features() & (1 << 32) != 0);
                }
                if s & status::DRIVER_OK != 0 {
                    prop_assert!(s & status::FEATURES_OK != 0);
                }
                if t.is_activated() {
                    prop_assert!(s & status::DRIVER_OK != 0);
                }
            }
            let s = st.lock().unwrap();
            prop_assert!(s.resets <= s.activations.len());
        }
    }
}

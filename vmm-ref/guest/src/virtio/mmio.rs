//! virtio-mmio version 2 register access.
//!
//! Every access is a VM exit, so only the notification register is touched
//! on the I/O path; everything else is set-up.

use core::ptr;

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Smallest register window we accept (registers + some config space).
pub const MIN_WINDOW: u64 = 0x200;

/// Guest-physical addresses of one split virtqueue's three parts.
#[derive(Clone, Copy, Debug)]
pub struct QueueAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Driver area (avail ring).
    pub driver: u64,
    /// Device area (used ring).
    pub device: u64,
}

/// One virtio-mmio register window.
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    base: usize,
}

impl Transport {
    /// Wraps the window at `base`.
    ///
    /// # Safety
    /// `base` must be the identity-mapped address of a virtio-mmio register
    /// window (or unassigned MMIO space) of at least [`MIN_WINDOW`] bytes that
    /// nothing else in the guest accesses.
    pub unsafe fn new(base: u64) -> Self {
        Self {
            base: base as usize,
        }
    }

    /// Physical base address.
    pub fn base(&self) -> u64 {
        self.base as u64
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `new`'s contract: base..base+MIN_WINDOW is our MMIO window,
        // and all offsets used here are below MIN_WINDOW and 4-byte aligned.
        unsafe { ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as for `read`.
        unsafe { ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    /// Magic value register.
    pub fn magic(&self) -> u32 {
        self.read(MAGIC)
    }

    /// Transport version (2 for virtio 1.x, 1 for legacy).
    pub fn version(&self) -> u32 {
        self.read(VERSION)
    }

    /// Device type (0 = no device, 2 = block).
    pub fn device_id(&self) -> u32 {
        self.read(DEVICE_ID)
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    /// Writes the device status register (0 resets the device).
    pub fn set_status(&self, status: u32) {
        self.write(STATUS, status)
    }

    /// All 64 device feature bits.
    pub fn device_features(&self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Writes the 64 driver feature bits.
    pub fn set_driver_features(&self, features: u64) {
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, features as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Selects queue `index` and returns its maximum size (0 = absent).
    pub fn select_queue(&self, index: u16) -> u16 {
        self.write(QUEUE_SEL, u32::from(index));
        self.read(QUEUE_NUM_MAX).min(u32::from(u16::MAX)) as u16
    }

    /// Ready bit of the selected queue.
    pub fn queue_ready(&self) -> bool {
        self.read(QUEUE_READY) != 0
    }

    /// Configures the selected queue and sets it ready.
    pub fn setup_queue(&self, size: u16, addrs: QueueAddrs) {
        self.write(QUEUE_NUM, u32::from(size));
        for (offset, addr) in [
            (QUEUE_DESC_LOW, addrs.desc),
            (QUEUE_DRIVER_LOW, addrs.driver),
            (QUEUE_DEVICE_LOW, addrs.device),
        ] {
            self.write(offset, addr as u32);
            self.write(offset + 4, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
    }

    /// Notifies the device that queue `index` has new buffers.
    pub fn notify(&self, index: u16) {
        self.write(QUEUE_NOTIFY, u32::from(index))
    }

    /// Runs `read` until the config generation is the same before and after
    /// (bounded: a device whose generation never settles gets the last read).
    fn config_stable<T>(&self, read: impl Fn() -> T) -> T {
        let mut tries = 0;
        loop {
            let generation = self.read(CONFIG_GENERATION);
            let value = read();
            tries += 1;
            if self.read(CONFIG_GENERATION) == generation || tries == 16 {
                return value;
            }
        }
    }

    /// Device config little-endian u16 at `offset` (2-byte aligned).
    pub fn config_u16(&self, offset: usize) -> u16 {
        // SAFETY: config space lies within the window; callers pass offsets of
        // the block config (< 0x40), well below MIN_WINDOW - CONFIG, and the
        // access is naturally aligned.
        self.config_stable(|| unsafe {
            ptr::read_volatile((self.base + CONFIG + offset) as *const u16)
        })
    }

    /// Device config little-endian u32 at `offset` (4-byte aligned).
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.config_stable(|| self.read(CONFIG + offset))
    }

    /// Device config little-endian u64 at `offset`, read as two 32-bit halves.
    pub fn config_u64(&self, offset: usize) -> u64 {
        self.config_stable(|| {
            u64::from(self.read(CONFIG + offset)) | u64::from(self.read(CONFIG + offset + 4)) << 32
        })
    }
}

//! virtio-blk driver over virtio-mmio: initialisation, feature negotiation,
//! configuration, and the queues (request handling is in [`request`]).

pub mod request;

use core::fmt;

use crate::mem::{Arena, OutOfMemory};
use crate::tsc::Deadline;
use crate::virtio::mmio::{Transport, MAGIC_VALUE};
use crate::virtio::queue::{Discipline, QueueFull, SplitQueue, MAX_SIZE};
use crate::virtio::{status, F_EVENT_IDX, F_VERSION_1};

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub mod feature {
    /// `VIRTIO_BLK_F_SIZE_MAX`.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `VIRTIO_BLK_F_SEG_MAX`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// `VIRTIO_BLK_F_RO`.
    pub const RO: u64 = 1 << 5;
    /// `VIRTIO_BLK_F_BLK_SIZE`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// `VIRTIO_BLK_F_FLUSH`.
    pub const FLUSH: u64 = 1 << 9;
    /// `VIRTIO_BLK_F_MQ`.
    pub const MQ: u64 = 1 << 12;
    /// `VIRTIO_BLK_F_DISCARD`.
    pub const DISCARD: u64 = 1 << 13;
    /// `VIRTIO_BLK_F_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Features we accept when offered.
const WANTED: u64 = F_VERSION_1
    | F_EVENT_IDX
    | feature::SIZE_MAX
    | feature::SEG_MAX
    | feature::RO
    | feature::BLK_SIZE
    | feature::FLUSH
    | feature::MQ
    | feature::DISCARD
    | feature::WRITE_ZEROES;

/// virtio device ID of a block device.
const DEVICE_ID_BLOCK: u32 = 2;
/// Most queues we drive.
pub const MAX_QUEUES: usize = 16;
/// Largest queue of the [`Discipline::Fixed`] driver profile.
pub const FIXED_MAX_QUEUE_SIZE: u16 = 128;
/// How long a reset may take to read back as 0.
const RESET_TIMEOUT_US: u64 = 1_000_000;

/// Offsets in the block device config space.
mod cfg {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
}

/// The block device's configuration (fields of non-negotiated features are 0).
#[derive(Clone, Copy, Debug, Default)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment (SIZE_MAX).
    pub size_max: u32,
    /// Most data segments per request (SEG_MAX).
    pub seg_max: u32,
    /// Logical block size (BLK_SIZE).
    pub blk_size: u32,
    /// Request queues (1 without MQ).
    pub num_queues: u16,
    /// DISCARD limits.
    pub max_discard_sectors: u32,
    /// DISCARD segments per request.
    pub max_discard_seg: u32,
    /// DISCARD alignment in sectors.
    pub discard_sector_alignment: u32,
    /// WRITE_ZEROES limits.
    pub max_write_zeroes_sectors: u32,
    /// WRITE_ZEROES segments per request.
    pub max_write_zeroes_seg: u32,
}

/// Driver errors.
#[derive(Debug)]
pub enum BlkError {
    /// No virtio magic at the address.
    BadMagic(u32),
    /// A legacy (version 1) transport: QEMU needs `-global virtio-mmio.force-legacy=false`.
    Legacy(u32),
    /// Not a block device.
    NotBlock(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device cleared FEATURES_OK.
    FeaturesRejected(u64),
    /// Reset did not complete (status never read back as 0).
    ResetStuck(u32),
    /// Queue `0` reports size 0 or is already live before set-up.
    QueueUnavailable(u16),
    /// More queues than memory was set aside for at the first initialisation.
    TooManyQueues(u16),
    /// No such queue on this device.
    NoQueue(usize),
    /// Not enough free descriptors.
    QueueFull,
    /// Guest memory exhausted (bytes requested).
    OutOfMemory(u64),
    /// The device set NEEDS_RESET.
    NeedsReset,
    /// Requests did not complete in time.
    Timeout,
    /// A request buffer is too small for the operation.
    BufferTooSmall,
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "no virtio-mmio magic (read {m:#x})"),
            Self::Legacy(v) => write!(f, "legacy virtio-mmio version {v} (need 2; QEMU: -global virtio-mmio.force-legacy=false)"),
            Self::NotBlock(id) => write!(f, "device id {id} is not a block device"),
            Self::NoVersion1 => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            Self::FeaturesRejected(feat) => write!(f, "device rejected features {feat:#x}"),
            Self::ResetStuck(s) => write!(f, "reset did not complete (status {s:#x})"),
            Self::QueueUnavailable(q) => write!(f, "queue {q} unavailable"),
            Self::TooManyQueues(n) => write!(f, "device now has {n} queues, more than at first initialisation"),
            Self::NoQueue(q) => write!(f, "no queue {q}"),
            Self::QueueFull => write!(f, "queue full"),
            Self::OutOfMemory(size) => write!(f, "out of guest memory ({size} bytes requested)"),
            Self::NeedsReset => write!(f, "device needs reset"),
            Self::Timeout => write!(f, "requests timed out"),
            Self::BufferTooSmall => write!(f, "request buffer too small"),
        }
    }
}

impl From<QueueFull> for BlkError {
    fn from(_: QueueFull) -> Self {
        Self::QueueFull
    }
}

impl From<OutOfMemory> for BlkError {
    fn from(e: OutOfMemory) -> Self {
        Self::OutOfMemory(e.size)
    }
}

/// One virtio-blk device.
pub struct BlkDevice {
    transport: Transport,
    /// Features we accept (a subset of `WANTED`).
    accepted: u64,
    features: u64,
    config: BlkConfig,
    queues: [Option<&'static mut SplitQueue>; MAX_QUEUES],
    nr_queues: usize,
    discipline: Discipline,
}

impl BlkDevice {
    /// Probes the transport; `Ok(None)` for an empty slot (device id 0).
    /// `event_idx` says whether VIRTIO_F_EVENT_IDX may be negotiated.
    pub fn probe(transport: Transport, event_idx: bool) -> Result<Option<Self>, BlkError> {
        let magic = transport.magic();
        if magic != MAGIC_VALUE {
            return Err(BlkError::BadMagic(magic));
        }
        let version = transport.version();
        if version != 2 {
            return Err(BlkError::Legacy(version));
        }
        match transport.device_id() {
            0 => Ok(None),
            DEVICE_ID_BLOCK => Ok(Some(Self {
                transport,
                accepted: if event_idx {
                    WANTED
                } else {
                    WANTED & !F_EVENT_IDX
                },
                features: 0,
                config: BlkConfig::default(),
                queues: Default::default(),
                nr_queues: 0,
                discipline: Discipline::Ours,
            })),
            other => Err(BlkError::NotBlock(other)),
        }
    }

    /// Selects the driver discipline of the queues from the next
    /// [`BlkDevice::init`] on; [`Discipline::Fixed`] also caps the queue
    /// size at [`FIXED_MAX_QUEUE_SIZE`].
    pub fn set_discipline(&mut self, discipline: Discipline) {
        self.discipline = discipline;
    }

    /// The transport.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether all of `bits` were negotiated.
    pub fn has(&self, bits: u64) -> bool {
        self.features & bits == bits
    }

    /// Device configuration read at the last initialisation.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Number of queues in use.
    pub fn nr_queues(&self) -> usize {
        self.nr_queues
    }

    /// Queue `q`.
    pub fn queue(&mut self, q: usize) -> Result<&mut SplitQueue, BlkError> {
        match self.queues.get_mut(q) {
            Some(Some(queue)) if q < self.nr_queues => Ok(queue),
            _ => Err(BlkError::NoQueue(q)),
        }
    }

    /// Size of the queues (all queues get the same size).
    pub fn queue_size(&self) -> u16 {
        self.queues[0].as_ref().map_or(0, |q| q.size())
    }

    /// Total notifications sent over all queues.
    pub fn kicks(&self) -> u64 {
        self.queues.iter().flatten().map(|q| q.kicks).sum()
    }

    /// Whether the device has set NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.transport.status() & status::NEEDS_RESET != 0
    }

    /// Resets the device (status 0) and waits until it reads back 0.
    pub fn reset(&mut self) -> Result<(), BlkError> {
        self.transport.set_status(0);
        let deadline = Deadline::after_us(RESET_TIMEOUT_US);
        loop {
            let s = self.transport.status();
            if s == 0 {
                return Ok(());
            }
            if deadline.passed() {
                return Err(BlkError::ResetStuck(s));
            }
        }
    }

    /// Full initialisation (virtio 1.2, 3.1.1): reset, ACKNOWLEDGE, DRIVER,
    /// feature negotiation, FEATURES_OK check, config, all queues, DRIVER_OK.
    /// Queue memory is allocated from `arena` at the first call and reused
    /// afterwards.
    pub fn init(&mut self, arena: &mut Arena) -> Result<(), BlkError> {
        self.reset()?;
        let t = self.transport;
        t.set_status(status::ACKNOWLEDGE);
        t.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = t.device_features();
        if offered & F_VERSION_1 == 0 {
            t.set_status(status::FAILED);
            return Err(BlkError::NoVersion1);
        }
        let features = offered & self.accepted;
        t.set_driver_features(features);
        let mut s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        t.set_status(s);
        if t.status() & status::FEATURES_OK == 0 {
            t.set_status(status::FAILED);
            return Err(BlkError::FeaturesRejected(features));
        }
        self.features = features;
        self.config = self.read_config();

        let wanted_queues = usize::from(self.config.num_queues).clamp(1, MAX_QUEUES);
        let allocated = self.queues.iter().filter(|q| q.is_some()).count();
        if allocated != 0 && wanted_queues > allocated {
            t.set_status(status::FAILED);
            return Err(BlkError::TooManyQueues(self.config.num_queues));
        }
        for index in 0..wanted_queues {
            if self.queues[index].is_none() {
                let queue = SplitQueue::new(arena, index as u16)?;
                self.queues[index] = Some(arena.boxed(queue)?);
            }
            let max = t.select_queue(index as u16);
            if max == 0 || t.queue_ready() {
                t.set_status(status::FAILED);
                return Err(BlkError::QueueUnavailable(index as u16));
            }
            // Split rings index modulo the size: use a power of two.
            let limit = match self.discipline {
                Discipline::Ours => MAX_SIZE,
                Discipline::Fixed => FIXED_MAX_QUEUE_SIZE,
            };
            let size: u16 = 1 << (15 - max.min(limit).leading_zeros());
            let queue = self.queues[index]
                .as_deref_mut()
                .ok_or(BlkError::NoQueue(index))?;
            queue.reset(size, features & F_EVENT_IDX != 0, self.discipline);
            t.setup_queue(size, queue.addrs());
        }
        self.nr_queues = wanted_queues;
        s |= status::DRIVER_OK;
        t.set_status(s);
        Ok(())
    }

    fn read_config(&self) -> BlkConfig {
        let t = &self.transport;
        let has = |bit| self.features & bit != 0;
        let mut c = BlkConfig {
            capacity: t.config_u64(cfg::CAPACITY),
            num_queues: 1,
            ..BlkConfig::default()
        };
        if has(feature::SIZE_MAX) {
            c.size_max = t.config_u32(cfg::SIZE_MAX);
        }
        if has(feature::SEG_MAX) {
            c.seg_max = t.config_u32(cfg::SEG_MAX);
        }
        if has(feature::BLK_SIZE) {
            c.blk_size = t.config_u32(cfg::BLK_SIZE);
        }
        if has(feature::MQ) {
            c.num_queues = t.config_u16(cfg::NUM_QUEUES).max(1);
        }
        if has(feature::DISCARD) {
            c.max_discard_sectors = t.config_u32(cfg::MAX_DISCARD_SECTORS);
            c.max_discard_seg = t.config_u32(cfg::MAX_DISCARD_SEG);
            c.discard_sector_alignment = t.config_u32(cfg::DISCARD_SECTOR_ALIGNMENT);
        }
        if has(feature::WRITE_ZEROES) {
            c.max_write_zeroes_sectors = t.config_u32(cfg::MAX_WRITE_ZEROES_SECTORS);
            c.max_write_zeroes_seg = t.config_u32(cfg::MAX_WRITE_ZEROES_SEG);
        }
        c
    }
}

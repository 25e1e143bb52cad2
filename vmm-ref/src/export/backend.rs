//! The vhost-user back-end protocol state of one export: features, memory
//! table, vrings and configuration space, driving a [`VirtioDevice`].
//!
//! This is a vhost-user *transport* for the same device model the
//! virtio-mmio transport drives: the device never sees protocol messages, it
//! is activated with an [`ActivateContext`] (guest memory mapped from the
//! front-end's fds, queues translated to guest-physical addresses, the kick
//! eventfds and a [`VringSignals`] interrupt over the call eventfds) and
//! serves its queues on its IOThreads exactly as under virtio-mmio.
//!
//! Vhost-user starts and stops rings one by one (a ring runs once it has a
//! kick fd and is enabled, and stops on `GET_VRING_BASE`), while a virtio
//! device is activated and reset as a whole. Whenever the set of running
//! rings changes, the device is therefore reset (which drains in-flight
//! requests) and, if any ring still runs, activated again with the new set.
//! A stopped ring resumes at its used index, which equals its last
//! available index once the device has drained.
//!
//! Everything here runs on the export's protocol thread; nothing the
//! front-end sends can panic it: indices are checked, addresses translated
//! with overflow checks, rings validated against guest memory before use.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{into_eventfd, EventFdError, VringSignals};
use super::memory::{self, AddressTable, MemoryError};
use crate::error_chain;
use crate::virtio::device::{feature, ActivateContext, VirtioDevice, VIRTIO_F_VERSION_1};

/// Size of the virtio-blk configuration space (`struct virtio_blk_config`,
/// virtio 1.2 §5.2.4, up to and including `zeroes_may_unmap`/padding).
pub const VIRTIO_BLK_CONFIG_SIZE: u32 = 60;

/// Protocol features offered (REPLY_ACK is added by the `vhost` crate).
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// A request the back-end refused. Reported to the front-end as a NACK
/// (when it asked for REPLY_ACK) and logged; the connection stays up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// A vring index beyond the export's queues.
    #[error("vring {index} does not exist ({num_queues} queues)")]
    BadIndex {
        /// Index sent.
        index: u32,
        /// Queues of the export.
        num_queues: usize,
    },
    /// A queue size that is zero, not a power of two or above the maximum.
    #[error("vring {index}: invalid size {num} (power of two up to {max})")]
    BadSize {
        /// Vring index.
        index: usize,
        /// Size sent.
        num: u32,
        /// Largest size supported.
        max: u16,
    },
    /// A vring base beyond 16 bits (split rings only).
    #[error("vring {index}: invalid base {base}")]
    BadBase {
        /// Vring index.
        index: usize,
        /// Base sent.
        base: u32,
    },
    /// A vring address outside the memory table.
    #[error(
        "vring {index}: {what} at front-end address {uaddr:#x} (+{len:#x}) is outside guest memory"
    )]
    BadRingAddress {
        /// Vring index.
        index: usize,
        /// "descriptor table", "available ring" or "used ring".
        what: &'static str,
        /// Front-end virtual address.
        uaddr: u64,
        /// Bytes the structure occupies.
        len: u64,
    },
    /// The ring layout is misaligned or not inside guest memory as a whole.
    #[error("vring {index}: ring layout not valid in guest memory")]
    InvalidRing {
        /// Vring index.
        index: usize,
    },
    /// A ring was started before its size and addresses were set.
    #[error("vring {index}: kick before size and addresses were set")]
    Unconfigured {
        /// Vring index.
        index: usize,
    },
    /// A request that needs a memory table came first.
    #[error("no memory table yet")]
    NoMemory,
    /// `VHOST_USER_VRING_NOFD_MASK` kicks (front-end polling) are not supported.
    #[error("vring {index}: polling mode (no kick fd) is not supported")]
    NoKickFd {
        /// Vring index.
        index: usize,
    },
    /// A kick, call or err fd that is not an eventfd.
    #[error("vring {index}: bad {what} fd")]
    BadFd {
        /// Vring index.
        index: usize,
        /// "kick", "call" or "err".
        what: &'static str,
        /// The cause.
        #[source]
        source: EventFdError,
    },
    /// Duplicating a kick eventfd (or creating a placeholder) failed.
    #[error("vring {index}: cannot prepare its kick eventfd")]
    EventFd {
        /// Vring index.
        index: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Features that were not offered.
    #[error("features {acked:#x} include bits never offered ({offered:#x})")]
    BadFeatures {
        /// Features acked.
        acked: u64,
        /// Features offered.
        offered: u64,
    },
    /// Features changed while rings run.
    #[error("features cannot change while rings run")]
    FeaturesWhileRunning,
    /// A configuration-space access outside the configuration space.
    #[error("config access at {offset} size {size} outside the {limit}-byte configuration space")]
    ConfigRange {
        /// Offset requested.
        offset: u32,
        /// Size requested.
        size: u32,
        /// Configuration space size.
        limit: u32,
    },
    /// The memory table was refused.
    #[error("memory table refused")]
    Memory(#[source] MemoryError),
    /// The device could not be activated with the running rings.
    #[error("device activation failed")]
    Activate(#[source] crate::virtio::device::ActivateError),
    /// The device's queue could not be created.
    #[error("vring {index}: cannot create the queue")]
    Queue {
        /// Vring index.
        index: usize,
        /// The cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// A request this back-end does not implement.
    #[error("{0} is not supported")]
    Unsupported(&'static str),
}

impl From<RequestError> for VuError {
    fn from(e: RequestError) -> Self {
        VuError::ReqHandlerError(io::Error::other(e))
    }
}

/// Split-ring addresses of one vring, both as sent (front-end virtual) and
/// translated (guest physical).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingAddrs {
    uaddr: [u64; 3],
    desc: u64,
    avail: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct Vring {
    /// Queue size, 0 until `SET_VRING_NUM`.
    num: u16,
    addrs: Option<RingAddrs>,
    /// Next available index to process when the ring (re)starts.
    base: u16,
    /// The kick fd; `Some` = the ring is started.
    kick: Option<EventFd>,
    /// `SET_VRING_ENABLE` state.
    enabled: bool,
}

/// Counters and state visible to `query-block-exports` and tests, readable
/// without taking the protocol lock.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Device activations (one per change of the running ring set).
    pub activations: AtomicU64,
    /// Requests refused with an error.
    pub refused: AtomicU64,
    /// Memory tables accepted.
    pub mem_tables: AtomicU64,
    /// Whether the device is currently activated.
    pub active: AtomicBool,
}

/// The vhost-user back-end of one export (one front-end at a time).
pub struct DeviceBackend {
    device: Box<dyn VirtioDevice>,
    queue_max: Vec<u16>,
    config_size: u32,
    offered_features: u64,
    acked_features: u64,
    acked_protocol: u64,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    table: AddressTable,
    vrings: Vec<Vring>,
    signals: Arc<VringSignals>,
    /// Rings the device was activated with; `None` = not active.
    active: Option<Vec<bool>>,
    /// A ring's kick fd changed while the device ran: re-activate even if
    /// the running set stays the same.
    restart: bool,
    /// A request whose reply the `vhost` crate does not send on error
    /// failed: the connection must be dropped or the front-end waits forever.
    fatal: bool,
    stats: Arc<BackendStats>,
}

impl std::fmt::Debug for DeviceBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBackend")
            .field("queues", &self.queue_max.len())
            .field("acked_features", &self.acked_features)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl DeviceBackend {
    /// A back-end for `device`, whose configuration space is `config_size`
    /// bytes.
    pub fn new(device: Box<dyn VirtioDevice>, config_size: u32) -> Self {
        let queue_max = device.queue_max_sizes().to_vec();
        let offered_features = device.avail_features()
            | feature(VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let n = queue_max.len();
        DeviceBackend {
            device,
            queue_max,
            config_size,
            offered_features,
            acked_features: 0,
            acked_protocol: 0,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            table: AddressTable::default(),
            vrings: (0..n).map(|_| Vring::default()).collect(),
            signals: Arc::new(VringSignals::new(n)),
            active: None,
            restart: false,
            fatal: false,
            stats: Arc::new(BackendStats::default()),
        }
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<BackendStats> {
        Arc::clone(&self.stats)
    }

    /// Virtio features offered to the front-end.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queue_max.len()
    }

    /// Whether a request failed in a way that leaves the front-end without
    /// a reply; clears the flag.
    pub fn take_fatal(&mut self) -> bool {
        std::mem::take(&mut self.fatal)
    }

    fn vring_index(&self, index: u32) -> Result<usize, RequestError> {
        usize::try_from(index)
            .ok()
            .filter(|&i| i < self.vrings.len())
            .ok_or(RequestError::BadIndex {
                index,
                num_queues: self.vrings.len(),
            })
    }

    fn protocol_negotiated(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Rings that should be processed now.
    fn running_set(&self) -> Vec<bool> {
        let proto = self.protocol_negotiated();
        self.vrings
            .iter()
            .map(|v| v.kick.is_some() && v.num != 0 && v.addrs.is_some() && (v.enabled || !proto))
            .collect()
    }

    /// Resets the device (draining it) and records where each ring stopped.
    fn stop_device(&mut self) {
        let Some(set) = self.active.take() else {
            return;
        };
        self.device.reset();
        self.stats.active.store(false, Ordering::SeqCst);
        let mem = self.mem.memory();
        for (vring, was_running) in self.vrings.iter_mut().zip(set) {
            if !was_running {
                continue;
            }
            if let Some(a) = vring.addrs {
                // used->idx: after the drain every request taken from the
                // available ring has its used element, so the used index is
                // the next available index.
                match a
                    .used
                    .checked_add(2)
                    .map(|addr| mem.read_obj::<u16>(GuestAddress(addr)))
                {
                    Some(Ok(idx)) => vring.base = u16::from_le(idx),
                    _ => log::warn!("vhost-user-blk: cannot read a used index after stop"),
                }
            }
        }
    }

    fn build_queue(&self, index: usize, mem: &GuestMemoryMmap) -> Result<Queue, RequestError> {
        let max = self.queue_max.get(index).copied().unwrap_or(0);
        let mut q = Queue::new(max).map_err(|source| RequestError::Queue { index, source })?;
        let Some(v) = self.vrings.get(index) else {
            return Err(RequestError::BadIndex {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                num_queues: self.vrings.len(),
            });
        };
        let a = v.addrs.ok_or(RequestError::Unconfigured { index })?;
        q.set_size(v.num);
        let split = |x: u64| (Some(x as u32), Some((x >> 32) as u32));
        let (l, h) = split(a.desc);
        q.set_desc_table_address(l, h);
        let (l, h) = split(a.avail);
        q.set_avail_ring_address(l, h);
        let (l, h) = split(a.used);
        q.set_used_ring_address(l, h);
        q.set_event_idx(
            self.acked_features & feature(crate::virtio::device::VIRTIO_RING_F_EVENT_IDX) != 0,
        );
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(RequestError::InvalidRing { index });
        }
        let used = q
            .used_idx(mem, Ordering::Acquire)
            .map_err(|source| RequestError::Queue { index, source })?;
        q.set_next_avail(v.base);
        q.set_next_used(used.0);
        Ok(q)
    }

    /// Brings the device in line with the running ring set. A ring whose
    /// layout is not valid in guest memory is stopped (its kick fd dropped)
    /// and reported, while the other rings run.
    fn reconfigure(&mut self) -> Result<(), RequestError> {
        let mut want = self.running_set();
        if !self.restart && self.active.as_ref() == Some(&want) {
            return Ok(());
        }
        self.restart = false;
        self.stop_device();
        if !want.iter().any(|&r| r) {
            return Ok(());
        }
        let mem = self.mem.memory();
        let mut queues = Vec::with_capacity(want.len());
        let mut evts = Vec::with_capacity(want.len());
        let mut first_err = None;
        for index in 0..want.len() {
            let built = if want.get(index) == Some(&true) {
                self.build_queue(index, &mem).and_then(|q| {
                    let kick = self
                        .vrings
                        .get(index)
                        .and_then(|v| v.kick.as_ref())
                        .ok_or(RequestError::Unconfigured { index })?;
                    let evt = kick
                        .try_clone()
                        .map_err(|source| RequestError::EventFd { index, source })?;
                    Ok((q, evt))
                })
            } else {
                Err(RequestError::Unconfigured { index })
            };
            match built {
                Ok((q, evt)) => {
                    queues.push(q);
                    evts.push(evt);
                }
                Err(e) => {
                    if want.get(index) == Some(&true) {
                        if let Some(v) = self.vrings.get_mut(index) {
                            v.kick = None;
                        }
                        if let Some(w) = want.get_mut(index) {
                            *w = false;
                        }
                        first_err.get_or_insert(e);
                    }
                    // A queue that is not ready, with a kick fd never signalled.
                    let max = self.queue_max.get(index).copied().unwrap_or(0);
                    queues.push(
                        Queue::new(max).map_err(|source| RequestError::Queue { index, source })?,
                    );
                    evts.push(
                        EventFd::new(libc::EFD_NONBLOCK)
                            .map_err(|source| RequestError::EventFd { index, source })?,
                    );
                }
            }
        }
        if !want.iter().any(|&r| r) {
            return first_err.map_or(Ok(()), Err);
        }
        drop(mem);
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts: evts,
            interrupt: Arc::clone(&self.signals) as Arc<dyn crate::virtio::device::VirtioInterrupt>,
            acked_features: self.acked_features,
        };
        self.device.activate(ctx).map_err(RequestError::Activate)?;
        self.active = Some(want);
        self.stats.active.store(true, Ordering::SeqCst);
        self.stats.activations.fetch_add(1, Ordering::Relaxed);
        first_err.map_or(Ok(()), Err)
    }

    /// Forgets everything the front-end set up (disconnect, `RESET_OWNER`).
    /// The device is stopped first; guest memory is unmapped.
    pub fn disconnect(&mut self) {
        self.stop_device();
        self.restart = false;
        self.fatal = false;
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        self.signals.clear();
        self.acked_features = 0;
        self.acked_protocol = 0;
        self.table = AddressTable::default();
        match self.mem.lock() {
            Ok(guard) => guard.replace(GuestMemoryMmap::new()),
            Err(e) => e.into_inner().replace(GuestMemoryMmap::new()),
        }
    }

    /// Stops the device for good and makes written data durable.
    pub fn shutdown(&mut self) {
        self.disconnect();
        self.device.shutdown();
    }

    fn refuse<T>(&self, e: RequestError) -> VuResult<T> {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        log::warn!("vhost-user-blk: refused: {}", error_chain(&e));
        Err(e.into())
    }

    fn check<T>(&self, r: Result<T, RequestError>) -> VuResult<T> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => self.refuse(e),
        }
    }

    fn set_fd(&mut self, index: u8, fd: Option<File>, kind: FdKind) -> Result<(), RequestError> {
        let index = self.vring_index(u32::from(index))?;
        let what = kind.name();
        let efd = match fd {
            Some(f) => Some(into_eventfd(f).map_err(|source| RequestError::BadFd {
                index,
                what,
                source,
            })?),
            None => None,
        };
        match kind {
            FdKind::Call => {
                self.signals.set_call(index, efd);
            }
            FdKind::Err => {
                self.signals.set_err(index, efd);
            }
            FdKind::Kick => {
                let efd = efd.ok_or(RequestError::NoKickFd { index })?;
                let running =
                    self.active.as_ref().and_then(|a| a.get(index).copied()) == Some(true);
                let Some(v) = self.vrings.get_mut(index) else {
                    return Err(RequestError::Unconfigured { index });
                };
                if v.num == 0 || v.addrs.is_none() {
                    return Err(RequestError::Unconfigured { index });
                }
                // A new kick fd for a running ring: the device must pick it up.
                self.restart |= running;
                v.kick = Some(efd);
                self.reconfigure()?;
            }
        }
        Ok(())
    }
}

/// Which per-vring eventfd a request sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FdKind {
    Kick,
    Call,
    Err,
}

impl FdKind {
    fn name(self) -> &'static str {
        match self {
            FdKind::Kick => "kick",
            FdKind::Call => "call",
            FdKind::Err => "err",
        }
    }
}

impl VhostUserBackendReqHandlerMut for DeviceBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_device();
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        self.signals.clear();
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered_features)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered_features != 0 {
            // The `vhost` crate records the features before asking us:
            // its view and ours would differ, so the connection must go.
            self.fatal = true;
            return self.refuse(RequestError::BadFeatures {
                acked: features,
                offered: self.offered_features,
            });
        }
        if self.active.is_some() && features != self.acked_features {
            self.fatal = true;
            return self.refuse(RequestError::FeaturesWhileRunning);
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES started rings are enabled: re-evaluate.
        let r = self.reconfigure();
        self.check(r)
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let (mem, table) = match memory::build(ctx, files) {
            Ok(v) => v,
            Err(e) => return self.refuse(RequestError::Memory(e)),
        };
        // Running rings stop on the old mapping (the drain completes into
        // it and their positions are read from it), then restart below on
        // the new one.
        self.stop_device();
        // Re-translate configured rings with the new table; a ring the new
        // table no longer covers loses its addresses (and stays stopped).
        for v in &mut self.vrings {
            if let Some(a) = v.addrs {
                let size = u64::from(v.num);
                let lens = ring_lengths(size);
                let tr: Option<Vec<u64>> = a
                    .uaddr
                    .iter()
                    .zip(lens)
                    .map(|(&u, l)| table.to_gpa(u, l))
                    .collect();
                v.addrs = tr.and_then(|g| match g.as_slice() {
                    [d, av, u] => Some(RingAddrs {
                        uaddr: a.uaddr,
                        desc: *d,
                        avail: *av,
                        used: *u,
                    }),
                    _ => None,
                });
            }
        }
        match self.mem.lock() {
            Ok(guard) => guard.replace(mem),
            Err(e) => e.into_inner().replace(mem),
        }
        self.table = table;
        self.stats.mem_tables.fetch_add(1, Ordering::Relaxed);
        let r = self.reconfigure();
        self.check(r)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let r = self.vring_index(index).and_then(|i| {
            let max = self.queue_max.get(i).copied().unwrap_or(0);
            match u16::try_from(num) {
                Ok(n) if n != 0 && n <= max && n.is_power_of_two() => Ok((i, n)),
                _ => Err(RequestError::BadSize { index: i, num, max }),
            }
        });
        let (i, n) = self.check(r)?;
        if let Some(v) = self.vrings.get_mut(i) {
            v.num = n;
        }
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let r = self.vring_index(index).and_then(|i| {
            if self.table.is_empty() {
                return Err(RequestError::NoMemory);
            }
            // Checked with the size set so far; validated again as a whole
            // (`Queue::is_valid`) when the ring starts.
            let num = match self.vrings.get(i).map(|v| v.num) {
                Some(n) if n != 0 => n,
                _ => 1,
            };
            let [desc_len, avail_len, used_len] = ring_lengths(u64::from(num));
            let tr = |what, uaddr, len| {
                self.table
                    .to_gpa(uaddr, len)
                    .ok_or(RequestError::BadRingAddress {
                        index: i,
                        what,
                        uaddr,
                        len,
                    })
            };
            Ok((
                i,
                RingAddrs {
                    uaddr: [descriptor, available, used],
                    desc: tr("descriptor table", descriptor, desc_len)?,
                    avail: tr("available ring", available, avail_len)?,
                    used: tr("used ring", used, used_len)?,
                },
            ))
        });
        let (i, a) = self.check(r)?;
        if let Some(v) = self.vrings.get_mut(i) {
            v.addrs = Some(a);
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let r = self.vring_index(index).and_then(|i| {
            u16::try_from(base)
                .map(|b| (i, b))
                .map_err(|_| RequestError::BadBase { index: i, base })
        });
        let (i, b) = self.check(r)?;
        if let Some(v) = self.vrings.get_mut(i) {
            v.base = b;
        }
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let i = match self.vring_index(index) {
            Ok(i) => i,
            Err(e) => {
                // The crate sends no reply on error: drop the connection.
                self.fatal = true;
                return self.refuse(e);
            }
        };
        // Stop the ring: the device drains and records its position.
        if let Some(v) = self.vrings.get_mut(i) {
            v.kick = None;
        }
        if let Err(e) = self.reconfigure() {
            // The ring is stopped either way; the other rings failed to
            // restart, which the front-end learns from their err fds.
            log::warn!(
                "vhost-user-blk: restarting rings after stop: {}",
                error_chain(&e)
            );
            crate::virtio::device::VirtioInterrupt::set_needs_reset(&*self.signals);
        }
        let base = self.vrings.get(i).map(|v| v.base).unwrap_or(0);
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let r = self.set_fd(index, fd, FdKind::Kick);
        self.check(r)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let r = self.set_fd(index, fd, FdKind::Call);
        self.check(r)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let r = self.set_fd(index, fd, FdKind::Err);
        self.check(r)
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = (offered_protocol_features() | VhostUserProtocolFeatures::REPLY_ACK).bits();
        if features & !offered != 0 {
            // As for SET_FEATURES: the crate already adopted them.
            self.fatal = true;
            return self.refuse(RequestError::BadFeatures {
                acked: features,
                offered,
            });
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let i = self.check(self.vring_index(index))?;
        if let Some(v) = self.vrings.get_mut(i) {
            v.enabled = enable;
        }
        let r = self.reconfigure();
        self.check(r)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let r = self.config_range(offset, size);
        self.check(r)?;
        let mut buf = vec![0u8; size as usize];
        self.device.read_config(u64::from(offset), &mut buf);
        Ok(buf)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        let size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let r = self.config_range(offset, size);
        self.check(r)?;
        self.device.write_config(u64::from(offset), buf);
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        self.refuse(RequestError::Unsupported("VHOST_USER_GPU_SET_SOCKET"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        self.fatal = true;
        self.refuse(RequestError::Unsupported("VHOST_USER_GET_SHARED_OBJECT"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        self.fatal = true;
        self.refuse(RequestError::Unsupported("VHOST_USER_GET_INFLIGHT_FD"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        self.refuse(RequestError::Unsupported("VHOST_USER_SET_INFLIGHT_FD"))
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        self.fatal = true;
        self.refuse(RequestError::Unsupported("VHOST_USER_GET_MAX_MEM_SLOTS"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        self.refuse(RequestError::Unsupported("VHOST_USER_ADD_MEM_REG"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        self.refuse(RequestError::Unsupported("VHOST_USER_REM_MEM_REG"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        self.refuse(RequestError::Unsupported("VHOST_USER_SET_DEVICE_STATE_FD"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        self.refuse(RequestError::Unsupported("VHOST_USER_CHECK_DEVICE_STATE"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        self.fatal = true;
        self.refuse(RequestError::Unsupported("VHOST_USER_GET_SHMEM_CONFIG"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        self.fatal = true;
        self.refuse(RequestError::Unsupported("VHOST_USER_SET_LOG_BASE"))
    }
}

impl DeviceBackend {
    fn config_range(&self, offset: u32, size: u32) -> Result<(), RequestError> {
        match offset.checked_add(size) {
            Some(end) if size != 0 && end <= self.config_size => Ok(()),
            _ => Err(RequestError::ConfigRange {
                offset,
                size,
                limit: self.config_size,
            }),
        }
    }
}

/// Bytes of the descriptor table, available ring and used ring of a split
/// ring of `num` entries (with the event-idx words).
fn ring_lengths(num: u64) -> [u64; 3] {
    [16 * num, 6 + 2 * num, 6 + 8 * num]
}

//! Virtio devices for vmm-ref: the device/transport interface, the
//! virtio-mmio (version 2) transport, the multi-queue virtio-blk device, and
//! the vhost-user-blk front-end (a virtio-blk device served by an external
//! back-end, [`vhost_user_blk`]).
//!
//! The transport ([`mmio::MmioTransport`]) owns all register state and the
//! status state machine; it talks to the device model only through the
//! [`device::VirtioDevice`] trait, and the device signals the guest only
//! through [`device::VirtioInterrupt`]. The block device (`block::Block`)
//! serves each virtqueue on the IOThread its `iothread-vq-mapping` names.

//!
//! Wiring one drive (what the VM core does):
//!
//! ```text
//! let block = Block::new(BlockConfig { id, path, num_queues, queue_size, readonly, direct,
//!                                      iothreads /* iothread-vq-mapping */, engine, serial,
//!                                      holder: Block::device_holder(&id) },
//!                        registry.clone())?;    // holds its IOThreads from here on
//! let handle = block.handle();                  // query-block, flush, set_iothreads: keep it
//! let irq = EventFd::new(EFD_NONBLOCK)?;        // KVM irqfd on the slot's GSI
//! let kicks: Vec<EventFd> = (0..num_queues).map(|_| EventFd::new(EFD_NONBLOCK)).collect()?;
//! let transport = MmioTransport::new(Box::new(block), mem.clone(), irq, kicks)?;
//! vm.register_irqfd(transport.irq_evt(), gsi);
//! for (i, e) in transport.queue_evts().iter().enumerate() {
//!     vm.register_ioevent(e, IoEventAddress::Mmio(base + 0x50), i as u32);
//! }
//! mmio_bus.insert(base, MMIO_WINDOW_SIZE, transport);   // BusDevice
//! // clean shutdown: transport.shutdown() (or drop it); handle.flush()
//! ```

pub mod block;
pub mod device;
pub mod mmio;
pub mod vhost_user_blk;

/// Rate-limited `log::warn!` for guest-triggered conditions: the first
/// `BURST` occurrences at each call site are logged, then one in every
/// `EVERY`, so that a hostile guest cannot flood the host log.
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        const BURST: u64 = 10;
        const EVERY: u64 = 1000;
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n < BURST || n % EVERY == 0 {
            log::warn!("{} (guest-triggered, occurrence {})", format_args!($($arg)+), n + 1);
        }
    }};
}
pub(crate) use guest_warn;

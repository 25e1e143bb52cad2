//! Split virtqueues (virtio 1.2, 2.7) driven by polling.
//!
//! The driver never takes interrupts: it asks the device not to send any
//! (`VIRTQ_AVAIL_F_NO_INTERRUPT`, or with event-idx a `used_event` kept just
//! behind the driver's position) and polls the used ring. Notifications honour
//! `VIRTQ_USED_F_NO_NOTIFY`, or with event-idx the device's `avail_event`
//! (`vring_need_event`).
//!
//! Chains are tracked by head descriptor in driver-private state, never by
//! walking the descriptor table, so the deliberately broken chains of the
//! `malformed` scenario (loops, bad `next`) are freed correctly.
//!
//! Two [`Discipline`]s shape what the device sees: our own driver's habits,
//! and those of an independent polled driver (`bench.profile=alt`), so that
//! a back-end cannot be tuned to one access pattern without it showing.

use core::ptr;
use core::sync::atomic::{fence, Ordering};

use super::mmio::{QueueAddrs, Transport};
use crate::mem::{Arena, OutOfMemory};

/// Largest queue we set up (the device may offer more).
pub const MAX_SIZE: u16 = 256;
/// Longest descriptor chain we build.
pub const MAX_CHAIN: usize = 4;

/// `VIRTQ_DESC_F_NEXT`.
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
const PAGE: u64 = 4096;

/// Descriptors of one chain slot under [`Discipline::Fixed`].
pub const FIXED_CHAIN: u16 = 3;
/// Distance between `used_event` and our used index under
/// [`Discipline::Fixed`]: half the index space, so the device never crosses it.
const FIXED_USED_EVENT_AHEAD: u16 = 0x8000;
/// Completions after which [`Discipline::Fixed`] moves `used_event` forward
/// again (well before the device could reach it).
const FIXED_USED_EVENT_REFRESH: u16 = 0x4000;

/// How the driver lays out chains, publishes them and keeps `used_event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discipline {
    /// Our own driver: descriptors from a LIFO free list (a chain's
    /// descriptors scatter over the table as completions reorder), a batch of
    /// chains published with one index store at the notification decision,
    /// and with EVENT_IDX `used_event` kept one behind our used index,
    /// rewritten at every completion.
    Ours,
    /// An independent polled driver's habits (the `alt` bench profile):
    /// chain slot `k` always uses descriptors `3k, 3k+1, 3k+2` (fixed
    /// 3-descriptor chains: header, data, status), every chain is published
    /// on its own (release barrier, then the avail index store, as Linux's
    /// `virtqueue_add` does), and with EVENT_IDX `used_event` is kept far
    /// ahead of the used index (rewritten once every 0x4000 completions), so
    /// the device never interrupts. The notification rule is the same as
    /// ours: after a full barrier, `vring_need_event(avail_event, new, old)`.
    Fixed,
}

impl Discipline {
    /// The bench profile's name on the command line (`bench.profile=`).
    pub fn profile_name(self) -> &'static str {
        match self {
            Self::Ours => "ours",
            Self::Fixed => "alt",
        }
    }
}

/// `vring_need_event(event, new, old)` (virtio 1.2, 2.7.10): whether moving an
/// index from `old` to `new` crosses the other side's `event` index.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A buffer of a well-formed chain.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Where a raw descriptor's `next` points.
#[derive(Clone, Copy, Debug)]
pub enum RawNext {
    /// `next` = 0 (meaningless unless `flags` has NEXT).
    Zero,
    /// The descriptor at this position of the same chain.
    Pos(usize),
    /// This descriptor index, whatever it is (may be out of range).
    Index(u16),
}

/// A descriptor written exactly as given (for malformed chains).
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Descriptor flags, NEXT included or not.
    pub flags: u16,
    /// Target of `next`.
    pub next: RawNext,
}

/// A completed chain.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    /// The token given when the chain was added.
    pub token: u32,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// Not enough free descriptors.
#[derive(Debug)]
pub struct QueueFull;

#[derive(Clone, Copy, Default)]
struct Chain {
    ids: [u16; MAX_CHAIN],
    len: u8,
    token: u32,
    busy: bool,
}

/// One split virtqueue and its driver-side state.
pub struct SplitQueue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    discipline: Discipline,
    /// Free descriptor ids ([`Discipline::Ours`]) or free chain slots
    /// ([`Discipline::Fixed`]), used as a stack.
    free: [u16; MAX_SIZE as usize],
    nr_free: u16,
    chains: [Chain; MAX_SIZE as usize],
    avail_idx: u16,
    last_used: u16,
    /// `avail_idx` at the last notification decision (vring_need_event's old).
    kick_check_idx: u16,
    /// `last_used` when `used_event` was last written ([`Discipline::Fixed`]).
    used_event_base: u16,
    /// Notifications sent.
    pub kicks: u64,
    /// Used entries naming a descriptor that was not in flight.
    pub bogus_used: u64,
}

impl SplitQueue {
    /// Allocates ring memory for a queue of up to [`MAX_SIZE`] entries.
    pub fn new(arena: &mut Arena, index: u16) -> Result<Self, OutOfMemory> {
        // Descriptor table, avail ring and used ring each get a page
        // (256 * 16, 6 + 2 * 256 and 6 + 8 * 256 bytes).
        let desc = arena.alloc(PAGE, PAGE)?;
        let avail = arena.alloc(PAGE, PAGE)?;
        let used = arena.alloc(PAGE, PAGE)?;
        Ok(Self {
            index,
            size: 0,
            desc,
            avail,
            used,
            event_idx: false,
            discipline: Discipline::Ours,
            free: [0; MAX_SIZE as usize],
            nr_free: 0,
            chains: [Chain::default(); MAX_SIZE as usize],
            avail_idx: 0,
            last_used: 0,
            kick_check_idx: 0,
            used_event_base: 0,
            kicks: 0,
            bogus_used: 0,
        })
    }

    /// Resets the rings for a (re-)initialised device: `size` entries (at
    /// most [`MAX_SIZE`]), whether VIRTIO_F_EVENT_IDX was negotiated, and the
    /// driver's [`Discipline`].
    pub fn reset(&mut self, size: u16, event_idx: bool, discipline: Discipline) {
        let size = size.min(MAX_SIZE);
        // SAFETY: the three pages were allocated for this queue in `new`.
        unsafe {
            for base in [self.desc, self.avail, self.used] {
                ptr::write_bytes(base as *mut u8, 0, PAGE as usize);
            }
        }
        self.size = size;
        self.event_idx = event_idx;
        self.discipline = discipline;
        // Descriptor ids (Ours) or chain slots (Fixed), lowest on top.
        let entries = match discipline {
            Discipline::Ours => size,
            Discipline::Fixed => size / FIXED_CHAIN,
        };
        for (i, slot) in self.free.iter_mut().enumerate().take(usize::from(entries)) {
            *slot = entries - 1 - i as u16;
        }
        self.nr_free = entries;
        self.chains = [Chain::default(); MAX_SIZE as usize];
        self.avail_idx = 0;
        self.last_used = 0;
        self.kick_check_idx = 0;
        self.used_event_base = 0;
        if event_idx {
            self.set_used_event();
        } else {
            self.write_avail_u16(0, AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Addresses to program into the transport.
    pub fn addrs(&self) -> QueueAddrs {
        QueueAddrs {
            desc: self.desc,
            driver: self.avail,
            device: self.used,
        }
    }

    fn write_avail_u16(&self, offset: u64, value: u16) {
        // SAFETY: offsets stay within the avail page (at most 4 + 2 * 256 + 2).
        unsafe { ptr::write_volatile((self.avail + offset) as *mut u16, value) }
    }

    fn read_used_u16(&self, offset: u64) -> u16 {
        // SAFETY: offsets stay within the used page (at most 4 + 8 * 256 + 2).
        unsafe { ptr::read_volatile((self.used + offset) as *const u16) }
    }

    fn read_used_u32(&self, offset: u64) -> u32 {
        // SAFETY: as for `read_used_u16`.
        unsafe { ptr::read_volatile((self.used + offset) as *const u32) }
    }

    fn write_desc(&self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = self.desc + 16 * u64::from(id);
        // SAFETY: id < size <= 256, so the 16-byte descriptor lies in the
        // descriptor page.
        unsafe {
            ptr::write_volatile(base as *mut u64, addr);
            ptr::write_volatile((base + 8) as *mut u32, len);
            ptr::write_volatile((base + 12) as *mut u16, flags);
            ptr::write_volatile((base + 14) as *mut u16, next);
        }
    }

    /// Writes `used_event` where the device never crosses it, so it never
    /// interrupts: one behind our position ([`Discipline::Ours`]) or half
    /// the index space ahead ([`Discipline::Fixed`]).
    fn set_used_event(&mut self) {
        let event = match self.discipline {
            Discipline::Ours => self.last_used.wrapping_sub(1),
            Discipline::Fixed => {
                self.used_event_base = self.last_used;
                self.last_used.wrapping_add(FIXED_USED_EVENT_AHEAD)
            }
        };
        self.write_avail_u16(4 + 2 * u64::from(self.size), event);
    }

    fn take_ids(&mut self, n: usize) -> Result<[u16; MAX_CHAIN], QueueFull> {
        let mut ids = [0u16; MAX_CHAIN];
        match self.discipline {
            Discipline::Ours => {
                if n == 0 || n > MAX_CHAIN || usize::from(self.nr_free) < n {
                    return Err(QueueFull);
                }
                for id in ids.iter_mut().take(n) {
                    self.nr_free -= 1;
                    *id = self.free[usize::from(self.nr_free)];
                }
            }
            Discipline::Fixed => {
                if n == 0 || n > usize::from(FIXED_CHAIN) || self.nr_free == 0 {
                    return Err(QueueFull);
                }
                self.nr_free -= 1;
                let first = self.free[usize::from(self.nr_free)] * FIXED_CHAIN;
                for (i, id) in ids.iter_mut().take(n).enumerate() {
                    *id = first + i as u16;
                }
            }
        }
        Ok(ids)
    }

    fn push(&mut self, ids: [u16; MAX_CHAIN], n: usize, token: u32) {
        let head = ids[0];
        self.chains[usize::from(head)] = Chain {
            ids,
            len: n as u8,
            token,
            busy: true,
        };
        let slot = u64::from(self.avail_idx % self.size);
        self.write_avail_u16(4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        if self.discipline == Discipline::Fixed {
            self.publish();
        }
    }

    /// Adds a well-formed chain (with [`Discipline::Ours`] not yet visible to
    /// the device: see [`Self::publish`]; [`Discipline::Fixed`] publishes it at
    /// once). [`Discipline::Fixed`] takes chains of at most [`FIXED_CHAIN`]
    /// descriptors.
    pub fn add(&mut self, segs: &[Seg], token: u32) -> Result<(), QueueFull> {
        let ids = self.take_ids(segs.len())?;
        for (i, seg) in segs.iter().enumerate() {
            let mut flags = if seg.write { DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if i + 1 < segs.len() {
                flags |= DESC_F_NEXT;
                next = ids[i + 1];
            }
            self.write_desc(ids[i], seg.addr, seg.len, flags, next);
        }
        self.push(ids, segs.len(), token);
        Ok(())
    }

    /// Adds a chain whose descriptors are written exactly as given.
    pub fn add_raw(&mut self, descs: &[RawDesc], token: u32) -> Result<(), QueueFull> {
        let ids = self.take_ids(descs.len())?;
        for (i, d) in descs.iter().enumerate() {
            let next = match d.next {
                RawNext::Zero => 0,
                RawNext::Pos(pos) => ids[pos.min(descs.len() - 1)],
                RawNext::Index(index) => index,
            };
            self.write_desc(ids[i], d.addr, d.len, d.flags, next);
        }
        self.push(ids, descs.len(), token);
        Ok(())
    }

    /// Makes the chains added so far visible to the device.
    pub fn publish(&mut self) {
        // Descriptors and ring entries must be visible before the index.
        fence(Ordering::Release);
        self.write_avail_u16(2, self.avail_idx);
    }

    /// Publishes and notifies the device if it wants a notification; returns
    /// whether it was notified.
    pub fn kick(&mut self, transport: &Transport) -> bool {
        if self.discipline == Discipline::Ours {
            self.publish();
        }
        // The index store must be ordered before reading the device's
        // suppression state (store-load: needs a full fence).
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = self.kick_check_idx;
        self.kick_check_idx = new;
        if new == old {
            return false;
        }
        let needed = if self.event_idx {
            let avail_event = self.read_used_u16(4 + 8 * u64::from(self.size));
            need_event(avail_event, new, old)
        } else {
            self.read_used_u16(0) & USED_F_NO_NOTIFY == 0
        };
        if needed {
            transport.notify(self.index);
            self.kicks += 1;
        }
        needed
    }

    /// Takes the next completed chain off the used ring, if any.
    pub fn pop_used(&mut self) -> Option<Used> {
        loop {
            if self.read_used_u16(2) == self.last_used {
                return None;
            }
            // Read the entry only after seeing the index.
            fence(Ordering::Acquire);
            let slot = u64::from(self.last_used % self.size);
            let id = self.read_used_u32(4 + 8 * slot);
            let len = self.read_used_u32(8 + 8 * slot);
            self.last_used = self.last_used.wrapping_add(1);
            if self.event_idx
                && (self.discipline == Discipline::Ours
                    || self.last_used.wrapping_sub(self.used_event_base)
                        >= FIXED_USED_EVENT_REFRESH)
            {
                self.set_used_event();
            }
            let chain = match self.chains.get_mut(id as usize) {
                Some(chain) if chain.busy && (id as u16) < self.size => chain,
                _ => {
                    self.bogus_used += 1;
                    continue;
                }
            };
            chain.busy = false;
            let (ids, n, token) = (chain.ids, usize::from(chain.len), chain.token);
            match self.discipline {
                Discipline::Ours => {
                    for &desc in &ids[..n] {
                        self.free[usize::from(self.nr_free)] = desc;
                        self.nr_free += 1;
                    }
                }
                Discipline::Fixed => {
                    self.free[usize::from(self.nr_free)] = ids[0] / FIXED_CHAIN;
                    self.nr_free += 1;
                }
            }
            return Some(Used { token, len });
        }
    }
}

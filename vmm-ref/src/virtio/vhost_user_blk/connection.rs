//! One connection to the back-end over the `vhost` crate's front-end:
//! negotiation ([`Connection::open`]), starting the rings of an activated
//! device ([`Connection::start`]), stopping them ([`Connection::stop`]) and
//! configuration writes. Every exchange runs under the [`Watchdog`], so a
//! back-end that stops answering fails the request instead of blocking.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use super::features::{self, CONFIG_SIZE, PROTOCOL_FEATURES};
use super::watchdog::{Guard, Watchdog};
use super::VhostUserBlkError;

/// Bound on one negotiation, ring start or ring stop (all its messages).
#[cfg(not(test))]
pub(super) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one exchange (short in unit tests, whose fake back-end may stay silent).
#[cfg(test)]
pub(super) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(1);

/// The back-end's in-flight tracking area (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`):
/// obtained once per device activation and handed to every later
/// connection, so that a restarted back-end finds what was in flight.
pub(super) struct Inflight {
    info: VhostUserInflight,
    file: File,
}

/// One ring to start, with guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RingSpec {
    /// Queue index.
    pub index: usize,
    /// Queue size.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Where the back-end starts in the available ring.
    pub base: u16,
}

/// What a ring needs to run besides its addresses.
pub(super) struct RingFds<'a> {
    /// Kick eventfd of every queue (the KVM ioeventfds), by queue index.
    pub kicks: &'a [EventFd],
    /// The device's interrupt eventfd (the KVM irqfd), shared by all rings.
    pub call: &'a EventFd,
}

/// A negotiated connection.
pub(super) struct Connection {
    fe: Frontend,
    fd: RawFd,
    protocol: VhostUserProtocolFeatures,
    backend_features: u64,
    num_queues: u16,
    queue_size: u16,
}

/// Maps a failed request to an error, telling a timeout (the watchdog shut
/// the socket down) from a protocol failure.
fn check<T>(
    guard: &Guard<'_>,
    request: &'static str,
    r: Result<T, vhost::Error>,
) -> Result<T, VhostUserBlkError> {
    r.map_err(|source| {
        if guard.fired() {
            VhostUserBlkError::Timeout {
                request,
                secs: EXCHANGE_TIMEOUT.as_secs(),
            }
        } else {
            VhostUserBlkError::Request { request, source }
        }
    })
}

/// Bytes a split ring's parts occupy (virtio 1.2 §2.7): descriptor table,
/// available ring (with `used_event`), used ring (with `avail_event`).
fn ring_lengths(size: u16) -> [(&'static str, u64); 3] {
    let n = u64::from(size);
    [
        ("descriptor table", 16 * n),
        ("available ring", 6 + 2 * n),
        ("used ring", 6 + 8 * n),
    ]
}

/// Host address of `[gpa, gpa + len)`, which must lie in one region.
fn host_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<u64> {
    let region = mem.find_region(GuestAddress(gpa))?;
    let offset = gpa.checked_sub(region.start_addr().raw_value())?;
    if offset.checked_add(len)? > region.len() {
        return None;
    }
    let host = region.get_host_address(MemoryRegionAddress(offset)).ok()?;
    Some(host as u64)
}

/// The memory table of `mem`: every region must be file-backed (shared).
pub(super) fn memory_table(
    mem: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserBlkError> {
    mem.iter()
        .map(|region| {
            let start = region.start_addr().raw_value();
            let fo = region
                .file_offset()
                .ok_or(VhostUserBlkError::MemoryNotShared { gpa: start })?;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VhostUserBlkError::MemoryNotShared { gpa: start })?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            })
        })
        .collect()
}

impl Connection {
    /// Connects to `path` and negotiates: `SET_OWNER`, features, protocol
    /// features (MQ, CONFIG, REPLY_ACK, INFLIGHT_SHMFD as offered), the
    /// queue count, and the configuration space (returned, as the back-end
    /// sent it).
    pub(super) fn open(
        path: &Path,
        num_queues: u16,
        queue_size: u16,
        watchdog: &Watchdog,
    ) -> Result<(Connection, Vec<u8>), VhostUserBlkError> {
        let stream = UnixStream::connect(path).map_err(|source| VhostUserBlkError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let fd = stream.as_raw_fd();
        let guard = watchdog
            .arm(fd, EXCHANGE_TIMEOUT)
            .map_err(VhostUserBlkError::Watchdog)?;
        let mut fe = Frontend::from_stream(stream, u64::from(num_queues));
        check(&guard, "SET_OWNER", fe.set_owner())?;
        let backend_features = check(&guard, "GET_FEATURES", fe.get_features())?;
        if backend_features & PROTOCOL_FEATURES == 0 {
            // GET_PROTOCOL_FEATURES is not allowed without it.
            features::check_backend(
                backend_features,
                VhostUserProtocolFeatures::empty(),
                None,
                num_queues,
            )
            .map_err(VhostUserBlkError::Backend)?;
        }
        let offered = check(&guard, "GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
        let protocol = offered & features::wanted_protocol();
        check(
            &guard,
            "SET_PROTOCOL_FEATURES",
            fe.set_protocol_features(protocol),
        )?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            Some(check(&guard, "GET_QUEUE_NUM", fe.get_queue_num())?)
        } else {
            None
        };
        features::check_backend(backend_features, protocol, queue_num, num_queues)
            .map_err(VhostUserBlkError::Backend)?;
        let empty = [0u8; CONFIG_SIZE];
        let (_, config) = check(
            &guard,
            "GET_CONFIG",
            fe.get_config(0, CONFIG_SIZE as u32, VhostUserConfigFlags::empty(), &empty),
        )?;
        Ok((
            Connection {
                fe,
                fd,
                protocol,
                backend_features,
                num_queues,
                queue_size,
            },
            config,
        ))
    }

    /// The socket (for polling while idle).
    pub(super) fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// Virtio features the back-end offers.
    pub(super) fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Protocol features in use.
    pub(super) fn protocol(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Starts `rings` for a driver that acknowledged `acked` features:
    /// `SET_FEATURES`, the in-flight area (fetched into `inflight` if there
    /// is none yet), `SET_MEM_TABLE`, then each ring's size, addresses
    /// (translated to our virtual addresses, as the protocol wants), base,
    /// call and kick eventfds, and finally `SET_VRING_ENABLE`.
    pub(super) fn start(
        &mut self,
        watchdog: &Watchdog,
        mem: &GuestMemoryMmap,
        acked: u64,
        rings: &[RingSpec],
        fds: &RingFds<'_>,
        inflight: &mut Option<Inflight>,
    ) -> Result<(), VhostUserBlkError> {
        let table = memory_table(mem)?;
        let mut addrs = Vec::with_capacity(rings.len());
        for r in rings {
            let [desc, avail, used] = [r.desc, r.avail, r.used];
            let mut host = [0u64; 3];
            for (slot, (gpa, (what, len))) in host
                .iter_mut()
                .zip([desc, avail, used].into_iter().zip(ring_lengths(r.size)))
            {
                *slot = host_range(mem, gpa, len).ok_or(VhostUserBlkError::RingAddress {
                    index: r.index,
                    what,
                    gpa,
                })?;
            }
            let kick = fds
                .kicks
                .get(r.index)
                .ok_or(VhostUserBlkError::NoKick(r.index))?;
            addrs.push((host, kick));
        }
        let guard = watchdog
            .arm(self.fd, EXCHANGE_TIMEOUT)
            .map_err(VhostUserBlkError::Watchdog)?;
        let fe = &mut self.fe;
        check(
            &guard,
            "SET_FEATURES",
            fe.set_features(features::backend_features(acked)),
        )?;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if inflight.is_none() {
                let want = VhostUserInflight::new(0, 0, self.num_queues, self.queue_size);
                let (info, file) = check(&guard, "GET_INFLIGHT_FD", fe.get_inflight_fd(&want))?;
                // A zero-sized area means the back-end does not track this
                // device's requests; go on without (as QEMU does).
                if info.mmap_size > 0 {
                    *inflight = Some(Inflight { info, file });
                }
            }
            if let Some(i) = inflight.as_ref() {
                check(
                    &guard,
                    "SET_INFLIGHT_FD",
                    fe.set_inflight_fd(&i.info, i.file.as_raw_fd()),
                )?;
            }
        }
        check(&guard, "SET_MEM_TABLE", fe.set_mem_table(&table))?;
        for (r, (host, kick)) in rings.iter().zip(&addrs) {
            let i = r.index;
            check(&guard, "SET_VRING_NUM", fe.set_vring_num(i, r.size))?;
            let data = VringConfigData {
                queue_max_size: self.queue_size,
                queue_size: r.size,
                flags: 0,
                desc_table_addr: host[0],
                used_ring_addr: host[2],
                avail_ring_addr: host[1],
                log_addr: None,
            };
            check(&guard, "SET_VRING_ADDR", fe.set_vring_addr(i, &data))?;
            check(&guard, "SET_VRING_BASE", fe.set_vring_base(i, r.base))?;
            check(&guard, "SET_VRING_CALL", fe.set_vring_call(i, fds.call))?;
            check(&guard, "SET_VRING_KICK", fe.set_vring_kick(i, kick))?;
        }
        for r in rings {
            check(
                &guard,
                "SET_VRING_ENABLE",
                fe.set_vring_enable(r.index, true),
            )?;
        }
        Ok(())
    }

    /// Stops `rings` (disable, then `GET_VRING_BASE`, which the back-end
    /// answers once it stopped processing the ring). Returns each ring's
    /// base: the index of the next available entry the back-end would take.
    pub(super) fn stop(
        &mut self,
        watchdog: &Watchdog,
        rings: &[usize],
    ) -> Result<Vec<u32>, VhostUserBlkError> {
        let guard = watchdog
            .arm(self.fd, EXCHANGE_TIMEOUT)
            .map_err(VhostUserBlkError::Watchdog)?;
        for &i in rings {
            check(
                &guard,
                "SET_VRING_ENABLE",
                self.fe.set_vring_enable(i, false),
            )?;
        }
        let mut bases = Vec::with_capacity(rings.len());
        for &i in rings {
            bases.push(check(&guard, "GET_VRING_BASE", self.fe.get_vring_base(i))?);
        }
        Ok(bases)
    }

    /// Writes `data` at `offset` of the back-end's configuration space.
    pub(super) fn set_config(
        &mut self,
        watchdog: &Watchdog,
        offset: u32,
        data: &[u8],
    ) -> Result<(), VhostUserBlkError> {
        let guard = watchdog
            .arm(self.fd, EXCHANGE_TIMEOUT)
            .map_err(VhostUserBlkError::Watchdog)?;
        check(
            &guard,
            "SET_CONFIG",
            self.fe
                .set_config(offset, VhostUserConfigFlags::empty(), data),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_ranges_must_lie_in_one_region() {
        let mem = crate::vm::memory::create_shared(32 << 20).unwrap();
        let host = host_range(&mem, 0x1000, 0x100).unwrap();
        assert_eq!(
            host,
            mem.get_host_address(GuestAddress(0x1000)).unwrap() as u64
        );
        assert!(host_range(&mem, (32 << 20) - 0x10, 0x100).is_none());
        assert!(host_range(&mem, 64 << 20, 1).is_none());
        assert!(host_range(&mem, u64::MAX - 1, 16).is_none());
        let table = memory_table(&mem).unwrap();
        assert_eq!(table.len(), 1);
        assert_eq!(
            (
                table[0].guest_phys_addr,
                table[0].memory_size,
                table[0].mmap_offset
            ),
            (0, 32 << 20, 0)
        );
        let private = crate::vm::memory::create(32 << 20).unwrap();
        assert!(matches!(
            memory_table(&private),
            Err(VhostUserBlkError::MemoryNotShared { gpa: 0 })
        ));
        assert_eq!(
            ring_lengths(4),
            [
                ("descriptor table", 64),
                ("available ring", 14),
                ("used ring", 38)
            ]
        );
    }
}

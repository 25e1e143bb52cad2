//! A minimal vhost-user-blk front-end for black-box tests of `vmm-ref
//! export`: it negotiates with the `vhost` crate's `Frontend`, shares a
//! memfd as guest memory (mapped here too, to build split virtqueues in it)
//! and drives one request at a time per queue.
//!
//! Guest memory layout: queue `q`'s rings at `0x1000 + q * 0x4000`
//! (descriptor table, avail ring at +0x1000, used ring at +0x2000, 64
//! entries), all below [`RING_AREA`]; request buffers wherever the caller
//! puts them (by default from [`BUFFERS`] on, 64 KiB per queue).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

/// The front-end's (made-up) virtual address of guest memory.
const UADDR: u64 = 0x7f00_0000_0000;
/// Entries per virtqueue.
pub const RING_SIZE: u16 = 64;
/// Most queues this driver sets up (their rings fit below `RING_AREA`).
pub const MAX_QUEUES: usize = 4;
/// Guest memory below this holds the rings only.
pub const RING_AREA: u64 = 0x1_0000;
/// Default request buffers: queue `q` uses `BUFFERS + q * 0x1_0000`.
pub const BUFFERS: u64 = 0x10_0000;
/// Sector size.
pub const SECTOR: u64 = 512;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// virtio-blk request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;

/// Where a request's parts live in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    /// The 16-byte request header.
    pub header: u64,
    /// The data buffer (unused by FLUSH).
    pub data: u64,
    /// The status byte.
    pub status: u64,
}

impl Placement {
    /// The default buffers of queue `q`.
    pub fn of_queue(q: usize) -> Placement {
        let base = BUFFERS + q as u64 * 0x1_0000;
        Placement {
            header: base,
            data: base + 0x1000,
            status: base + 0x200,
        }
    }
}

struct Vq {
    kick: EventFd,
    call: EventFd,
    err: EventFd,
    /// Requests published so far (= the next avail index).
    published: u16,
}

fn desc_table(q: usize) -> u64 {
    0x1000 + q as u64 * 0x4000
}

/// A connected vhost-user-blk front-end.
pub struct VuBlk {
    fe: Frontend,
    memfd: File,
    mem: GuestMemoryMmap,
    mem_size: u64,
    queues: Vec<Vq>,
}

fn memfd(size: u64) -> Result<File, String> {
    // SAFETY: a valid NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"vu-blk-test".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| format!("memfd size: {e}"))?;
    Ok(file)
}

impl VuBlk {
    /// Connects to the export at `socket` (retrying for up to `timeout`
    /// while it appears), negotiates, shares `mem_size` bytes of guest
    /// memory and enables `queues` rings (without EVENT_IDX: the export
    /// signals every completion).
    pub fn connect(
        socket: &Path,
        queues: usize,
        mem_size: u64,
        timeout: Duration,
    ) -> Result<VuBlk, String> {
        assert!((1..=MAX_QUEUES).contains(&queues));
        let deadline = Instant::now() + timeout;
        let mut fe = loop {
            match Frontend::connect(socket, queues as u64) {
                Ok(fe) => break fe,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("connect {}: {e}", socket.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        fn err(what: &'static str) -> impl Fn(vhost::Error) -> String {
            move |e| format!("{what}: {e}")
        }
        fe.set_owner().map_err(err("SET_OWNER"))?;
        let features = fe.get_features().map_err(err("GET_FEATURES"))?;
        fe.set_features(features & !VIRTIO_RING_F_EVENT_IDX)
            .map_err(err("SET_FEATURES"))?;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let pf = fe
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            fe.set_protocol_features(pf)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let memfd = memfd(mem_size)?;
        let region = MmapRegion::from_file(
            FileOffset::new(memfd.try_clone().map_err(|e| e.to_string())?, 0),
            mem_size as usize,
        )
        .map_err(|e| format!("map guest memory: {e}"))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or("guest region")?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| e.to_string())?;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem_size,
            userspace_addr: UADDR,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .map_err(err("SET_MEM_TABLE"))?;
        let mut vqs = Vec::new();
        for q in 0..queues {
            let vq = Vq {
                kick: EventFd::new(0).map_err(|e| e.to_string())?,
                call: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
                err: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
                published: 0,
            };
            let d = desc_table(q);
            fe.set_vring_num(q, RING_SIZE)
                .map_err(err("SET_VRING_NUM"))?;
            fe.set_vring_base(q, 0).map_err(err("SET_VRING_BASE"))?;
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: RING_SIZE,
                    queue_size: RING_SIZE,
                    flags: 0,
                    desc_table_addr: UADDR + d,
                    avail_ring_addr: UADDR + d + 0x1000,
                    used_ring_addr: UADDR + d + 0x2000,
                    log_addr: None,
                },
            )
            .map_err(err("SET_VRING_ADDR"))?;
            fe.set_vring_kick(q, &vq.kick)
                .map_err(err("SET_VRING_KICK"))?;
            fe.set_vring_call(q, &vq.call)
                .map_err(err("SET_VRING_CALL"))?;
            fe.set_vring_err(q, &vq.err).map_err(err("SET_VRING_ERR"))?;
            vqs.push(vq);
        }
        for q in 0..queues {
            fe.set_vring_enable(q, true)
                .map_err(err("SET_VRING_ENABLE"))?;
        }
        Ok(VuBlk {
            fe,
            memfd,
            mem,
            mem_size,
            queues: vqs,
        })
    }

    /// The memfd shared as guest memory (a test may shrink it).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Guest memory as mapped in this process (never touch what was cut).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size of guest memory as announced to the export.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The vhost-user connection (for protocol requests of a test).
    pub fn frontend(&self) -> &Frontend {
        &self.fe
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(desc_table(q) + 0x2000 + 2))
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// Requests the export completed on queue `q` (the used index).
    pub fn completed(&self, q: usize) -> u16 {
        self.used_idx(q)
    }

    /// Writes request `t` (sector, `data` for OUT, `in_len` bytes for IN)
    /// at `at` and its descriptors (head 0) on queue `q`, without
    /// publishing it. The caller must publish it with [`VuBlk::publish`].
    pub fn prepare(
        &self,
        q: usize,
        t: u32,
        sector: u64,
        data: &[u8],
        in_len: u32,
        at: Placement,
    ) -> Result<(), String> {
        let m = &self.mem;
        let e = |e: vm_memory::GuestMemoryError| e.to_string();
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&t.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&hdr, GuestAddress(at.header)).map_err(e)?;
        m.write_obj(0xffu8, GuestAddress(at.status)).map_err(e)?;
        let mut descs: Vec<(u64, u32, u16)> = vec![(at.header, 16, 0)];
        match t {
            T_OUT => {
                m.write_slice(data, GuestAddress(at.data)).map_err(e)?;
                descs.push((at.data, data.len() as u32, 0));
            }
            T_IN => descs.push((at.data, in_len, VRING_DESC_F_WRITE)),
            _ => {}
        }
        descs.push((at.status, 1, VRING_DESC_F_WRITE));
        let table = desc_table(q);
        let n = descs.len();
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
            let base = table + 16 * i as u64;
            m.write_obj(addr.to_le(), GuestAddress(base)).map_err(e)?;
            m.write_obj(len.to_le(), GuestAddress(base + 8))
                .map_err(e)?;
            m.write_obj((flags | next).to_le(), GuestAddress(base + 12))
                .map_err(e)?;
            m.write_obj((i as u16 + 1).to_le(), GuestAddress(base + 14))
                .map_err(e)?;
        }
        Ok(())
    }

    /// Publishes head 0 on queue `q`'s avail ring and kicks the export.
    pub fn publish(&mut self, q: usize) -> Result<(), String> {
        let avail = desc_table(q) + 0x1000;
        let vq = &mut self.queues[q];
        let pos = vq.published;
        let e = |e: vm_memory::GuestMemoryError| e.to_string();
        self.mem
            .write_obj(
                0u16.to_le(),
                GuestAddress(avail + 4 + 2 * u64::from(pos % RING_SIZE)),
            )
            .map_err(e)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(pos.wrapping_add(1).to_le(), GuestAddress(avail + 2))
            .map_err(e)?;
        vq.published = pos.wrapping_add(1);
        vq.kick.write(1).map_err(|e| format!("kick: {e}"))
    }

    /// Waits until every published request of queue `q` completed.
    pub fn wait(&self, q: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let want = self.queues[q].published;
        while self.used_idx(q) != want {
            if Instant::now() >= deadline {
                return Err(format!(
                    "queue {q}: {} of {want} requests completed after {timeout:?}",
                    self.used_idx(q)
                ));
            }
            let _ = self.queues[q].call.read();
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Whether the export signalled queue `q`'s error eventfd (it stopped
    /// the ring); clears the signal.
    pub fn ring_error(&self, q: usize) -> bool {
        self.queues[q].err.read().is_ok()
    }

    fn status(&self, at: Placement) -> Result<u8, String> {
        self.mem
            .read_obj::<u8>(GuestAddress(at.status))
            .map_err(|e| e.to_string())
    }

    /// One request on queue `q` with its default buffers, waited for;
    /// returns the status byte.
    fn run(
        &mut self,
        q: usize,
        t: u32,
        sector: u64,
        data: &[u8],
        in_len: u32,
    ) -> Result<u8, String> {
        let at = Placement::of_queue(q);
        self.prepare(q, t, sector, data, in_len, at)?;
        self.publish(q)?;
        self.wait(q, Duration::from_secs(60))?;
        self.status(at)
    }

    /// Writes `data` at `sector` through queue `q`; returns the status.
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> Result<u8, String> {
        self.run(q, T_OUT, sector, data, 0)
    }

    /// FLUSH through queue `q`; returns the status.
    pub fn flush(&mut self, q: usize) -> Result<u8, String> {
        self.run(q, T_FLUSH, 0, &[], 0)
    }

    /// Reads `len` bytes at `sector` through queue `q`: (status, data).
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> Result<(u8, Vec<u8>), String> {
        let status = self.run(q, T_IN, sector, &[], len)?;
        let mut buf = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(Placement::of_queue(q).data))
            .map_err(|e| e.to_string())?;
        Ok((status, buf))
    }
}

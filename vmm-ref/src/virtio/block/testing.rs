//! Test helpers shared by the block tests: temporary disks, guest memory,
//! descriptors, and an error-injecting backend.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::backend::{DiskBackend, DiskCompletion, DiskOp, DiskOpKind, EngineKind};
use super::raw::RawFile;
use super::request::DiskLimits;

/// Held by the tests that spawn a child process, and by the tests that need
/// an image lock gone as soon as they drop it: between fork and exec a child
/// holds a copy of every descriptor of the test process, and with it the OFD
/// locks of their open file descriptions, so a lock dropped meanwhile stays
/// held until the child's exec.
pub fn spawn_exclusion() -> MutexGuard<'static, ()> {
    static SPAWN: Mutex<()> = Mutex::new(());
    SPAWN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest memory size used by the tests.
pub const MEM_SIZE: usize = 0x10_0000;

/// A temporary image of `size` bytes filled with `fill`.
pub fn temp_disk(size: usize, fill: u8) -> TempFile {
    let f = TempFile::new_with_prefix("/tmp/virtio-blk-test-").unwrap();
    std::fs::write(f.as_path(), vec![fill; size]).unwrap();
    f
}

/// Opens a temporary image as a raw file.
pub fn open_raw(f: &TempFile, read_only: bool, direct: bool) -> Arc<RawFile> {
    Arc::new(RawFile::open(f.as_path(), read_only, direct).unwrap())
}

/// Opens a temporary image with `O_DIRECT`, or `None` (test reported as
/// skipped) when the file system holding /tmp does not support it.
pub fn open_direct(f: &TempFile) -> Option<Arc<RawFile>> {
    match RawFile::open(f.as_path(), false, true) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("skipped: O_DIRECT not supported on /tmp: {e}");
            None
        }
        Err(e) => panic!("open O_DIRECT: {e}"),
    }
}

/// 1 MiB of guest memory at 0.
pub fn guest_mem() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

/// A descriptor (NEXT/next are filled in by `build_desc_chain`).
pub fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write {
        virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Limits of a writable disk of `capacity_sectors` with everything enabled.
pub fn limits(capacity_sectors: u64) -> DiskLimits {
    DiskLimits {
        capacity_sectors,
        read_only: false,
        seg_max: 8,
        size_max: 1 << 20,
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 1 << 20,
        max_write_zeroes_sectors: 1 << 20,
    }
}

/// Fails every operation for which `fail` returns true with EIO; passes
/// the rest to `inner`.
pub struct FaultyBackend {
    pub inner: Box<dyn DiskBackend>,
    pub fail: Box<dyn Fn(&DiskOpKind) -> bool + Send>,
    pub failed: VecDeque<u64>,
    pub injected: Arc<std::sync::atomic::AtomicUsize>,
}

impl FaultyBackend {
    /// Wraps `inner`.
    pub fn new(
        inner: Box<dyn DiskBackend>,
        fail: impl Fn(&DiskOpKind) -> bool + Send + 'static,
    ) -> FaultyBackend {
        FaultyBackend {
            inner,
            fail: Box::new(fail),
            failed: VecDeque::new(),
            injected: Arc::default(),
        }
    }
}

impl DiskBackend for FaultyBackend {
    fn engine(&self) -> EngineKind {
        self.inner.engine()
    }
    fn has_capacity(&self) -> bool {
        self.inner.has_capacity()
    }
    fn submit(&mut self, op: DiskOp, user_data: u64) {
        if (self.fail)(&op.kind) {
            self.injected
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.failed.push_back(user_data);
        } else {
            self.inner.submit(op, user_data);
        }
    }
    fn flush_submissions(&mut self) {
        self.inner.flush_submissions()
    }
    fn set_max_batch(&mut self, n: usize) {
        self.inner.set_max_batch(n)
    }
    fn has_completions(&mut self) -> bool {
        !self.failed.is_empty() || self.inner.has_completions()
    }
    fn ack_completion_event(&mut self) {
        self.inner.ack_completion_event()
    }
    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        out.extend(self.failed.drain(..).map(|user_data| DiskCompletion {
            user_data,
            result: Err(io::Error::from_raw_os_error(libc::EIO)),
        }));
        self.inner.reap(out)
    }
    fn wait(&mut self) -> io::Result<()> {
        if self.failed.is_empty() {
            self.inner.wait()
        } else {
            Ok(())
        }
    }
    fn in_flight(&self) -> usize {
        self.failed.len() + self.inner.in_flight()
    }
    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }
}

/// Polls `cond` every millisecond for up to 20 s; whether it became true.
pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    cond()
}

/// A minimal virtio-mmio driver used by the end-to-end tests: it programs
/// the transport through `BusDevice` reads and writes exactly like a guest
/// driver, and builds split rings and requests in guest memory by hand
/// (virtio-queue's `MockSplitQueue` zeroes the rings whenever it is
/// created, so it cannot be re-attached to live rings).
pub mod driver {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use crate::bus::BusDevice;
    use crate::virtio::mmio::{regs, status, MmioTransport};

    /// Reads a register.
    pub fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    /// Writes a register.
    pub fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Split ring layout of queue `i` (`size` entries).
    pub struct Rings {
        /// Descriptor table.
        pub desc: u64,
        /// Available ring.
        pub avail: u64,
        /// Used ring.
        pub used: u64,
        /// Queue size.
        pub size: u16,
    }

    impl Rings {
        /// Rings of queue `i` at `0x1_0000 * (i + 1)`.
        pub fn of(i: u16, size: u16) -> Rings {
            let desc = 0x1_0000 * (u64::from(i) + 1);
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
            Rings {
                desc,
                avail,
                used,
                size,
            }
        }

        /// Zeroes the rings.
        pub fn clear(&self, mem: &GuestMemoryMmap) {
            let len = (self.used + 6 + 8 * u64::from(self.size) - self.desc) as usize;
            mem.write_slice(&vec![0u8; len], GuestAddress(self.desc))
                .unwrap();
        }

        /// Writes descriptor `idx`.
        pub fn set_desc(
            &self,
            mem: &GuestMemoryMmap,
            idx: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let a = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(a)).unwrap();
            mem.write_obj(len, GuestAddress(a + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
            mem.write_obj(next, GuestAddress(a + 14)).unwrap();
        }

        /// Makes chain `head` available.
        pub fn push_avail(&self, mem: &GuestMemoryMmap, head: u16) {
            let idx: u16 = mem
                .load(GuestAddress(self.avail + 2), Ordering::Acquire)
                .unwrap();
            let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            mem.store(
                idx.wrapping_add(1),
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .unwrap();
        }

        /// The used index.
        pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
            mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
                .unwrap()
        }

        /// Used element `i`: (id, len).
        pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
            let a = self.used + 4 + 8 * u64::from(i % self.size);
            (
                mem.read_obj(GuestAddress(a)).unwrap(),
                mem.read_obj(GuestAddress(a + 4)).unwrap(),
            )
        }
    }

    /// Negotiates `want & offered`, sets up queues `0..nq` of `size` (see
    /// [`Rings::of`]), and sets DRIVER_OK. Returns the final status.
    pub fn bring_up(
        t: &mut MmioTransport,
        mem: &GuestMemoryMmap,
        want: u64,
        nq: u16,
        size: u16,
    ) -> u32 {
        assert_eq!(rd(t, regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(t, regs::VERSION), 2);
        assert_eq!(rd(t, regs::DEVICE_ID), 2);
        wr(t, regs::STATUS, 0);
        wr(t, regs::STATUS, status::ACKNOWLEDGE);
        wr(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, regs::DEVICE_FEATURES_SEL, 0);
        let lo = rd(t, regs::DEVICE_FEATURES);
        wr(t, regs::DEVICE_FEATURES_SEL, 1);
        let hi = rd(t, regs::DEVICE_FEATURES);
        let acked = ((u64::from(hi) << 32) | u64::from(lo)) & want;
        wr(t, regs::DRIVER_FEATURES_SEL, 0);
        wr(t, regs::DRIVER_FEATURES, acked as u32);
        wr(t, regs::DRIVER_FEATURES_SEL, 1);
        wr(t, regs::DRIVER_FEATURES, (acked >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(t, regs::STATUS, s);
        assert_eq!(rd(t, regs::STATUS), s, "FEATURES_OK refused");
        for i in 0..nq {
            let r = Rings::of(i, size);
            r.clear(mem);
            wr(t, regs::QUEUE_SEL, u32::from(i));
            assert!(rd(t, regs::QUEUE_NUM_MAX) >= u32::from(size));
            assert_eq!(rd(t, regs::QUEUE_READY), 0);
            wr(t, regs::QUEUE_NUM, u32::from(size));
            for (lo, hi, a) in [
                (regs::QUEUE_DESC_LOW, regs::QUEUE_DESC_HIGH, r.desc),
                (regs::QUEUE_AVAIL_LOW, regs::QUEUE_AVAIL_HIGH, r.avail),
                (regs::QUEUE_USED_LOW, regs::QUEUE_USED_HIGH, r.used),
            ] {
                wr(t, lo, a as u32);
                wr(t, hi, (a >> 32) as u32);
            }
            wr(t, regs::QUEUE_READY, 1);
        }
        wr(t, regs::STATUS, s | status::DRIVER_OK);
        rd(t, regs::STATUS)
    }

    /// One request as the driver builds it.
    #[derive(Clone, Copy, Debug)]
    pub struct Req {
        /// Request type.
        pub t: u32,
        /// Sector.
        pub sector: u64,
        /// Data buffer (header at `buf - 0x100`, status at `buf - 0x10`).
        pub buf: u64,
        /// Data length (0 = no data descriptor).
        pub len: u32,
        /// Data is device-writable.
        pub write: bool,
    }

    /// Places `reqs` in queue `qi`'s rings (descriptors from index
    /// `first`, 3 per request at most), without notifying. Returns the
    /// next free descriptor index.
    pub fn post(mem: &GuestMemoryMmap, qi: u16, size: u16, reqs: &[Req], first: u16) -> u16 {
        let rings = Rings::of(qi, size);
        let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let w = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        let mut idx = first % size;
        for r in reqs {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&r.t.to_le_bytes());
            h[8..].copy_from_slice(&r.sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(r.buf - 0x100)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(r.buf - 0x10)).unwrap();
            let head = idx;
            let mut chain = vec![(r.buf - 0x100, 16u32, 0u16)];
            if r.len > 0 {
                chain.push((r.buf, r.len, if r.write { w } else { 0 }));
            }
            chain.push((r.buf - 0x10, 1, w));
            let n = chain.len();
            for (k, (addr, len, flags)) in chain.into_iter().enumerate() {
                let nxt = (idx + 1) % size;
                let f = if k + 1 < n { flags | next } else { flags };
                rings.set_desc(mem, idx, addr, len, f, nxt);
                idx = nxt;
            }
            rings.push_avail(mem, head);
        }
        idx
    }

    /// Waits (up to 20 s) until queue `qi`'s used index reaches `want`.
    pub fn wait_used(mem: &GuestMemoryMmap, qi: u16, size: u16, want: u16) -> bool {
        let rings = Rings::of(qi, size);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if rings.used_idx(mem) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Status byte of a request.
    pub fn status_of(mem: &GuestMemoryMmap, r: &Req) -> u8 {
        mem.read_obj(GuestAddress(r.buf - 0x10)).unwrap()
    }
}

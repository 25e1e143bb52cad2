//! The io_uring engine: one ring per queue, driven from the queue's
//! IOThread.
//!
//! - Submissions are batched: SQEs queue up while the queue handler takes
//!   requests and go to the kernel in one `io_uring_enter` per pass
//!   ([`DiskBackend::flush_submissions`]), or earlier once `aio-max-batch`
//!   of them wait.
//! - The image's descriptors are registered with the ring
//!   (`IORING_REGISTER_FILES`) and SQEs name them by index, which spares the
//!   kernel a file lookup and reference count per request; a request with
//!   one data buffer (the usual case) goes as `READ`/`WRITE`, which spares
//!   copying in an iovec array.
//! - The ring is set up with `IORING_SETUP_COOP_TASKRUN |
//!   IORING_SETUP_TASKRUN_FLAG` where the kernel has them (5.19): a
//!   completion that needs the submitting task (the IOThread) to finish it
//!   does not interrupt the IOThread while it runs in user space; the
//!   kernel sets `IORING_SQ_TASKRUN` instead, which the completion poll
//!   ([`DiskBackend::has_completions`]) looks at along with the completion
//!   ring, and reaping enters the kernel to run that work. (A sleeping
//!   IOThread is still woken for it.)
//! - Completions wake the IOThread through the ring's own descriptor, which
//!   is readable while the completion ring holds entries: no eventfd to
//!   signal per completion batch and none to read back.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, register::Probe, squeue, types, IoUring};

use super::backend::{
    DiskBackend, DiskCompletion, DiskOp, DiskOpKind, EngineKind, DEFAULT_MAX_BATCH,
};
use super::raw::{complete_short, IoPlan, RawFile, IOV_MAX};

struct InFlight {
    user_data: u64,
    op: DiskOp,
    plan: Option<IoPlan>,
}

/// How SQEs name the image's descriptors: by index into the registered
/// files (`[buffered, direct]`) or, if registering failed, by number.
#[derive(Clone, Copy, Debug)]
struct Files {
    fixed: bool,
    buffered: RawFd,
    direct: Option<RawFd>,
}

impl Files {
    /// The registered index of `fd`.
    fn index(&self, fd: RawFd) -> Option<u32> {
        if !self.fixed {
            None
        } else if fd == self.buffered {
            Some(0)
        } else if Some(fd) == self.direct {
            Some(1)
        } else {
            None
        }
    }
}

/// Builds an SQE with `$fd` as a registered index when it has one, else as
/// a plain descriptor (the opcode builders take either type).
macro_rules! with_fd {
    ($files:expr, $fd:expr, |$f:ident| $build:expr) => {
        match $files.index($fd) {
            Some(i) => {
                let $f = types::Fixed(i);
                $build
            }
            None => {
                let $f = types::Fd($fd);
                $build
            }
        }
    };
}

/// io_uring backend over a [`RawFile`].
pub struct IoUringEngine {
    file: Arc<RawFile>,
    ring: IoUring,
    files: Files,
    /// `IORING_SETUP_TASKRUN_FLAG` is in effect: `IORING_SQ_TASKRUN` tells
    /// when completions wait for the IOThread to run them.
    taskrun_flag: bool,
    /// One per SQ entry; never resized, so an SQE may point into a slot
    /// (the iovec array of a vectored request) until its CQE is reaped.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    unsubmitted: usize,
    max_batch: usize,
    ready: VecDeque<DiskCompletion>,
    enters: u64,
}

/// A ring of `entries`, with COOP_TASKRUN + TASKRUN_FLAG when the kernel
/// accepts them. Returns the ring and whether the flags are in effect.
fn setup_ring(entries: u32) -> io::Result<(IoUring, bool)> {
    match IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries)
    {
        Ok(r) => Ok((r, true)),
        // Older than 5.19: unknown setup flags.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log::debug!("io_uring: no COOP_TASKRUN/TASKRUN_FLAG ({e}), plain ring");
            Ok((IoUring::new(entries)?, false))
        }
        Err(e) => Err(e),
    }
}

impl IoUringEngine {
    /// Checks that io_uring can be set up and supports the opcodes used.
    pub fn probe() -> io::Result<()> {
        let ring = IoUring::new(4)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (name, code) in [
            ("read", opcode::Read::CODE),
            ("write", opcode::Write::CODE),
            ("readv", opcode::Readv::CODE),
            ("writev", opcode::Writev::CODE),
            ("fsync", opcode::Fsync::CODE),
            ("fallocate", opcode::Fallocate::CODE),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring opcode {name} not supported"),
                ));
            }
        }
        Ok(())
    }

    /// A ring for up to `queue_size` in-flight operations.
    pub fn new(file: Arc<RawFile>, queue_size: u16) -> io::Result<IoUringEngine> {
        let entries = u32::from(queue_size).max(8).next_power_of_two();
        let (ring, taskrun_flag) = setup_ring(entries)?;
        let buffered = file.buffered_fd();
        let direct = file.direct_fd();
        let mut fds = vec![buffered];
        fds.extend(direct);
        // Registered files are an optimisation: without them (EMFILE under
        // a low RLIMIT_NOFILE, ENOMEM) SQEs name the descriptors directly.
        let fixed = match ring.submitter().register_files(&fds) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("io_uring: cannot register the image's files ({e}), using plain fds");
                false
            }
        };
        let cap = ring.params().sq_entries() as usize;
        Ok(IoUringEngine {
            file,
            ring,
            files: Files {
                fixed,
                buffered,
                direct,
            },
            taskrun_flag,
            slots: (0..cap).map(|_| None).collect(),
            free: (0..cap).rev().collect(),
            unsubmitted: 0,
            max_batch: DEFAULT_MAX_BATCH,
            ready: VecDeque::new(),
            enters: 0,
        })
    }

    /// Number of `io_uring_enter` calls made to submit (diagnostics/tests).
    pub fn submit_calls(&self) -> u64 {
        self.enters
    }

    /// Whether the ring was set up with COOP_TASKRUN + TASKRUN_FLAG.
    pub fn coop_taskrun(&self) -> bool {
        self.taskrun_flag
    }

    /// Whether the image's descriptors are registered with the ring.
    pub fn fixed_files(&self) -> bool {
        self.files.fixed
    }

    fn enter(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        self.enters += 1;
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            Err(e) => {
                // The SQEs stay in the ring and go with the next enter.
                log::error!("io_uring submit failed: {e}");
            }
        }
    }

    /// Completions wait for the IOThread to run them (COOP_TASKRUN).
    fn taskrun_pending(&mut self) -> bool {
        self.taskrun_flag && self.ring.submission().taskrun()
    }

    /// Runs the completion work the kernel left for this thread (with
    /// COOP_TASKRUN it does not interrupt us for it): an `io_uring_enter`
    /// with GETEVENTS, which also submits whatever SQEs wait.
    fn run_task_work(&mut self) {
        if !self.taskrun_pending() {
            return;
        }
        // submit() adds GETEVENTS when IORING_SQ_TASKRUN is set.
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => log::error!("io_uring enter (task work) failed: {e}"),
        }
    }

    /// The SQE for the operation in `slot`, built from the slot itself (its
    /// iovec array stays where it is until the CQE is reaped). `None`: the
    /// operation runs synchronously instead.
    fn build_sqe(&self, slot: usize) -> Option<squeue::Entry> {
        let f = self.slots.get(slot)?.as_ref()?;
        let files = self.files;
        let sqe = match f.op.kind {
            DiskOpKind::Read { .. } | DiskOpKind::Write { .. } => {
                let p = f.plan.as_ref()?;
                let write = matches!(f.op.kind, DiskOpKind::Write { .. });
                match p.iovecs.as_slice() {
                    // One buffer: READ/WRITE, no iovec array to import.
                    [one] if u32::try_from(one.iov_len).is_ok() => {
                        let (ptr, len) = (one.iov_base.cast::<u8>(), one.iov_len as u32);
                        with_fd!(files, p.fd, |fd| if write {
                            opcode::Write::new(fd, ptr, len).offset(p.offset).build()
                        } else {
                            opcode::Read::new(fd, ptr, len).offset(p.offset).build()
                        })
                    }
                    iovecs => {
                        let (ptr, len) = (iovecs.as_ptr(), iovecs.len() as u32);
                        with_fd!(files, p.fd, |fd| if write {
                            opcode::Writev::new(fd, ptr, len).offset(p.offset).build()
                        } else {
                            opcode::Readv::new(fd, ptr, len).offset(p.offset).build()
                        })
                    }
                }
            }
            // The test hook: RawFile::fdatasync acknowledges without syncing.
            DiskOpKind::Flush if self.file.skips_flush() => return None,
            DiskOpKind::Flush => with_fd!(files, files.buffered, |fd| opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            DiskOpKind::Discard { offset, len } | DiskOpKind::WriteZeroes { offset, len, .. } => {
                let mode = self.file.fallocate_mode(&f.op.kind)?;
                with_fd!(files, files.buffered, |fd| opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build())
            }
        };
        Some(sqe.user_data(slot as u64))
    }

    fn complete(&mut self, slot: usize, res: i32) -> Option<DiskCompletion> {
        let f = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        let is_write = matches!(f.op.kind, DiskOpKind::Write { .. });
        let result = if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            match f.op.kind {
                // Unsupported fallocate mode: the sync path knows the fallbacks.
                DiskOpKind::Discard { .. } | DiskOpKind::WriteZeroes { .. }
                    if super::raw::is_unsupported(&e) =>
                {
                    self.file.run_sync(&f.op)
                }
                _ => Err(e),
            }
        } else {
            let n = res as usize;
            match (&f.plan, &f.op.bufs) {
                (Some(plan), Some(bufs)) => {
                    let want: usize = plan.iovecs.iter().map(|v| v.iov_len).sum();
                    let total = if n < want {
                        complete_short(plan.fd, plan.offset, &plan.iovecs, n, is_write)
                    } else {
                        Ok(n)
                    };
                    total.and_then(|t| RawFile::finish_plan(plan, bufs, is_write, t).map(|()| t))
                }
                _ => Ok(0),
            }
        };
        Some(DiskCompletion {
            user_data: f.user_data,
            result,
        })
    }
}

impl DiskBackend for IoUringEngine {
    fn engine(&self) -> EngineKind {
        EngineKind::IoUring
    }

    fn has_capacity(&self) -> bool {
        !self.free.is_empty()
    }

    fn submit(&mut self, op: DiskOp, user_data: u64) {
        let plan = match (op.kind, &op.bufs) {
            (DiskOpKind::Read { offset }, Some(b)) => Some(self.file.plan(offset, b, false)),
            (DiskOpKind::Write { offset }, Some(b)) => Some(self.file.plan(offset, b, true)),
            _ => None,
        };
        let plan = match plan.transpose() {
            Ok(p) => p,
            Err(e) => {
                self.ready.push_back(DiskCompletion {
                    user_data,
                    result: Err(e),
                });
                return;
            }
        };
        if plan.as_ref().is_some_and(|p| p.iovecs.len() > IOV_MAX) {
            // Too many iovecs for one vectored SQE: rw_all splits them.
            let result = self.file.run_sync(&op);
            self.ready.push_back(DiskCompletion { user_data, result });
            return;
        }
        // The slot first: the SQE points into it, and a full engine must
        // not leave a request half built.
        let Some(slot) = self.free.pop() else {
            self.ready.push_back(DiskCompletion {
                user_data,
                result: Err(io::Error::other("io_uring engine full")),
            });
            return;
        };
        let Some(cell) = self.slots.get_mut(slot) else {
            // Cannot happen: `free` holds indices of `slots` only.
            self.ready.push_back(DiskCompletion {
                user_data,
                result: Err(io::Error::other("io_uring engine slot out of range")),
            });
            return;
        };
        *cell = Some(InFlight {
            user_data,
            op,
            plan,
        });
        let Some(sqe) = self.build_sqe(slot) else {
            // Nothing for the kernel to do asynchronously (empty range or
            // the write-zeroes fallback): run it here.
            if let Some(f) = self.slots.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                let result = self.file.run_sync(&f.op);
                self.ready.push_back(DiskCompletion { user_data, result });
            }
            return;
        };
        // SAFETY: the SQE's buffers (the guest memory that the op's
        // GuestBuffers keep mapped, or the plan's bounce buffer) and, for a
        // vectored request, its iovec array (inside `slots[slot]`, a vector
        // that is never resized) stay in place until its CQE is reaped in
        // `complete`; the descriptors are owned by `self.file` (and
        // registered with the ring when named by index).
        let pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok() || {
            self.enter();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&sqe) }.is_ok()
        };
        if !pushed {
            if let Some(c) = self.complete(slot, -libc::EBUSY) {
                self.ready.push_back(c);
            }
            return;
        }
        self.unsubmitted += 1;
        if self.unsubmitted >= self.max_batch {
            self.enter();
        }
    }

    fn flush_submissions(&mut self) {
        self.enter();
    }

    fn set_max_batch(&mut self, n: usize) {
        self.max_batch = if n == 0 { DEFAULT_MAX_BATCH } else { n };
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || !self.ring.completion().is_empty() || self.taskrun_pending()
    }

    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        out.extend(self.ready.drain(..));
        self.run_task_work();
        loop {
            // Taken in chunks without allocating: `complete` needs `self`.
            let mut cqes = [(0u64, 0i32); 32];
            let mut n = 0;
            for (c, dst) in self.ring.completion().zip(cqes.iter_mut()) {
                *dst = (c.user_data(), c.result());
                n += 1;
            }
            for &(slot, res) in cqes.iter().take(n) {
                match usize::try_from(slot)
                    .ok()
                    .and_then(|s| self.complete(s, res))
                {
                    Some(c) => out.push(c),
                    None => log::error!("io_uring: completion for unknown slot {slot}"),
                }
            }
            if n < cqes.len() {
                break;
            }
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        if !self.ready.is_empty() || self.in_flight() == 0 {
            return Ok(());
        }
        if !self.ring.completion().is_empty() {
            return Ok(());
        }
        self.enters += 1;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.ready.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        // Readable while the completion ring is not empty.
        Some(self.ring.as_raw_fd())
    }
}

impl Drop for IoUringEngine {
    fn drop(&mut self) {
        // The kernel may still write into guest memory / bounce buffers of
        // in-flight operations: wait for all of them before freeing.
        let mut sink = Vec::new();
        while self.slots.len() != self.free.len() {
            self.enter();
            if self.ring.submit_and_wait(1).is_err() {
                log::error!("io_uring: cannot drain in-flight operations on drop");
                // Leak the buffers rather than free memory the kernel may write.
                for s in self.slots.iter_mut() {
                    if let Some(f) = s.take() {
                        std::mem::forget(f);
                    }
                }
                return;
            }
            self.reap(&mut sink);
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::backend::GuestBuffers;
    use crate::virtio::block::request::Segment;
    use crate::virtio::block::testing::{guest_mem, open_direct, open_raw, temp_disk};

    fn op(
        mem: &std::sync::Arc<vm_memory::GuestMemoryMmap>,
        kind: DiskOpKind,
        addr: u64,
        len: u32,
    ) -> DiskOp {
        let segs = [Segment {
            addr: GuestAddress(addr),
            len,
        }];
        DiskOp {
            kind,
            bufs: Some(GuestBuffers::new(mem.clone(), &segs).unwrap()),
        }
    }

    #[test]
    fn round_trip_buffered_and_direct() {
        for direct in [false, true] {
            let f = temp_disk(1 << 20, 0);
            let raw = if direct {
                match open_direct(&f) {
                    Some(r) => r,
                    None => continue,
                }
            } else {
                open_raw(&f, false, false)
            };
            let mut e = IoUringEngine::new(raw, 16).unwrap();
            // The image's descriptors are registered (SQEs use indices).
            assert!(e.fixed_files());
            let mem = guest_mem();
            let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 256) as u8).collect();
            mem.write_slice(&pattern, GuestAddress(0x2_0000)).unwrap();
            let w = op(&mem, DiskOpKind::Write { offset: 4096 }, 0x2_0000, 8192);
            assert_eq!(e.execute_blocking(w).unwrap(), 8192);
            // Unaligned destination (bounce buffer when direct).
            let r = op(&mem, DiskOpKind::Read { offset: 4096 }, 0x4_0007, 8192);
            assert_eq!(e.execute_blocking(r).unwrap(), 8192);
            let mut back = vec![0u8; 8192];
            mem.read_slice(&mut back, GuestAddress(0x4_0007)).unwrap();
            assert_eq!(back, pattern, "direct={direct}");
            // Two separate buffers: one vectored SQE whose iovec array
            // lives in the engine's slot.
            let segs = [
                Segment {
                    addr: GuestAddress(0x6_0000),
                    len: 4096,
                },
                Segment {
                    addr: GuestAddress(0x8_0000),
                    len: 4096,
                },
            ];
            let r2 = DiskOp {
                kind: DiskOpKind::Read { offset: 4096 },
                bufs: Some(GuestBuffers::new(mem.clone(), &segs).unwrap()),
            };
            assert_eq!(r2.bufs.as_ref().unwrap().iovecs().len(), 2);
            assert_eq!(e.execute_blocking(r2).unwrap(), 8192);
            let mut half = vec![0u8; 4096];
            mem.read_slice(&mut half, GuestAddress(0x6_0000)).unwrap();
            assert_eq!(half, pattern[..4096], "direct={direct}");
            mem.read_slice(&mut half, GuestAddress(0x8_0000)).unwrap();
            assert_eq!(half, pattern[4096..], "direct={direct}");
            let flush = DiskOp {
                kind: DiskOpKind::Flush,
                bufs: None,
            };
            assert_eq!(e.execute_blocking(flush).unwrap(), 0);
            for kind in [
                DiskOpKind::WriteZeroes {
                    offset: 4096,
                    len: 4096,
                    unmap: false,
                },
                DiskOpKind::Discard {
                    offset: 65536,
                    len: 4096,
                },
                DiskOpKind::WriteZeroes {
                    offset: 8192,
                    len: 0,
                    unmap: true,
                },
            ] {
                assert_eq!(e.execute_blocking(DiskOp { kind, bufs: None }).unwrap(), 0);
            }
            let d = std::fs::read(f.as_path()).unwrap();
            assert!(d[4096..8192].iter().all(|&b| b == 0));
            assert_eq!(&d[8192..12288], &pattern[4096..]);
            assert_eq!(e.in_flight(), 0);
        }
    }

    #[test]
    fn max_batch_bounds_sqes_per_enter_and_completions_signal() {
        let f = temp_disk(1 << 20, 0x42);
        let mut e = IoUringEngine::new(open_raw(&f, false, false), 32).unwrap();
        let mem = guest_mem();
        e.set_max_batch(4);
        for i in 0..10u64 {
            let r = op(
                &mem,
                DiskOpKind::Read { offset: i * 4096 },
                0x1_0000 + i * 4096,
                4096,
            );
            e.submit(r, i);
        }
        // Two full batches of 4 went to the kernel; 2 SQEs wait.
        assert_eq!(e.submit_calls(), 2);
        e.flush_submissions();
        assert_eq!(e.submit_calls(), 3);
        assert_eq!(e.in_flight(), 10);
        // Completions wake the IOThread through the ring's own descriptor:
        // readable while the completion ring holds entries.
        let fd = e.completion_fd().unwrap();
        let readable = || {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
        };
        let mut done = Vec::new();
        while done.len() < 10 {
            e.wait().unwrap();
            assert!(e.has_completions());
            assert!(readable());
            e.reap(&mut done);
        }
        let mut tokens: Vec<u64> = done.iter().map(|c| c.user_data).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..10).collect::<Vec<_>>());
        assert!(done.iter().all(|c| matches!(c.result, Ok(4096))));
        // All reaped: nothing left to wake anyone.
        assert!(!readable());
        e.ack_completion_event();
        assert!(!e.has_completions());
        // 0 = default batch.
        e.set_max_batch(0);
        assert_eq!(e.max_batch, DEFAULT_MAX_BATCH);
        let mut buf = vec![0u8; 4096];
        mem.read_slice(&mut buf, GuestAddress(0x1_0000)).unwrap();
        assert!(buf.iter().all(|&b| b == 0x42));
    }

    #[test]
    fn capacity_errors_and_drop_drain() {
        let f = temp_disk(1 << 16, 0);
        let mut e = IoUringEngine::new(open_raw(&f, false, false), 8).unwrap();
        let mem = guest_mem();
        let cap = e.slots.len();
        for i in 0..cap as u64 {
            assert!(e.has_capacity());
            e.submit(op(&mem, DiskOpKind::Read { offset: 0 }, 0x1_0000, 512), i);
        }
        assert!(!e.has_capacity());
        // Over capacity: completes with an error instead of overflowing.
        e.submit(op(&mem, DiskOpKind::Read { offset: 0 }, 0x1_0000, 512), 99);
        let mut out = Vec::new();
        e.reap(&mut out);
        assert!(out.iter().any(|c| c.user_data == 99 && c.result.is_err()));
        // Drop with operations in flight waits for them.
        e.flush_submissions();
        drop(e);
        // An engine on a read-only file reports EBADF for writes.
        let mut e = IoUringEngine::new(open_raw(&f, true, false), 8).unwrap();
        let w = op(&mem, DiskOpKind::Write { offset: 0 }, 0x1_0000, 512);
        assert!(e.execute_blocking(w).is_err());
    }

    #[test]
    fn more_than_iov_max_buffers_round_trip() {
        let f = temp_disk(2 << 20, 0);
        let mut e = IoUringEngine::new(open_raw(&f, false, false), 8).unwrap();
        let mem = guest_mem();
        // 1100 separate 512-byte buffers: one iovec each.
        let segs: Vec<Segment> = (0..1100u64)
            .map(|i| Segment {
                addr: GuestAddress(0x1000 + i * 512),
                len: 512,
            })
            .collect();
        for (i, s) in segs.iter().enumerate() {
            mem.write_slice(&[i as u8; 512], s.addr).unwrap();
        }
        let w = DiskOp {
            kind: DiskOpKind::Write { offset: 0 },
            bufs: Some(GuestBuffers::new(mem.clone(), &segs).unwrap()),
        };
        assert!(w.bufs.as_ref().unwrap().iovecs().len() > IOV_MAX);
        assert_eq!(e.execute_blocking(w).unwrap(), 1100 * 512);
        let d = std::fs::read(f.as_path()).unwrap();
        for i in 0..1100usize {
            assert!(
                d[i * 512..(i + 1) * 512].iter().all(|&b| b == i as u8),
                "block {i}"
            );
        }
    }

    #[test]
    fn probe_works_here() {
        IoUringEngine::probe().unwrap();
        assert!(crate::virtio::block::backend::io_uring_available());
    }
}

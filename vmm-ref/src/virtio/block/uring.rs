//! The io_uring engine: one ring per queue, driven from the queue's
//! IOThread. Submissions are batched (`aio-max-batch` SQEs per
//! `io_uring_enter` at most); completions are signalled through an eventfd
//! registered with the ring (`IORING_REGISTER_EVENTFD`) and can be polled
//! without a syscall by looking at the completion ring.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, register::Probe, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{
    DiskBackend, DiskCompletion, DiskOp, DiskOpKind, EngineKind, DEFAULT_MAX_BATCH,
};
use super::raw::{complete_short, IoPlan, RawFile, IOV_MAX};

struct InFlight {
    user_data: u64,
    op: DiskOp,
    plan: Option<IoPlan>,
}

/// io_uring backend over a [`RawFile`].
pub struct IoUringEngine {
    file: Arc<RawFile>,
    ring: IoUring,
    evt: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    unsubmitted: usize,
    max_batch: usize,
    ready: VecDeque<DiskCompletion>,
    enters: u64,
}

impl IoUringEngine {
    /// Checks that io_uring can be set up and supports the opcodes used.
    pub fn probe() -> io::Result<()> {
        let ring = IoUring::new(4)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (name, code) in [
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
        let ring = IoUring::new(entries)?;
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        let cap = ring.params().sq_entries() as usize;
        Ok(IoUringEngine {
            file,
            ring,
            evt,
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

    fn build_sqe(&self, op: &DiskOp, plan: &Option<IoPlan>) -> Option<io_uring::squeue::Entry> {
        match op.kind {
            DiskOpKind::Read { .. } | DiskOpKind::Write { .. } => {
                let p = plan.as_ref()?;
                let fd = types::Fd(p.fd);
                let len = p.iovecs.len() as u32;
                Some(if matches!(op.kind, DiskOpKind::Write { .. }) {
                    opcode::Writev::new(fd, p.iovecs.as_ptr(), len)
                        .offset(p.offset)
                        .build()
                } else {
                    opcode::Readv::new(fd, p.iovecs.as_ptr(), len)
                        .offset(p.offset)
                        .build()
                })
            }
            // The test hook: RawFile::fdatasync acknowledges without syncing.
            DiskOpKind::Flush if self.file.skips_flush() => None,
            DiskOpKind::Flush => Some(
                opcode::Fsync::new(types::Fd(self.file.buffered_fd()))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            ),
            DiskOpKind::Discard { offset, len } | DiskOpKind::WriteZeroes { offset, len, .. } => {
                let mode = self.file.fallocate_mode(&op.kind)?;
                Some(
                    opcode::Fallocate::new(types::Fd(self.file.buffered_fd()), len)
                        .offset(offset)
                        .mode(mode)
                        .build(),
                )
            }
        }
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
        let Some(sqe) = self.build_sqe(&op, &plan) else {
            // Nothing for the kernel to do asynchronously (empty range or
            // the write-zeroes fallback): run it here.
            let result = self.file.run_sync(&op);
            self.ready.push_back(DiskCompletion { user_data, result });
            return;
        };
        let Some(slot) = self.free.pop() else {
            self.ready.push_back(DiskCompletion {
                user_data,
                result: Err(io::Error::other("io_uring engine full")),
            });
            return;
        };
        let sqe = sqe.user_data(slot as u64);
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(InFlight {
                user_data,
                op,
                plan,
            });
        }
        // SAFETY: the SQE's buffers (iovec array and the memory it points
        // to: guest memory kept mapped by the op's GuestBuffers, or the
        // plan's bounce buffer) live in `slots[slot]` until its CQE is
        // reaped in `complete`; the fd is owned by `self.file`.
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
        !self.ready.is_empty() || !self.ring.completion().is_empty()
    }

    fn ack_completion_event(&mut self) {
        // Non-blocking: EAGAIN when nothing was signalled.
        let _ = self.evt.read();
    }

    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        out.extend(self.ready.drain(..));
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in cqes {
            match usize::try_from(slot)
                .ok()
                .and_then(|s| self.complete(s, res))
            {
                Some(c) => out.push(c),
                None => log::error!("io_uring: completion for unknown slot {slot}"),
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
        Some(self.evt.as_raw_fd())
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
        let mut done = Vec::new();
        while done.len() < 10 {
            e.wait().unwrap();
            assert!(e.has_completions());
            e.reap(&mut done);
        }
        let mut tokens: Vec<u64> = done.iter().map(|c| c.user_data).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..10).collect::<Vec<_>>());
        assert!(done.iter().all(|c| matches!(c.result, Ok(4096))));
        // The registered eventfd was signalled.
        let fd = e.completion_fd().unwrap();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
        e.ack_completion_event();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
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

//! The synchronous engine: every operation runs to completion inside
//! `submit` (`preadv`/`pwritev`/`fdatasync`/`fallocate` on the IOThread).
//! Used when io_uring is unavailable or not wanted.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::backend::{DiskBackend, DiskCompletion, DiskOp, EngineKind};
use super::raw::RawFile;

/// A disk that runs one operation to completion in the calling thread.
pub trait SyncDisk: Send {
    /// Performs `op`; returns the bytes transferred.
    fn run(&mut self, op: &DiskOp) -> io::Result<usize>;
}

impl SyncDisk for Arc<RawFile> {
    fn run(&mut self, op: &DiskOp) -> io::Result<usize> {
        self.run_sync(op)
    }
}

/// Synchronous backend over a [`SyncDisk`] (by default a [`RawFile`]).
pub struct SyncEngine<D = Arc<RawFile>> {
    disk: D,
    done: VecDeque<DiskCompletion>,
}

impl<D> SyncEngine<D> {
    /// A sync engine on `disk`.
    pub fn new(disk: D) -> SyncEngine<D> {
        SyncEngine {
            disk,
            done: VecDeque::new(),
        }
    }

    /// The disk (e.g. to inspect a [`MemDisk`](super::mem_disk::MemDisk)).
    pub fn disk(&self) -> &D {
        &self.disk
    }
}

impl<D: SyncDisk> DiskBackend for SyncEngine<D> {
    fn engine(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn has_capacity(&self) -> bool {
        true
    }

    fn submit(&mut self, op: DiskOp, user_data: u64) {
        let result = self.disk.run(&op);
        self.done.push_back(DiskCompletion { user_data, result });
    }

    fn flush_submissions(&mut self) {}

    fn set_max_batch(&mut self, _n: usize) {}

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn reap(&mut self, out: &mut Vec<DiskCompletion>) {
        out.extend(self.done.drain(..));
    }

    fn wait(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
}

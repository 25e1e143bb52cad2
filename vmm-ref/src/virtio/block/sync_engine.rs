//! The synchronous engine: every operation runs to completion inside
//! `submit` (`preadv`/`pwritev`/`fdatasync`/`fallocate` on the IOThread).
//! Used when io_uring is unavailable or not wanted.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::backend::{DiskBackend, DiskCompletion, DiskOp, EngineKind};
use super::raw::RawFile;

/// Synchronous backend over a [`RawFile`].
pub struct SyncEngine {
    file: Arc<RawFile>,
    done: VecDeque<DiskCompletion>,
}

impl SyncEngine {
    /// A sync engine on `file`.
    pub fn new(file: Arc<RawFile>) -> SyncEngine {
        SyncEngine {
            file,
            done: VecDeque::new(),
        }
    }
}

impl DiskBackend for SyncEngine {
    fn engine(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn has_capacity(&self) -> bool {
        true
    }

    fn submit(&mut self, op: DiskOp, user_data: u64) {
        let result = self.file.run_sync(&op);
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

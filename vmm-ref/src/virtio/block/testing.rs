//! Test helpers shared by the block tests: temporary disks, guest memory,
//! descriptors, and an error-injecting backend.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::backend::{DiskBackend, DiskCompletion, DiskOp, DiskOpKind, EngineKind};
use super::raw::RawFile;
use super::request::DiskLimits;

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

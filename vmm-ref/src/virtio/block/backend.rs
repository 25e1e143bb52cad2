//! Disk backends: the [`DiskBackend`] submission/completion interface, the
//! operations it carries, and engine selection ([`BlockEngine`]).
//!
//! A backend is owned by one queue handler and runs on that queue's
//! IOThread. Operations are submitted with a `user_data` token and complete
//! later ([`DiskBackend::reap`]); the synchronous engine completes them
//! during `submit`, the io_uring engine when the kernel posts a CQE (its
//! [`DiskBackend::completion_fd`] becomes readable and
//! [`DiskBackend::has_completions`] turns true).

use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use smallvec::SmallVec;
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, Permissions};

use super::raw::RawFile;
use super::request::Segment;
use super::sync_engine::SyncEngine;
use super::uring::IoUringEngine;

/// Host iovecs of one request. Inline up to 4 (a block request has one or
/// two data buffers in practice): no allocation per request.
pub type Iovecs = SmallVec<[libc::iovec; 4]>;

/// Guest buffers of one request, as host iovecs, with the guest memory kept
/// mapped for as long as the buffers exist.
pub struct GuestBuffers {
    mem: Arc<GuestMemoryMmap>,
    segs: SmallVec<[Segment; 4]>,
    iovecs: Iovecs,
    len: usize,
}

// SAFETY: the raw pointers in `iovecs` point into the mmap'ed regions of
// `mem`, which this struct keeps alive; they are plain addresses that any
// thread may use.
unsafe impl Send for GuestBuffers {}

impl fmt::Debug for GuestBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestBuffers")
            .field("segs", &self.segs)
            .field("len", &self.len)
            .finish()
    }
}

impl GuestBuffers {
    /// Resolves `segs` to host addresses. Fails if a segment is not backed
    /// by guest memory.
    pub fn new(mem: Arc<GuestMemoryMmap>, segs: &[Segment]) -> io::Result<GuestBuffers> {
        let mut iovecs = Iovecs::with_capacity(segs.len());
        let mut len = 0usize;
        for s in segs {
            let n = s.len as usize;
            if n == 0 {
                continue;
            }
            let slices = GuestMemory::get_slices(&*mem, s.addr, n, Permissions::ReadWrite)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let mut covered = 0usize;
            for sl in slices {
                let sl = sl.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                covered += sl.len();
                iovecs.push(libc::iovec {
                    iov_base: sl.ptr_guard_mut().as_ptr().cast(),
                    iov_len: sl.len(),
                });
            }
            if covered != n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "segment not backed by guest memory",
                ));
            }
            len += n;
        }
        Ok(GuestBuffers {
            mem,
            segs: SmallVec::from_slice(segs),
            iovecs,
            len,
        })
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host iovecs (valid while `self` lives).
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Whether every iovec starts on `mem_align` and has a length that is a
    /// multiple of `len_align` (what `O_DIRECT` needs).
    pub fn is_aligned(&self, mem_align: usize, len_align: usize) -> bool {
        self.iovecs.iter().all(|v| {
            (v.iov_base as usize) % mem_align.max(1) == 0 && v.iov_len % len_align.max(1) == 0
        })
    }

    /// Copies `src` into the guest buffers, in order (at most `len()` bytes).
    pub fn copy_to_guest(&self, src: &[u8]) -> io::Result<()> {
        let mut done = 0usize;
        for s in &self.segs {
            let Some(rest) = src.get(done..) else { break };
            let n = rest.len().min(s.len as usize);
            let part = rest.get(..n).unwrap_or(&[]);
            self.mem
                .write_slice(part, s.addr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            done += n;
        }
        Ok(())
    }

    /// Copies the guest buffers into `dst`, in order (at most `dst.len()` bytes).
    pub fn copy_from_guest(&self, dst: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        for s in &self.segs {
            let avail = dst.len().saturating_sub(done);
            let n = avail.min(s.len as usize);
            let Some(part) = dst.get_mut(done..done + n) else {
                break;
            };
            self.mem
                .read_slice(part, s.addr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            done += n;
        }
        Ok(())
    }
}

/// What to do on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskOpKind {
    /// Read into the buffers from `offset`.
    Read {
        /// Byte offset.
        offset: u64,
    },
    /// Write the buffers at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
    },
    /// `fdatasync`.
    Flush,
    /// Deallocate `len` bytes at `offset`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Zero `len` bytes at `offset` (deallocating if `unmap`).
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Deallocation allowed.
        unmap: bool,
    },
}

/// One backend operation with its guest buffers (reads and writes).
#[derive(Debug)]
pub struct DiskOp {
    /// The operation.
    pub kind: DiskOpKind,
    /// The buffers (`Some` for reads and writes).
    pub bufs: Option<GuestBuffers>,
}

/// A finished operation.
#[derive(Debug)]
pub struct DiskCompletion {
    /// The token passed to `submit`.
    pub user_data: u64,
    /// Bytes transferred, or the error.
    pub result: io::Result<usize>,
}

/// The engine actually running a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// io_uring.
    IoUring,
    /// Synchronous `preadv`/`pwritev`/`fdatasync` on the IOThread.
    Sync,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Sync => "sync",
        })
    }
}

/// Engine choice in the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockEngine {
    /// io_uring when this host supports it (probed once), else sync; also
    /// sync for an image in memory (tmpfs, ramfs, hugetlbfs), where these
    /// file systems cannot serve io_uring inline (no `RWF_NOWAIT`), so
    /// every request would go through an io-wq worker thread and an
    /// eventfd wake-up only to copy memory that `preadv`/`pwritev` on the
    /// IOThread copies at once. On tmpfs and ramfs the sync engine reads
    /// by copying out of a mapping of the image, guarded against the file
    /// shrinking under it (see [`mapped`](super::mapped)). (If the host
    /// swapped those pages out, the IOThread waits for them to come back:
    /// pick `io_uring` for a tmpfs image on a host that swaps.)
    #[default]
    Auto,
    /// io_uring; fails if unavailable.
    #[serde(alias = "io_uring")]
    IoUring,
    /// Synchronous I/O on the IOThread.
    Sync,
}

impl FromStr for BlockEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BlockEngine::Auto),
            "io_uring" | "io-uring" => Ok(BlockEngine::IoUring),
            "sync" | "threads" => Ok(BlockEngine::Sync),
            other => Err(format!(
                "invalid engine '{other}' (expected auto, io_uring or sync)"
            )),
        }
    }
}

impl fmt::Display for BlockEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockEngine::Auto => "auto",
            BlockEngine::IoUring => "io_uring",
            BlockEngine::Sync => "sync",
        })
    }
}

/// Errors creating a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// io_uring was requested but cannot be set up.
    #[error("io_uring is not available")]
    IoUringUnavailable(#[source] io::Error),
}

/// Default number of SQEs submitted per `io_uring_enter` when
/// `aio-max-batch` is 0.
pub const DEFAULT_MAX_BATCH: usize = 32;

/// A disk backend serving one queue. See the module documentation.
pub trait DiskBackend: Send {
    /// Which engine this is.
    fn engine(&self) -> EngineKind;
    /// Whether another operation can be submitted now.
    fn has_capacity(&self) -> bool;
    /// Queues `op`; its completion carries `user_data`. Never fails: a
    /// failed submission completes with the error.
    fn submit(&mut self, op: DiskOp, user_data: u64);
    /// Hands queued submissions to the kernel (io_uring: `io_uring_enter`).
    fn flush_submissions(&mut self);
    /// Sets how many operations are submitted per kernel call at most
    /// (`aio-max-batch`; 0 = engine default).
    fn set_max_batch(&mut self, n: usize);
    /// Cheap check (no syscall) for completions ready to reap.
    fn has_completions(&mut self) -> bool;
    /// Clears the completion descriptor (call when it was readable), for
    /// engines whose descriptor is an eventfd. Default: nothing (no
    /// descriptor, or one that reaping clears, as the io_uring engine's).
    fn ack_completion_event(&mut self) {}
    /// Moves ready completions into `out` (non-blocking).
    fn reap(&mut self, out: &mut Vec<DiskCompletion>);
    /// Blocks until at least one completion is ready (returns at once when
    /// nothing is in flight).
    fn wait(&mut self) -> io::Result<()>;
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// A descriptor that becomes readable when completions are posted (to
    /// register with the IOThread), if the engine has one.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Runs one operation to completion. Only for a backend with nothing
    /// else in flight (tests, fuzzing, synchronous callers).
    fn execute_blocking(&mut self, op: DiskOp) -> io::Result<usize> {
        const TOKEN: u64 = u64::MAX;
        if self.in_flight() != 0 {
            return Err(io::Error::other(
                "execute_blocking with operations in flight",
            ));
        }
        self.submit(op, TOKEN);
        self.flush_submissions();
        let mut out = Vec::new();
        loop {
            self.reap(&mut out);
            if let Some(c) = out.pop() {
                return c.result;
            }
            if self.in_flight() == 0 {
                return Err(io::Error::other("operation vanished"));
            }
            self.wait()?;
        }
    }
}

/// Whether io_uring works on this host with the opcodes the engine uses
/// (probed once per process).
pub fn io_uring_available() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| match IoUringEngine::probe() {
        Ok(()) => true,
        Err(e) => {
            log::info!("io_uring unavailable, using the sync engine: {e}");
            false
        }
    })
}

/// Creates a backend for one queue of at most `queue_size` in-flight requests.
pub fn create_backend(
    file: Arc<RawFile>,
    engine: BlockEngine,
    queue_size: u16,
) -> Result<Box<dyn DiskBackend>, BackendError> {
    if resolve_engine(engine, &file) == EngineKind::IoUring {
        match IoUringEngine::new(file.clone(), queue_size) {
            Ok(e) => return Ok(Box::new(e)),
            Err(e) if engine == BlockEngine::IoUring => {
                return Err(BackendError::IoUringUnavailable(e))
            }
            Err(e) => log::warn!("io_uring setup failed, using the sync engine: {e}"),
        }
    }
    Ok(Box::new(SyncEngine::new(file)))
}

/// The engine `engine` resolves to on this host for `file`.
pub fn resolve_engine(engine: BlockEngine, file: &RawFile) -> EngineKind {
    match engine {
        BlockEngine::Sync => EngineKind::Sync,
        BlockEngine::IoUring => EngineKind::IoUring,
        BlockEngine::Auto if file.is_memory_backed() => EngineKind::Sync,
        BlockEngine::Auto if io_uring_available() => EngineKind::IoUring,
        BlockEngine::Auto => EngineKind::Sync,
    }
}

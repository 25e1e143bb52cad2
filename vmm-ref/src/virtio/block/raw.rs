//! A raw disk image file, opened buffered or with `O_DIRECT`, plus the
//! synchronous primitives every engine shares (vectored read/write loops,
//! `fdatasync`, discard and write-zeroes via `fallocate`) and the aligned
//! bounce buffers `O_DIRECT` needs for unaligned guest buffers.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use super::backend::{DiskOp, DiskOpKind, GuestBuffers, Iovecs};
use super::mapped::MappedImage;

/// Most iovecs one `preadv`/`pwritev`/io_uring vectored op accepts.
pub const IOV_MAX: usize = 1024;
/// Requests larger than this that would need a bounce buffer go through the
/// buffered file descriptor instead (bounds host memory per request).
pub const MAX_BOUNCE_BYTES: usize = 8 << 20;
/// Chunk size of the write-zeroes fallback that writes real zeroes.
const ZERO_CHUNK: usize = 1 << 20;

/// A zero-initialised heap buffer with a given alignment (for `O_DIRECT`).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf exclusively owns its allocation (like Vec<u8>).
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(AlignedBuf { ptr, layout })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// One iovec covering the first `len` bytes (clamped to the buffer).
    pub fn iovec(&mut self, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: len.min(self.layout.size()),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// How one read or write is carried out on the file.
pub struct IoPlan {
    /// The descriptor to use (direct or buffered).
    pub fd: RawFd,
    /// File offset.
    pub offset: u64,
    /// The buffers (guest memory, or the bounce buffer).
    pub iovecs: Iovecs,
    /// The bounce buffer, if the guest buffers could not be used directly.
    pub bounce: Option<AlignedBuf>,
}

// SAFETY: the iovecs point either into `bounce` (owned) or into guest memory
// kept mapped by the DiskOp's GuestBuffers, which the caller keeps alive
// together with the plan.
unsafe impl Send for IoPlan {}

/// A raw image file.
pub struct RawFile {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    read_only: bool,
    memory_backed: bool,
    /// Tmpfs and ramfs images: reads are copies out of this mapping.
    mapped: Option<MappedImage>,
    mem_align: usize,
    offset_align: u64,
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
    /// [`SKIP_FLUSH_ENV`] was set: flushes succeed without syncing.
    skip_flush: bool,
}

/// Environment variable that, set to `1`, makes every image acknowledge
/// flushes without `fdatasync` (both engines). A test hook: the
/// power-cut tests (`tests/durability.rs`) use it to prove that they
/// detect a FLUSH acknowledged before its data is durable. Never set it
/// for real guests: a host crash then loses acknowledged writes.
pub const SKIP_FLUSH_ENV: &str = "VMM_REF_TEST_SKIP_FLUSH";

/// Whether [`SKIP_FLUSH_ENV`] is `1` (read once per process).
fn skip_flush_requested() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os(SKIP_FLUSH_ENV).is_some_and(|v| v == "1"))
}

fn dio_alignment(file: &File) -> (usize, u64) {
    // SAFETY: zeroed statx is a valid out-parameter.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, stx points to a statx.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_mem_align != 0 {
        (
            (stx.stx_dio_mem_align as usize).max(512),
            u64::from(stx.stx_dio_offset_align).max(512),
        )
    } else {
        // Unknown: be conservative for memory, assume 512-byte sectors.
        (4096, 512)
    }
}

/// `RAMFS_MAGIC` from `<linux/magic.h>` (not in the libc crate).
const RAMFS_MAGIC: libc::__fsword_t = 0x8584_58f6;

/// The file system type of `file` (`f_type` of `fstatfs`), `None` when
/// `fstatfs` fails: the caller then treats it as an ordinary file.
fn fs_type(file: &File) -> Option<libc::__fsword_t> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `file` is an open descriptor and `st` is a writable `statfs`;
    // the kernel fills it in or fails without touching other memory.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatfs succeeded, so `st` is initialised (it also started zeroed).
    let st = unsafe { st.assume_init() };
    Some(st.f_type)
}

/// The error of [`open_image`] for a path that is neither a regular file
/// nor a block device (a FIFO, a socket, a character device, a directory).
#[derive(Debug, thiserror::Error)]
#[error("not a regular file or block device")]
pub struct NotAnImage;

/// Whether `e` is [`open_image`]'s [`NotAnImage`].
pub fn is_not_an_image(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NotAnImage>())
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`, a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// The size of an image in bytes: `st_size` for a regular file, the device's
/// size for a block device (whose `st_size` is 0).
pub fn image_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to `size`, alive for the call; the descriptor is owned by `file`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Opens an image read-only or read-write, close-on-exec, with `O_DIRECT`
/// if `direct`, without ever blocking in `open`: it opens with `O_NONBLOCK`
/// (a FIFO opened read-only would otherwise wait for a writer forever),
/// checks on the descriptor itself that it is a regular file or a block
/// device (no window for the path to change in between), then replaces
/// `O_NONBLOCK` with `O_DIRECT` if asked (so that a FIFO gets this error, not
/// `O_DIRECT`'s `EINVAL`). Anything else fails with [`NotAnImage`]
/// (`io::ErrorKind::InvalidInput`).
pub fn open_image(path: &Path, read_only: bool, direct: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, NotAnImage));
    }
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor `file` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut flags = flags & !libc::O_NONBLOCK;
    if direct {
        flags |= libc::O_DIRECT;
    }
    // SAFETY: F_SETFL on a descriptor `file` owns, with integer status
    // flags; no memory is passed. The kernel refuses O_DIRECT (EINVAL) where
    // the file system cannot do it, as open(2) would.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

impl RawFile {
    /// Opens `path` read-only or read-write; with `direct`, also with
    /// `O_DIRECT` (used for every request whose offsets and lengths fit the
    /// file system's direct-I/O alignment). Both through [`open_image`]:
    /// never blocks, and anything but a regular file or a block device fails
    /// with [`NotAnImage`].
    pub fn open(path: &Path, read_only: bool, direct: bool) -> io::Result<RawFile> {
        let buffered = open_image(path, read_only, false)?;
        let direct = if direct {
            Some(open_image(path, read_only, true)?)
        } else {
            None
        };
        let (mem_align, offset_align) = direct.as_ref().map_or((1, 1), dio_alignment);
        let fs = fs_type(&buffered);
        let memory_backed = matches!(
            fs,
            Some(libc::TMPFS_MAGIC | RAMFS_MAGIC | libc::HUGETLBFS_MAGIC)
        );
        // Reads from tmpfs and ramfs go through a mapping (see `mapped`);
        // hugetlbfs is left to preadv, its pages are too large to patch.
        let mapped = if matches!(fs, Some(libc::TMPFS_MAGIC | RAMFS_MAGIC)) {
            MappedImage::new(&buffered)
                .inspect_err(|e| {
                    log::debug!("{}: not mapped ({e}); reading with preadv", path.display())
                })
                .ok()
        } else {
            None
        };
        let skip_flush = skip_flush_requested();
        if skip_flush {
            log::warn!(
                "{}: {SKIP_FLUSH_ENV}=1: flushes are acknowledged WITHOUT syncing (test hook)",
                path.display()
            );
        }
        Ok(RawFile {
            path: path.to_path_buf(),
            buffered,
            direct,
            read_only,
            memory_backed,
            mapped,
            mem_align,
            offset_align,
            punch_hole: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
            skip_flush,
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image lives on a file system that keeps its data in memory
    /// (tmpfs, ramfs, hugetlbfs): every read and write is a memory copy.
    pub fn is_memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// Reads are served from a mapping of the file (tmpfs and ramfs images,
    /// until the file shrinks under it).
    pub fn is_mapped(&self) -> bool {
        self.mapped.as_ref().is_some_and(|m| !m.is_poisoned())
    }

    /// Opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// `(memory, offset)` alignment direct I/O needs.
    pub fn dio_alignment(&self) -> (usize, u64) {
        (self.mem_align, self.offset_align)
    }

    /// Size in bytes (of a block device too).
    pub fn size(&self) -> io::Result<u64> {
        image_size(&self.buffered)
    }

    /// The buffered descriptor (always open).
    pub fn buffered_fd(&self) -> RawFd {
        self.buffered.as_raw_fd()
    }

    /// The `O_DIRECT` descriptor, if the image was opened with one.
    pub fn direct_fd(&self) -> Option<RawFd> {
        self.direct.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Decides how a read or write runs: straight on guest memory (on the
    /// `O_DIRECT` descriptor when everything is aligned for it), through an
    /// aligned bounce buffer (direct I/O with unaligned guest buffers, at most
    /// [`MAX_BOUNCE_BYTES`]; filled from the guest for writes), or on the
    /// buffered descriptor (no `O_DIRECT`, offset/length not aligned for
    /// direct I/O, or a large unaligned request). A plan may hold more than
    /// [`IOV_MAX`] iovecs; [`rw_all`] splits those, asynchronous engines
    /// must run them synchronously.
    pub fn plan(&self, offset: u64, bufs: &GuestBuffers, is_write: bool) -> io::Result<IoPlan> {
        let guest = |fd: RawFd| IoPlan {
            fd,
            offset,
            iovecs: Iovecs::from_slice(bufs.iovecs()),
            bounce: None,
        };
        let Some(direct) = &self.direct else {
            return Ok(guest(self.buffered.as_raw_fd()));
        };
        let len = bufs.len();
        let geometry_ok = offset % self.offset_align == 0 && len as u64 % self.offset_align == 0;
        if !geometry_ok {
            return Ok(guest(self.buffered.as_raw_fd()));
        }
        if bufs.iovecs().len() <= IOV_MAX
            && bufs.is_aligned(self.mem_align, self.offset_align as usize)
        {
            return Ok(guest(direct.as_raw_fd()));
        }
        if len <= MAX_BOUNCE_BYTES {
            return self.bounce_plan(direct.as_raw_fd(), offset, bufs, is_write, self.mem_align);
        }
        Ok(guest(self.buffered.as_raw_fd()))
    }

    fn bounce_plan(
        &self,
        fd: RawFd,
        offset: u64,
        bufs: &GuestBuffers,
        is_write: bool,
        align: usize,
    ) -> io::Result<IoPlan> {
        let mut bounce = AlignedBuf::new(bufs.len(), align)?;
        if is_write {
            bufs.copy_from_guest(bounce.as_mut_slice())?;
        }
        let iov = bounce.iovec(bufs.len());
        Ok(IoPlan {
            fd,
            offset,
            iovecs: smallvec::smallvec![iov],
            bounce: Some(bounce),
        })
    }

    /// After a read through a bounce buffer: copies the `n` bytes read back
    /// into guest memory.
    pub fn finish_plan(
        plan: &IoPlan,
        bufs: &GuestBuffers,
        is_write: bool,
        n: usize,
    ) -> io::Result<()> {
        if let (false, Some(b)) = (is_write, &plan.bounce) {
            let src = b.as_slice().get(..n).unwrap_or(b.as_slice());
            bufs.copy_to_guest(src)?;
        }
        Ok(())
    }

    /// `fdatasync` (nothing when [`SKIP_FLUSH_ENV`] is set).
    pub fn fdatasync(&self) -> io::Result<()> {
        if self.skip_flush {
            return Ok(());
        }
        self.buffered.sync_data()
    }

    /// Flushes succeed without syncing ([`SKIP_FLUSH_ENV`]): an
    /// asynchronous engine must not submit its own sync.
    pub fn skips_flush(&self) -> bool {
        self.skip_flush
    }

    /// Deallocates a range (punch hole, size kept). Discard is advisory:
    /// file systems without hole punching succeed without doing anything.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || !self.punch_hole.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if is_unsupported(&e) => {
                self.punch_hole.store(false, Ordering::Relaxed);
                Ok(())
            }
            r => r,
        }
    }

    /// Zeroes a range: punch hole when `unmap` is allowed, else
    /// `FALLOC_FL_ZERO_RANGE`, falling back to writing zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if unmap && self.punch_hole.load(Ordering::Relaxed) {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if is_unsupported(&e) => self.punch_hole.store(false, Ordering::Relaxed),
                r => return r,
            }
        }
        if self.zero_range.load(Ordering::Relaxed) {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if is_unsupported(&e) => self.zero_range.store(false, Ordering::Relaxed),
                r => return r,
            }
        }
        self.write_zeroes_slow(offset, len)
    }

    /// The `fallocate` mode [`RawFile::discard`] / [`RawFile::write_zeroes`]
    /// would try first for `kind`, or `None` when they would not call
    /// `fallocate` (nothing to do, or the write-zeroes fallback). Lets an
    /// asynchronous engine submit the same `fallocate` itself.
    pub fn fallocate_mode(&self, kind: &DiskOpKind) -> Option<i32> {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match *kind {
            DiskOpKind::Discard { len, .. } if len > 0 => {
                self.punch_hole.load(Ordering::Relaxed).then_some(punch)
            }
            DiskOpKind::WriteZeroes { len, unmap, .. } if len > 0 => {
                if unmap && self.punch_hole.load(Ordering::Relaxed) {
                    Some(punch)
                } else if self.zero_range.load(Ordering::Relaxed) {
                    Some(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    fn write_zeroes_slow(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut zeros = AlignedBuf::new(ZERO_CHUNK, 4096)?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            let pos = offset + done;
            let iov = [zeros.iovec(n)];
            let use_direct = pos % self.offset_align == 0 && n as u64 % self.offset_align == 0;
            let fd = match (&self.direct, use_direct) {
                (Some(d), true) => d.as_raw_fd(),
                _ => self.buffered.as_raw_fd(),
            };
            rw_all(fd, pos, &iov, true)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let off =
            i64::try_from(offset).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let len = i64::try_from(len).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        loop {
            // SAFETY: plain syscall on an owned fd with integer arguments.
            let rc = unsafe { libc::fallocate64(self.buffered.as_raw_fd(), mode, off, len) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Runs a whole operation synchronously; returns the bytes transferred
    /// (reads/writes) or 0.
    pub fn run_sync(&self, op: &DiskOp) -> io::Result<usize> {
        match op.kind {
            DiskOpKind::Read { offset } | DiskOpKind::Write { offset } => {
                let is_write = matches!(op.kind, DiskOpKind::Write { .. });
                let bufs = op
                    .bufs
                    .as_ref()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no buffers"))?;
                if !is_write {
                    if let Some(m) = &self.mapped {
                        // SAFETY: `bufs` resolved its iovecs in guest memory,
                        // which it keeps mapped; guest memory is only ever
                        // accessed volatile-style.
                        if let Some(n) = unsafe { m.read(offset, bufs.iovecs()) } {
                            return Ok(n);
                        }
                    }
                }
                let plan = self.plan(offset, bufs, is_write)?;
                let n = rw_all(plan.fd, plan.offset, &plan.iovecs, is_write)?;
                RawFile::finish_plan(&plan, bufs, is_write, n)?;
                Ok(n)
            }
            DiskOpKind::Flush => self.fdatasync().map(|()| 0),
            DiskOpKind::Discard { offset, len } => self.discard(offset, len).map(|()| 0),
            DiskOpKind::WriteZeroes { offset, len, unmap } => {
                self.write_zeroes(offset, len, unmap).map(|()| 0)
            }
        }
    }
}

/// True for errors meaning "this fallocate mode is not supported here".
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Reads or writes all of `iovecs` at `offset`, continuing after short
/// transfers; a read that hits end-of-file zero-fills the rest. Returns the
/// total length.
pub fn rw_all(fd: RawFd, offset: u64, iovecs: &[libc::iovec], is_write: bool) -> io::Result<usize> {
    let total: usize = iovecs.iter().map(|v| v.iov_len).sum();
    let mut iov: Vec<libc::iovec> = iovecs.iter().filter(|v| v.iov_len > 0).copied().collect();
    let mut done = 0usize;
    let mut start = 0usize;
    while start < iov.len() {
        let pos = offset
            .checked_add(done as u64)
            .and_then(|p| i64::try_from(p).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        let rest = iov.get(start..).unwrap_or(&[]);
        let cnt = rest.len().min(IOV_MAX) as i32;
        // SAFETY: every iovec points to memory valid for its length for the
        // duration of the call (guaranteed by the caller: guest memory held
        // mapped by GuestBuffers, or an owned bounce buffer).
        let rc = unsafe {
            if is_write {
                libc::pwritev64(fd, rest.as_ptr(), cnt, pos)
            } else {
                libc::preadv64(fd, rest.as_ptr(), cnt, pos)
            }
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = rc as usize;
        if n == 0 {
            if is_write {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote 0 bytes",
                ));
            }
            // End of file: the rest reads as zeroes.
            for v in iov.get(start..).unwrap_or(&[]) {
                // SAFETY: as above; writing zeros into the caller's buffers.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return Ok(total);
        }
        done += n;
        while n > 0 {
            let Some(v) = iov.get_mut(start) else { break };
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                // SAFETY: n < iov_len, so the advanced pointer stays inside the buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(total)
}

/// Finishes a read or write the kernel completed only partly: transfers
/// the rest of `iovecs` (after the first `done` bytes) synchronously.
/// Returns the total length.
pub fn complete_short(
    fd: RawFd,
    offset: u64,
    iovecs: &[libc::iovec],
    done: usize,
    is_write: bool,
) -> io::Result<usize> {
    let mut skip = done;
    let mut rest = Vec::with_capacity(iovecs.len());
    for v in iovecs {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        rest.push(libc::iovec {
            // SAFETY: skip < iov_len, so the pointer stays inside the buffer.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(skip) }.cast(),
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    let pos = offset
        .checked_add(done as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
    rw_all(fd, pos, &rest, is_write).map(|n| n + done)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::request::Segment;
    use crate::virtio::block::testing::{guest_mem, open_direct, open_raw, temp_disk};

    fn bufs(mem: &std::sync::Arc<vm_memory::GuestMemoryMmap>, segs: &[(u64, u32)]) -> GuestBuffers {
        let segs: Vec<Segment> = segs
            .iter()
            .map(|&(a, l)| Segment {
                addr: GuestAddress(a),
                len: l,
            })
            .collect();
        GuestBuffers::new(mem.clone(), &segs).unwrap()
    }

    /// A read-write RawFile on tmpfs holding `data` (its name already
    /// unlinked), or `None` without a writable /dev/shm (tmpfs on every
    /// Linux system with POSIX shared memory).
    fn shm_raw(name: &str, data: &[u8]) -> Option<RawFile> {
        let path = PathBuf::from(format!("/dev/shm/vmm-ref-{name}-{}", std::process::id()));
        if std::fs::write(&path, data).is_err() {
            eprintln!("no writable /dev/shm: skipping the tmpfs part");
            return None;
        }
        let raw = RawFile::open(&path, false, false);
        std::fs::remove_file(&path).unwrap();
        Some(raw.unwrap())
    }

    /// A block device's size is the device's, not its `st_size` (0): a loop
    /// device over a 1 MiB + 4 KiB file, opened as the block device does and
    /// mapped as `aio=auto` does. Skipped where `losetup` cannot attach one
    /// (not root, no loop driver).
    #[test]
    fn block_devices_have_their_real_size() {
        let disk = temp_disk((1 << 20) + 4096, 0x5a);
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(disk.as_path())
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_owned(),
            other => {
                eprintln!("skipped: cannot attach a loop device: {other:?}");
                return;
            }
        };
        let detach = || {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &dev])
                .status();
        };
        let result = std::panic::catch_unwind(|| {
            assert!(std::fs::metadata(&dev)
                .unwrap()
                .file_type()
                .is_block_device());
            let raw = RawFile::open(Path::new(&dev), true, false).unwrap();
            assert_eq!(raw.size().unwrap(), (1 << 20) + 4096);
            let file = File::open(&dev).unwrap();
            assert_eq!(image_size(&file).unwrap(), (1 << 20) + 4096);
            let mapped = MappedImage::new(&file).unwrap();
            assert_eq!(mapped.len(), (1 << 20) + 4096);
        });
        detach();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }

    /// A FIFO at `path` (removed by the caller).
    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let _ = std::fs::remove_file(path);
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", io::Error::last_os_error());
    }

    /// Runs `f` on a thread and returns its result, or fails the test if it
    /// is still blocked after 10 s (after opening the FIFO `fifo` for
    /// writing, which lets a reader blocked in open(2) go).
    fn without_blocking<T: Send + 'static>(
        fifo: &Path,
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(v) => v,
            Err(_) => {
                let _writer = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(fifo);
                let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
                panic!("{what}: blocked in open(2) on a FIFO for 10 s");
            }
        }
    }

    /// A FIFO is not an image: every way of opening one (read-only or
    /// read-write, buffered or O_DIRECT, and the lock's descriptor) fails at
    /// once with `NotAnImage` instead of waiting in open(2) for a writer.
    #[test]
    fn fifos_are_refused_without_blocking_in_open() {
        use crate::virtio::block::lock::{ImageLock, LockError, LockMode};
        let fifo = PathBuf::from(format!("/tmp/vmm-ref-fifo-{}.img", std::process::id()));
        mkfifo(&fifo);
        for read_only in [true, false] {
            for direct in [false, true] {
                let what = format!("RawFile::open(read_only={read_only}, direct={direct})");
                let p = fifo.clone();
                let r = without_blocking(&fifo, &what, move || {
                    RawFile::open(&p, read_only, direct).map(drop)
                });
                let e = r.expect_err(&what);
                assert!(is_not_an_image(&e), "{what}: {e}");
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{what}");
                assert_eq!(e.to_string(), "not a regular file or block device");
            }
        }
        for read_only in [true, false] {
            let p = fifo.clone();
            let r = without_blocking(&fifo, "ImageLock::acquire", move || {
                ImageLock::acquire(&p, read_only, LockMode::On).map(drop)
            });
            match r {
                Err(LockError::Open { source, .. }) => {
                    assert!(is_not_an_image(&source), "{source}")
                }
                other => panic!("ImageLock::acquire(read_only={read_only}): {other:?}"),
            }
        }
        // Regular files and O_NONBLOCK cleared again.
        let disk = temp_disk(4096, 0);
        for direct in [false, true] {
            match open_image(disk.as_path(), true, direct) {
                Ok(f) => {
                    // SAFETY: F_GETFL on an open descriptor; no memory is passed.
                    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
                    assert_eq!(fl & libc::O_NONBLOCK, 0, "direct={direct}");
                    assert_eq!(fl & libc::O_DIRECT != 0, direct);
                }
                // O_DIRECT is not available on every file system.
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => panic!("open_image(direct={direct}): {e}"),
            }
        }
        std::fs::remove_file(&fifo).unwrap();
    }

    #[test]
    fn memory_backed_file_systems_are_recognised() {
        use crate::virtio::block::backend::{
            io_uring_available, resolve_engine, BlockEngine, EngineKind,
        };
        // procfs is not one of them: `auto` keeps its usual choice.
        let proc_file = RawFile::open(Path::new("/proc/self/stat"), true, false).unwrap();
        assert!(!proc_file.is_memory_backed());
        let usual = if io_uring_available() {
            EngineKind::IoUring
        } else {
            EngineKind::Sync
        };
        assert_eq!(resolve_engine(BlockEngine::Auto, &proc_file), usual);
        let Some(f) = shm_raw("shm", &[0u8; 512]) else {
            return;
        };
        assert!(f.is_memory_backed());
        // `auto` serves in-memory images synchronously; explicit choices stand.
        assert_eq!(resolve_engine(BlockEngine::Auto, &f), EngineKind::Sync);
        assert_eq!(
            resolve_engine(BlockEngine::IoUring, &f),
            EngineKind::IoUring
        );
    }

    #[test]
    fn tmpfs_reads_use_the_mapping_and_survive_truncation() {
        let data: Vec<u8> = (0..16 * 4096u32).map(|i| (i % 253) as u8).collect();
        let Some(raw) = shm_raw("map", &data) else {
            return;
        };
        assert!(raw.is_mapped());
        let mem = guest_mem();
        let read = |offset: u64| {
            let op = DiskOp {
                kind: DiskOpKind::Read { offset },
                bufs: Some(bufs(&mem, &[(0x3_0000, 512), (0x5_0000, 3584)])),
            };
            let n = raw.run_sync(&op).unwrap();
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got[..512], GuestAddress(0x3_0000))
                .unwrap();
            mem.read_slice(&mut got[512..], GuestAddress(0x5_0000))
                .unwrap();
            (n, got)
        };
        let (n, got) = read(8192);
        assert_eq!((n, &got[..]), (4096, &data[8192..12288]));
        // A write (pwritev) is seen by the next mapped read.
        mem.write_slice(&[0xabu8; 512], GuestAddress(0x3_0000))
            .unwrap();
        let op = DiskOp {
            kind: DiskOpKind::Write { offset: 4096 },
            bufs: Some(bufs(&mem, &[(0x3_0000, 512)])),
        };
        raw.run_sync(&op).unwrap();
        let (_, got) = read(4096);
        assert!(got[..512].iter().all(|&b| b == 0xab));
        assert!(raw.is_mapped());
        // Another process shrinks the image to 8 KiB: a read of the lost
        // range takes a SIGBUS inside the mapping, which is poisoned; the
        // read is redone with preadv and returns zeros (past end of file).
        raw.buffered.set_len(8192).unwrap();
        let (n, got) = read(8192);
        assert_eq!(n, 4096);
        assert!(got.iter().all(|&b| b == 0));
        assert!(!raw.is_mapped());
        let (_, got) = read(4096);
        assert!(got[..512].iter().all(|&b| b == 0xab));
        assert_eq!(got[512..], data[4096 + 512..8192]);
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let mut b = AlignedBuf::new(10_000, 4096).unwrap();
        assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[9_999] = 1;
        assert_eq!(b.iovec(20_000).iov_len, 10_000);
        assert!(AlignedBuf::new(10, 3).is_err());
    }

    #[test]
    fn plan_chooses_direct_bounce_or_buffered() {
        let f = temp_disk(1 << 16, 0);
        let Some(raw) = open_direct(&f) else { return };
        assert!(raw.is_direct());
        let (mem_align, off_align) = raw.dio_alignment();
        assert!(mem_align >= 512 && off_align >= 512);
        let mem = guest_mem();
        // Page-aligned guest buffer: straight to the O_DIRECT fd.
        let b = bufs(&mem, &[(0x2_0000, 4096)]);
        let p = raw.plan(0, &b, false).unwrap();
        assert!(p.bounce.is_none());
        assert_ne!(p.fd, raw.buffered_fd());
        // Misaligned guest buffer: bounce buffer on the O_DIRECT fd.
        let b = bufs(&mem, &[(0x2_0001, 4096)]);
        let p = raw.plan(0, &b, true).unwrap();
        assert!(p.bounce.is_some());
        assert_ne!(p.fd, raw.buffered_fd());
        assert_eq!(p.iovecs[0].iov_base as usize % mem_align, 0);
        // Offset not aligned for direct I/O: buffered fd.
        if off_align > 512 {
            let b = bufs(&mem, &[(0x2_0000, 512)]);
            let p = raw.plan(512, &b, false).unwrap();
            assert_eq!(p.fd, raw.buffered_fd());
        }
        // Buffered file: always the guest iovecs.
        let raw = open_raw(&f, false, false);
        let b = bufs(&mem, &[(0x2_0001, 100)]);
        let p = raw.plan(3, &b, false).unwrap();
        assert!(p.bounce.is_none());
        assert_eq!(p.fd, raw.buffered_fd());
    }

    #[test]
    fn direct_io_with_unaligned_guest_buffers_round_trips() {
        let f = temp_disk(1 << 16, 0);
        let Some(raw) = open_direct(&f) else { return };
        let mem = guest_mem();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x2_0003)).unwrap();
        // Two segments, both misaligned.
        let w = bufs(&mem, &[(0x2_0003, 4096), (0x2_1003, 4096)]);
        let op = DiskOp {
            kind: DiskOpKind::Write { offset: 8192 },
            bufs: Some(w),
        };
        assert_eq!(raw.run_sync(&op).unwrap(), 8192);
        let disk = std::fs::read(f.as_path()).unwrap();
        assert_eq!(&disk[8192..16384], &pattern[..]);
        let r = bufs(&mem, &[(0x5_0001, 8192)]);
        let op = DiskOp {
            kind: DiskOpKind::Read { offset: 8192 },
            bufs: Some(r),
        };
        assert_eq!(raw.run_sync(&op).unwrap(), 8192);
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back, GuestAddress(0x5_0001)).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn read_past_eof_zero_fills_and_short_completion_finishes() {
        let f = temp_disk(1024, 0xab);
        let raw = open_raw(&f, false, false);
        let mut buf = vec![0xffu8; 2048];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        assert_eq!(rw_all(raw.buffered_fd(), 0, &iov, false).unwrap(), 2048);
        assert!(buf[..1024].iter().all(|&b| b == 0xab));
        assert!(buf[1024..].iter().all(|&b| b == 0));
        // complete_short: pretend the first 700 bytes were already read.
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 512,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 512,
            },
        ];
        assert_eq!(
            complete_short(raw.buffered_fd(), 0, &iov, 700, false).unwrap(),
            1024
        );
        assert!(a.iter().all(|&x| x == 0));
        assert!(b[..188].iter().all(|&x| x == 0));
        assert!(b[188..].iter().all(|&x| x == 0xab));
    }

    #[test]
    fn write_zeroes_and_discard() {
        let f = temp_disk(1 << 16, 0xee);
        let raw = open_raw(&f, false, false);
        raw.write_zeroes(4096, 4096, false).unwrap();
        raw.write_zeroes(16384, 512, true).unwrap();
        raw.discard(32768, 4096).unwrap();
        // The slow path (as on file systems without ZERO_RANGE).
        raw.write_zeroes_slow(40960, 1000).unwrap();
        let d = std::fs::read(f.as_path()).unwrap();
        assert_eq!(d.len(), 1 << 16, "KEEP_SIZE");
        assert!(d[4096..8192].iter().all(|&b| b == 0));
        assert!(d[16384..16896].iter().all(|&b| b == 0));
        assert!(d[40960..41960].iter().all(|&b| b == 0));
        assert!(d[..4096].iter().all(|&b| b == 0xee));
        assert!(d[41960..].iter().all(|&b| b == 0xee));
        assert!(raw
            .fallocate_mode(&DiskOpKind::Discard { offset: 0, len: 0 })
            .is_none());
        assert!(raw
            .fallocate_mode(&DiskOpKind::WriteZeroes {
                offset: 0,
                len: 512,
                unmap: false
            })
            .is_some());
        raw.fdatasync().unwrap();
    }

    #[test]
    fn read_only_file_refuses_writes() {
        let f = temp_disk(4096, 1);
        let raw = open_raw(&f, true, false);
        assert!(raw.read_only());
        let mem = guest_mem();
        let op = DiskOp {
            kind: DiskOpKind::Write { offset: 0 },
            bufs: Some(bufs(&mem, &[(0x2_0000, 512)])),
        };
        assert!(raw.run_sync(&op).is_err());
    }
}

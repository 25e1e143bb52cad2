//! A disk that loses power: a FUSE file system serving one image file whose
//! writes land in a volatile cache until an `fsync`/`fdatasync` commits them
//! to the durable store; [`PowerCutDisk::cut_power`] drops the cache.
//!
//! - `disk.img` is opened with `FOPEN_DIRECT_IO` and the mount has no
//!   writeback cache, so every `write`, `pwritev`, io_uring `WRITEV` and
//!   `O_DIRECT` write of the process under test reaches this server as a
//!   FUSE `WRITE` before the system call returns: there is no host page
//!   cache between the VMM and the model that could keep data alive.
//! - `fsync(2)`, `fdatasync(2)` and io_uring `IORING_OP_FSYNC` (with or
//!   without `DATASYNC`) all arrive as FUSE `FSYNC` (the kernel's
//!   `vfs_fsync_range` → `fuse_fsync`): it commits the whole cache before
//!   it is answered. The server never answers `ENOSYS` to it (the kernel
//!   would then stop sending it and report success by itself).
//! - FUSE `FLUSH`, which the kernel sends on every `close()` (including the
//!   implicit ones of a killed process), commits nothing: closing a file
//!   is no durability guarantee.
//! - [`PowerCutDisk::cut_power`] is the power cut: from then on every
//!   request fails with `EIO` and the cache is gone. Whatever was committed
//!   before is in the durable store, nothing else.
//!
//! The durable store is a sparse file outside the mount, read with
//! [`PowerCutDisk::durable`]. Mounting needs `/dev/fuse` and the right to
//! mount (root, or `fusermount3`): [`PowerCutDisk::new`] says why not.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use super::TempDir;

/// Granularity of the volatile cache.
const PAGE: u64 = 4096;
/// The image's inode (the root directory is 1).
const IMAGE_INO: INodeNo = INodeNo(2);
/// The image's name in the mount.
const IMAGE_NAME: &str = "disk.img";
/// Attribute and entry cache time: nothing changes behind the kernel's back.
const TTL: Duration = Duration::from_secs(3600);

/// Counters of what the server saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// FUSE `WRITE` requests served.
    pub writes: u64,
    /// FUSE `FSYNC` requests served (each one a commit).
    pub fsyncs: u64,
    /// FUSE `FLUSH` requests (`close()`; no commit).
    pub flushes: u64,
    /// Pages written to the durable store by commits.
    pub committed_pages: u64,
    /// Pages in the volatile cache when the power was cut.
    pub lost_pages: u64,
    /// Requests refused because the power was off.
    pub refused_after_cut: u64,
}

struct State {
    durable: File,
    size: u64,
    /// Page index -> the page's current (not yet durable) content.
    cache: BTreeMap<u64, Box<[u8]>>,
    powered: bool,
    stats: Stats,
}

impl State {
    /// The current content of page `index` (cache, else durable store).
    fn page(&self, index: u64) -> std::io::Result<Box<[u8]>> {
        if let Some(p) = self.cache.get(&index) {
            return Ok(p.clone());
        }
        let mut buf = vec![0u8; PAGE as usize].into_boxed_slice();
        let n = self.durable.read_at(&mut buf, index * PAGE)?;
        buf[n..].fill(0);
        Ok(buf)
    }

    fn read(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let page = self.page(pos / PAGE)?;
            let from = (pos % PAGE) as usize;
            let n = (PAGE - pos % PAGE).min(end - pos) as usize;
            out.extend_from_slice(&page[from..from + n]);
            pos += n as u64;
        }
        Ok(out)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = pos / PAGE;
            let from = (pos % PAGE) as usize;
            let n = (PAGE as usize - from).min(rest.len());
            let mut page = self.page(index)?;
            page[from..from + n].copy_from_slice(&rest[..n]);
            self.cache.insert(index, page);
            pos += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    fn commit(&mut self) -> std::io::Result<()> {
        while let Some((index, page)) = self.cache.pop_first() {
            if let Err(e) = self.durable.write_all_at(&page, index * PAGE) {
                self.cache.insert(index, page);
                return Err(e);
            }
            self.stats.committed_pages += 1;
        }
        Ok(())
    }
}

/// The FUSE side.
struct PowerCutFs {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn attr(ino: INodeNo, size: u64) -> FileAttr {
    let dir = ino == INodeNo::ROOT;
    FileAttr {
        ino,
        size: if dir { 0 } else { size },
        blocks: size.div_ceil(512),
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: if dir { 2 } else { 1 },
        // SAFETY: getuid/getgid have no preconditions.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        rdev: 0,
        blksize: PAGE as u32,
        flags: 0,
    }
}

impl PowerCutFs {
    /// Runs `f` on the state if the power is on; `EIO` otherwise.
    fn powered<T>(&self, f: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut s = lock(&self.state);
        if !s.powered {
            s.stats.refused_after_cut += 1;
            return Err(Errno::EIO);
        }
        f(&mut s)
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT || name != IMAGE_NAME {
            return reply.error(Errno::ENOENT);
        }
        let size = lock(&self.state).size;
        reply.entry(&TTL, &attr(IMAGE_INO, size), Generation(0));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino != INodeNo::ROOT && ino != IMAGE_INO {
            return reply.error(Errno::ENOENT);
        }
        let size = lock(&self.state).size;
        reply.attr(&TTL, &attr(ino, size));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let current = lock(&self.state).size;
        // The image has a fixed size, like a disk.
        if ino != IMAGE_INO || size.is_some_and(|s| s != current) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr(ino, current));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        // No page cache: every write reaches `write` below before the
        // caller's system call returns.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.powered(|s| s.read(offset, u64::from(size)).map_err(Errno::from)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.powered(|s| {
            if offset.saturating_add(data.len() as u64) > s.size {
                return Err(Errno::ENOSPC);
            }
            s.write(offset, data).map_err(Errno::from)?;
            s.stats.writes += 1;
            Ok(data.len() as u32)
        });
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(): no durability promise, nothing is committed.
        lock(&self.state).stats.flushes += 1;
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.powered(|s| {
            s.commit().map_err(Errno::from)?;
            s.stats.fsyncs += 1;
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Callers fall back to writing zeroes (which the cache models).
        reply.error(Errno::EOPNOTSUPP);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (IMAGE_INO, FileType::RegularFile, IMAGE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted power-cut disk of a fixed size; unmounted on drop.
pub struct PowerCutDisk {
    state: Arc<Mutex<State>>,
    image: PathBuf,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    // Declared last: removed after the unmount.
    _dir: TempDir,
}

impl PowerCutDisk {
    /// Mounts a `size`-byte zeroed image, or says why it cannot (no
    /// `/dev/fuse`, no permission to mount).
    pub fn new(tag: &str, size: u64) -> Result<PowerCutDisk, String> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| format!("/dev/fuse: {e}"))?;
        let dir = TempDir::new(&format!("powercut-{tag}"));
        let mountpoint = dir.join("mnt");
        std::fs::create_dir(&mountpoint).map_err(|e| format!("mkdir: {e}"))?;
        let durable = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("durable.img"))
            .map_err(|e| format!("durable store: {e}"))?;
        durable
            .set_len(size)
            .map_err(|e| format!("durable store: {e}"))?;
        let state = Arc::new(Mutex::new(State {
            durable,
            size,
            cache: BTreeMap::new(),
            powered: true,
            stats: Stats::default(),
        }));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("vmm-ref-powercut".into()),
            MountOption::RW,
            MountOption::NoAtime,
        ];
        let fs = PowerCutFs {
            state: Arc::clone(&state),
        };
        let session = fuser::spawn_mount(fs, &mountpoint, &config)
            .map_err(|e| format!("cannot mount FUSE on {}: {e}", mountpoint.display()))?;
        let image = mountpoint.join(IMAGE_NAME);
        Ok(PowerCutDisk {
            state,
            image,
            session: Some(session),
            mountpoint,
            _dir: dir,
        })
    }

    /// The image's path (inside the mount).
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Cuts the power: every later request fails with `EIO` and the
    /// volatile cache is dropped. Returns the counters at the cut.
    pub fn cut_power(&self) -> Stats {
        let mut s = lock(&self.state);
        if s.powered {
            s.powered = false;
            s.stats.lost_pages = s.cache.len() as u64;
            s.cache.clear();
        }
        s.stats
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        lock(&self.state).stats
    }

    /// `len` bytes of the durable store at `offset`.
    pub fn durable(&self, offset: u64, len: usize) -> Vec<u8> {
        let s = lock(&self.state);
        let mut buf = vec![0u8; len];
        let n = s
            .durable
            .read_at(&mut buf, offset)
            .expect("read durable store");
        buf.truncate(n);
        buf
    }
}

impl Drop for PowerCutDisk {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                eprintln!("unmounting {}: {e}", self.mountpoint.display());
                // Lazy unmount so that the temporary directory can go.
                if let Ok(c) =
                    std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
                {
                    // SAFETY: a valid NUL-terminated path; no memory is shared.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
    }
}

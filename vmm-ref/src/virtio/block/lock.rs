//! Image locking compatible with QEMU's `file-posix` driver, so that QEMU,
//! qemu-storage-daemon and vmm-ref keep each other off an image in use.
//!
//! QEMU (since 2.10, with OFD locks since 2.12) turns the block layer's
//! permissions into shared ("read") open-file-description locks on single
//! bytes of the image file: for each permission `i` the node *holds*, byte
//! `100 + i` (`RAW_LOCK_PERM_BASE`); for each permission it does *not share*
//! with other users, byte `200 + i` (`RAW_LOCK_SHARED_BASE`). The
//! permissions of QEMU 6.2 and later (7.2 included) are bit 0 "consistent
//! read", 1 "write", 2 "write unchanged", 3 "resize". After taking its bytes,
//! an opener tests, with `F_OFD_GETLK` for a write lock: byte `200 + i` for
//! every permission it wants (someone refuses to share it) and byte
//! `100 + i` for every permission it does not share (someone holds it).
//!
//! vmm-ref takes what a QEMU virtio-blk device takes by default
//! (`share-rw=off`): "consistent read", plus "write" unless read-only; it
//! shares everything but "write". So two writers exclude each other, a
//! writer and a reader exclude each other, and any number of read-only users
//! share an image - in both directions with QEMU and qemu-storage-daemon.
//!
//! The locks belong to the open file description of the [`ImageLock`]'s own
//! descriptor: they go away when it is dropped (or the process dies).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// QEMU's `RAW_LOCK_PERM_BASE`: byte `100 + i` = permission `i` is held.
pub const LOCK_PERM_BASE: u64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte `200 + i` = permission `i` is not shared.
pub const LOCK_SHARED_BASE: u64 = 200;

/// QEMU's block permissions (`BLK_PERM_*` bit numbers of QEMU 6.2 and later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// `BLK_PERM_CONSISTENT_READ` (bit 0).
    ConsistentRead = 0,
    /// `BLK_PERM_WRITE` (bit 1).
    Write = 1,
    /// `BLK_PERM_WRITE_UNCHANGED` (bit 2).
    WriteUnchanged = 2,
    /// `BLK_PERM_RESIZE` (bit 3).
    Resize = 3,
}

impl Perm {
    /// Every permission, in bit order.
    pub const ALL: [Perm; 4] = [
        Perm::ConsistentRead,
        Perm::Write,
        Perm::WriteUnchanged,
        Perm::Resize,
    ];

    /// QEMU's name (`bdrv_perm_names`).
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// The byte that says "held".
    pub fn held_byte(self) -> u64 {
        LOCK_PERM_BASE + self as u64
    }

    /// The byte that says "not shared".
    pub fn unshared_byte(self) -> u64 {
        LOCK_SHARED_BASE + self as u64
    }
}

/// The permissions a user of an image takes and shares, as bit sets of [`Perm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    /// Held.
    pub held: u8,
    /// Shared with other users.
    pub shared: u8,
}

impl Perms {
    /// What a QEMU virtio-blk device takes by default (`share-rw=off`):
    /// consistent read (and write unless `readonly`); everything but write
    /// is shared.
    pub fn virtio_blk(readonly: bool) -> Perms {
        let mut held = Perm::ConsistentRead.bit();
        if !readonly {
            held |= Perm::Write.bit();
        }
        Perms {
            held,
            shared: Perm::ConsistentRead.bit() | Perm::WriteUnchanged.bit() | Perm::Resize.bit(),
        }
    }

    fn holds(self, p: Perm) -> bool {
        self.held & p.bit() != 0
    }

    fn shares(self, p: Perm) -> bool {
        self.shared & p.bit() != 0
    }

    /// The bytes to lock (shared locks), with what it means when another
    /// user's (write) lock refuses one.
    pub fn lock_bytes(self) -> Vec<(u64, Conflict)> {
        let held = Perm::ALL
            .into_iter()
            .filter(|p| self.holds(*p))
            .map(|p| (p.held_byte(), Conflict::Held(p)));
        let unshared = Perm::ALL
            .into_iter()
            .filter(|p| !self.shares(*p))
            .map(|p| (p.unshared_byte(), Conflict::NotShared(p)));
        held.chain(unshared).collect()
    }

    /// The bytes nobody else may have locked, with the conflict each means.
    pub fn check_bytes(self) -> Vec<(u64, Conflict)> {
        let wanted = Perm::ALL
            .into_iter()
            .filter(|p| self.holds(*p))
            .map(|p| (p.unshared_byte(), Conflict::NotShared(p)));
        let unshared = Perm::ALL
            .into_iter()
            .filter(|p| !self.shares(*p))
            .map(|p| (p.held_byte(), Conflict::Held(p)));
        wanted.chain(unshared).collect()
    }
}

/// What another user of the image stands in the way of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// It does not share a permission we want (QEMU: `Failed to get "write" lock`).
    NotShared(Perm),
    /// It holds a permission we do not share (QEMU: `Failed to get shared "write" lock`).
    Held(Perm),
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::NotShared(p) => write!(f, "failed to get \"{}\" lock", p.name()),
            Conflict::Held(p) => write!(f, "failed to get shared \"{}\" lock", p.name()),
        }
    }
}

/// The `locking=` drive option (QEMU's `file` driver option of that name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Lock; if the host or the image's file system cannot take OFD locks,
    /// warn and go on without.
    #[default]
    Auto,
    /// Lock; no OFD locks is an error.
    On,
    /// Do not lock (and do not look at others' locks).
    Off,
}

impl std::str::FromStr for LockMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LockMode::Auto),
            "on" => Ok(LockMode::On),
            "off" => Ok(LockMode::Off),
            other => Err(format!(
                "invalid locking '{other}' (expected on, off or auto)"
            )),
        }
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Auto => "auto",
            LockMode::On => "on",
            LockMode::Off => "off",
        })
    }
}

/// Who holds a conflicting lock, as far as `/proc` tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Processes with a descriptor that holds a lock on the byte.
    Processes(Vec<(u32, String)>),
    /// Not visible (OFD locks report no PID; `/proc` of other users may be
    /// unreadable).
    Unknown,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Processes(p) if !p.is_empty() => {
                let list: Vec<String> = p
                    .iter()
                    .map(|(pid, name)| format!("{pid} ({name})"))
                    .collect();
                let s = if p.len() == 1 { "" } else { "es" };
                write!(f, "process{s} {}", list.join(", "))
            }
            _ => f.write_str("another process (QEMU, qemu-storage-daemon or vmm-ref)"),
        }
    }
}

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The image cannot be opened for locking.
    #[error("cannot open '{path}' to lock it")]
    Open {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another user's locks conflict with ours.
    #[error(
        "image '{path}' is in use: {conflict}, held by {holder}; locking=off skips this check"
    )]
    Conflict {
        /// The image.
        path: PathBuf,
        /// What it conflicts with.
        conflict: Conflict,
        /// Who holds the lock.
        holder: Holder,
    },
    /// `locking=on`, and the host or file system cannot take OFD locks.
    #[error("cannot lock '{path}' (locking=on): OFD locks are not available")]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `fcntl` failed otherwise.
    #[error("cannot lock '{path}'")]
    Fcntl {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The locks of one user of an image; released when dropped.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
    perms: Perms,
}

/// One OFD lock operation on byte `byte`.
fn ofd(fd: RawFd, cmd: libc::c_int, ty: libc::c_int, byte: u64) -> io::Result<libc::flock> {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // OFD commands require l_pid = 0 (zeroed above).
    // SAFETY: `fd` is an open descriptor and `fl` a valid flock the kernel
    // reads (and, for F_OFD_GETLK, writes); nothing else is touched.
    let rc = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// OFD locks themselves are missing (kernel before 3.15: `EINVAL`) or the
/// file system refuses locks.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

impl ImageLock {
    /// Takes the locks of a virtio-blk user of `path` (read-only or not, see
    /// [`Perms::virtio_blk`]) as `mode` says: `None` for [`LockMode::Off`],
    /// and for [`LockMode::Auto`] when locks are not available (with a warning).
    pub fn acquire(
        path: &Path,
        readonly: bool,
        mode: LockMode,
    ) -> Result<Option<ImageLock>, LockError> {
        if mode == LockMode::Off {
            return Ok(None);
        }
        Self::acquire_perms(path, Perms::virtio_blk(readonly), mode)
    }

    /// [`ImageLock::acquire`] for any permissions. As QEMU does: take our
    /// bytes first, then test the others' (two openers racing both see each
    /// other, so at most one wins); on a conflict ours are released.
    pub fn acquire_perms(
        path: &Path,
        perms: Perms,
        mode: LockMode,
    ) -> Result<Option<ImageLock>, LockError> {
        if mode == LockMode::Off {
            return Ok(None);
        }
        // Shared (read) locks need only read access; so does F_OFD_GETLK.
        // Never blocks in open (a FIFO read-only would wait for a writer).
        let file = super::raw::open_image(path, true, false).map_err(|source| LockError::Open {
            path: path.to_owned(),
            source,
        })?;
        let fd = file.as_raw_fd();
        for (byte, conflict) in perms.lock_bytes() {
            match ofd(fd, libc::F_OFD_SETLK, libc::F_RDLCK, byte) {
                Ok(_) => {}
                // A write lock on the byte; QEMU never takes one, but it is a conflict.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                    drop(file);
                    return Err(conflict_error(path, conflict, byte));
                }
                Err(e) if unsupported(&e) && mode == LockMode::Auto => {
                    log::warn!(
                        "{}: not locked (locking=auto): OFD locks are not available: {e}",
                        path.display()
                    );
                    return Ok(None);
                }
                Err(source) if unsupported(&source) => {
                    return Err(LockError::Unsupported {
                        path: path.to_owned(),
                        source,
                    })
                }
                Err(source) => {
                    return Err(LockError::Fcntl {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        }
        for (byte, conflict) in perms.check_bytes() {
            let fl = ofd(fd, libc::F_OFD_GETLK, libc::F_WRLCK, byte).map_err(|source| {
                LockError::Fcntl {
                    path: path.to_owned(),
                    source,
                }
            })?;
            if i32::from(fl.l_type) != libc::F_UNLCK {
                // Release ours before looking for the holder: what is left is theirs.
                drop(file);
                let mut err = conflict_error(path, conflict, byte);
                // A traditional POSIX lock (QEMU without OFD) names its owner.
                if let (LockError::Conflict { holder, .. }, Ok(pid)) =
                    (&mut err, u32::try_from(fl.l_pid))
                {
                    if pid > 0 && *holder == Holder::Unknown {
                        *holder = Holder::Processes(vec![(pid, process_name(pid))]);
                    }
                }
                return Err(err);
            }
        }
        Ok(Some(ImageLock {
            file,
            path: path.to_owned(),
            perms,
        }))
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The permissions held.
    pub fn perms(&self) -> Perms {
        self.perms
    }
}

impl AsRawFd for ImageLock {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn conflict_error(path: &Path, conflict: Conflict, byte: u64) -> LockError {
    LockError::Conflict {
        path: path.to_owned(),
        conflict,
        holder: find_holders(path, byte),
    }
}

/// Most holder processes named in an error.
const MAX_HOLDERS: usize = 4;

/// Finds the processes holding a lock on `byte` of `path` through the
/// `lock:` lines of `/proc/<pid>/fdinfo/<fd>` (OFD locks report no PID
/// anywhere else). Processes whose `/proc` is not readable are not found.
pub fn find_holders(path: &Path, byte: u64) -> Holder {
    let Ok(meta) = std::fs::metadata(path) else {
        return Holder::Unknown;
    };
    let dev = meta.dev();
    let key = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Holder::Unknown;
    };
    let mut found: Vec<(u32, String)> = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path())
                .is_ok_and(|info| info.lines().any(|l| lock_line_covers(l, &key, byte)))
        });
        if holds {
            found.push((pid, process_name(pid)));
            if found.len() == MAX_HOLDERS {
                break;
            }
        }
    }
    if found.is_empty() {
        Holder::Unknown
    } else {
        Holder::Processes(found)
    }
}

/// Whether an fdinfo line `lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101`
/// is a lock on file `key` (`major:minor:inode`) covering `byte`.
fn lock_line_covers(line: &str, key: &str, byte: u64) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Blocked waiters ("->") hold nothing.
    if fields.contains(&"->") {
        return false;
    }
    let Some(pos) = fields.iter().position(|f| *f == key) else {
        return false;
    };
    let start = fields.get(pos + 1).and_then(|s| s.parse::<u64>().ok());
    let end = match fields.get(pos + 2) {
        Some(&"EOF") => Some(u64::MAX),
        Some(s) => s.parse::<u64>().ok(),
        None => None,
    };
    matches!((start, end), (Some(s), Some(e)) if s <= byte && byte <= e)
}

/// The program name of `pid`: `argv[0]`'s file name, else `comm`.
fn process_name(pid: u32) -> String {
    let argv0 = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|c| {
            let first = c.split(|b| *b == 0).next()?.to_vec();
            let s = String::from_utf8(first).ok()?;
            let name = Path::new(&s).file_name()?.to_str()?.to_owned();
            (!name.is_empty()).then_some(name)
        });
    argv0
        .or_else(|| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::temp_disk;

    #[test]
    fn bytes_match_qemu_virtio_blk() {
        // QEMU 7.2's virtio-blk holds 100 (+101 writable) and 201 (measured
        // in /proc/locks); it tests 200 (+201) and 101.
        let rw = Perms::virtio_blk(false);
        let bytes = |v: Vec<(u64, Conflict)>| v.iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(bytes(rw.lock_bytes()), vec![100, 101, 201]);
        assert_eq!(
            rw.check_bytes(),
            vec![
                (200, Conflict::NotShared(Perm::ConsistentRead)),
                (201, Conflict::NotShared(Perm::Write)),
                (101, Conflict::Held(Perm::Write)),
            ]
        );
        let ro = Perms::virtio_blk(true);
        assert_eq!(bytes(ro.lock_bytes()), vec![100, 201]);
        assert_eq!(bytes(ro.check_bytes()), vec![200, 101]);
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        // No child may inherit `w` while it is dropped (see spawn_exclusion).
        let _spawn = crate::virtio::block::testing::spawn_exclusion();
        let f = temp_disk(4096, 0);
        let p = f.as_path();
        let w = ImageLock::acquire(p, false, LockMode::On).unwrap().unwrap();
        let e = ImageLock::acquire(p, false, LockMode::On).unwrap_err();
        let msg = crate::error_chain(&e);
        assert!(msg.contains("failed to get \"write\" lock"), "{msg}");
        // The holder is this very process (another descriptor).
        let me = std::process::id();
        assert!(msg.contains(&format!("held by process {me} (")), "{msg}");
        let e = ImageLock::acquire(p, true, LockMode::Auto).unwrap_err();
        assert!(crate::error_chain(&e).contains("failed to get shared \"write\" lock"));
        // locking=off neither looks nor locks.
        assert!(ImageLock::acquire(p, false, LockMode::Off)
            .unwrap()
            .is_none());
        drop(w);
        let r1 = ImageLock::acquire(p, true, LockMode::On).unwrap().unwrap();
        let r2 = ImageLock::acquire(p, true, LockMode::On).unwrap().unwrap();
        assert_eq!(r1.perms(), r2.perms());
        assert!(ImageLock::acquire(p, false, LockMode::On).is_err());
        drop((r1, r2));
        assert!(ImageLock::acquire(p, false, LockMode::On)
            .unwrap()
            .is_some());
    }

    #[test]
    fn fdinfo_lock_lines() {
        let k = "fe:00:1234";
        assert!(lock_line_covers(
            "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101",
            k,
            101
        ));
        assert!(!lock_line_covers(
            "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101",
            k,
            201
        ));
        assert!(!lock_line_covers(
            "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:12345 100 101",
            k,
            100
        ));
        assert!(lock_line_covers(
            "lock:\t2: POSIX  ADVISORY  WRITE 77 fe:00:1234 0 EOF",
            k,
            201
        ));
        assert!(!lock_line_covers(
            "lock:\t2: -> OFDLCK ADVISORY  WRITE -1 fe:00:1234 0 EOF",
            k,
            201
        ));
        assert!(!lock_line_covers("pos:\t0", k, 0));
    }

    #[test]
    fn lock_mode_parses() {
        for (s, m) in [
            ("on", LockMode::On),
            ("off", LockMode::Off),
            ("auto", LockMode::Auto),
        ] {
            assert_eq!(s.parse::<LockMode>(), Ok(m));
            assert_eq!(m.to_string(), s);
        }
        assert!("yes".parse::<LockMode>().is_err());
    }
}

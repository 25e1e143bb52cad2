//! VM configuration in QEMU's vocabulary: the types (shared by the command line
//! and the JSON config file) and their validation. Everything is checked here,
//! before any VM, thread or file handle is created.

pub mod cli;
pub mod export;
pub mod keyval;
pub mod vhost_user;

use std::collections::HashSet;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iothread_registry::{IoThreadParams, IoThreadVqMapping, Property};
use serde::{Deserialize, Serialize};

use crate::virtio::block::lock::{ImageLock, LockError, LockMode};
use crate::virtio::block::raw::{image_size, is_not_an_image, open_image};
use crate::vm::boot::{BootError, BootProtocol};
use crate::vm::kernel::KernelInfo;
use crate::vm::layout::{MAX_VCPUS, MAX_VIRTIO_DEVICES};
pub use keyval::OptionError;

/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Smallest accepted guest RAM.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest accepted guest RAM.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Default virtqueue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Smallest virtqueue size: a request (header, data, status) takes 3
/// descriptors without indirect ones (QEMU: "must be > 2").
pub const MIN_QUEUE_SIZE: u16 = 4;
/// Image sizes are counted in sectors of this many bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Largest virtqueue size (QEMU's VIRTQUEUE_MAX_SIZE).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest number of virtqueues per drive.
pub const MAX_NUM_QUEUES: u16 = 64;
/// Length of the virtio-blk GET_ID answer.
pub const MAX_SERIAL_LEN: usize = 20;
/// Longest Unix socket path: `sun_path` of `sockaddr_un` (108 bytes on
/// Linux) less the NUL that ends it. bind(2) and connect(2) take no longer
/// path.
pub const MAX_SOCKET_PATH_LEN: usize =
    std::mem::size_of::<libc::sockaddr_un>() - std::mem::size_of::<libc::sa_family_t>() - 1;

/// A byte count, written `256M`, `1G`, `4096` (or a JSON number of bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "u64")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for ByteSize {
    type Error = String;

    fn try_from(r: SizeRepr) -> Result<Self, String> {
        match r {
            SizeRepr::Bytes(b) => Ok(ByteSize(b)),
            SizeRepr::Text(t) => keyval::parse_size(&t)
                .map(ByteSize)
                .ok_or_else(|| format!("invalid size '{t}': expected e.g. 4096, 64K, 256M or 1G")),
        }
    }
}

impl From<ByteSize> for u64 {
    fn from(b: ByteSize) -> u64 {
        b.0
    }
}

fn default_memory() -> ByteSize {
    ByteSize(DEFAULT_MEMORY)
}
fn default_vcpus() -> u32 {
    1
}
fn default_num_queues() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    DEFAULT_QUEUE_SIZE
}

/// The whole VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image (ELF, ELF with PVH note, or bzImage).
    pub kernel: PathBuf,
    /// Optional initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (device arguments are appended).
    #[serde(default)]
    pub cmdline: String,
    /// Boot protocol: `auto` (default: PVH if the ELF has the note),
    /// `linux64` or `pvh`.
    #[serde(default)]
    pub boot: BootProtocol,
    /// Guest RAM.
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// Number of vCPUs.
    /// (Wider than the 32 allowed, so that every value out of range gets the
    /// same message from the validation.)
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// `--object` entries (IOThreads).
    #[serde(default)]
    pub objects: Vec<IoThreadObject>,
    /// `--drive` entries.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// `--qmp unix:/path`.
    #[serde(default)]
    pub qmp: Option<QmpAddr>,
    /// `--chardev` entries (vhost-user back-end sockets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chardevs: Vec<vhost_user::ChardevConfig>,
    /// `--device` entries (vhost-user-blk devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<vhost_user::DeviceConfig>,
}

/// The only object type vmm-ref knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QomType {
    /// `iothread`.
    Iothread,
}

/// `--object iothread,id=...,poll-max-ns=...`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IoThreadObject {
    /// Always `iothread`.
    pub qom_type: QomType,
    /// Object id.
    pub id: String,
    /// `poll-max-ns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_max_ns: Option<i64>,
    /// `poll-grow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_grow: Option<i64>,
    /// `poll-shrink`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_shrink: Option<i64>,
    /// `poll-weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_weight: Option<i64>,
    /// `aio-max-batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio_max_batch: Option<i64>,
    /// `poll-algorithm` (extension): `weighted` or `classic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_algorithm: Option<aio_poll::PollAlgorithm>,
}

impl IoThreadObject {
    /// The creation parameters, range-checked.
    pub fn params(&self) -> Result<IoThreadParams, iothread_registry::Error> {
        let mut p = IoThreadParams::default();
        for (prop, value) in [
            (Property::PollMaxNs, self.poll_max_ns),
            (Property::PollGrow, self.poll_grow),
            (Property::PollShrink, self.poll_shrink),
            (Property::PollWeight, self.poll_weight),
            (Property::AioMaxBatch, self.aio_max_batch),
        ] {
            if let Some(v) = value {
                p.set(prop, v)?;
            }
        }
        if let Some(a) = self.poll_algorithm {
            p.poll.algorithm = a;
        }
        p.validate()?;
        Ok(p)
    }
}

/// The disk I/O engine (`aio=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AioMode {
    /// io_uring if the host has it, else synchronous.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// io_uring (fail if unavailable).
    #[serde(rename = "io_uring")]
    IoUring,
    /// Synchronous I/O on the IOThread.
    #[serde(rename = "threads")]
    Threads,
}

impl AioMode {
    fn parse(s: &str) -> Option<AioMode> {
        match s {
            "auto" => Some(AioMode::Auto),
            "io_uring" => Some(AioMode::IoUring),
            "threads" => Some(AioMode::Threads),
            _ => None,
        }
    }
}

impl fmt::Display for AioMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AioMode::Auto => "auto",
            AioMode::IoUring => "io_uring",
            AioMode::Threads => "threads",
        })
    }
}

/// `--drive id=...,file=...,num-queues=...`: a virtio-blk device on virtio-mmio.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DriveConfig {
    /// Device id (QOM path `/machine/peripheral/<id>`).
    pub id: String,
    /// Raw image file.
    pub file: PathBuf,
    /// Number of request queues.
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    /// Size of each virtqueue (power of two).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Single IOThread serving every queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iothread: Option<String>,
    /// Per-queue IOThreads (QEMU 9.0 `iothread-vq-mapping`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iothread_vq_mapping: Option<Vec<IoThreadVqMapping>>,
    /// Read-only drive.
    #[serde(default)]
    pub readonly: bool,
    /// O_DIRECT (cache=none).
    #[serde(default)]
    pub direct: bool,
    /// I/O engine.
    #[serde(default)]
    pub aio: AioMode,
    /// GET_ID serial (at most 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Image locking, compatible with QEMU's (`on`, `off`, `auto`).
    #[serde(default)]
    pub locking: LockMode,
}

/// Where the QMP monitor listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum QmpAddr {
    /// `unix:/path`.
    Unix(PathBuf),
}

impl TryFrom<String> for QmpAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(p) if !p.is_empty() => {
                let path = PathBuf::from(p);
                check_sun_path(&path).map_err(|e| e.to_string())?;
                Ok(QmpAddr::Unix(path))
            }
            _ => Err(format!("expected unix:/path, got '{s}'")),
        }
    }
}

impl From<QmpAddr> for String {
    fn from(a: QmpAddr) -> String {
        match a {
            QmpAddr::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

/// Where a configuration came from (for error messages).
#[derive(Clone, Debug)]
pub enum Origin {
    /// Command-line options.
    Cli,
    /// A JSON file.
    File(PathBuf),
}

impl Origin {
    fn label(&self, cli: String, json: String) -> String {
        match self {
            Origin::Cli => cli,
            Origin::File(p) => format!("--config {}: {json}", p.display()),
        }
    }
}

/// A semantic problem with one option.
#[derive(Debug, thiserror::Error)]
pub enum InvalidOption {
    /// Parsing the option string failed.
    #[error(transparent)]
    Parse(#[from] OptionError),
    /// A problem described by the message.
    #[error("{0}")]
    Message(String),
    /// The IOThread parameters were rejected.
    #[error("invalid IOThread parameters")]
    IoThread(#[source] iothread_registry::Error),
    /// The iothread-vq-mapping was rejected.
    #[error("invalid iothread-vq-mapping")]
    Mapping(#[source] iothread_registry::Error),
    /// A `--drive`/`--export` option of the export daemon was rejected.
    #[error(transparent)]
    Export(crate::export::OptionsError),
    /// An export cannot be built from its options, drive and IOThreads.
    #[error(transparent)]
    ExportConfig(crate::export::ExportError),
    /// An export conflicts with another export, the QMP socket or a file.
    #[error(transparent)]
    ExportConflict(export::ExportConflict),
    /// The kernel image cannot be booted.
    #[error(transparent)]
    Kernel(crate::vm::kernel::KernelError),
    /// The boot layout (initrd placement, command line) does not work out.
    #[error(transparent)]
    Boot(crate::vm::boot::BootError),
    /// A socket cannot be created at the path.
    #[error(transparent)]
    Socket(SocketPathError),
    /// The image is locked by another user (or cannot be locked).
    #[error(transparent)]
    Lock(LockError),
    /// A file cannot be opened.
    #[error("cannot open '{path}'{how}")]
    File {
        /// The file.
        path: PathBuf,
        /// How it was opened, e.g. " for writing with O_DIRECT".
        how: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A configuration error: the option it concerns and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One option is invalid.
    #[error("{option}")]
    Option {
        /// The option, e.g. `--drive id=d0`.
        option: String,
        /// What is wrong.
        #[source]
        source: InvalidOption,
    },
    /// The config file cannot be read.
    #[error("--config {path}: cannot read the file")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON for [`VmConfig`].
    #[error("--config {path}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Cause (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// Neither `--kernel` nor `--config` was given.
    #[error("--kernel is required (or give a --config file)")]
    MissingKernel,
}

impl ConfigError {
    pub(crate) fn option(option: impl Into<String>, source: impl Into<InvalidOption>) -> Self {
        ConfigError::Option {
            option: option.into(),
            source: source.into(),
        }
    }

    pub(crate) fn msg(option: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::option(option, InvalidOption::Message(msg.into()))
    }
}

/// A drive after validation: its configuration, per queue its IOThread,
/// and the lock on its image (held as long as any clone of this lives).
#[derive(Clone, Debug)]
pub struct ValidDrive {
    /// The drive.
    pub config: DriveConfig,
    /// Its IOThreads as an `iothread-vq-mapping` (`iothread=X` is `[X]`).
    pub mapping: Vec<IoThreadVqMapping>,
    /// `queue_iothreads[q]` serves queue `q`.
    pub queue_iothreads: Vec<String>,
    /// The image lock (`None` with `locking=off`, or `auto` without OFD locks).
    pub lock: Option<Arc<ImageLock>>,
}

/// A drive's IOThreads from its `iothread` or `iothread-vq-mapping` property
/// (exactly one must be given), as an `iothread-vq-mapping`: used at start-up
/// and by `x-drive-set-iothreads`, with the same messages.
pub fn drive_mapping(
    iothread: Option<&str>,
    mapping: Option<&[IoThreadVqMapping]>,
) -> Result<Vec<IoThreadVqMapping>, &'static str> {
    match (iothread, mapping) {
        (Some(_), Some(_)) => {
            Err("iothread and iothread-vq-mapping properties cannot be set at the same time")
        }
        (Some(t), None) => Ok(vec![IoThreadVqMapping::new(t)]),
        (None, Some(m)) => Ok(m.to_vec()),
        (None, None) => {
            Err("an IOThread is required: give iothread=<id> or iothread-vq-mapping=<id>:<id>...")
        }
    }
}

/// A configuration that passed [`validate`]. It holds the image locks.
#[derive(Clone, Debug)]
pub struct ValidConfig {
    /// The configuration as given.
    pub vm: VmConfig,
    /// IOThreads to create, in order, with their parameters.
    pub iothreads: Vec<(String, IoThreadParams)>,
    /// Drives with their queue assignment.
    pub drives: Vec<ValidDrive>,
    /// vhost-user-blk devices (after the drives on the virtio-mmio slots).
    pub vhost_user: Vec<vhost_user::ValidVhostUserBlk>,
}

/// Reads a JSON config file.
pub fn load_json(path: &Path) -> Result<VmConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Checks that the initrd is a readable file that fits in guest RAM above
/// the kernel (the placement rule of [`crate::vm::boot::initrd_address`]).
fn check_initrd(
    option: &str,
    path: &Path,
    mem_size: u64,
    kernel: &KernelInfo,
) -> Result<(), ConfigError> {
    let file_err = |source: std::io::Error| {
        ConfigError::option(
            option,
            InvalidOption::File {
                path: path.to_owned(),
                how: "",
                source,
            },
        )
    };
    let meta = crate::vm::kernel::open_boot_file(path)
        .and_then(|f| f.metadata())
        .map_err(file_err)?;
    if meta.is_dir() {
        return Err(file_err(std::io::Error::from_raw_os_error(libc::EISDIR)));
    }
    if !meta.is_file() {
        return Err(ConfigError::msg(
            option,
            format!("'{}' is not a regular file", path.display()),
        ));
    }
    crate::vm::boot::initrd_address(
        mem_size,
        kernel.kernel_end,
        meta.len(),
        kernel.initrd_addr_max,
    )
    .map(drop)
    .map_err(|e| ConfigError::option(option, InvalidOption::Boot(e)))
}

/// Opens the image the way the block device will (read-only or read-write,
/// O_DIRECT if asked), without writing anything, to catch errors early.
fn check_image(option: &str, d: &DriveConfig) -> Result<(), ConfigError> {
    check_image_file(option, &d.file, d.readonly, d.direct)
}

/// [`check_image`] for any image: `file` opened read-only or read-write, with
/// O_DIRECT if `direct`; it must be a regular file or a block device.
pub(crate) fn check_image_file(
    option: &str,
    file: &Path,
    readonly: bool,
    direct: bool,
) -> Result<(), ConfigError> {
    let how = match (readonly, direct) {
        (true, false) => " read-only",
        (true, true) => " read-only with O_DIRECT (direct=on)",
        (false, false) => " for writing",
        (false, true) => " for writing with O_DIRECT (direct=on)",
    };
    // Never blocks (a FIFO opened read-only would wait for a writer).
    let handle = open_image(file, readonly, direct).map_err(|source| {
        if is_not_an_image(&source) {
            return ConfigError::msg(
                option,
                format!("'{}' is not a regular file or block device", file.display()),
            );
        }
        ConfigError::option(
            option,
            InvalidOption::File {
                path: file.to_owned(),
                how,
                source,
            },
        )
    })?;
    let size = image_size(&handle).map_err(|source| {
        ConfigError::option(
            option,
            InvalidOption::File {
                path: file.to_owned(),
                how,
                source,
            },
        )
    })?;
    if size < SECTOR_SIZE {
        return Err(ConfigError::msg(
            option,
            format!(
                "'{}' is {size} bytes long, smaller than one {SECTOR_SIZE}-byte sector",
                file.display()
            ),
        ));
    }
    Ok(())
}

/// Which image a drive's `file` names, so that two spellings of one image (a
/// hard link, a symlink, a relative and an absolute path, two device nodes of one
/// disk) are one image: device and inode for files, the device number for block
/// devices. The canonical path if the file cannot be examined (opening it then
/// fails with its own message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ImageIdentity {
    File { dev: u64, ino: u64 },
    BlockDevice { rdev: u64 },
    Path(PathBuf),
}

impl ImageIdentity {
    pub(crate) fn of(path: &Path) -> ImageIdentity {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => {
                ImageIdentity::BlockDevice { rdev: m.rdev() }
            }
            Ok(m) => ImageIdentity::File {
                dev: m.dev(),
                ino: m.ino(),
            },
            Err(_) => ImageIdentity::Path(
                std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            ),
        }
    }
}

/// Locks an image the way a virtio-blk device of QEMU does (see
/// [`crate::virtio::block::lock`]); a conflict is a configuration error.
pub(crate) fn lock_image(
    option: &str,
    file: &Path,
    readonly: bool,
    mode: LockMode,
) -> Result<Option<ImageLock>, ConfigError> {
    ImageLock::acquire(file, readonly, mode)
        .map_err(|e| ConfigError::option(option, InvalidOption::Lock(e)))
}

/// IOThreads to create, in order, with their parameters.
pub type IoThreadSpecs = Vec<(String, IoThreadParams)>;

/// Validates `--object` entries: ids (well-formed, unique) and parameters.
/// Returns the IOThreads to create, in order, and the set of their ids.
pub(crate) fn validate_objects(
    objects: &[IoThreadObject],
    origin: &Origin,
) -> Result<(IoThreadSpecs, HashSet<String>), ConfigError> {
    let mut iothreads = Vec::new();
    let mut ids = HashSet::new();
    for (i, o) in objects.iter().enumerate() {
        let label = origin.label(
            format!("--object iothread,id={}", o.id),
            format!("objects[{i}] (id={})", o.id),
        );
        iothread_registry::validate_id(&o.id)
            .map_err(|e| ConfigError::option(label.clone(), InvalidOption::IoThread(e)))?;
        if !ids.insert(o.id.clone()) {
            return Err(ConfigError::msg(
                label,
                format!("duplicate object id '{}'", o.id),
            ));
        }
        let params = o
            .params()
            .map_err(|e| ConfigError::option(label, InvalidOption::IoThread(e)))?;
        iothreads.push((o.id.clone(), params));
    }
    Ok((iothreads, ids))
}

/// Why a listening Unix socket cannot be created at a path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketPathError {
    /// The socket's directory does not exist.
    #[error("directory '{0}' does not exist")]
    NoDirectory(PathBuf),
    /// Something other than a socket is at the path.
    #[error("'{0}' exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A live server accepts connections on the path.
    #[error("socket '{0}' is in use by a running server")]
    InUse(PathBuf),
    /// The path does not fit in `sun_path` (its length in bytes).
    #[error("socket path is {0} bytes long; the limit is {MAX_SOCKET_PATH_LEN}")]
    TooLong(usize),
    /// The path is empty.
    #[error("socket path is empty")]
    Empty,
    /// The path contains a NUL byte (`sun_path` is a C string).
    #[error("socket path contains a NUL byte")]
    Nul,
}

/// Checks that `path` fits in a `sockaddr_un` as bind(2) and connect(2) need
/// it: not empty, no NUL byte, at most [`MAX_SOCKET_PATH_LEN`] bytes. Every
/// socket path of the configuration (`--qmp`, an export's `addr`, `--chardev
/// path=`) and of QMP (`block-export-add`'s `addr`) is checked with it when it
/// is parsed, so that a path no socket can have is refused before anything
/// is created.
pub fn check_sun_path(path: &Path) -> Result<(), SocketPathError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(SocketPathError::Empty);
    }
    if bytes.contains(&0) {
        return Err(SocketPathError::Nul);
    }
    if bytes.len() > MAX_SOCKET_PATH_LEN {
        return Err(SocketPathError::TooLong(bytes.len()));
    }
    Ok(())
}

/// Checks that a server may listen on `path`: its directory exists and
/// nothing but a stale socket (which is replaced) is there.
pub fn check_socket_path(path: &Path) -> Result<(), SocketPathError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(SocketPathError::NoDirectory(dir.to_owned()));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => Err(SocketPathError::NotASocket(path.to_owned())),
        Ok(_) if UnixStream::connect(path).is_ok() => Err(SocketPathError::InUse(path.to_owned())),
        _ => Ok(()),
    }
}

/// Checks that the QMP monitor can listen on `addr`.
pub(crate) fn check_qmp(label: String, addr: &QmpAddr) -> Result<(), ConfigError> {
    let QmpAddr::Unix(path) = addr;
    check_socket_path(path).map_err(|e| ConfigError::option(label, InvalidOption::Socket(e)))
}

/// Checks everything that can be checked before the VM exists.
pub fn validate(vm: VmConfig, origin: &Origin) -> Result<ValidConfig, ConfigError> {
    let top = |flag: &str, key: &str| origin.label(flag.to_owned(), key.to_owned());
    let kernel_label = top("--kernel", "kernel");
    let kernel = crate::vm::kernel::probe(&vm.kernel)
        .map_err(|e| ConfigError::option(kernel_label.clone(), InvalidOption::Kernel(e)))?;
    if vm.boot == BootProtocol::Pvh && kernel.pvh_entry.is_none() {
        return Err(ConfigError::option(
            top("--boot", "boot"),
            InvalidOption::Boot(BootError::NoPvhEntry),
        ));
    }
    let mem = vm.memory.0;
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&mem) || mem % 4096 != 0 {
        return Err(ConfigError::msg(
            top("--memory", "memory"),
            format!(
                "memory size {mem} must be a multiple of 4 KiB between {}M and {}G",
                MIN_MEMORY >> 20,
                MAX_MEMORY >> 30
            ),
        ));
    }
    if vm.vcpus == 0 || vm.vcpus > u32::from(MAX_VCPUS) {
        return Err(ConfigError::msg(
            top("--vcpus", "vcpus"),
            format!("number of vCPUs must be between 1 and {MAX_VCPUS}"),
        ));
    }
    kernel
        .check_fits(&vm.kernel, mem)
        .map_err(|e| ConfigError::option(kernel_label, InvalidOption::Kernel(e)))?;
    if let Some(initrd) = &vm.initrd {
        check_initrd(&top("--initrd", "initrd"), initrd, mem, &kernel)?;
    }

    let (iothreads, ids) = validate_objects(&vm.objects, origin)?;

    if vm.drives.len() > MAX_VIRTIO_DEVICES {
        return Err(ConfigError::msg(
            top("--drive", "drives"),
            format!("at most {MAX_VIRTIO_DEVICES} drives are supported"),
        ));
    }
    let mut drives = Vec::new();
    let mut drive_ids = HashSet::new();
    let mut files: Vec<(ImageIdentity, bool, String)> = Vec::new();
    for (i, d) in vm.drives.iter().enumerate() {
        let label = origin.label(
            format!("--drive id={}", d.id),
            format!("drives[{i}] (id={})", d.id),
        );
        iothread_registry::validate_id(&d.id)
            .map_err(|e| ConfigError::msg(label.clone(), format!("invalid drive id: {e}")))?;
        if ids.contains(&d.id) || !drive_ids.insert(d.id.clone()) {
            return Err(ConfigError::msg(label, format!("duplicate id '{}'", d.id)));
        }
        if d.num_queues == 0 || d.num_queues > MAX_NUM_QUEUES {
            return Err(ConfigError::msg(
                label,
                format!("num-queues must be between 1 and {MAX_NUM_QUEUES}"),
            ));
        }
        if d.queue_size < MIN_QUEUE_SIZE
            || d.queue_size > MAX_QUEUE_SIZE
            || !d.queue_size.is_power_of_two()
        {
            return Err(ConfigError::msg(
                label,
                format!(
                    "queue-size must be a power of 2 between {MIN_QUEUE_SIZE} and {MAX_QUEUE_SIZE} \
                     (a request takes 3 descriptors)"
                ),
            ));
        }
        if let Some(s) = &d.serial {
            if s.len() > MAX_SERIAL_LEN {
                return Err(ConfigError::msg(
                    label,
                    format!("serial must be at most {MAX_SERIAL_LEN} bytes"),
                ));
            }
        }
        let mapping = drive_mapping(d.iothread.as_deref(), d.iothread_vq_mapping.as_deref())
            .map_err(|msg| ConfigError::msg(label.clone(), msg))?;
        let queue_iothreads =
            iothread_registry::assign_vqs(&mapping, d.num_queues, |id| ids.contains(id))
                .map_err(|e| ConfigError::option(label.clone(), InvalidOption::Mapping(e)))?;
        check_image(&label, d)?;
        let image = ImageIdentity::of(&d.file);
        if let Some((_, _, other)) = files
            .iter()
            .find(|(i, ro, _)| *i == image && !(*ro && d.readonly))
        {
            return Err(ConfigError::msg(
                label,
                format!(
                    "'{}' is already used by drive '{other}' (only read-only drives may share an image)",
                    d.file.display()
                ),
            ));
        }
        files.push((image, d.readonly, d.id.clone()));
        // Last: the lock is held from here on (and released if a later check fails).
        let lock = lock_image(&label, &d.file, d.readonly, d.locking)?;
        drives.push(ValidDrive {
            config: d.clone(),
            mapping,
            queue_iothreads,
            lock: lock.map(Arc::new),
        });
    }
    let taken: HashSet<String> = ids.union(&drive_ids).cloned().collect();
    let vhost_user = vhost_user::validate(&vm.chardevs, &vm.devices, origin, &taken, drives.len())?;
    // The command line as the boot will write it (a slot per drive and per
    // vhost-user device), with the widest tsc_khz=.
    let slots: Vec<(u64, u32)> = (0..drives.len() + vhost_user.len())
        .filter_map(crate::vm::layout::virtio_mmio_slot)
        .collect();
    let full = crate::vmm::kernel_cmdline(&vm.cmdline, &slots, Some(u32::MAX));
    crate::vm::boot::checked_cmdline(&full)
        .map_err(|e| ConfigError::option(top("--cmdline", "cmdline"), InvalidOption::Boot(e)))?;
    if let Some(addr) = &vm.qmp {
        check_qmp(top("--qmp", "qmp"), addr)?;
    }
    Ok(ValidConfig {
        vm,
        iothreads,
        drives,
        vhost_user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_roundtrip_and_unknown_fields() {
        let text = r#"{
            "kernel": "/bin/true", "memory": "64M", "vcpus": 2,
            "objects": [{"qom-type": "iothread", "id": "io0", "poll-max-ns": 0}],
            "drives": [{"id": "d0", "file": "/tmp/x.img", "num-queues": 2,
                        "iothread-vq-mapping": [{"iothread": "io0", "vqs": [0, 1]}],
                        "aio": "io_uring", "readonly": true, "locking": "off"}],
            "qmp": "unix:/tmp/q.sock"
        }"#;
        let c: VmConfig = serde_json::from_str(text).unwrap();
        assert_eq!(c.memory, ByteSize(64 << 20));
        assert_eq!(c.drives[0].aio, AioMode::IoUring);
        assert_eq!(c.drives[0].locking, LockMode::Off);
        assert_eq!(c.qmp, Some(QmpAddr::Unix("/tmp/q.sock".into())));
        let again: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);

        let bad = r#"{"kernel": "k", "drives": [{"id": "d0", "file": "f", "foo": 1}]}"#;
        let e = serde_json::from_str::<VmConfig>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `foo`"), "{e}");
        let bad = r#"{"kernel": "k", "memory": "12Q"}"#;
        assert!(serde_json::from_str::<VmConfig>(bad).is_err());
        let bad = r#"{"kernel": "k", "objects": [{"qom-type": "memory-backend", "id": "m"}]}"#;
        assert!(serde_json::from_str::<VmConfig>(bad).is_err());
        let bad = r#"{"kernel": "k", "qmp": "tcp:1234"}"#;
        assert!(serde_json::from_str::<VmConfig>(bad).is_err());
    }

    #[test]
    fn socket_paths_must_fit_in_sun_path() {
        assert_eq!(MAX_SOCKET_PATH_LEN, 107);
        let dir = std::env::temp_dir().join(format!("vmm-ref-sunpath-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let of_len = |len: usize| {
            let prefix = format!("{}/", dir.display());
            assert!(prefix.len() < len, "{prefix} is too long already");
            PathBuf::from(format!("{prefix}{}", "s".repeat(len - prefix.len())))
        };
        // The longest accepted path is one a socket can be bound to; one byte
        // more is refused by bind(2) as by the check.
        let longest = of_len(MAX_SOCKET_PATH_LEN);
        check_sun_path(&longest).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&longest).unwrap());
        let too_long = of_len(MAX_SOCKET_PATH_LEN + 1);
        assert!(std::os::unix::net::UnixListener::bind(&too_long).is_err());
        let e = check_sun_path(&too_long).unwrap_err();
        assert_eq!(
            e.to_string(),
            "socket path is 108 bytes long; the limit is 107"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            check_sun_path(Path::new("")),
            Err(SocketPathError::Empty)
        ));
        assert!(matches!(
            check_sun_path(Path::new("/tmp/a\0b")),
            Err(SocketPathError::Nul)
        ));
        // --qmp and the JSON "qmp" are checked when parsed.
        let long = format!("unix:/{}", "q".repeat(200));
        assert_eq!(
            QmpAddr::try_from(long.clone()).unwrap_err(),
            "socket path is 201 bytes long; the limit is 107"
        );
        let e = serde_json::from_str::<VmConfig>(&format!(r#"{{"kernel": "k", "qmp": "{long}"}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("socket path is 201 bytes long"), "{e}");
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel": "k", "qmp": "unix:/a\u0000b"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("socket path contains a NUL byte"), "{e}");
    }

    #[test]
    fn iothread_params_are_range_checked() {
        let mut o = IoThreadObject {
            qom_type: QomType::Iothread,
            id: "io0".into(),
            poll_max_ns: Some(0),
            poll_grow: None,
            poll_shrink: None,
            poll_weight: Some(64),
            aio_max_batch: None,
            poll_algorithm: None,
        };
        assert!(o.params().is_err());
        o.poll_weight = Some(5);
        let p = o.params().unwrap();
        assert_eq!((p.poll.max_ns, p.poll.weight), (0, 5));
    }
}

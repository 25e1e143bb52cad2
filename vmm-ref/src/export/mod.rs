//! vhost-user-blk exports: QEMU's "block export" role.
//!
//! The virtio-blk device model of [`crate::virtio::block`] reached over
//! vhost-user instead of virtio-mmio: a front-end (QEMU's
//! `vhost-user-blk-pci`, or any vhost-user front-end) connects to the
//! export's Unix socket, shares its guest memory and eventfds, and the
//! device serves the virtqueues on IOThreads with adaptive polling, exactly
//! as it does for vmm-ref's own guests.
//!
//! - [`options`]: the `--export`/`--drive` command line and QMP
//!   `block-export-add` arguments.
//! - [`memory`]: the front-end's memory table, validated and mapped.
//! - [`interrupt`]: per-queue call/err eventfds as a `VirtioInterrupt`.
//! - [`backend`]: the protocol state (features, vrings, config space)
//!   driving the device.
//! - [`server`]: the protocol thread (listen, serve, reconnect).
//!
//! An export holds each IOThread that serves one of its queues as holder
//! `block-node <node-name>` from [`Export::start`] until it is stopped
//! (block-export-add to block-export-del), whether a front-end is connected or
//! not: the virtio-blk device model holds them for its whole life.

pub mod backend;
pub mod interrupt;
pub mod memory;
pub mod options;
pub mod server;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use iothread_registry::{HolderGuard, IoThreadHolder, IoThreadRegistry};
use serde::Serialize;

use crate::virtio::block::backend::BlockEngine;
use crate::virtio::block::lock::{ImageLock, LockError, LockMode};
use crate::virtio::block::{BlockHandle, BlockInfo};
use crate::virtio::device::VirtioDevice;
pub use backend::{BackendStats, DeviceBackend, RequestError, VIRTIO_BLK_CONFIG_SIZE};
pub use options::{
    BlockExportAddArgs, BlockExportDelArgs, BlockExportRemoveMode, DriveSpec, ExportSpec,
    IoThreadChoice, OptionsError,
};
pub use server::{ConnState, ServerError};

/// Largest queue size a front-end may choose (QEMU's vhost-user-blk
/// `queue-size` maximum).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Everything needed to start an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// Export id (QMP `id`).
    pub id: String,
    /// Exported block node (the drive id).
    pub node_name: String,
    /// Unix socket to listen on.
    pub socket: PathBuf,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// IOThread id of every queue (length `num_queues`), e.g. from
    /// [`ExportSpec::queue_iothreads`].
    pub queue_iothreads: Vec<String>,
    /// Image file.
    pub file: PathBuf,
    /// Refuse writes (virtio-blk `VIRTIO_BLK_F_RO`).
    pub readonly: bool,
    /// Open the image with O_DIRECT.
    pub direct: bool,
    /// I/O engine (`aio=` of the drive).
    pub engine: BlockEngine,
    /// Image locking (`locking=` of the drive).
    pub locking: LockMode,
}

impl ExportConfig {
    /// Combines a parsed export with its drive; `exists` tells which
    /// IOThread ids exist.
    pub fn from_spec(
        spec: &ExportSpec,
        drive: &DriveSpec,
        exists: impl Fn(&str) -> bool,
    ) -> Result<ExportConfig, ExportError> {
        if spec.node_name != drive.id {
            return Err(ExportError::NodeMismatch {
                node_name: spec.node_name.clone(),
                drive: drive.id.clone(),
            });
        }
        if spec.writable == Some(true) && drive.readonly {
            return Err(ExportError::ReadOnlyDrive(drive.id.clone()));
        }
        Ok(ExportConfig {
            id: spec.id.clone(),
            node_name: spec.node_name.clone(),
            socket: spec.socket.clone(),
            num_queues: spec.num_queues,
            queue_iothreads: spec.queue_iothreads(exists).map_err(ExportError::Options)?,
            file: drive.file.clone(),
            readonly: drive.readonly || spec.writable == Some(false),
            direct: drive.direct,
            locking: drive.locking,
            engine: match drive.aio.as_deref() {
                None => BlockEngine::Auto,
                Some(a) => a
                    .parse()
                    .map_err(|msg| ExportError::Options(OptionsError::Value { key: "aio", msg }))?,
            },
        })
    }
}

/// Errors starting an export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// Bad options.
    #[error("invalid export options")]
    Options(#[source] OptionsError),
    /// The export refers to another node than the drive given.
    #[error("export node-name '{node_name}' does not match drive '{drive}'")]
    NodeMismatch {
        /// node-name of the export.
        node_name: String,
        /// Drive id.
        drive: String,
    },
    /// A writable export of a read-only drive.
    #[error("drive '{0}' is read-only: the export cannot be writable")]
    ReadOnlyDrive(String),
    /// `queue_iothreads` does not have one entry per queue.
    #[error("{queues} queues but {iothreads} IOThread assignments")]
    QueueMapping {
        /// num_queues.
        queues: u16,
        /// Entries in queue_iothreads.
        iothreads: usize,
    },
    /// The device declares a different number of queues than configured.
    #[error("device has {device} queues, export configured {configured}")]
    DeviceQueues {
        /// Queues of the device.
        device: usize,
        /// num_queues.
        configured: u16,
    },
    /// An IOThread could not be acquired.
    #[error("cannot acquire IOThread '{iothread}'")]
    IoThread {
        /// IOThread id.
        iothread: String,
        /// The cause.
        #[source]
        source: iothread_registry::Error,
    },
    /// The block device could not be created.
    #[error("cannot open the block device")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The image is locked by another user (or cannot be locked).
    #[error(transparent)]
    Lock(LockError),
    /// The socket or thread could not be set up.
    #[error("cannot start the export server")]
    Server(#[source] ServerError),
}

/// One element of QMP `query-block-exports` (QEMU's `BlockExportInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExportInfo {
    /// Export id.
    pub id: String,
    /// Always "vhost-user-blk".
    #[serde(rename = "type")]
    pub kind: String,
    /// Exported node.
    pub node_name: String,
    /// Whether the export is being removed.
    pub shutting_down: bool,
}

/// Detailed state of an export (HMP / diagnostics; not a QEMU structure).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExportStatus {
    /// QMP view.
    #[serde(flatten)]
    pub info: ExportInfo,
    /// Socket path.
    pub addr: PathBuf,
    /// Number of queues.
    pub num_queues: u16,
    /// IOThread of every queue.
    pub iothreads: Vec<String>,
    /// Whether the export is writable.
    pub writable: bool,
    /// A front-end is connected.
    pub connected: bool,
    /// Front-ends accepted so far.
    pub connections: u64,
    /// Connections dropped for protocol errors.
    pub protocol_errors: u64,
    /// Requests refused.
    pub refused_requests: u64,
    /// Device activations.
    pub activations: u64,
    /// The device currently serves queues.
    pub active: bool,
    /// The virtio-blk device's state and per-queue counters (`None` for
    /// exports of other device models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockInfo>,
}

/// A running vhost-user-blk export.
pub struct Export {
    cfg: ExportConfig,
    backend: Arc<Mutex<DeviceBackend>>,
    stats: Arc<BackendStats>,
    server: server::Server,
    holders: Vec<HolderGuard>,
    block: Option<BlockHandle>,
    /// The image lock, released after the final flush.
    lock: Option<ImageLock>,
    stopped: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("cfg", &self.cfg)
            .field("server", &self.server)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Locks the image (as `cfg.locking` says), opens the drive as a
    /// virtio-blk device model and starts serving it.
    pub fn start(cfg: ExportConfig, registry: &IoThreadRegistry) -> Result<Export, ExportError> {
        let lock =
            ImageLock::acquire(&cfg.file, cfg.readonly, cfg.locking).map_err(ExportError::Lock)?;
        Self::start_locked(cfg, registry, lock)
    }

    /// [`Export::start`] with the image lock taken before (when the
    /// configuration was checked); `None` if the image is not to be locked.
    pub fn start_locked(
        cfg: ExportConfig,
        registry: &IoThreadRegistry,
        lock: Option<ImageLock>,
    ) -> Result<Export, ExportError> {
        // The device holds the IOThreads itself, as `block-node <node-name>`.
        let (device, handle) = device::open_block(&cfg, registry)?;
        let mut export = Self::start_inner(cfg, Vec::new(), device)?;
        export.block = Some(handle);
        export.lock = lock;
        Ok(export)
    }

    /// Starts an export of an already-built device model (tests, other
    /// device types). The device's queue count must match `num_queues`. The
    /// export holds the IOThreads of `cfg` as `block-node <node-name>` until
    /// it is stopped.
    pub fn with_device(
        cfg: ExportConfig,
        registry: &IoThreadRegistry,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Export, ExportError> {
        let holders = acquire_holders(&cfg, registry)?;
        Self::start_inner(cfg, holders, device)
    }

    fn start_inner(
        cfg: ExportConfig,
        holders: Vec<HolderGuard>,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Export, ExportError> {
        let nq = device.queue_max_sizes().len();
        if nq != usize::from(cfg.num_queues) {
            return Err(ExportError::DeviceQueues {
                device: nq,
                configured: cfg.num_queues,
            });
        }
        let backend = DeviceBackend::new(device, VIRTIO_BLK_CONFIG_SIZE);
        let stats = backend.stats();
        let backend = Arc::new(Mutex::new(backend));
        let server = server::Server::start(&cfg.id, &cfg.socket, Arc::clone(&backend))
            .map_err(ExportError::Server)?;
        log::info!(
            "vhost-user-blk export '{}' of '{}' on {} ({} queues, IOThreads {:?})",
            cfg.id,
            cfg.node_name,
            cfg.socket.display(),
            cfg.num_queues,
            cfg.queue_iothreads
        );
        Ok(Export {
            cfg,
            backend,
            stats,
            server,
            holders,
            block: None,
            lock: None,
            stopped: false,
        })
    }

    /// Export id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// The configuration the export was started with.
    pub fn config(&self) -> &ExportConfig {
        &self.cfg
    }

    /// The `query-block-exports` element.
    pub fn info(&self) -> ExportInfo {
        ExportInfo {
            id: self.cfg.id.clone(),
            kind: options::EXPORT_TYPE.to_owned(),
            node_name: self.cfg.node_name.clone(),
            shutting_down: self.stopped,
        }
    }

    /// Serves a front-end connected over `stream` (e.g. one end of a
    /// `UnixStream::pair`) on the calling thread, as the export's protocol thread
    /// serves a front-end that connected to the socket: until it disconnects or
    /// breaks the protocol, after which the back-end is reset for the next one.
    /// Returns false if the export was stopped meanwhile.
    ///
    /// For driving the protocol in-process (the fuzzer does, to skip a connect,
    /// an accept and two thread hand-overs per front-end). The export serves one
    /// front-end at a time: while one that connected to the socket is served,
    /// this waits for it to go, and a front-end connecting meanwhile waits for
    /// this one.
    pub fn serve_stream(&self, stream: std::os::unix::net::UnixStream) -> bool {
        self.server
            .serve_stream(&self.cfg.id, stream, &self.backend)
    }

    /// Whether a front-end is connected (QMP `block-export-del` in `safe`
    /// mode refuses to remove a connected export).
    pub fn is_connected(&self) -> bool {
        self.server.state().connected.load(Ordering::SeqCst)
    }

    /// Detailed state.
    pub fn status(&self) -> ExportStatus {
        let conn = self.server.state();
        ExportStatus {
            info: self.info(),
            addr: self.cfg.socket.clone(),
            num_queues: self.cfg.num_queues,
            iothreads: self.cfg.queue_iothreads.clone(),
            writable: !self.cfg.readonly,
            connected: conn.connected.load(Ordering::SeqCst),
            connections: conn.connections.load(Ordering::Relaxed),
            protocol_errors: conn.protocol_errors.load(Ordering::Relaxed),
            refused_requests: self.stats.refused.load(Ordering::Relaxed),
            activations: self.stats.activations.load(Ordering::Relaxed),
            active: self.stats.active.load(Ordering::SeqCst),
            block: self.block_info(),
        }
    }

    /// The virtio-blk device's state (`query-block`), when the export was
    /// started with [`Export::start`].
    pub fn block_info(&self) -> Option<BlockInfo> {
        self.block.as_ref().map(BlockHandle::info)
    }

    /// Disconnects the front-end (if any), stops serving, flushes the
    /// device, removes the socket and releases the IOThreads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.server.stop();
        self.backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown();
        for guard in self.holders.drain(..) {
            let id = guard.iothread_id().to_owned();
            if let Err(e) = guard.release() {
                log::error!("export '{}': releasing IOThread '{id}': {e}", self.cfg.id);
            }
        }
        // The device is stopped and flushed: others may have the image now.
        drop(self.lock.take());
        log::info!("vhost-user-blk export '{}' stopped", self.cfg.id);
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Acquires every IOThread of the export (once each) as `block-node
/// <node-name>`. On error the ones already acquired are released.
fn acquire_holders(
    cfg: &ExportConfig,
    registry: &IoThreadRegistry,
) -> Result<Vec<HolderGuard>, ExportError> {
    if cfg.queue_iothreads.len() != usize::from(cfg.num_queues) {
        return Err(ExportError::QueueMapping {
            queues: cfg.num_queues,
            iothreads: cfg.queue_iothreads.len(),
        });
    }
    let mut ids: Vec<&str> = Vec::new();
    for id in &cfg.queue_iothreads {
        if !ids.contains(&id.as_str()) {
            ids.push(id);
        }
    }
    let mut guards = Vec::with_capacity(ids.len());
    for id in ids {
        let guard = registry
            .acquire(id, IoThreadHolder::block_node(cfg.node_name.clone()))
            .map_err(|source| ExportError::IoThread {
                iothread: id.to_owned(),
                source,
            })?;
        guards.push(guard);
    }
    Ok(guards)
}

mod device;

#[cfg(test)]
mod tests;

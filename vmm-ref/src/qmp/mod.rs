//! QMP control socket: QEMU's machine protocol on a Unix socket, for live IOThread
//! management (`query-iothreads`, `qom-get`/`qom-set`, `object-add`/`object-del`, the
//! `x-query-iothread-stats` extension), `query-block`, `query-status`,
//! `human-monitor-command` (HMP `info iothreads`, ...), `system_reset`, `quit`,
//! block exports (`block-export-add`, `block-export-del`, `query-block-exports`,
//! answered by machines that have an [`ExportControl`]) and asynchronous events.
//!
//! Layout (control plane = typed commands + one dispatcher):
//!
//! * [`protocol`]: wire format without I/O: the streaming JSON decoder (size limit
//!   [`protocol::MAX_MESSAGE_SIZE`]), request validation, reply encoding.
//! * [`commands`]: the typed [`Command`]s (arguments parsed into
//!   `#[serde(deny_unknown_fields)]` structs, QEMU's error messages) and the one
//!   [`Dispatcher`] that executes them against a [`QmpMachine`].
//! * [`session`]: one client's protocol state (capabilities negotiation), bytes in,
//!   replies out, still without I/O — the entry point for fuzzing.
//! * `server`: the socket, the `qmp` thread and per-client output queues ([`QmpServer`]).
//! * `event`: [`EventSender`], how the VMM emits events such as `SHUTDOWN` and `RESET`.
//!
//! The VMM implements [`QmpMachine`], starts the server with [`QmpServer::start`] and
//! keeps the [`QmpServer`] alive as long as the socket should exist.
//!
//! Fuzzing entry points (no socket needed): [`Session::feed`] +
//! [`Session::process_next`] with a [`Dispatcher`] over any [`QmpMachine`];
//! [`protocol::JsonStreamDecoder`] and [`Command::parse`] on their own.

mod args;
pub mod commands;
mod error;
mod event;
pub mod protocol;
mod server;
pub mod session;
mod socket;

use serde::Serialize;

use crate::export::options::SocketAddress;
use crate::export::{BlockExportAddArgs, BlockExportDelArgs};

// The whole surface (also for the fuzz target and tools); the vmm-ref binary uses part
// of it, so unused re-exports must not warn there.
#[allow(unused_imports)]
pub use commands::{Command, Dispatcher, FollowUp};
#[allow(unused_imports)]
pub use error::{CommandError, ErrorClass, QmpError};
#[allow(unused_imports)]
pub use event::{Event, EventSender};
#[allow(unused_imports)]
pub use server::{QmpListener, QmpServer, QmpServerConfig, DEFAULT_NEGOTIATION_TIMEOUT};
#[allow(unused_imports)]
pub use session::Session;

/// What the VMM exposes to QMP. Every method is called on the `qmp` server thread, one
/// command at a time; implementations serialise with the rest of the VMM as they need.
pub trait QmpMachine: Send + Sync {
    /// The run state, as `query-status` reports it.
    fn status(&self) -> RunStatus;

    /// Reset the machine (`system_reset`). On success the server sends the reply, then a
    /// `RESET` event `{"guest": false, "reason": "host-qmp-system-reset"}`.
    fn system_reset(&self) -> Result<(), String>;

    /// `stop`: stop the guest's vCPUs until `cont`. Stopping a stopped machine
    /// succeeds and changes nothing. The machine emits `STOP` when its state
    /// changes. The default, for machines without vCPUs, refuses.
    fn stop(&self) -> Result<(), String> {
        Err("stop is not supported by this machine (it runs no guest)".to_owned())
    }

    /// `cont`: let a stopped machine's vCPUs run again. Continuing a running
    /// machine succeeds and changes nothing. The machine emits `RESUME` when its
    /// state changes. The default, for machines without vCPUs, refuses.
    fn cont(&self) -> Result<(), String> {
        Err("cont is not supported by this machine (it runs no guest)".to_owned())
    }

    /// Stop the VMM (`quit`). Called after the reply and the `SHUTDOWN` event were queued
    /// (and flushed as far as the clients read them). Must only *request* the shutdown:
    /// it runs on the `qmp` thread, so it must not wait for the [`QmpServer`] to stop.
    /// Dropping the [`QmpServer`] later flushes what is still queued.
    fn quit(&self);

    /// The block devices, for `query-block`.
    fn query_block(&self) -> Vec<BlockInfo>;

    /// The IOThread registry that `query-iothreads`, `qom-get`/`qom-set` and
    /// `object-add`/`object-del` operate on.
    fn registry(&self) -> &iothread_registry::IoThreadRegistry;

    /// `x-drive-set-iothreads`: move drive `id`'s queues to the IOThreads of
    /// `mapping` (already in `iothread-vq-mapping` form; the machine validates it
    /// against its IOThreads). The default, for machines without guest drives,
    /// reports the drive as not found.
    fn set_drive_iothreads(
        &self,
        id: &str,
        mapping: &[iothread_registry::IoThreadVqMapping],
    ) -> Result<(), CommandError> {
        let _ = mapping;
        Err(CommandError::device_not_found(format!(
            "Device '{id}' not found"
        )))
    }

    /// Block export management (`block-export-add`, `block-export-del`,
    /// `query-block-exports`), if this machine has it. The default, `None`,
    /// makes the first two fail with [`NO_EXPORTS`] and the query return `[]`.
    fn exports(&self) -> Option<&dyn ExportControl> {
        None
    }
}

/// The `desc` of `block-export-add`/`block-export-del` on a machine without
/// block exports (vmm-ref's VM mode).
pub const NO_EXPORTS: &str =
    "Block exports are not available in this mode (they are served by 'vmm-ref export')";

/// Block exports, as QMP manages them. Called on the `qmp` server thread, one
/// command at a time.
pub trait ExportControl: Send + Sync {
    /// `block-export-add`: start an export. The export acquires the IOThreads of
    /// its queues as holder `block-node <node-name>`.
    fn add(&self, args: BlockExportAddArgs) -> Result<(), CommandError>;

    /// `block-export-del`: stop an export and release its IOThreads. On success the
    /// server sends `BLOCK_EXPORT_DELETED` `{"id": <id>}` after the reply.
    fn del(&self, args: &BlockExportDelArgs) -> Result<(), CommandError>;

    /// `query-block-exports`.
    fn query(&self) -> Vec<BlockExportInfo>;
}

/// One element of `query-block-exports`: QEMU's `BlockExportInfo` (`type`, `id`,
/// `node-name`, `shutting-down`) plus vmm-ref's fields.
///
/// ```text
/// {"type": "vhost-user-blk", "id": "e0", "node-name": "d0", "shutting-down": false,
///  "addr": {"type": "unix", "path": "/tmp/e0.sock"}, "num-queues": 2,
///  "iothreads": ["io0", "io1"], "writable": true, "connected": false}
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// Export type (`vhost-user-blk`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Export id.
    pub id: String,
    /// The exported block node (drive id).
    pub node_name: String,
    /// The export is being removed.
    pub shutting_down: bool,
    /// Listening socket (extension).
    pub addr: SocketAddress,
    /// Number of virtqueues (extension).
    pub num_queues: u16,
    /// IOThread of every virtqueue (extension).
    pub iothreads: Vec<String>,
    /// Writes are accepted (extension).
    pub writable: bool,
    /// A front-end is connected (extension).
    pub connected: bool,
}

/// The VM run state (QEMU's `RunState`, the values vmm-ref can be in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
// QEMU's vocabulary; a VMM uses the subset it can be in.
#[allow(dead_code)]
pub enum RunStatus {
    /// Not started yet.
    Prelaunch,
    /// vCPUs running.
    Running,
    /// vCPUs stopped by the host.
    Paused,
    /// The guest was stopped for debugging.
    Debug,
    /// The guest shut down (or asked for it).
    Shutdown,
    /// The guest panicked.
    GuestPanicked,
    /// An internal VMM error stopped the guest.
    InternalError,
    /// The guest is suspended.
    Suspended,
}

impl RunStatus {
    /// The QEMU name (`running`, `paused`, ...).
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Prelaunch => "prelaunch",
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Debug => "debug",
            RunStatus::Shutdown => "shutdown",
            RunStatus::GuestPanicked => "guest-panicked",
            RunStatus::InternalError => "internal-error",
            RunStatus::Suspended => "suspended",
        }
    }
}

/// One virtqueue's IOThread in [`BlockInfo::queues`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockQueueInfo {
    /// Virtqueue index.
    pub queue: u16,
    /// Id of the IOThread that serves it.
    pub iothread: String,
    /// Requests taken from the avail ring since the device was created.
    pub requests: u64,
    /// Guest notifications (kicks) that woke the queue's handler.
    pub notifications: u64,
    /// Used-buffer interrupts sent to the guest.
    pub interrupts: u64,
    /// Requests completed with an error status.
    pub errors: u64,
}

impl BlockInfo {
    /// The `query-block` element for a device's status `b`, shown as drive
    /// `device` at QOM path (or `export:<id>`) `qdev`, with queues of at most
    /// `queue_size` entries.
    pub fn from_device(
        b: crate::virtio::block::BlockInfo,
        device: String,
        qdev: String,
        queue_size: u16,
    ) -> BlockInfo {
        use crate::virtio::block::backend::EngineKind;
        BlockInfo {
            device,
            qdev,
            file: b.file,
            read_only: b.read_only,
            direct: b.direct,
            format: "raw".to_owned(),
            engine: match b.engine {
                EngineKind::IoUring => "io-uring",
                EngineKind::Sync => "sync",
            }
            .to_owned(),
            num_queues: b.num_queues,
            queue_size,
            activated: b.activated,
            queues: b.queues.iter().map(BlockQueueInfo::from).collect(),
            vhost_user: None,
        }
    }
}

impl From<&crate::virtio::block::QueueInfo> for BlockQueueInfo {
    fn from(q: &crate::virtio::block::QueueInfo) -> Self {
        BlockQueueInfo {
            queue: q.index,
            iothread: q.iothread.clone(),
            requests: q.requests,
            notifications: q.notifications,
            interrupts: q.interrupts,
            errors: q.errors,
        }
    }
}

/// One block device in `query-block` (vmm-ref's own schema; QEMU's `BlockInfo` nests
/// the image under `inserted` and has no per-queue mapping).
///
/// ```text
/// {"device": "blk0", "qdev": "/machine/peripheral/blk0/virtio-backend",
///  "file": "/tmp/disk.img", "read-only": false, "direct": false, "format": "raw",
///  "engine": "io-uring", "num-queues": 2, "queue-size": 256, "activated": true,
///  "queues": [{"queue": 0, "iothread": "io0", "requests": 28, "notifications": 10,
///              "interrupts": 4, "errors": 2},
///             {"queue": 1, "iothread": "io1", "requests": 19, "notifications": 3,
///              "interrupts": 0, "errors": 0}]}
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInfo {
    /// Drive id (`-drive id=` / `--blk id=`).
    pub device: String,
    /// QOM path of the device (its holder name).
    pub qdev: String,
    /// Image file.
    pub file: String,
    /// Opened read-only.
    pub read_only: bool,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// Image format (`raw`).
    pub format: String,
    /// I/O engine in use (`io-uring`, `sync`, ...).
    pub engine: String,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Virtqueue size.
    pub queue_size: u16,
    /// The driver activated the device (DRIVER_OK): its queues run. (It holds
    /// its IOThreads whether activated or not.)
    pub activated: bool,
    /// Per-queue IOThread mapping.
    pub queues: Vec<BlockQueueInfo>,
    /// For a vhost-user-blk device: its back-end and connection state.
    #[serde(rename = "vhost-user", skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<VhostUserBlockInfo>,
}

/// The back-end of a vhost-user-blk device in `query-block` (`vhost-user`).
///
/// ```text
/// "vhost-user": {"chardev": "c0", "path": "/run/vhost.sock", "connected": true,
///                "connections": 2, "disconnects": 1, "reconnects": 1,
///                "protocol-errors": 0, "reconnect": 1, "inflight": true,
///                "protocol-features": 11785, "last-error": null}
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VhostUserBlockInfo {
    /// The `--chardev` id.
    pub chardev: String,
    /// The back-end's socket.
    pub path: String,
    /// A back-end is connected.
    pub connected: bool,
    /// Connections made (the first included).
    pub connections: u64,
    /// Connections lost.
    pub disconnects: u64,
    /// Connections re-established after a loss.
    pub reconnects: u64,
    /// Connections dropped because the back-end broke the protocol.
    pub protocol_errors: u64,
    /// Seconds between reconnection attempts (`null`: none).
    pub reconnect: Option<u64>,
    /// The back-end tracks in-flight requests (INFLIGHT_SHMFD).
    pub inflight: bool,
    /// vhost-user protocol features in use.
    pub protocol_features: u64,
    /// Why the back-end was last lost or the last reconnection failed.
    pub last_error: Option<String>,
}

#[cfg(test)]
mod export_tests;
#[cfg(test)]
pub(crate) mod test_util;
#[cfg(test)]
mod tests;

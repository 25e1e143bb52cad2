//! `vmm-ref export`: the vhost-user-blk export daemon (QEMU's
//! `qemu-storage-daemon` role). Composition and lifecycle: IOThreads, the
//! exports of [`crate::export`], the QMP monitor, clean shutdown.
//!
//! The [`ExportDaemon`] handle is what the control plane drives
//! (`block-export-add`, `block-export-del`, `query-block-exports`,
//! `query-block`, `quit`; see [`crate::control::ExportQmpAdapter`]). The
//! daemon runs until SIGINT/SIGTERM/SIGHUP or QMP `quit`; then every export
//! is stopped (front-end disconnected, image flushed, socket removed, its
//! `block-node` holders released) and the IOThreads are joined.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use iothread_registry::IoThreadRegistry;

use crate::config::export::{check_export, ExportConflict, ValidExportConfig};
use crate::config::QmpAddr;
use crate::export::options::SocketAddress;
use crate::export::{
    BlockExportAddArgs, BlockExportDelArgs, BlockExportRemoveMode, DriveSpec, Export, ExportConfig,
    ExportError, OptionsError,
};
use crate::qmp::{BlockExportInfo, BlockInfo};
use crate::vm::stop::{StopReason, StopSignal};

/// Errors starting or running the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Creating an IOThread failed.
    #[error("cannot create IOThread '{id}'")]
    IoThread {
        /// The IOThread.
        id: String,
        /// Cause.
        #[source]
        source: iothread_registry::Error,
    },
    /// An export of the command line could not be started.
    #[error("cannot start export '{id}'")]
    Export {
        /// The export.
        id: String,
        /// Cause.
        #[source]
        source: ExportError,
    },
    /// Termination signals could not be set up.
    #[error("cannot set up signal handling")]
    Signals(#[source] crate::signals::SignalError),
    /// The QMP monitor could not be started.
    #[error("cannot start the QMP monitor")]
    Qmp(#[source] crate::qmp::QmpError),
}

/// Why `block-export-add` or `block-export-del` failed (the QMP error
/// description is the whole chain).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportRequestError {
    /// The arguments do not describe a valid export.
    #[error("invalid options for export '{id}'")]
    Options {
        /// The export (`id` of the arguments).
        id: String,
        /// What is wrong.
        #[source]
        source: OptionsError,
    },
    /// No drive (block node) with this name (QEMU's message).
    #[error("Cannot find device= nor node-name={0}")]
    NoNode(String),
    /// The export cannot be built from its options, drive and IOThreads.
    #[error(transparent)]
    Config(ExportError),
    /// It conflicts with another export or the QMP socket.
    #[error(transparent)]
    Conflict(ExportConflict),
    /// Starting it failed.
    #[error("cannot start export '{id}'")]
    Start {
        /// The export.
        id: String,
        /// Cause.
        #[source]
        source: ExportError,
    },
    /// No export with this id (QEMU's message).
    #[error("Export '{0}' is not found")]
    NotFound(String),
    /// `mode: safe` and a front-end is connected (QEMU's message and hint).
    #[error("export '{0}' still in use (use mode 'hard' to force client disconnect)")]
    InUse(String),
    /// The daemon is stopping.
    #[error("the export daemon is shutting down")]
    ShuttingDown,
}

struct Exports {
    running: Vec<Export>,
    shut_down: bool,
}

struct Inner {
    registry: IoThreadRegistry,
    drives: Vec<DriveSpec>,
    qmp: Option<PathBuf>,
    exports: Mutex<Exports>,
    stop: StopSignal,
}

/// Handle on the export daemon. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ExportDaemon {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ExportDaemon {
    /// Creates the IOThreads and starts the exports of `cfg` with the image
    /// locks taken during validation (the QMP monitor is started by [`run`]).
    /// On error everything created is stopped again.
    pub fn start(cfg: ValidExportConfig) -> Result<ExportDaemon, DaemonError> {
        let registry = IoThreadRegistry::new();
        let daemon = ExportDaemon {
            inner: Arc::new(Inner {
                registry: registry.clone(),
                drives: cfg.drives.clone(),
                qmp: cfg.qmp.as_ref().map(|QmpAddr::Unix(p)| p.clone()),
                exports: Mutex::new(Exports {
                    running: Vec::new(),
                    shut_down: false,
                }),
                stop: StopSignal::new(),
            }),
        };
        let started = || -> Result<(), DaemonError> {
            for (id, params) in &cfg.iothreads {
                registry
                    .create(id, *params)
                    .map_err(|source| DaemonError::IoThread {
                        id: id.clone(),
                        source,
                    })?;
            }
            for (e, image_lock) in cfg.exports.into_iter().zip(cfg.image_locks) {
                let id = e.id.clone();
                let export = Export::start_locked(e, &registry, image_lock)
                    .map_err(|source| DaemonError::Export { id, source })?;
                lock(&daemon.inner.exports).running.push(export);
            }
            Ok(())
        };
        if let Err(e) = started() {
            daemon.shutdown();
            return Err(e);
        }
        Ok(daemon)
    }

    /// The IOThread registry (query-iothreads, object-add/del, ...).
    pub fn registry(&self) -> &IoThreadRegistry {
        &self.inner.registry
    }

    /// The stop signal: [`ExportDaemon::quit`] and the signal thread request
    /// the stop, [`run`] waits for it.
    pub fn stop_signal(&self) -> &StopSignal {
        &self.inner.stop
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.inner.stop.reason().is_some()
    }

    /// Asks the daemon to stop (QMP `quit`).
    pub fn quit(&self) {
        self.inner.stop.request(StopReason::Quit);
    }

    /// Ids of the running exports, in creation order.
    pub fn export_ids(&self) -> Vec<String> {
        lock(&self.inner.exports)
            .running
            .iter()
            .map(|e| e.id().to_owned())
            .collect()
    }

    /// QMP `block-export-add`: validates the arguments against the drives,
    /// the IOThreads and the other exports, then starts the export (which
    /// acquires its IOThreads as `block-node <node-name>`).
    pub fn add_export(&self, args: BlockExportAddArgs) -> Result<(), ExportRequestError> {
        let id = args.id.clone();
        let spec = args
            .into_spec()
            .map_err(|source| ExportRequestError::Options { id, source })?;
        let drive = self
            .inner
            .drives
            .iter()
            .find(|d| d.id == spec.node_name)
            .ok_or_else(|| ExportRequestError::NoNode(spec.node_name.clone()))?;
        let registry = &self.inner.registry;
        let cfg = ExportConfig::from_spec(&spec, drive, |id| registry.contains(id))
            .map_err(ExportRequestError::Config)?;
        // Held while starting, so that concurrent requests see each other.
        let mut exports = lock(&self.inner.exports);
        if exports.shut_down || self.stopping() {
            return Err(ExportRequestError::ShuttingDown);
        }
        let existing: Vec<&ExportConfig> = exports.running.iter().map(Export::config).collect();
        check_export(&cfg, &existing, self.inner.qmp.as_deref())
            .map_err(ExportRequestError::Conflict)?;
        let id = cfg.id.clone();
        let export = Export::start(cfg, registry)
            .map_err(|source| ExportRequestError::Start { id, source })?;
        exports.running.push(export);
        Ok(())
    }

    /// QMP `block-export-del`: stops the export (disconnecting the front-end
    /// in `hard` mode; `safe` mode refuses while one is connected), flushes
    /// the image, removes the socket and releases the IOThreads.
    pub fn del_export(&self, args: &BlockExportDelArgs) -> Result<(), ExportRequestError> {
        let export = {
            let mut exports = lock(&self.inner.exports);
            let pos = exports
                .running
                .iter()
                .position(|e| e.id() == args.id)
                .ok_or_else(|| ExportRequestError::NotFound(args.id.clone()))?;
            if args.mode == BlockExportRemoveMode::Safe && exports.running[pos].is_connected() {
                return Err(ExportRequestError::InUse(args.id.clone()));
            }
            exports.running.remove(pos)
        };
        // Outside the lock: stopping joins the export's protocol thread.
        export.stop();
        Ok(())
    }

    /// QMP `query-block-exports`.
    pub fn query_exports(&self) -> Vec<BlockExportInfo> {
        lock(&self.inner.exports)
            .running
            .iter()
            .map(|e| {
                let st = e.status();
                BlockExportInfo {
                    id: st.info.id,
                    kind: st.info.kind,
                    node_name: st.info.node_name,
                    shutting_down: st.info.shutting_down,
                    addr: SocketAddress::Unix { path: st.addr },
                    num_queues: st.num_queues,
                    iothreads: st.iothreads,
                    writable: st.writable,
                    connected: st.connected,
                }
            })
            .collect()
    }

    /// QMP `query-block`: the drive of every export, as that export serves it
    /// (`qdev` is `export:<export id>`; drives without an export are not open).
    pub fn query_block(&self) -> Vec<BlockInfo> {
        lock(&self.inner.exports)
            .running
            .iter()
            .filter_map(|e| {
                let cfg = e.config();
                let b = e.block_info()?;
                Some(BlockInfo::from_device(
                    b,
                    cfg.node_name.clone(),
                    format!("export:{}", cfg.id),
                    crate::export::MAX_QUEUE_SIZE,
                ))
            })
            .collect()
    }

    /// Stops every export (in reverse order), then the IOThreads. Idempotent;
    /// later `block-export-add` requests are refused.
    pub fn shutdown(&self) {
        self.inner.stop.request(StopReason::Quit);
        let running = {
            let mut exports = lock(&self.inner.exports);
            exports.shut_down = true;
            std::mem::take(&mut exports.running)
        };
        for export in running.into_iter().rev() {
            // The final counters (requests per queue, protocol errors) on
            // stdout, one JSON line per export, for operators and tests.
            let status = export.status();
            export.stop();
            let line = serde_json::to_string(&status).map(|json| format!("export-status {json}"));
            // Informational, like the ready line: a closed stdout is no error.
            let mut out = std::io::stdout().lock();
            if let Err(e) = line
                .map_err(std::io::Error::other)
                .and_then(|l| writeln!(out, "{l}"))
                .and_then(|()| out.flush())
            {
                log::debug!(
                    "cannot print the status of export '{}': {e}",
                    status.info.id
                );
            }
        }
        let registry = &self.inner.registry;
        for id in registry.ids().into_iter().rev() {
            if let Err(e) = registry.delete(&id) {
                log::error!("cannot stop IOThread '{id}': {e}");
            }
        }
    }
}

/// Runs the daemon until a termination signal or QMP `quit`; returns the
/// process exit status (0 after a clean stop).
pub fn run(cfg: ValidExportConfig) -> Result<i32, DaemonError> {
    crate::signals::block_termination_signals().map_err(DaemonError::Signals)?;
    let qmp = cfg.qmp.clone();
    let listening: Vec<String> = cfg
        .exports
        .iter()
        .map(|e| format!("{} on unix:{}", e.id, e.socket.display()))
        .collect();
    let daemon = ExportDaemon::start(cfg)?;
    if let Err(e) = crate::signals::spawn_signal_thread(daemon.stop_signal().clone()) {
        daemon.shutdown();
        return Err(DaemonError::Signals(e));
    }
    let qmp_server = match &qmp {
        Some(addr) => match crate::control::start_export_qmp(&daemon, addr) {
            Ok(server) => Some(server),
            Err(e) => {
                daemon.shutdown();
                return Err(DaemonError::Qmp(e));
            }
        },
        None => None,
    };
    let ready = format!(
        "vmm-ref export: ready ({})",
        if listening.is_empty() {
            "no exports yet".to_owned()
        } else {
            listening.join(", ")
        }
    );
    // Informational: a closed stdout must not stop the daemon.
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{ready}").and_then(|()| out.flush()) {
        log::debug!("cannot print the ready line: {e}");
    }
    drop(out);
    let reason = daemon.stop_signal().wait();
    log::info!("export daemon stopping: {reason}");
    if let StopReason::Signal { .. } = reason {
        eprintln!("vmm-ref: {reason}");
    }
    daemon.shutdown();
    // `quit`'s SHUTDOWN is the dispatcher's; a signal's is sent here, as
    // `vmm-ref run` does.
    if let (StopReason::Signal { .. }, Some(server)) = (&reason, &qmp_server) {
        server.events().emit(
            "SHUTDOWN",
            serde_json::json!({"guest": false, "reason": "host-signal"}),
        );
    }
    // Dropped after the shutdown so that queued replies and events are flushed.
    drop(qmp_server);
    Ok(0)
}

/// `vmm-ref export`: validates the options (status 2 on error, before
/// anything is created), then runs the daemon (status 1 if it fails).
pub fn main(args: &crate::config::cli::ExportArgs) -> i32 {
    let cfg = match crate::config::export::validate(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", crate::error_chain(&e));
            return crate::EXIT_CONFIG_ERROR;
        }
    };
    match run(cfg) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("error: {}", crate::error_chain(&e));
            crate::EXIT_FAILURE
        }
    }
}

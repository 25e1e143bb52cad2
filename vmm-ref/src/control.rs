//! Control-plane glue: the [`QmpMachine`] implementations over a [`Vmm`]
//! ([`QmpAdapter`]) and over the export daemon ([`ExportQmpAdapter`], which
//! also manages block exports), and starting the QMP server for
//! `--qmp unix:/path`.
//!
//! Event flow: the QMP dispatcher itself emits `RESET` after a successful
//! `system_reset` and `SHUTDOWN` before `quit`; the VMM adds `STOP` and
//! `RESUME` when `stop` and `cont` change its state, and the events the
//! guest causes (`SHUTDOWN` with `"guest": true` when the guest leaves through
//! the debug-exit port, the i8042 or a triple fault).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::config::QmpAddr;
use crate::export::{BlockExportAddArgs, BlockExportDelArgs};
use crate::export_daemon::ExportDaemon;
use crate::qmp::{
    BlockExportInfo, BlockInfo, CommandError, ExportControl, QmpError, QmpListener, QmpMachine,
    QmpServer, QmpServerConfig, RunStatus,
};
use crate::vm::stop::StopReason;
use crate::vmm::{RunState, Vmm, VmmEvent};

/// [`QmpMachine`] over a [`Vmm`] handle.
pub struct QmpAdapter(pub Vmm);

impl QmpMachine for QmpAdapter {
    fn status(&self) -> RunStatus {
        match (self.0.status(), self.0.stop_reason()) {
            (_, Some(StopReason::VcpuError { .. })) => RunStatus::InternalError,
            (RunState::Shutdown, _) | (_, Some(_)) => RunStatus::Shutdown,
            (RunState::Running, None) => RunStatus::Running,
            (RunState::Paused, None) => RunStatus::Paused,
        }
    }

    fn system_reset(&self) -> Result<(), String> {
        self.0.system_reset().map_err(|e| crate::error_chain(&e))
    }

    fn stop(&self) -> Result<(), String> {
        self.0.pause().map_err(|e| crate::error_chain(&e))
    }

    fn cont(&self) -> Result<(), String> {
        self.0.resume().map_err(|e| crate::error_chain(&e))
    }

    fn quit(&self) {
        self.0.quit();
    }

    fn query_block(&self) -> Vec<BlockInfo> {
        self.0.query_block()
    }

    fn registry(&self) -> &iothread_registry::IoThreadRegistry {
        self.0.registry()
    }

    fn set_drive_iothreads(
        &self,
        id: &str,
        mapping: &[iothread_registry::IoThreadVqMapping],
    ) -> Result<(), CommandError> {
        let drive = self
            .0
            .drive(id)
            .ok_or_else(|| CommandError::device_not_found(format!("Device '{id}' not found")))?;
        drive
            .set_iothreads(mapping)
            .map_err(|e| CommandError::from_error(&e))
    }
}

/// Environment variable overriding the QMP capabilities-negotiation timeout,
/// in milliseconds (`0`: no timeout). For tests and unusual clients; the
/// default is [`crate::qmp::DEFAULT_NEGOTIATION_TIMEOUT`].
pub const NEGOTIATION_TIMEOUT_ENV: &str = "VMM_REF_QMP_NEGOTIATION_TIMEOUT_MS";

/// The QMP server limits: the defaults, with the negotiation timeout from
/// [`NEGOTIATION_TIMEOUT_ENV`] if it is set (an invalid value is reported
/// and ignored).
fn server_config() -> QmpServerConfig {
    let mut config = QmpServerConfig::default();
    if let Some(raw) = std::env::var_os(NEGOTIATION_TIMEOUT_ENV) {
        match raw.to_str().and_then(|v| v.parse::<u64>().ok()) {
            Some(0) => config.negotiation_timeout = None,
            Some(ms) => config.negotiation_timeout = Some(Duration::from_millis(ms)),
            None => log::warn!(
                "{NEGOTIATION_TIMEOUT_ENV}={}: not a number of milliseconds; using {:?}",
                raw.to_string_lossy(),
                crate::qmp::DEFAULT_NEGOTIATION_TIMEOUT
            ),
        }
    }
    config
}

/// Creates the QMP socket at `addr` (before the VM: see [`QmpServer::bind`]).
pub fn bind_qmp(addr: &QmpAddr) -> Result<QmpListener, QmpError> {
    let QmpAddr::Unix(path) = addr;
    QmpServer::bind(path, server_config())
}

/// Serves QMP for `vmm` on `listener`, forwarding guest-initiated lifecycle
/// events. Keep the returned server alive until the VMM has shut down
/// (dropping it flushes queued replies and events and removes the socket).
pub fn serve_qmp(vmm: &Vmm, listener: QmpListener) -> Result<QmpServer, QmpError> {
    let server = listener.serve(Arc::new(QmpAdapter(vmm.clone())))?;
    let events = server.events();
    vmm.add_event_listener(Box::new(move |ev| match ev {
        // The dispatcher emits the events of its own commands (quit,
        // system_reset); the rest come from here: the guest's, a termination
        // signal's (`host-signal`) and a failed vCPU's (`host-error`).
        VmmEvent::Shutdown { guest, reason } if *reason != "host-qmp-quit" => {
            events.emit("SHUTDOWN", json!({"guest": guest, "reason": reason}))
        }
        VmmEvent::Reset {
            guest: true,
            reason,
        } => events.emit("RESET", json!({"guest": true, "reason": reason})),
        VmmEvent::Stop => events.emit("STOP", serde_json::Value::Null),
        VmmEvent::Resume => events.emit("RESUME", serde_json::Value::Null),
        _ => {}
    }));
    Ok(server)
}

/// The `system_reset` error of the export daemon.
pub const EXPORT_RESET_UNSUPPORTED: &str = "system_reset is not supported by the export daemon";

/// The `stop` error of the export daemon (it runs no guest).
pub const EXPORT_STOP_UNSUPPORTED: &str = "stop is not supported by the export daemon";

/// The `cont` error of the export daemon (it runs no guest).
pub const EXPORT_CONT_UNSUPPORTED: &str = "cont is not supported by the export daemon";

/// [`QmpMachine`] (with block exports) over an [`ExportDaemon`]: status
/// `running` until a stop is requested, no `system_reset`, `query-block` lists
/// the exported drives.
pub struct ExportQmpAdapter(pub ExportDaemon);

impl QmpMachine for ExportQmpAdapter {
    fn status(&self) -> RunStatus {
        if self.0.stopping() {
            RunStatus::Shutdown
        } else {
            RunStatus::Running
        }
    }

    fn system_reset(&self) -> Result<(), String> {
        Err(EXPORT_RESET_UNSUPPORTED.to_owned())
    }

    fn stop(&self) -> Result<(), String> {
        Err(EXPORT_STOP_UNSUPPORTED.to_owned())
    }

    fn cont(&self) -> Result<(), String> {
        Err(EXPORT_CONT_UNSUPPORTED.to_owned())
    }

    fn quit(&self) {
        self.0.quit();
    }

    fn query_block(&self) -> Vec<BlockInfo> {
        self.0.query_block()
    }

    fn registry(&self) -> &iothread_registry::IoThreadRegistry {
        self.0.registry()
    }

    fn exports(&self) -> Option<&dyn ExportControl> {
        Some(self)
    }
}

impl ExportControl for ExportQmpAdapter {
    fn add(&self, args: BlockExportAddArgs) -> Result<(), CommandError> {
        self.0
            .add_export(args)
            .map_err(|e| CommandError::from_error(&e))
    }

    fn del(&self, args: &BlockExportDelArgs) -> Result<(), CommandError> {
        self.0
            .del_export(args)
            .map_err(|e| CommandError::from_error(&e))
    }

    fn query(&self) -> Vec<BlockExportInfo> {
        self.0.query_exports()
    }
}

/// Starts the QMP monitor of the export daemon on `addr`. Keep the returned
/// server alive until the daemon has shut down.
pub fn start_export_qmp(daemon: &ExportDaemon, addr: &QmpAddr) -> Result<QmpServer, QmpError> {
    let QmpAddr::Unix(path) = addr;
    QmpServer::start_with_config(
        path,
        Arc::new(ExportQmpAdapter(daemon.clone())),
        server_config(),
    )
}

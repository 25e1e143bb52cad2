//! Control-plane glue: the [`QmpMachine`] implementation over a [`Vmm`], and
//! starting the QMP server for `--qmp unix:/path`.
//!
//! Event flow: the QMP dispatcher itself emits `RESET` after a successful
//! `system_reset` and `SHUTDOWN` before `quit`; the VMM adds the events the
//! guest causes (`SHUTDOWN` with `"guest": true` when the guest leaves through
//! the debug-exit port, the i8042 or a triple fault).

use std::sync::Arc;

use serde_json::json;

use crate::config::QmpAddr;
use crate::qmp::{BlockInfo, QmpError, QmpMachine, QmpServer, RunStatus};
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

    fn quit(&self) {
        self.0.quit();
    }

    fn query_block(&self) -> Vec<BlockInfo> {
        self.0.query_block()
    }

    fn registry(&self) -> &iothread_registry::IoThreadRegistry {
        self.0.registry()
    }
}

/// Starts the QMP monitor for `vmm` on `addr`, forwarding guest-initiated
/// lifecycle events. Keep the returned server alive until the VMM has shut down
/// (dropping it flushes queued replies and events and removes the socket).
pub fn start_qmp(vmm: &Vmm, addr: &QmpAddr) -> Result<QmpServer, QmpError> {
    let QmpAddr::Unix(path) = addr;
    let server = QmpServer::start(path, Arc::new(QmpAdapter(vmm.clone())))?;
    let events = server.events();
    vmm.add_event_listener(Box::new(move |ev| match ev {
        // Host-initiated events (quit, system_reset) are emitted by the dispatcher.
        VmmEvent::Shutdown {
            guest: true,
            reason,
        } => events.emit("SHUTDOWN", json!({"guest": true, "reason": reason})),
        VmmEvent::Reset {
            guest: true,
            reason,
        } => events.emit("RESET", json!({"guest": true, "reason": reason})),
        _ => {}
    }));
    Ok(server)
}

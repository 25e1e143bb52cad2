//! Control-plane glue: connects the QMP server to a [`Vmm`].

use crate::config::QmpAddr;
use crate::vmm::Vmm;

/// Starts the QMP monitor for `vmm` on `addr`.
pub fn start_qmp(_vmm: &Vmm, addr: &QmpAddr) {
    log::warn!("QMP is not built into this vmm-ref yet; ignoring --qmp {addr:?}");
}

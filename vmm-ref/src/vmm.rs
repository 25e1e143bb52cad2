//! Composition and lifecycle: IOThreads, the VM, the platform devices, the drives,
//! the vCPUs; the [`Vmm`] handle the control plane (QMP) drives: status, reset,
//! quit, query-block; clean shutdown (vCPUs stopped, disks flushed, holders
//! released, IOThreads joined).

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use iothread_registry::IoThreadRegistry;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use crate::config::ValidConfig;
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_SIZE};
use crate::devices::i8042::{I8042, I8042_SIZE};
use crate::devices::serial::{Serial, SerialOut, SERIAL_SIZE};
use crate::drives::{self, Drive};
use crate::qmp::BlockInfo;
use crate::vhost_user_drives::VhostUserDrive;
use crate::vm::boot::{self, BootSetup};
use crate::vm::cpu::BootEntry;
use crate::vm::iobus::IoBus;
use crate::vm::layout;
use crate::vm::stop::{StopReason, StopSignal};
use crate::vm::vcpu::{VcpuContext, Vcpus};
use crate::vm::{self, mptable, Vm};

/// Errors building or running the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Creating an IOThread failed.
    #[error("cannot create IOThread '{id}'")]
    IoThread {
        /// The IOThread.
        id: String,
        /// Cause.
        #[source]
        source: iothread_registry::Error,
    },
    /// Creating the VM failed.
    #[error("cannot create the VM")]
    Vm(#[source] vm::VmError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Bus layout conflict (a bug).
    #[error("cannot map a device")]
    Bus(#[source] vm::iobus::IoBusError),
    /// Termination signals could not be set up.
    #[error("cannot set up signal handling")]
    Signals(#[source] crate::signals::SignalError),
    /// The QMP socket could not be created (before the VM: a configuration
    /// error, exit status 2).
    #[error("--qmp")]
    QmpSocket(#[source] crate::qmp::QmpError),
    /// The QMP monitor could not be started.
    #[error("cannot start the QMP monitor")]
    Qmp(#[source] crate::qmp::QmpError),
    /// A drive could not be attached.
    #[error("cannot attach drive '{id}'")]
    Drive {
        /// The drive.
        id: String,
        /// Cause.
        #[source]
        source: Box<drives::DriveError>,
    },
    /// Loading the kernel or writing the boot structures failed.
    #[error("cannot prepare the guest for boot")]
    Boot(#[source] boot::BootError),
    /// Writing the MP table failed.
    #[error("cannot write the MP table")]
    Mptable(#[source] mptable::MptableError),
    /// Starting, pausing or stopping vCPUs failed.
    #[error("vCPU control failed")]
    Vcpu(#[source] vm::vcpu::VcpuError),
    /// The VM is shut down; the request cannot be served.
    #[error("the VM is shut down")]
    ShutDown,
}

/// Run state, as QMP `query-status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs are running.
    Running,
    /// vCPUs are paused: stopped by QMP `stop` (until `cont`), or during a
    /// reset.
    Paused,
    /// The VM has stopped for good.
    Shutdown,
}

impl RunState {
    /// QEMU's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
        }
    }

    /// Whether vCPUs are running.
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

/// Lifecycle events for the control plane (QMP `SHUTDOWN` / `RESET`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmEvent {
    /// The VM stopped. `guest` tells whether the guest initiated it; `reason` uses
    /// QEMU's ShutdownCause names (`guest-shutdown`, `guest-reset`, `host-qmp-quit`,
    /// `guest-panic`, `host-error`).
    Shutdown {
        /// Guest initiated.
        guest: bool,
        /// ShutdownCause.
        reason: &'static str,
    },
    /// The VM was reset (`host-qmp-system-reset` when asked by the control plane).
    Reset {
        /// Guest initiated.
        guest: bool,
        /// ShutdownCause.
        reason: &'static str,
    },
    /// The vCPUs were stopped ([`Vmm::pause`], QMP `STOP`).
    Stop,
    /// The vCPUs run again ([`Vmm::resume`], QMP `RESUME`).
    Resume,
}

/// A callback receiving [`VmmEvent`]s (called on the thread that caused them).
pub type EventListener = Box<dyn Fn(&VmmEvent) + Send + Sync>;

fn shutdown_cause(reason: &StopReason) -> &'static str {
    match reason {
        StopReason::DebugExit(_) | StopReason::SystemEvent { .. } => "guest-shutdown",
        StopReason::I8042Reset | StopReason::TripleFault { .. } => "guest-reset",
        StopReason::Quit => "host-qmp-quit",
        StopReason::Signal { .. } => "host-signal",
        StopReason::VcpuError { .. } => "host-error",
    }
}

/// Options that are not part of the VM configuration.
#[derive(Default)]
pub struct VmmOptions {
    /// Where guest serial output goes (default: stdout).
    pub serial_out: Option<SerialOut>,
}

struct Inner {
    registry: IoThreadRegistry,
    vm: Vm,
    stop: StopSignal,
    vcpus: Mutex<Option<Vcpus>>,
    boot: BootSetup,
    vcpu_count: u8,
    drives: Vec<Drive>,
    vhost_user: Vec<VhostUserDrive>,
    serial: Arc<Mutex<Serial>>,
    state: Mutex<RunState>,
    /// kvmclock when [`Vmm::pause`] stopped the vCPUs, for [`Vmm::resume`].
    saved_clock: Mutex<Option<u64>>,
    listeners: Mutex<Vec<EventListener>>,
    /// Serializes pause, resume, reset and shutdown.
    lifecycle: Mutex<()>,
    config: ValidConfig,
}

/// Handle on a running VMM. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Vmm {
    inner: Arc<Inner>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The kernel command line: the user's, then one `virtio_mmio.device=` per drive,
/// then `tsc_khz=` unless the user gave one (the test guest's TSC frequency; Linux
/// hands unknown parameters on to init, harmlessly).
pub fn kernel_cmdline(user: &str, drives: &[(u64, u32)], tsc_khz: Option<u32>) -> String {
    let mut parts: Vec<String> = Vec::new();
    if !user.trim().is_empty() {
        parts.push(user.trim().to_owned());
    }
    for (base, gsi) in drives {
        parts.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
    }
    let user_tsc = user.split_whitespace().any(|w| w.starts_with("tsc_khz="));
    if let Some(khz) = tsc_khz.filter(|_| !user_tsc) {
        parts.push(format!("tsc_khz={khz}"));
    }
    parts.join(" ")
}

impl Vmm {
    /// Builds everything and starts the vCPUs.
    pub fn start(config: ValidConfig, opts: VmmOptions) -> Result<Vmm, VmmError> {
        let registry = IoThreadRegistry::new();
        for (id, params) in &config.iothreads {
            registry
                .create(id, *params)
                .map_err(|source| VmmError::IoThread {
                    id: id.clone(),
                    source,
                })?;
        }
        // From here on, a failure must stop the IOThreads created above.
        Self::start_with_registry(config, opts, registry.clone()).inspect_err(|_| {
            for id in registry.ids().into_iter().rev() {
                if let Err(e) = registry.delete(&id) {
                    log::error!("cannot delete IOThread '{id}': {e}");
                }
            }
        })
    }

    fn start_with_registry(
        config: ValidConfig,
        opts: VmmOptions,
        registry: IoThreadRegistry,
    ) -> Result<Vmm, VmmError> {
        // vhost-user back-ends map guest RAM: it must be shareable then.
        let shared = !config.vhost_user.is_empty();
        let vm = Vm::with_memory(config.vm.memory.0, shared).map_err(VmmError::Vm)?;
        let stop = StopSignal::new();

        let mut pio = IoBus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_GSI)
            .map_err(VmmError::Vm)?;
        let out = opts
            .serial_out
            .unwrap_or_else(|| Box::new(std::io::stdout()));
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, out)));
        pio.insert(layout::SERIAL_PORT_BASE, SERIAL_SIZE, serial.clone())
            .map_err(VmmError::Bus)?;
        pio.insert(
            layout::I8042_PORT_BASE,
            I8042_SIZE,
            Arc::new(Mutex::new(I8042::new(stop.clone()))),
        )
        .map_err(VmmError::Bus)?;
        pio.insert(
            layout::DEBUG_EXIT_PORT,
            DEBUG_EXIT_SIZE,
            Arc::new(Mutex::new(DebugExit::new(stop.clone()))),
        )
        .map_err(VmmError::Bus)?;

        let mut mmio = IoBus::new();
        let mut drives = Vec::new();
        for (index, d) in config.drives.iter().enumerate() {
            let drive = Drive::attach(&vm, &mut mmio, &registry, index, d).map_err(|source| {
                VmmError::Drive {
                    id: d.config.id.clone(),
                    source: Box::new(source),
                }
            })?;
            drives.push(drive);
        }
        let mut vhost_user = Vec::new();
        for (i, d) in config.vhost_user.iter().enumerate() {
            let dev =
                VhostUserDrive::attach(&vm, &mut mmio, drives.len() + i, d).map_err(|source| {
                    VmmError::Drive {
                        id: d.id.clone(),
                        source: Box::new(source),
                    }
                })?;
            vhost_user.push(dev);
        }

        // Validated: 1..=MAX_VCPUS.
        let vcpu_count = u8::try_from(config.vm.vcpus).unwrap_or(crate::vm::layout::MAX_VCPUS);
        let vcpus = vm.create_vcpus(vcpu_count).map_err(VmmError::Vm)?;
        let tsc_khz = vcpus.first().and_then(|(fd, _)| vm::tsc_khz(fd));
        let slots: Vec<(u64, u32)> = drives
            .iter()
            .map(|d| (d.base(), d.gsi()))
            .chain(vhost_user.iter().map(|d| (d.base(), d.gsi())))
            .collect();
        let boot = BootSetup {
            kernel: config.vm.kernel.clone(),
            initrd: config.vm.initrd.clone(),
            cmdline: kernel_cmdline(&config.vm.cmdline, &slots, tsc_khz),
            mem_size: config.vm.memory.0,
            protocol: config.vm.boot,
        };
        log::info!("kernel command line: {}", boot.cmdline);
        let entry = Self::load_guest(&vm, &boot, vcpu_count)?;
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            stop: stop.clone(),
        };
        let vcpus = Vcpus::start(vcpus, ctx, entry).map_err(VmmError::Vcpu)?;
        Ok(Vmm {
            inner: Arc::new(Inner {
                registry,
                vm,
                stop,
                vcpus: Mutex::new(Some(vcpus)),
                boot,
                vcpu_count,
                drives,
                vhost_user,
                serial,
                state: Mutex::new(RunState::Running),
                saved_clock: Mutex::new(None),
                listeners: Mutex::new(Vec::new()),
                lifecycle: Mutex::new(()),
                config,
            }),
        })
    }

    fn load_guest(vm: &Vm, boot: &BootSetup, vcpus: u8) -> Result<BootEntry, VmmError> {
        let mem = vm.memory().memory();
        let entry = boot::prepare(&mem, boot).map_err(VmmError::Boot)?;
        if vcpus > 1 {
            mptable::write(&mem, vcpus).map_err(VmmError::Mptable)?;
        }
        Ok(entry)
    }

    /// The IOThread registry (for query-iothreads, qom-get/set, object-add/del).
    pub fn registry(&self) -> &IoThreadRegistry {
        &self.inner.registry
    }

    /// The validated configuration the VM was built from.
    pub fn config(&self) -> &ValidConfig {
        &self.inner.config
    }

    /// Current run state.
    pub fn status(&self) -> RunState {
        *lock(&self.inner.state)
    }

    /// Registers a listener for SHUTDOWN / RESET events.
    pub fn add_event_listener(&self, l: EventListener) {
        lock(&self.inner.listeners).push(l);
    }

    fn emit(&self, ev: &VmmEvent) {
        for l in lock(&self.inner.listeners).iter() {
            l(ev);
        }
    }

    /// Asks the VM to stop (QMP `quit`). [`Vmm::wait`] then returns.
    pub fn quit(&self) {
        self.inner.stop.request(StopReason::Quit);
    }

    /// Blocks until the guest stops or a quit is requested.
    pub fn wait(&self) -> StopReason {
        self.inner.stop.wait()
    }

    /// Blocks until the guest stops, a quit is requested, or `timeout` passes.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<StopReason> {
        self.inner.stop.wait_timeout(timeout)
    }

    /// The stop reason, if the VM is stopping or stopped.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.inner.stop.reason()
    }

    /// The drive with id `id`.
    pub fn drive(&self, id: &str) -> Option<&Drive> {
        self.inner.drives.iter().find(|d| d.id() == id)
    }

    /// Per-drive information for QMP `query-block`.
    pub fn query_block(&self) -> Vec<BlockInfo> {
        let drives = self.inner.drives.iter().map(Drive::info);
        drives
            .chain(self.inner.vhost_user.iter().map(VhostUserDrive::info))
            .collect()
    }

    fn check_not_shut_down(&self) -> Result<(), VmmError> {
        if self.status() == RunState::Shutdown || self.inner.stop.reason().is_some() {
            return Err(VmmError::ShutDown);
        }
        Ok(())
    }

    /// QMP `stop`: takes every vCPU out of the guest and keeps it out until
    /// [`Vmm::resume`]; then, as QEMU's `vm_stop` (drain all, flush all), every
    /// drive's queues quiesce (requests in flight complete, requests queued
    /// stay in the rings until `cont`) and its image is flushed, so that what
    /// the guest was told is written is in the image while the VM is stopped
    /// (a copy taken then is consistent). vhost-user drives have their
    /// back-ends stop the rings (`GET_VRING_BASE`), as QEMU's
    /// `vhost_dev_stop`; they restart where they stood. kvmclock is saved, so that the guest's clock
    /// does not count the stop. A stopped VM stays stopped (no second
    /// [`VmmEvent::Stop`]).
    pub fn pause(&self) -> Result<(), VmmError> {
        let _serialized = lock(&self.inner.lifecycle);
        self.check_not_shut_down()?;
        if self.status() == RunState::Paused {
            return Ok(());
        }
        let vcpus = lock(&self.inner.vcpus);
        let vcpus = vcpus.as_ref().ok_or(VmmError::ShutDown)?;
        vcpus.pause().map_err(VmmError::Vcpu)?;
        let clock = self
            .inner
            .vm
            .save_clock()
            .inspect_err(|e| {
                log::warn!(
                    "the guest's clock will count the stop: {}",
                    crate::error_chain(e)
                )
            })
            .ok();
        *lock(&self.inner.saved_clock) = clock;
        for d in &self.inner.drives {
            if let Err(e) = d.pause() {
                // The queues are quiesced; only the flush failed.
                log::error!("drive '{}': flush at stop failed: {e}", d.id());
            }
        }
        for d in &self.inner.vhost_user {
            d.pause();
        }
        *lock(&self.inner.state) = RunState::Paused;
        self.emit(&VmmEvent::Stop);
        Ok(())
    }

    /// QMP `cont`: lets the vCPUs of a stopped VM run again, kvmclock set back
    /// to where the stop left it (a reset while stopped is applied now). A
    /// running VM is left alone (no [`VmmEvent::Resume`]).
    pub fn resume(&self) -> Result<(), VmmError> {
        let _serialized = lock(&self.inner.lifecycle);
        self.check_not_shut_down()?;
        if self.status() == RunState::Running {
            return Ok(());
        }
        let vcpus = lock(&self.inner.vcpus);
        let vcpus = vcpus.as_ref().ok_or(VmmError::ShutDown)?;
        if let Some(clock) = lock(&self.inner.saved_clock).take() {
            if let Err(e) = self.inner.vm.restore_clock(clock) {
                log::warn!(
                    "the guest's clock counts the stop: {}",
                    crate::error_chain(&e)
                );
            }
        }
        for d in &self.inner.drives {
            if let Err(e) = d.resume() {
                // The device says DEVICE_NEEDS_RESET; the guest can recover.
                log::error!("drive '{}': {}", d.id(), crate::error_chain(&e));
            }
        }
        for d in &self.inner.vhost_user {
            d.resume();
        }
        vcpus.resume(None);
        *lock(&self.inner.state) = RunState::Running;
        self.emit(&VmmEvent::Resume);
        Ok(())
    }

    /// QMP `system_reset`: pause the vCPUs, reset every device (their queues
    /// stop; drives keep holding their IOThreads), reload the kernel and boot
    /// structures, reset vCPU state, resume. A VM stopped by [`Vmm::pause`]
    /// stays stopped: its vCPUs start from the reset state at [`Vmm::resume`].
    pub fn system_reset(&self) -> Result<(), VmmError> {
        let _serialized = lock(&self.inner.lifecycle);
        self.check_not_shut_down()?;
        let stopped = self.status() == RunState::Paused;
        let vcpus = lock(&self.inner.vcpus);
        let vcpus = vcpus.as_ref().ok_or(VmmError::ShutDown)?;
        vcpus.pause().map_err(VmmError::Vcpu)?;
        *lock(&self.inner.state) = RunState::Paused;
        for d in &self.inner.drives {
            d.reset();
        }
        for d in &self.inner.vhost_user {
            d.reset();
        }
        let entry = Self::load_guest(&self.inner.vm, &self.inner.boot, self.inner.vcpu_count);
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // The guest image is gone or broken: nothing sensible to resume.
                self.inner.stop.request(StopReason::VcpuError {
                    vcpu: 0,
                    detail: format!("reset failed: {}", crate::error_chain(&e)),
                });
                return Err(e);
            }
        };
        if stopped {
            vcpus.reset_paused(entry);
        } else {
            vcpus.resume(Some(entry));
            *lock(&self.inner.state) = RunState::Running;
        }
        self.emit(&VmmEvent::Reset {
            guest: false,
            reason: "host-qmp-system-reset",
        });
        Ok(())
    }

    /// Stops everything: vCPUs, devices (disks flushed, IOThreads released),
    /// IOThreads. Idempotent. Returns the stop reason.
    pub fn shutdown(&self) -> StopReason {
        let _serialized = lock(&self.inner.lifecycle);
        self.inner.stop.request(StopReason::Quit);
        let reason = self.inner.stop.reason().unwrap_or(StopReason::Quit);
        if self.status() == RunState::Shutdown {
            return reason;
        }
        if let Some(mut vcpus) = lock(&self.inner.vcpus).take() {
            if let Err(e) = vcpus.stop() {
                log::error!("{}", crate::error_chain(&e));
            }
        }
        for d in &self.inner.drives {
            d.shutdown();
        }
        for d in &self.inner.vhost_user {
            d.shutdown();
        }
        lock(&self.inner.serial).flush();
        let _ = std::io::stdout().flush();
        for id in self.inner.registry.ids().into_iter().rev() {
            if let Err(e) = self.inner.registry.delete(&id) {
                log::error!("cannot stop IOThread '{id}': {e}");
            }
        }
        *lock(&self.inner.state) = RunState::Shutdown;
        self.emit(&VmmEvent::Shutdown {
            guest: reason.is_guest_initiated(),
            reason: shutdown_cause(&reason),
        });
        reason
    }
}

/// Runs a VM until it stops; returns the process exit status.
pub fn run(config: ValidConfig) -> Result<i32, VmmError> {
    // Bound before the VM exists: a path the process cannot use is a
    // configuration error, reported before any guest code runs.
    let qmp = match config.vm.qmp.as_ref().map(crate::control::bind_qmp) {
        Some(Err(e)) => return Err(VmmError::QmpSocket(e)),
        Some(Ok(listener)) => Some(listener),
        None => None,
    };
    crate::signals::block_termination_signals().map_err(VmmError::Signals)?;
    let vmm = Vmm::start(config, VmmOptions::default())?;
    if let Err(e) = crate::signals::spawn_signal_thread(vmm.inner.stop.clone()) {
        vmm.shutdown();
        return Err(VmmError::Signals(e));
    }
    // Detached: it ends with stdin or the process.
    if let Err(e) = crate::devices::serial::spawn_stdin_forwarder(
        vmm.inner.serial.clone(),
        vmm.inner.stop.clone(),
    ) {
        log::warn!("no serial input: cannot spawn the stdin thread: {e}");
    }
    let qmp_server = match qmp.map(|listener| crate::control::serve_qmp(&vmm, listener)) {
        Some(Err(e)) => {
            vmm.shutdown();
            return Err(VmmError::Qmp(e));
        }
        Some(Ok(server)) => Some(server),
        None => None,
    };
    vmm.wait();
    let reason = vmm.shutdown();
    // Dropped after the shutdown so that the SHUTDOWN event reaches the clients.
    drop(qmp_server);
    match &reason {
        StopReason::VcpuError { .. } => eprintln!("vmm-ref: {reason}"),
        StopReason::DebugExit(_) => log::info!("{reason}"),
        _ => eprintln!("vmm-ref: {reason}"),
    }
    Ok(reason.exit_status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_assembly() {
        assert_eq!(
            kernel_cmdline(" scenario=verify ", &[(0xd000_0000, 5), (0xd000_1000, 6)], Some(2_000_000)),
            "scenario=verify virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 tsc_khz=2000000"
        );
        assert_eq!(kernel_cmdline("", &[], None), "");
        assert_eq!(
            kernel_cmdline("tsc_khz=1000 x", &[], Some(2000)),
            "tsc_khz=1000 x"
        );
    }
}

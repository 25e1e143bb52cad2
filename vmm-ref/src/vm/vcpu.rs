//! vCPU threads: `KVM_RUN` loops that dispatch port-I/O and MMIO exits to the
//! buses, turn guest stops into a [`StopSignal`] request, and obey pause /
//! resume / reset / exit commands. A vCPU is kicked out of `KVM_RUN` with a
//! real-time signal (`SIGRTMIN`, empty handler: `KVM_RUN` returns `EINTR`);
//! the kick is repeated until the thread acknowledges, so a signal that lands
//! just before `KVM_RUN` is entered cannot be lost.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::cpu::{BootEntry, CpuSetup};
use super::iobus::IoBus;
use super::stop::{StopReason, StopSignal};
use crate::ratelimit::RateLimiter;

/// How long pause / stop wait for the vCPUs to acknowledge before giving up.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between repeated kicks while waiting for an acknowledgement.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

static UNHANDLED_PIO: RateLimiter = RateLimiter::new(16, Duration::from_secs(5));
static UNHANDLED_MMIO: RateLimiter = RateLimiter::new(16, Duration::from_secs(5));

/// Errors managing vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Installing the kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning a vCPU thread failed.
    #[error("cannot spawn vCPU thread {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// Initial register setup failed.
    #[error("cannot set up vCPU state")]
    Setup(#[source] super::cpu::CpuError),
    /// vCPUs did not acknowledge a pause or stop in time.
    #[error("{pending} vCPU(s) did not acknowledge the {what} request within {ACK_TIMEOUT:?}")]
    Timeout {
        /// "pause" or "stop".
        what: &'static str,
        /// Threads that did not answer.
        pending: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Run,
    Pause,
    Exit,
}

struct Ctl {
    command: Command,
    /// Bumped by every reset; a vCPU that sees a new epoch re-applies its boot state.
    reset_epoch: u64,
    entry: BootEntry,
    paused: usize,
    exited: usize,
}

struct Control {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the vCPU threads share with the rest of the VM.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port-I/O bus.
    pub pio: Arc<IoBus>,
    /// MMIO bus.
    pub mmio: Arc<IoBus>,
    /// Where stops are requested.
    pub stop: StopSignal,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), kick_handler).map_err(VcpuError::Signal);
    });
    result
}

/// The running vCPU threads of one VM.
pub struct Vcpus {
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
}

impl Vcpus {
    /// Applies the boot state (boot processor entering at `entry`) and starts one
    /// thread `vcpu<N>` per vCPU.
    pub fn start(
        vcpus: Vec<(VcpuFd, CpuSetup)>,
        ctx: VcpuContext,
        entry: BootEntry,
    ) -> Result<Vcpus, VcpuError> {
        install_kick_handler()?;
        let control = Arc::new(Control {
            ctl: Mutex::new(Ctl {
                command: Command::Run,
                reset_epoch: 0,
                entry,
                paused: 0,
                exited: 0,
            }),
            cv: Condvar::new(),
        });
        for (fd, setup) in &vcpus {
            setup.apply(fd, entry, true).map_err(VcpuError::Setup)?;
        }
        let mut this = Vcpus {
            control,
            threads: Vec::new(),
        };
        for (fd, setup) in vcpus {
            let id = setup.id;
            let runner = Runner {
                fd,
                setup,
                ctx: ctx.clone(),
                control: this.control.clone(),
            };
            let stop = ctx.stop.clone();
            let control = this.control.clone();
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A panic (a device bug) stops the VM instead of leaving it
                    // half-running; the thread still counts as exited.
                    let run = std::panic::AssertUnwindSafe(|| runner.run());
                    if std::panic::catch_unwind(run).is_err() {
                        stop.request(StopReason::VcpuError {
                            vcpu: id,
                            detail: "the vCPU thread panicked".into(),
                        });
                        let mut ctl = control.lock();
                        ctl.exited += 1;
                        control.cv.notify_all();
                    }
                }) {
                Ok(t) => this.threads.push(t),
                Err(e) => {
                    // Stop the threads started so far; the error is the spawn failure.
                    if let Err(stop_err) = this.stop() {
                        log::error!("{stop_err}");
                    }
                    return Err(VcpuError::Spawn(id, e));
                }
            }
        }
        Ok(this)
    }

    /// Number of vCPU threads.
    pub fn count(&self) -> usize {
        self.threads.len()
    }

    fn kick_all(&self) {
        for t in &self.threads {
            if !t.is_finished() {
                // A thread that exits meanwhile makes pthread_kill fail harmlessly.
                let _ = t.kill(SIGRTMIN());
            }
        }
    }

    fn wait_for(&self, what: &'static str, done: impl Fn(&Ctl) -> usize) -> Result<(), VcpuError> {
        let n = self.threads.len();
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut ctl = self.control.lock();
        loop {
            let acked = done(&ctl);
            if acked >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VcpuError::Timeout {
                    what,
                    pending: n - acked,
                });
            }
            drop(ctl);
            self.kick_all();
            ctl = self.control.lock();
            ctl = self
                .control
                .cv
                .wait_timeout(ctl, KICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Takes every vCPU out of `KVM_RUN` and parks it. Returns when all are parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        {
            let mut ctl = self.control.lock();
            if ctl.command == Command::Exit {
                return Ok(());
            }
            ctl.command = Command::Pause;
            ctl.paused = 0;
        }
        self.wait_for("pause", |c| c.paused)
    }

    /// Resumes paused vCPUs; with `reset_entry`, each vCPU first re-applies its boot
    /// state (the boot processor entering at that address).
    pub fn resume(&self, reset_entry: Option<BootEntry>) {
        let mut ctl = self.control.lock();
        if ctl.command == Command::Exit {
            return;
        }
        if let Some(entry) = reset_entry {
            ctl.reset_epoch += 1;
            ctl.entry = entry;
        }
        ctl.command = Command::Run;
        self.control.cv.notify_all();
    }

    /// Stops and joins every vCPU thread. Idempotent.
    pub fn stop(&mut self) -> Result<(), VcpuError> {
        {
            let mut ctl = self.control.lock();
            ctl.command = Command::Exit;
            self.control.cv.notify_all();
        }
        let result = self.wait_for("stop", |c| c.exited);
        if result.is_ok() {
            for t in self.threads.drain(..) {
                if t.join().is_err() {
                    log::error!("a vCPU thread panicked");
                }
            }
        }
        result
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            if let Err(e) = self.stop() {
                log::error!("{e}");
            }
        }
    }
}

/// What the run loop does after an exit.
enum Next {
    Continue,
    /// Stop running the guest on this vCPU until reset or exit.
    Park,
}

struct Runner {
    fd: VcpuFd,
    setup: CpuSetup,
    ctx: VcpuContext,
    control: Arc<Control>,
}

impl Runner {
    fn run(mut self) {
        let id = self.setup.id;
        let mut epoch = 0;
        let mut parked = false;
        loop {
            let reset_entry = {
                let mut ctl = self.control.lock();
                let mut counted = false;
                loop {
                    match ctl.command {
                        Command::Exit => {
                            ctl.exited += 1;
                            self.control.cv.notify_all();
                            return;
                        }
                        Command::Pause if !counted => {
                            counted = true;
                            ctl.paused += 1;
                            self.control.cv.notify_all();
                        }
                        Command::Run if !parked || ctl.reset_epoch != epoch => break,
                        _ => {}
                    }
                    ctl = self.control.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
                }
                (ctl.reset_epoch != epoch).then(|| {
                    epoch = ctl.reset_epoch;
                    ctl.entry
                })
            };
            if let Some(entry) = reset_entry {
                parked = false;
                if let Err(e) = self.setup.apply(&self.fd, entry, false) {
                    self.ctx.stop.request(StopReason::VcpuError {
                        vcpu: id,
                        detail: format!("reset failed: {}", crate::error_chain(&e)),
                    });
                    parked = true;
                    continue;
                }
            }
            if let Next::Park = self.run_once() {
                parked = true;
            }
        }
    }

    fn fail(&self, detail: String) -> Next {
        self.ctx.stop.request(StopReason::VcpuError {
            vcpu: self.setup.id,
            detail,
        });
        Next::Park
    }

    fn run_once(&mut self) -> Next {
        let id = self.setup.id;
        let ctx = &self.ctx;
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                    if let Some(n) = UNHANDLED_PIO.check() {
                        log::debug!(
                            "vcpu{id}: unhandled port read {port:#x} ({n} more suppressed)"
                        );
                    }
                }
                return Next::Continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.pio.write(u64::from(port), data) {
                    if let Some(n) = UNHANDLED_PIO.check() {
                        log::debug!(
                            "vcpu{id}: unhandled port write {port:#x} <- {data:02x?} ({n} more suppressed)"
                        );
                    }
                }
                return Next::Continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                    if let Some(n) = UNHANDLED_MMIO.check() {
                        log::warn!("vcpu{id}: unhandled MMIO read {addr:#x} ({n} more suppressed)");
                    }
                }
                return Next::Continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    if let Some(n) = UNHANDLED_MMIO.check() {
                        log::warn!(
                            "vcpu{id}: unhandled MMIO write {addr:#x} ({n} more suppressed)"
                        );
                    }
                }
                return Next::Continue;
            }
            Ok(VcpuExit::Intr) => return Next::Continue,
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::SystemEvent(kind, data)) => Exit::SystemEvent(kind, data.to_vec()),
            Ok(VcpuExit::InternalError) => Exit::Internal,
            Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::FailEntry(reason, cpu),
            Ok(other) => Exit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Next::Continue;
            }
            Err(e) => Exit::Other(format!("KVM_RUN failed: {e}")),
        };
        match exit {
            Exit::Hlt => {
                log::info!("vcpu{id}: halted with interrupts off; parking it");
                Next::Park
            }
            Exit::Shutdown => {
                ctx.stop.request(StopReason::TripleFault {
                    vcpu: id,
                    regs: self.regs_summary(),
                });
                Next::Park
            }
            Exit::SystemEvent(kind, data) => {
                log::info!("vcpu{id}: system event {kind} {data:x?}");
                ctx.stop.request(StopReason::SystemEvent { vcpu: id, kind });
                Next::Park
            }
            Exit::Internal => {
                // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so the kernel filled
                // the `internal` member of the kvm_run union.
                let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                let data = internal.data.get(..n).unwrap_or(&[]).to_vec();
                let detail = format!(
                    "KVM internal error, suberror {} (1 = emulation failure), data {:x?}{}",
                    internal.suberror,
                    data,
                    self.regs_summary()
                );
                self.fail(detail)
            }
            Exit::FailEntry(reason, cpu) => self.fail(format!(
                "KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on cpu {cpu}{}",
                self.regs_summary()
            )),
            Exit::Other(what) => {
                let detail = format!("unexpected exit: {what}{}", self.regs_summary());
                self.fail(detail)
            }
        }
    }

    fn regs_summary(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "; rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer
            ),
            _ => String::new(),
        }
    }
}

enum Exit {
    Hlt,
    Shutdown,
    SystemEvent(u32, Vec<u64>),
    Internal,
    FailEntry(u64, u32),
    Other(String),
}

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

/// The control state shared by the control side ([`Vcpus`]) and the vCPU
/// threads, under [`Control::ctl`]. The control side asks with `request_*` and
/// waits for the acknowledgement counts; each vCPU thread asks
/// [`Ctl::vcpu_step`] what to do next, with its own [`VcpuState`].
///
/// The counts describe where the threads are, not which requests they have
/// seen: `idle` is the number of threads waiting in [`Control::next`] (not
/// running the guest), and only each thread moves itself in and out of it. A
/// pause is complete when every thread is idle or exited; as no thread leaves
/// [`Control::next`] while the command is `Pause`, that holds until the next
/// request, whatever the threads saw of the requests before it (a thread that
/// slept through a resume and the next pause never ran the guest in between).
struct Ctl {
    command: Command,
    /// Bumped by every reset; a vCPU that sees a new epoch re-applies its boot state.
    reset_epoch: u64,
    entry: BootEntry,
    /// vCPU threads waiting in [`Control::next`]: paused, or parked.
    idle: usize,
    /// vCPU threads that left (exit command, or a panic).
    exited: usize,
}

/// One vCPU thread's own part of the control state.
#[derive(Debug, Default)]
struct VcpuState {
    /// The reset epoch whose boot state this vCPU applied last.
    epoch: u64,
    /// The vCPU stopped running the guest on its own (halt, fatal exit): only a
    /// reset (or exit) makes it go on.
    parked: bool,
    /// This thread is counted in [`Ctl::idle`].
    idle: bool,
}

/// What a vCPU thread does once the control state lets it go on.
#[derive(Debug, PartialEq, Eq)]
enum Go {
    /// Run the guest; with `reset`, first re-apply the boot state entering there.
    Run { reset: Option<BootEntry> },
    /// Leave the thread.
    Exit,
}

impl Ctl {
    fn new(entry: BootEntry) -> Ctl {
        Ctl {
            command: Command::Run,
            reset_epoch: 0,
            entry,
            idle: 0,
            exited: 0,
        }
    }

    /// Control side: asks every vCPU to stop running the guest. False once the
    /// vCPUs are exiting.
    fn request_pause(&mut self) -> bool {
        if self.command == Command::Exit {
            return false;
        }
        self.command = Command::Pause;
        true
    }

    /// Control side: lets the vCPUs run again, with `reset` re-applying their
    /// boot state first. No effect once the vCPUs are exiting.
    fn request_run(&mut self, reset: Option<BootEntry>) {
        if self.command == Command::Exit {
            return;
        }
        if let Some(entry) = reset {
            self.request_reset(entry);
        }
        self.command = Command::Run;
    }

    /// Control side: every vCPU re-applies its boot state (entering at `entry`)
    /// before it next runs the guest; paused vCPUs stay paused.
    fn request_reset(&mut self, entry: BootEntry) {
        self.reset_epoch += 1;
        self.entry = entry;
    }

    /// Control side: asks every vCPU thread to exit.
    fn request_exit(&mut self) {
        self.command = Command::Exit;
    }

    /// vCPU threads not running the guest: once the command is `Pause`, the
    /// threads that acknowledged it.
    fn paused(&self) -> usize {
        self.idle + self.exited
    }

    /// vCPU side: what the vCPU with state `me` does next; `None`: wait for the
    /// control state to change (the thread then counts as idle until it goes on).
    fn vcpu_step(&mut self, me: &mut VcpuState) -> Option<Go> {
        let go = match self.command {
            Command::Exit => Some(Go::Exit),
            Command::Run if !me.parked || self.reset_epoch != me.epoch => {
                let reset = (self.reset_epoch != me.epoch).then(|| {
                    me.epoch = self.reset_epoch;
                    me.parked = false;
                    self.entry
                });
                Some(Go::Run { reset })
            }
            // Paused, or parked until a reset.
            Command::Run | Command::Pause => None,
        };
        let idle = go.is_none();
        if idle != me.idle {
            me.idle = idle;
            if idle {
                self.idle += 1;
            } else {
                self.idle -= 1;
            }
        }
        if go == Some(Go::Exit) {
            self.exited += 1;
        }
        go
    }
}

struct Control {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Control {
    fn new(entry: BootEntry) -> Control {
        Control {
            ctl: Mutex::new(Ctl::new(entry)),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPU side: blocks until the vCPU with state `me` may go on.
    fn next(&self, me: &mut VcpuState) -> Go {
        let mut ctl = self.lock();
        loop {
            let acks = (ctl.idle, ctl.exited);
            let go = ctl.vcpu_step(me);
            if (ctl.idle, ctl.exited) != acks {
                // The control side may be waiting for this acknowledgement.
                self.cv.notify_all();
            }
            if let Some(go) = go {
                return go;
            }
            ctl = self.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Control side: waits until `done` counts `n` vCPU threads, calling `kick`
    /// (which takes them out of `KVM_RUN`) every [`KICK_INTERVAL`].
    fn wait_for(
        &self,
        n: usize,
        what: &'static str,
        done: impl Fn(&Ctl) -> usize,
        kick: impl Fn(),
    ) -> Result<(), VcpuError> {
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut ctl = self.lock();
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
            kick();
            ctl = self.lock();
            ctl = self
                .cv
                .wait_timeout(ctl, KICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
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
        let control = Arc::new(Control::new(entry));
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
        self.control.wait_for(n, what, done, || self.kick_all())
    }

    /// Takes every vCPU out of `KVM_RUN` and parks it. Returns when all are parked.
    /// On failure the vCPUs run on (none is left paused behind an error).
    ///
    /// Callers serialise pause / resume / stop (the [`crate::vmm::Vmm`] does, with
    /// its lifecycle lock): a resume ends every pause requested before it.
    pub fn pause(&self) -> Result<(), VcpuError> {
        if !self.control.lock().request_pause() {
            return Ok(());
        }
        let result = self.wait_for("pause", Ctl::paused);
        if result.is_err() {
            self.resume(None);
        }
        result
    }

    /// Resumes paused vCPUs; with `reset_entry`, each vCPU first re-applies its boot
    /// state (the boot processor entering at that address).
    pub fn resume(&self, reset_entry: Option<BootEntry>) {
        self.control.lock().request_run(reset_entry);
        self.control.cv.notify_all();
    }

    /// Resets paused vCPUs without resuming them: each re-applies its boot
    /// state (the boot processor entering at `entry`) when a later
    /// [`Vcpus::resume`] lets it run. A reset of a machine the operator
    /// stopped leaves it stopped, as in QEMU.
    pub fn reset_paused(&self, entry: BootEntry) {
        self.control.lock().request_reset(entry);
    }

    /// Stops and joins every vCPU thread. Idempotent.
    pub fn stop(&mut self) -> Result<(), VcpuError> {
        {
            self.control.lock().request_exit();
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
        let mut me = VcpuState::default();
        loop {
            let reset = match self.control.next(&mut me) {
                Go::Exit => return,
                Go::Run { reset } => reset,
            };
            if let Some(entry) = reset {
                if let Err(e) = self.setup.apply(&self.fd, entry, false) {
                    self.ctx.stop.request(StopReason::VcpuError {
                        vcpu: id,
                        detail: format!("reset failed: {}", crate::error_chain(&e)),
                    });
                    me.parked = true;
                    continue;
                }
            }
            if let Next::Park = self.run_once() {
                me.parked = true;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;

    const E0: BootEntry = BootEntry::Linux64 { rip: 0x10_0000 };
    const E1: BootEntry = BootEntry::Linux64 { rip: 0x20_0000 };
    const E2: BootEntry = BootEntry::Linux64 { rip: 0x30_0000 };

    /// Two `system_reset`s back to back (pause, resume with a reset, pause
    /// again) while the vCPU thread is not scheduled between the resume and the
    /// second pause: it never sees the `Run` in between, and the second pause
    /// must still count it.
    #[test]
    fn pause_again_before_the_vcpu_saw_the_resume() {
        let mut ctl = Ctl::new(E0);
        let mut vcpu = VcpuState::default();
        assert_eq!(ctl.vcpu_step(&mut vcpu), Some(Go::Run { reset: None }));

        assert!(ctl.request_pause());
        assert_eq!(ctl.vcpu_step(&mut vcpu), None);
        assert_eq!(ctl.paused(), 1);
        ctl.request_run(Some(E1));

        // The vCPU thread does not run here.
        assert!(ctl.request_pause());
        assert_eq!(ctl.paused(), 1, "the vCPU never left the control loop");
        // Woken late (by the resume's notify or a kick), it goes on waiting and
        // stays counted.
        assert_eq!(ctl.vcpu_step(&mut vcpu), None);
        assert_eq!(ctl.paused(), 1);

        // It applies only the latest reset.
        ctl.request_run(Some(E2));
        assert_eq!(ctl.vcpu_step(&mut vcpu), Some(Go::Run { reset: Some(E2) }));
        assert_eq!(ctl.paused(), 0);
    }

    /// A reset of a stopped machine (QMP `stop`, then `system_reset`) leaves its
    /// vCPUs paused, parked ones included; the next resume applies the reset.
    #[test]
    fn a_reset_while_paused_waits_for_the_resume() {
        let mut ctl = Ctl::new(E0);
        let mut running = VcpuState::default();
        let mut parked = VcpuState::default();
        assert_eq!(ctl.vcpu_step(&mut running), Some(Go::Run { reset: None }));
        assert_eq!(ctl.vcpu_step(&mut parked), Some(Go::Run { reset: None }));
        parked.parked = true;
        assert!(ctl.request_pause());
        assert_eq!(ctl.vcpu_step(&mut running), None);
        assert_eq!(ctl.vcpu_step(&mut parked), None);
        ctl.request_reset(E1);
        assert_eq!(ctl.vcpu_step(&mut running), None, "still paused");
        assert_eq!(ctl.vcpu_step(&mut parked), None, "still paused");
        assert_eq!(ctl.paused(), 2);
        ctl.request_reset(E2);
        ctl.request_run(None);
        assert_eq!(
            ctl.vcpu_step(&mut running),
            Some(Go::Run { reset: Some(E2) })
        );
        assert_eq!(
            ctl.vcpu_step(&mut parked),
            Some(Go::Run { reset: Some(E2) })
        );
        assert_eq!(ctl.paused(), 0);
    }

    /// A vCPU that parked itself (halt, fatal exit) is not running the guest: a
    /// pause counts it at once (no wake-up needed: kicks do not interrupt a
    /// condvar wait), however often the VM is paused and resumed without a reset.
    #[test]
    fn a_parked_vcpu_counts_as_paused_across_pause_resume_cycles() {
        let mut ctl = Ctl::new(E0);
        let mut vcpu = VcpuState::default();
        assert_eq!(ctl.vcpu_step(&mut vcpu), Some(Go::Run { reset: None }));
        vcpu.parked = true;
        assert_eq!(ctl.vcpu_step(&mut vcpu), None);
        for _ in 0..3 {
            assert!(ctl.request_pause());
            assert_eq!(ctl.paused(), 1);
            assert_eq!(ctl.vcpu_step(&mut vcpu), None);
            assert_eq!(ctl.paused(), 1);
            ctl.request_run(None);
            assert_eq!(ctl.vcpu_step(&mut vcpu), None, "still parked");
        }
        assert!(ctl.request_pause());
        assert_eq!(ctl.paused(), 1);
        ctl.request_run(Some(E1));
        assert_eq!(ctl.vcpu_step(&mut vcpu), Some(Go::Run { reset: Some(E1) }));
        assert!(!vcpu.parked);
    }

    /// Exit reaches paused, parked and running vCPUs; exited threads count as
    /// paused, and no pause is requested once exiting.
    #[test]
    fn exit_from_any_state() {
        let mut ctl = Ctl::new(E0);
        let mut vcpus: [VcpuState; 3] = Default::default();
        for v in &mut vcpus {
            assert_eq!(ctl.vcpu_step(v), Some(Go::Run { reset: None }));
        }
        vcpus[1].parked = true;
        assert_eq!(ctl.vcpu_step(&mut vcpus[1]), None);
        assert!(ctl.request_pause());
        assert_eq!(ctl.vcpu_step(&mut vcpus[0]), None);
        assert_eq!(ctl.paused(), 2);
        ctl.request_exit();
        for v in &mut vcpus {
            assert_eq!(ctl.vcpu_step(v), Some(Go::Exit));
        }
        assert_eq!(ctl.exited, 3);
        assert_eq!(ctl.paused(), 3);
        assert!(!ctl.request_pause());
        ctl.request_run(Some(E1));
        assert_eq!(ctl.command, Command::Exit);
    }

    /// Pause / resume-with-reset cycles against a fake vCPU thread (the real
    /// condvar protocol; its "guest code" spins until kicked), every other one
    /// right after the previous resume, the others once the vCPU applied the
    /// reset: every pause is acknowledged, the vCPU is never in the guest while
    /// the control side holds it paused, and it applies the resets in order.
    #[test]
    fn pause_resume_cycles_against_a_vcpu_thread() {
        const CYCLES: u64 = 2000;
        let entry = |i: u64| BootEntry::Linux64 { rip: 0x1000 * i };
        let rip = |e: BootEntry| match e {
            BootEntry::Linux64 { rip } | BootEntry::Pvh { rip, .. } => rip,
        };
        let control = Arc::new(Control::new(entry(0)));
        let kicked = Arc::new(AtomicBool::new(false));
        let in_guest = Arc::new(AtomicBool::new(false));
        let applied = Arc::new(AtomicU64::new(0));
        let vcpu = {
            let (control, kicked, in_guest, applied) = (
                control.clone(),
                kicked.clone(),
                in_guest.clone(),
                applied.clone(),
            );
            std::thread::spawn(move || {
                let mut me = VcpuState::default();
                while let Go::Run { reset } = control.next(&mut me) {
                    if let Some(e) = reset {
                        let before = applied.swap(rip(e), Ordering::SeqCst);
                        assert!(before < rip(e), "reset {e:?} after {before:#x}");
                    }
                    in_guest.store(true, Ordering::SeqCst);
                    while !kicked.swap(false, Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                    in_guest.store(false, Ordering::SeqCst);
                }
            })
        };
        let kick = || kicked.store(true, Ordering::SeqCst);
        for i in 1..=CYCLES {
            assert!(control.lock().request_pause());
            control
                .wait_for(1, "pause", Ctl::paused, kick)
                .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
            assert!(
                !in_guest.load(Ordering::SeqCst),
                "cycle {i}: paused in the guest"
            );
            control.lock().request_run(Some(entry(i)));
            control.cv.notify_all();
            if i % 2 == 0 || i == CYCLES {
                let deadline = Instant::now() + ACK_TIMEOUT;
                while applied.load(Ordering::SeqCst) != rip(entry(i)) {
                    assert!(Instant::now() < deadline, "cycle {i}: reset not applied");
                    std::thread::yield_now();
                }
            }
        }
        control.lock().request_exit();
        control.cv.notify_all();
        control
            .wait_for(1, "stop", |c| c.exited, kick)
            .expect("exit");
        vcpu.join().unwrap();
    }
}

//! Host signals: SIGINT, SIGTERM and SIGHUP become a clean shutdown (vCPUs
//! stopped, disks flushed, IOThreads joined) instead of killing the process.
//!
//! The signals are blocked in the calling thread before any other thread is
//! spawned (so every thread inherits the mask) and received synchronously by a
//! dedicated `signals` thread with `sigwait`.

use vmm_sys_util::signal::create_sigset;

use crate::vm::stop::{StopReason, StopSignal};

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Errors setting up signal handling.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// Building the signal set failed.
    #[error("cannot build the signal set")]
    Set(#[source] vmm_sys_util::errno::Error),
    /// pthread_sigmask failed.
    #[error("cannot block termination signals")]
    Mask(#[source] std::io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the signal thread")]
    Spawn(#[source] std::io::Error),
}

/// Blocks the termination signals in the calling thread (call before spawning
/// any thread).
pub fn block_termination_signals() -> Result<(), SignalError> {
    let set = create_sigset(&SIGNALS).map_err(SignalError::Set)?;
    // SAFETY: `set` is a valid, initialised sigset; a null old-set pointer is allowed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(SignalError::Mask(std::io::Error::from_raw_os_error(ret)));
    }
    Ok(())
}

/// Spawns the `signals` thread: the first termination signal requests
/// [`StopReason::Signal`], naming the sender (the process that stops reports
/// it once, with its stop reason); later ones are ignored, the shutdown is
/// under way.
pub fn spawn_signal_thread(stop: StopSignal) -> Result<(), SignalError> {
    let set = create_sigset(&SIGNALS).map_err(SignalError::Set)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is a valid sigset and `info` a valid out-pointer.
            let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
            if sig < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("sigwaitinfo failed: {e}");
                return;
            }
            let reason = StopReason::Signal {
                signal: sig,
                sender: sender(&info),
            };
            if !stop.request(reason) {
                log::info!("signal {sig} ignored: the VMM is already stopping");
            }
        })
        .map(drop)
        .map_err(SignalError::Spawn)
}

/// `from pid N (comm)` for a signal a process sent with kill(2) or
/// sigqueue(3); empty for one the kernel raised (SIGHUP of a closed terminal).
fn sender(info: &libc::siginfo_t) -> String {
    if info.si_code != libc::SI_USER && info.si_code != libc::SI_QUEUE {
        return String::new();
    }
    // SAFETY: for SI_USER and SI_QUEUE the kernel filled the `kill` member
    // of the union, whose first field is the sender's pid.
    let pid = unsafe { info.si_pid() };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    match comm.trim() {
        "" => format!("from pid {pid}"),
        name => format!("from pid {pid} ({name})"),
    }
}

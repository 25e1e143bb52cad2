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
/// `StopReason::Quit` (later ones are ignored; the shutdown is under way).
pub fn spawn_signal_thread(stop: StopSignal) -> Result<(), SignalError> {
    let set = create_sigset(&SIGNALS).map_err(SignalError::Set)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid sigset and `sig` a valid out-pointer.
            let ret = unsafe { libc::sigwait(&set, &mut sig) };
            if ret != 0 {
                log::error!("sigwait failed: {}", std::io::Error::from_raw_os_error(ret));
                return;
            }
            eprintln!("vmm-ref: terminating on signal {sig}");
            stop.request(StopReason::Quit);
        })
        .map(drop)
        .map_err(SignalError::Spawn)
}

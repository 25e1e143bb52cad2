//! Why the VM stopped, and the one-shot signal the vCPUs, devices and the
//! control plane use to request the stop. The first request wins.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote `value` to the debug-exit port.
    DebugExit(u32),
    /// The guest asked the i8042 controller for a CPU reset (0xFE to port 0x64).
    I8042Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed (or
    /// reset itself the hard way, e.g. Linux `reboot=t`). Not a clean stop.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
        /// Its registers at the exit (`; rip=... rsp=...`, empty if unknown).
        regs: String,
    },
    /// KVM reported a system event (shutdown / reset / crash).
    SystemEvent {
        /// The vCPU.
        vcpu: u8,
        /// KVM_SYSTEM_EVENT_* type.
        kind: u32,
    },
    /// The control plane (QMP `quit`) asked to stop.
    Quit,
    /// A termination signal (SIGINT, SIGTERM, SIGHUP) asked to stop: a clean
    /// shutdown, as QEMU's `host-signal`.
    Signal {
        /// The signal number.
        signal: i32,
        /// Who sent it (`from pid N (comm)`), empty if the kernel did not say.
        sender: String,
    },
    /// A vCPU failed (emulation failure, failed entry, unexpected exit...).
    VcpuError {
        /// The vCPU.
        vcpu: u8,
        /// What happened, with the details KVM gave.
        detail: String,
    },
}

/// KVM_SYSTEM_EVENT_CRASH.
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

impl StopReason {
    /// Process exit status for this stop: the debug-exit value (clamped to 255),
    /// 0 for clean stops (an i8042 reset is the guest asking to stop), 1 for
    /// failures, a triple fault among them (the guest crashed).
    pub fn exit_status(&self) -> i32 {
        match self {
            StopReason::DebugExit(v) => (*v).min(255) as i32,
            StopReason::I8042Reset | StopReason::Quit | StopReason::Signal { .. } => 0,
            StopReason::SystemEvent { kind, .. } => i32::from(*kind == KVM_SYSTEM_EVENT_CRASH),
            StopReason::TripleFault { .. } | StopReason::VcpuError { .. } => 1,
        }
    }

    /// True for stops the guest asked for (as opposed to failures or `quit`).
    pub fn is_guest_initiated(&self) -> bool {
        !matches!(
            self,
            StopReason::Quit | StopReason::Signal { .. } | StopReason::VcpuError { .. }
        )
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::DebugExit(v) => write!(f, "guest wrote {v} to the debug-exit port"),
            StopReason::I8042Reset => write!(f, "guest requested a reset through the i8042"),
            StopReason::TripleFault { vcpu, regs } => write!(
                f,
                "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed \
                 (a guest that means to stop resets through the i8042 or the debug-exit port){regs}"
            ),
            StopReason::SystemEvent { vcpu, kind } => {
                write!(f, "vCPU {vcpu} reported KVM system event {kind}")
            }
            StopReason::Quit => write!(f, "quit requested"),
            StopReason::Signal { signal, sender } => {
                write!(f, "terminating on signal {signal}")?;
                if !sender.is_empty() {
                    write!(f, " {sender}")?;
                }
                Ok(())
            }
            StopReason::VcpuError { vcpu, detail } => write!(f, "vCPU {vcpu} failed: {detail}"),
        }
    }
}

#[derive(Default)]
struct Inner {
    reason: Mutex<Option<StopReason>>,
    cv: Condvar,
}

/// A cloneable one-shot "stop the VM" signal.
#[derive(Clone, Default)]
pub struct StopSignal(Arc<Inner>);

impl StopSignal {
    /// A fresh, unset signal.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<StopReason>> {
        self.0.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests a stop. Returns false if a stop had already been requested
    /// (the first reason is kept).
    pub fn request(&self, reason: StopReason) -> bool {
        let mut r = self.lock();
        if r.is_some() {
            return false;
        }
        log::debug!("stop requested: {reason}");
        *r = Some(reason);
        self.0.cv.notify_all();
        true
    }

    /// The reason, if a stop was requested.
    pub fn reason(&self) -> Option<StopReason> {
        self.lock().clone()
    }

    /// Blocks until a stop is requested.
    pub fn wait(&self) -> StopReason {
        let mut r = self.lock();
        loop {
            if let Some(reason) = r.as_ref() {
                return reason.clone();
            }
            r = self.0.cv.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until a stop is requested or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<StopReason> {
        let r = self.lock();
        let (r, _) = self
            .0
            .cv
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        r.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let s = StopSignal::new();
        assert!(s.wait_timeout(Duration::from_millis(1)).is_none());
        assert!(s.request(StopReason::DebugExit(3)));
        assert!(!s.request(StopReason::Quit));
        assert_eq!(s.wait(), StopReason::DebugExit(3));
    }

    #[test]
    fn wakes_a_waiter_on_another_thread() {
        let s = StopSignal::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait());
        s.request(StopReason::I8042Reset);
        assert_eq!(t.join().unwrap(), StopReason::I8042Reset);
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(StopReason::DebugExit(0).exit_status(), 0);
        assert_eq!(StopReason::DebugExit(7).exit_status(), 7);
        assert_eq!(StopReason::DebugExit(1000).exit_status(), 255);
        assert_eq!(StopReason::I8042Reset.exit_status(), 0);
        let tf = StopReason::TripleFault {
            vcpu: 0,
            regs: String::new(),
        };
        assert_eq!(tf.exit_status(), 1);
        assert!(tf.is_guest_initiated());
        let e = StopReason::VcpuError {
            vcpu: 0,
            detail: "x".into(),
        };
        assert_eq!(e.exit_status(), 1);
        assert!(!e.is_guest_initiated());
    }
}

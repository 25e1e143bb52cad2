//! Used-buffer notifications to the front-end: the per-queue "call" eventfds.
//!
//! The front-end may replace a queue's call fd at any time, also while the
//! queue runs (QEMU does so when the guest masks or unmasks an MSI-X vector),
//! so the device does not keep an fd: every notification looks up the
//! current one in a slot shared with the protocol handler.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::RwLock;

use vmm_sys_util::eventfd::EventFd;

use crate::virtio::device::VirtioInterrupt;

/// Why a file descriptor was refused as a kick, call or err fd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventFdError {
    /// The descriptor is not an eventfd.
    #[error("file descriptor {fd} is not an eventfd ({target})")]
    NotEventFd {
        /// The descriptor number (in this process).
        fd: i32,
        /// What it is instead (`/proc/self/fd` link).
        target: String,
    },
    /// The descriptor could not be inspected or configured.
    #[error("cannot inspect file descriptor {fd}")]
    Inspect {
        /// The descriptor number.
        fd: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Checks that `file` is an eventfd, makes it non-blocking (a hostile
/// front-end must not be able to block an IOThread with a full pipe), and
/// converts it.
pub fn into_eventfd(file: File) -> Result<EventFd, EventFdError> {
    let fd = file.as_raw_fd();
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|source| EventFdError::Inspect { fd, source })?;
    let target = target.to_string_lossy().into_owned();
    if target != "anon_inode:[eventfd]" {
        return Err(EventFdError::NotEventFd { fd, target });
    }
    // SAFETY: fcntl on an fd owned by `file`; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(EventFdError::Inspect {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(EventFdError::Inspect {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: ownership of the open eventfd moves from `file` to the EventFd.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

/// The call and err fds of every queue, shared by the protocol handler
/// (which replaces them) and the device (which signals them).
#[derive(Debug)]
pub struct VringSignals {
    calls: Vec<RwLock<Option<EventFd>>>,
    errs: Vec<RwLock<Option<EventFd>>>,
}

impl VringSignals {
    /// Empty slots for `num_queues` queues.
    pub fn new(num_queues: usize) -> Self {
        VringSignals {
            calls: (0..num_queues).map(|_| RwLock::new(None)).collect(),
            errs: (0..num_queues).map(|_| RwLock::new(None)).collect(),
        }
    }

    fn set(slots: &[RwLock<Option<EventFd>>], index: usize, fd: Option<EventFd>) -> bool {
        match slots.get(index) {
            Some(slot) => {
                *slot.write().unwrap_or_else(|e| e.into_inner()) = fd;
                true
            }
            None => false,
        }
    }

    /// Replaces the call fd of queue `index` (false if no such queue).
    pub fn set_call(&self, index: usize, fd: Option<EventFd>) -> bool {
        Self::set(&self.calls, index, fd)
    }

    /// Replaces the err fd of queue `index` (false if no such queue).
    pub fn set_err(&self, index: usize, fd: Option<EventFd>) -> bool {
        Self::set(&self.errs, index, fd)
    }

    /// Drops every fd (front-end disconnected).
    pub fn clear(&self) {
        for slot in self.calls.iter().chain(&self.errs) {
            *slot.write().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Whether queue `index` has a call fd.
    pub fn has_call(&self, index: usize) -> bool {
        self.calls
            .get(index)
            .is_some_and(|s| s.read().unwrap_or_else(|e| e.into_inner()).is_some())
    }

    fn signal(slot: Option<&RwLock<Option<EventFd>>>) -> io::Result<()> {
        let Some(slot) = slot else {
            return Ok(());
        };
        let guard = slot.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(fd) => match fd.write(1) {
                Ok(()) => Ok(()),
                // Counter saturated: the front-end has a wakeup pending anyway.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(e) => Err(e),
            },
            // No fd (yet): the front-end polls or has not configured the queue.
            None => Ok(()),
        }
    }
}

impl VirtioInterrupt for VringSignals {
    fn trigger_queue(&self, queue_index: u16) -> io::Result<()> {
        Self::signal(self.calls.get(usize::from(queue_index)))
    }

    fn trigger_config(&self) -> io::Result<()> {
        // A configuration-change message needs the back-end request channel
        // (VHOST_USER_PROTOCOL_F_BACKEND_REQ), which is not negotiated: the
        // export's configuration never changes while a front-end is connected.
        log::debug!("vhost-user-blk: configuration change not signalled (no back-end channel)");
        Ok(())
    }

    fn set_needs_reset(&self) {
        // The vhost-user way to report a broken queue is its err fd.
        for slot in &self.errs {
            if let Err(e) = Self::signal(Some(slot)) {
                log::error!("vhost-user-blk: cannot signal a vring error: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup_file(fd: &EventFd) -> File {
        // SAFETY: dup of an open fd; the new fd is owned by the File.
        let n = unsafe { libc::dup(fd.as_raw_fd()) };
        assert!(n >= 0);
        // SAFETY: `n` is a fresh fd owned by nobody else.
        unsafe { File::from_raw_fd(n) }
    }

    #[test]
    fn accepts_eventfds_only() {
        let efd = EventFd::new(0).unwrap();
        let converted = into_eventfd(dup_file(&efd)).unwrap();
        converted.write(3).unwrap();
        assert_eq!(efd.read().unwrap(), 3);
        let file = File::open("/dev/null").unwrap();
        assert!(matches!(
            into_eventfd(file),
            Err(EventFdError::NotEventFd { .. })
        ));
    }

    #[test]
    fn signals_current_call_fd() {
        let signals = VringSignals::new(2);
        // No fd: nothing to do, no error.
        signals.trigger_queue(0).unwrap();
        // Out of range: ignored.
        signals.trigger_queue(7).unwrap();
        assert!(!signals.set_call(2, None));
        let a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(signals.set_call(1, Some(a.try_clone().unwrap())));
        signals.trigger_queue(1).unwrap();
        assert_eq!(a.read().unwrap(), 1);
        // Replaced while "running".
        signals.set_call(1, Some(b.try_clone().unwrap()));
        signals.trigger_queue(1).unwrap();
        signals.trigger_queue(1).unwrap();
        assert_eq!(b.read().unwrap(), 2);
        assert!(a.read().is_err(), "old fd must not be signalled");
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        signals.set_err(0, Some(e.try_clone().unwrap()));
        signals.set_needs_reset();
        assert_eq!(e.read().unwrap(), 1);
        signals.clear();
        assert!(!signals.has_call(1));
    }
}

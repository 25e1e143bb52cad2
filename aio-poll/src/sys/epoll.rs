// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A minimal epoll wrapper with nanosecond timeouts (`epoll_pwait2`, falling
//! back to millisecond `epoll_wait` on kernels older than 5.11 (`ENOSYS`) and
//! under seccomp filters that refuse it (`EPERM`)).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether `epoll_pwait2` is known to be unusable (ENOSYS or EPERM once seen).
static NO_PWAIT2: AtomicBool = AtomicBool::new(false);

/// The epoll instance of a context. Closed on drop.
#[derive(Debug)]
pub(crate) struct Epoll {
    fd: OwnedFd,
}

/// `epoll_ctl` operations.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ctl {
    Add,
    Modify,
    Delete,
}

/// An empty event buffer entry.
pub(crate) fn empty_event() -> libc::epoll_event {
    libc::epoll_event { events: 0, u64: 0 }
}

impl Ctl {
    /// The operation's name in errors.
    pub(crate) fn op_name(self) -> &'static str {
        match self {
            Ctl::Add => "epoll_ctl(EPOLL_CTL_ADD)",
            Ctl::Modify => "epoll_ctl(EPOLL_CTL_MOD)",
            Ctl::Delete => "epoll_ctl(EPOLL_CTL_DEL)",
        }
    }
}

impl Epoll {
    /// `epoll_create1(EPOLL_CLOEXEC)`.
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall without pointer arguments.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    /// `epoll_ctl(op, fd, {events, data})`.
    pub(crate) fn ctl(&self, op: Ctl, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        let op = match op {
            Ctl::Add => libc::EPOLL_CTL_ADD,
            Ctl::Modify => libc::EPOLL_CTL_MOD,
            Ctl::Delete => libc::EPOLL_CTL_DEL,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; the
        // kernel validates `fd` and returns EBADF/ENOENT/EEXIST on misuse.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ns` (`None` = forever, `Some(0)` = just check) and
    /// fills `events`. Returns the number of ready events; EINTR yields 0.
    #[inline]
    pub(crate) fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout_ns: Option<u64>,
    ) -> io::Result<usize> {
        let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
        if max == 0 {
            return Ok(0);
        }
        // The loop's common cases (no timeout, or poll only) go straight to
        // epoll_wait; ns timeouts take the epoll_pwait2 path.
        let rc = match timeout_ns {
            Some(0) => self.wait_ms(events, max, 0),
            None => self.wait_ms(events, max, -1),
            Some(ns) => self.wait_ns(events, max, ns),
        };
        match usize::try_from(rc) {
            Ok(n) => Ok(n),
            Err(_) => Self::wait_error(),
        }
    }

    #[cold]
    fn wait_error() -> io::Result<usize> {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        Err(err)
    }

    fn wait_ns(&self, events: &mut [libc::epoll_event], max: i32, ns: u64) -> i32 {
        if NO_PWAIT2.load(Ordering::Relaxed) {
            return self.wait_ms(events, max, ms_rounded_up(ns));
        }
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(ns / 1_000_000_000).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::try_from(ns % 1_000_000_000).unwrap_or(0),
        };
        // SAFETY: `events` is a writable buffer of at least `max` entries,
        // `ts` outlives the call and a null sigmask means "unchanged".
        let rc = unsafe {
            libc::epoll_pwait2(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                max,
                &ts,
                std::ptr::null(),
            )
        };
        if rc < 0
            && matches!(
                io::Error::last_os_error().raw_os_error(),
                Some(libc::ENOSYS) | Some(libc::EPERM)
            )
        {
            // ENOSYS: kernel before 5.11. EPERM: a seccomp filter refused it
            // (EPERM is not a documented epoll_pwait2 error otherwise).
            NO_PWAIT2.store(true, Ordering::Relaxed);
            self.wait_ms(events, max, ms_rounded_up(ns))
        } else {
            rc
        }
    }

    #[inline]
    fn wait_ms(&self, events: &mut [libc::epoll_event], max: i32, ms: i32) -> i32 {
        // SAFETY: `events` is a writable buffer of at least `max` entries.
        unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, ms) }
    }
}

/// A ns timeout in ms for `epoll_wait`, rounded up so that a timer is never
/// woken early.
fn ms_rounded_up(ns: u64) -> i32 {
    i32::try_from(ns.div_ceil(1_000_000)).unwrap_or(i32::MAX)
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn add_wait_delete() {
        let ep = Epoll::new().unwrap();
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        ep.ctl(Ctl::Add, efd.as_raw_fd(), libc::EPOLLIN as u32, 7)
            .unwrap();
        let mut evs = [empty_event(); 4];
        assert_eq!(ep.wait(&mut evs, Some(0)).unwrap(), 0);
        assert_eq!(ep.wait(&mut evs, Some(1_000)).unwrap(), 0);
        efd.write(1).unwrap();
        assert_eq!(ep.wait(&mut evs, None).unwrap(), 1);
        let data = evs[0].u64;
        assert_eq!(data, 7);
        ep.ctl(Ctl::Delete, efd.as_raw_fd(), 0, 0).unwrap();
        assert_eq!(ep.wait(&mut evs, Some(0)).unwrap(), 0);
        assert!(ep.ctl(Ctl::Delete, efd.as_raw_fd(), 0, 0).is_err());
        assert!(ep.ctl(Ctl::Add, -1, 0, 0).is_err());
    }
}

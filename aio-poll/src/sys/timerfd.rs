// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A `CLOCK_MONOTONIC` timerfd: wakes an outer event loop for the timers of
//! a nested context (see [`NestedContext`](crate::NestedContext)).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking, close-on-exec timerfd. Closed on drop.
#[derive(Debug)]
pub(crate) struct TimerFd {
    fd: OwnedFd,
}

impl TimerFd {
    /// `timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)`.
    pub(crate) fn new() -> io::Result<TimerFd> {
        // SAFETY: plain syscall without pointer arguments.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TimerFd { fd })
    }

    /// Arms the timer to expire once, `ns` from now (at least 1 ns: an
    /// all-zero value would disarm it), or disarms it with `None`.
    pub(crate) fn set(&self, ns: Option<u64>) -> io::Result<()> {
        let value = match ns {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            Some(ns) => {
                let ns = ns.max(1);
                libc::timespec {
                    tv_sec: libc::time_t::try_from(ns / 1_000_000_000).unwrap_or(libc::time_t::MAX),
                    tv_nsec: libc::c_long::try_from(ns % 1_000_000_000).unwrap_or(0),
                }
            }
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `spec` is a valid itimerspec for the duration of the call and
        // a null old-value pointer is allowed.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads (clears) the expiration count; EAGAIN (not expired) is ignored.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid, writable buffer.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::epoll::{empty_event, Ctl, Epoll};

    #[test]
    fn arm_fire_drain_disarm() {
        let ep = Epoll::new().unwrap();
        let t = TimerFd::new().unwrap();
        ep.ctl(Ctl::Add, t.as_raw_fd(), libc::EPOLLIN as u32, 3)
            .unwrap();
        let mut evs = [empty_event(); 2];
        assert_eq!(ep.wait(&mut evs, Some(0)).unwrap(), 0);
        t.set(Some(0)).unwrap(); // 0 is taken as 1 ns, not as "disarm"
        assert_eq!(ep.wait(&mut evs, None).unwrap(), 1);
        t.drain();
        assert_eq!(ep.wait(&mut evs, Some(0)).unwrap(), 0);
        t.set(Some(1_000_000_000)).unwrap();
        t.set(None).unwrap();
        assert_eq!(ep.wait(&mut evs, Some(2_000_000)).unwrap(), 0);
    }
}

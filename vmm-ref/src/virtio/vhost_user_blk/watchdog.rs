//! A bound on every exchange with the back-end.
//!
//! The `vhost` crate's front-end blocks in `recvmsg` until the reply is
//! complete and retries on `EAGAIN`, so a socket receive timeout cannot cut
//! off a back-end that stops answering (or stops in the middle of a
//! message). The watchdog does: while armed it waits for its deadline on
//! its own thread and then shuts the socket down, which makes the blocked
//! receive return end-of-file, so the request fails with an error instead of
//! hanging the device (and with it a vCPU waiting for an activation).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Armed {
    /// A duplicate of the socket: shutting it down shuts the connection down.
    fd: OwnedFd,
    deadline: Instant,
    fired: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    armed: Option<Armed>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The watchdog thread of one device.
pub(super) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// An armed watchdog; dropping it disarms. [`Guard::fired`] tells whether
/// the deadline passed (and the socket was shut down).
pub(super) struct Guard<'a> {
    watchdog: &'a Watchdog,
    fired: Arc<AtomicBool>,
}

impl Guard<'_> {
    /// Whether the deadline passed and the socket was shut down.
    pub(super) fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        lock(&self.watchdog.shared).armed = None;
    }
}

impl Watchdog {
    /// Starts the thread (named `name`).
    pub(super) fn start(name: String) -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(&s))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Arms the watchdog for `fd` (the connection's socket) until the guard
    /// is dropped or `timeout` passes, whichever comes first. Fails only if
    /// the socket cannot be duplicated.
    pub(super) fn arm(&self, fd: RawFd, timeout: Duration) -> std::io::Result<Guard<'_>> {
        // SAFETY: the caller passes the fd of a live connection it owns for
        // the duration of this call; it is only duplicated here.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        let fired = Arc::new(AtomicBool::new(false));
        lock(&self.shared).armed = Some(Armed {
            fd,
            deadline: Instant::now() + timeout,
            fired: Arc::clone(&fired),
        });
        self.shared.cond.notify_all();
        Ok(Guard {
            watchdog: self,
            fired,
        })
    }
}

fn run(shared: &Shared) {
    let mut st = lock(shared);
    loop {
        if st.stop {
            return;
        }
        let wait = match &st.armed {
            None => None,
            Some(a) => {
                let now = Instant::now();
                if now >= a.deadline {
                    // Flag first: the blocked request fails as soon as the
                    // socket is down and must then see why.
                    a.fired.store(true, Ordering::SeqCst);
                    // SAFETY: shutdown(2) on a descriptor we own; no pointers.
                    unsafe { libc::shutdown(a.fd.as_raw_fd(), libc::SHUT_RDWR) };
                    st.armed = None;
                    continue;
                }
                Some(a.deadline - now)
            }
        };
        st = match wait {
            None => shared.cond.wait(st).unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                shared
                    .cond
                    .wait_timeout(st, d)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn cuts_off_a_silent_peer_and_not_a_quick_one() {
        let w = Watchdog::start("vu-test-wd".into()).unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        {
            let g = w.arm(a.as_raw_fd(), Duration::from_millis(50)).unwrap();
            let mut buf = [0u8; 1];
            // Blocks until the watchdog shuts the socket down: end-of-file.
            assert_eq!(a.read(&mut buf).unwrap(), 0);
            assert!(g.fired());
        }
        let (mut c, mut d) = UnixStream::pair().unwrap();
        {
            let g = w.arm(c.as_raw_fd(), Duration::from_secs(60)).unwrap();
            std::io::Write::write_all(&mut d, b"x").unwrap();
            let mut buf = [0u8; 1];
            assert_eq!(c.read(&mut buf).unwrap(), 1);
            assert!(!g.fired());
        }
        drop(b);
    }
}

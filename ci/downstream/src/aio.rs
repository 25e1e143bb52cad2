// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! aio-poll on its own: a context owning an eventfd handler, woken from another thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aio_poll::{AioContext, FnHandler, Interest, SharedEventFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The VMM's error type: the loop's errors and the eventfd's, each with its cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs a context until its eventfd handler has counted `kicks` writes made from another
/// thread; returns the count.
pub fn count_kicks(kicks: u64) -> Result<u64, BoxError> {
    let mut ctx = AioContext::new()?;
    // The context owns the registered clone; the handler reads through another.
    let kick = SharedEventFd::new(EventFd::new(EFD_NONBLOCK)?);
    let reader = kick.clone();
    let seen = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&seen);
    ctx.add_fd_handler(
        kick.clone(),
        Interest::READABLE,
        FnHandler::new(move |_ctx, ready| {
            if ready.is_readable() {
                if let Ok(n) = reader.read() {
                    counter.fetch_add(n, Ordering::SeqCst);
                }
            }
        }),
    )?;
    let writer = std::thread::spawn(move || {
        for _ in 0..kicks {
            if kick.write(1).is_err() {
                break;
            }
        }
    });
    let ran = ctx.run(|_| seen.load(Ordering::SeqCst) >= kicks);
    // A panicked writer shows up as a missing count below.
    let _ = writer.join();
    ran?;
    Ok(seen.load(Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_kick_is_seen() {
        assert_eq!(super::count_kicks(100).unwrap(), 100);
    }
}

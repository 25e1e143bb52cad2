//! aio-poll on its own: a context with an fd handler, woken from another thread.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aio_poll::{AioContext, FnHandler, Interest};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Runs a context until its eventfd handler has seen `kicks` writes from another thread;
/// returns how many events the handler counted.
pub fn count_kicks(kicks: u64) -> Result<u64, aio_poll::Error> {
    let mut ctx = AioContext::new()?;
    let kick = EventFd::new(EFD_NONBLOCK)?;
    let reader = kick.try_clone()?;
    let seen = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&seen);
    ctx.add_fd_handler(
        kick.as_raw_fd(),
        Interest::READABLE,
        FnHandler::read(move |_ctx| {
            if let Ok(n) = reader.read() {
                counter.fetch_add(n, Ordering::SeqCst);
            }
        })
        .boxed(),
    )?;
    let writer = std::thread::spawn(move || {
        for _ in 0..kicks {
            if kick.write(1).is_err() {
                break;
            }
        }
        kick
    });
    ctx.run(|_| seen.load(Ordering::SeqCst) >= kicks);
    // Keep the eventfd open until the loop stopped watching it.
    drop(writer.join());
    Ok(seen.load(Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_kick_is_seen() {
        assert_eq!(super::count_kicks(100).unwrap(), 100);
    }
}

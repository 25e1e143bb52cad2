// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Handler add / modify / remove, also from inside callbacks.

mod common;

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aio_poll::{AioContext, Error, FdHandler, FnHandler, HandlerId, Interest, Readiness};
use common::eventfd;

/// Sets `dropped` when dropped; `running` is true while its callback runs.
struct SelfRemover {
    id: Arc<Mutex<Option<HandlerId>>>,
    calls: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    dropped: Arc<AtomicBool>,
}

impl FdHandler for SelfRemover {
    fn ready(&mut self, ctx: &mut AioContext, ready: Readiness) {
        // One call with both readinesses, never a second one.
        assert!(ready.is_readable() && ready.is_writable(), "{ready:?}");
        self.running.store(true, Ordering::SeqCst);
        let calls = self.calls.fetch_add(1, Ordering::SeqCst);
        assert_eq!(calls, 0, "called after the handler removed itself");
        let id = self.id.lock().unwrap().expect("id set");
        ctx.remove_handler(id).expect("remove self");
        // Still alive: the context must not drop us while we run.
        assert!(!self.dropped.load(Ordering::SeqCst));
        assert!(!ctx.contains_handler(id));
        // Removing twice is an error, not a crash.
        assert!(matches!(
            ctx.remove_handler(id),
            Err(Error::UnknownHandler(_))
        ));
        self.running.store(false, Ordering::SeqCst);
    }
}

impl Drop for SelfRemover {
    fn drop(&mut self) {
        assert!(
            !self.running.load(Ordering::SeqCst),
            "dropped while running"
        );
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[test]
fn remove_self_during_dispatch() {
    let mut ctx = AioContext::new().unwrap();
    let (efd, writer) = eventfd();
    let id_cell = Arc::new(Mutex::new(None));
    let calls = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    let h = SelfRemover {
        id: id_cell.clone(),
        calls: calls.clone(),
        running: Arc::new(AtomicBool::new(false)),
        dropped: dropped.clone(),
    };
    // Readable and writable at once: one call, nothing after the removal.
    let id = ctx
        .add_fd_handler(efd, Interest::READABLE | Interest::WRITABLE, h)
        .unwrap();
    *id_cell.lock().unwrap() = Some(id);
    writer.write(1).unwrap();
    assert!(ctx.poll(true).unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        dropped.load(Ordering::SeqCst),
        "handler freed after its callback returned"
    );
    assert_eq!(ctx.handler_count(), 0);
    // The fd is still readable but nothing is registered any more.
    assert!(!ctx.poll(false).unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The slot is reused with a new generation: the stale id stays invalid.
    let (efd2, _w2) = eventfd();
    let id2 = ctx
        .add_fd_handler(efd2, Interest::READABLE, FnHandler::new(|_, _| {}))
        .unwrap();
    assert_ne!(id, id2);
    assert!(matches!(
        ctx.set_interest(id, Interest::READABLE),
        Err(Error::UnknownHandler(_))
    ));
}

#[test]
fn remove_other_during_dispatch() {
    let mut ctx = AioContext::new().unwrap();
    let (a, wa) = eventfd();
    let (b, wb) = eventfd();
    let ids: Arc<Mutex<Vec<HandlerId>>> = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicU64::new(0));
    let mut handlers = Vec::new();
    for (k, fd) in [(0usize, &a), (1usize, &b)] {
        let ids = ids.clone();
        let calls = calls.clone();
        let reader = fd.clone();
        let h = FnHandler::new(move |ctx, _| {
            let _ = reader.read();
            calls.fetch_add(1, Ordering::SeqCst);
            let other = ids.lock().unwrap()[1 - k];
            // Whoever runs first removes the other one, whose event is
            // already in this iteration's ready list.
            let _ = ctx.remove_handler(other);
        });
        handlers.push(
            ctx.add_fd_handler(fd.clone(), Interest::READABLE, h)
                .unwrap(),
        );
    }
    *ids.lock().unwrap() = handlers.clone();
    wa.write(1).unwrap();
    wb.write(1).unwrap();
    assert!(ctx.poll(true).unwrap());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the removed handler must not run"
    );
    assert_eq!(ctx.handler_count(), 1);
    let survivor = handlers
        .iter()
        .copied()
        .find(|id| ctx.contains_handler(*id))
        .unwrap();
    // The survivor still works.
    wa.write(1).unwrap();
    wb.write(1).unwrap();
    assert!(ctx.poll(true).unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    ctx.remove_handler(survivor).unwrap();
    assert_eq!(ctx.handler_count(), 0);
}

#[test]
fn add_and_modify_from_callback() {
    let mut ctx = AioContext::new().unwrap();
    let (a, wa) = eventfd();
    let (b, wb) = eventfd();
    let b_calls = Arc::new(AtomicU64::new(0));
    let bc = b_calls.clone();
    let added: Arc<Mutex<Option<HandlerId>>> = Arc::new(Mutex::new(None));
    let added2 = added.clone();
    let reader_a = a.clone();
    let mut b_fd = Some(b);
    let id_a = ctx
        .add_fd_handler(
            a,
            Interest::READABLE,
            FnHandler::new(move |ctx, _| {
                let _ = reader_a.read();
                if let Some(fd) = b_fd.take() {
                    let bc = bc.clone();
                    let r = fd.clone();
                    let id = ctx
                        .add_fd_handler(
                            fd,
                            Interest::READABLE,
                            FnHandler::new(move |_, _| {
                                let _ = r.read();
                                bc.fetch_add(1, Ordering::SeqCst);
                            }),
                        )
                        .unwrap();
                    *added2.lock().unwrap() = Some(id);
                }
            }),
        )
        .unwrap();
    wa.write(1).unwrap();
    assert!(ctx.poll(true).unwrap());
    let id_b = added.lock().unwrap().expect("added from callback");
    wb.write(1).unwrap();
    assert!(ctx.poll(true).unwrap());
    assert_eq!(b_calls.load(Ordering::SeqCst), 1);
    // Interest empty: the fd stays registered but is silent.
    ctx.set_interest(id_b, Interest::empty()).unwrap();
    wb.write(1).unwrap();
    assert!(!ctx.poll(false).unwrap());
    ctx.set_interest(id_b, Interest::READABLE).unwrap();
    assert!(ctx.poll(false).unwrap());
    assert_eq!(b_calls.load(Ordering::SeqCst), 2);
    ctx.remove_handler(id_a).unwrap();
    ctx.remove_handler(id_b).unwrap();
}

#[test]
fn write_interest_and_errors() {
    let mut ctx = AioContext::new().unwrap();
    let (a, _wa) = eventfd();
    let writes = Arc::new(AtomicU64::new(0));
    let w = writes.clone();
    let id = ctx
        .add_fd_handler(
            a.clone(),
            Interest::WRITABLE,
            FnHandler::new(move |_, ready| {
                assert_eq!(ready, Readiness::WRITABLE);
                w.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
    // An eventfd is always writable (level-triggered).
    assert!(ctx.poll(false).unwrap());
    assert!(ctx.poll(false).unwrap());
    assert_eq!(writes.load(Ordering::SeqCst), 2);
    ctx.remove_handler(id).unwrap();
    // Same fd twice is an epoll error naming the operation, not a panic.
    let id = ctx
        .add_fd_handler(a.clone(), Interest::READABLE, FnHandler::new(|_, _| {}))
        .unwrap();
    let e = ctx
        .add_fd_handler(a.clone(), Interest::READABLE, FnHandler::new(|_, _| {}))
        .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_eq!(e.to_string(), "epoll_ctl(EPOLL_CTL_ADD) failed");
    let source = std::error::Error::source(&e).expect("cause kept");
    assert!(source.to_string().contains("File exists"), "{source}");
    assert_eq!(ctx.handler_count(), 1);
    ctx.remove_handler(id).unwrap();
}

/// A handle whose fd is a pipe's read end, with a drop flag.
struct PipeEnd {
    fd: std::os::fd::OwnedFd,
    dropped: Arc<AtomicBool>,
}

impl AsFd for PipeEnd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for PipeEnd {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// The context owns the registered fd: it is dropped on removal (and with
/// the context), and a hang-up is reported as such.
#[test]
fn owned_fd_dropped_on_removal_and_hang_up_reported() {
    let mut ctx = AioContext::new().unwrap();
    let (r, w) = pipe();
    let dropped = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let id_cell: Arc<Mutex<Option<HandlerId>>> = Arc::new(Mutex::new(None));
    let idc = id_cell.clone();
    let id = ctx
        .add_fd_handler(
            PipeEnd {
                fd: r,
                dropped: dropped.clone(),
            },
            Interest::READABLE,
            FnHandler::new(move |ctx, ready| {
                s.lock().unwrap().push(ready);
                if ready.is_hang_up() {
                    let me = idc.lock().unwrap().expect("id");
                    ctx.remove_handler(me).unwrap();
                }
            }),
        )
        .unwrap();
    *id_cell.lock().unwrap() = Some(id);
    assert!(!dropped.load(Ordering::SeqCst));
    drop(w); // the peer hangs up
    assert!(ctx.poll(true).unwrap());
    assert_eq!(*seen.lock().unwrap(), vec![Readiness::HANG_UP]);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the fd is dropped when its handler is removed"
    );
    assert!(!ctx.poll(false).unwrap());

    // Dropping the context drops the fds it still owns.
    let (r2, _w2) = pipe();
    let dropped2 = Arc::new(AtomicBool::new(false));
    ctx.add_fd_handler(
        PipeEnd {
            fd: r2,
            dropped: dropped2.clone(),
        },
        Interest::READABLE,
        FnHandler::new(|_, _| {}),
    )
    .unwrap();
    drop(ctx);
    assert!(dropped2.load(Ordering::SeqCst));
}

#[test]
fn remove_poll_handler_on_poll_list_during_poll_ready() {
    use common::{add_queue, Probe, Queue};
    let mut ctx = AioContext::new().unwrap();
    let q = Queue::new();
    let probe = Probe::default();
    let id = add_queue(&mut ctx, &q, &probe);
    q.push();
    assert!(ctx.poll(true).unwrap());
    assert!(ctx.is_on_poll_list(id));
    // Remove it from a BH while it is on the poll list (and in poll mode).
    ctx.schedule_oneshot(move |ctx| ctx.remove_handler(id).unwrap());
    assert!(ctx.poll(false).unwrap());
    assert!(probe.dropped.load(Ordering::SeqCst));
    assert!(!ctx.is_on_poll_list(id));
    assert!(ctx.stats().handlers.is_empty());
    q.push();
    assert!(!ctx.poll(false).unwrap());
}

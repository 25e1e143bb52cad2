//! Handler add / modify / remove, also from inside callbacks.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aio_poll::{AioContext, Error, FdHandler, FnHandler, HandlerId, Interest};
use common::eventfd;

/// Sets `dropped` when dropped; `running` is true while its callback runs.
struct SelfRemover {
    id: Arc<Mutex<Option<HandlerId>>>,
    calls: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    dropped: Arc<AtomicBool>,
}

impl FdHandler for SelfRemover {
    fn read(&mut self, ctx: &mut AioContext) {
        self.running.store(true, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        let id = self.id.lock().unwrap().expect("id set");
        ctx.remove_fd_handler(id).expect("remove self");
        // Still alive: the context must not drop us while we run.
        assert!(!self.dropped.load(Ordering::SeqCst));
        assert!(!ctx.contains_handler(id));
        // Removing twice is an error, not a crash.
        assert!(matches!(
            ctx.remove_fd_handler(id),
            Err(Error::UnknownHandler(_))
        ));
        self.running.store(false, Ordering::SeqCst);
    }

    fn write(&mut self, _ctx: &mut AioContext) {
        panic!("write called after the handler removed itself");
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
    // Readable and writable at once: write must not run after the removal.
    let id = ctx
        .add_fd_handler(
            efd.as_raw_fd(),
            Interest::READABLE | Interest::WRITABLE,
            Box::new(h),
        )
        .unwrap();
    *id_cell.lock().unwrap() = Some(id);
    writer.write(1).unwrap();
    assert!(ctx.poll(true));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        dropped.load(Ordering::SeqCst),
        "handler freed after its callback returned"
    );
    assert_eq!(ctx.handler_count(), 0);
    // The fd is still readable but nothing is registered any more.
    assert!(!ctx.poll(false));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The slot is reused with a new generation: the stale id stays invalid.
    let (efd2, _w2) = eventfd();
    let id2 = ctx
        .add_fd_handler(
            efd2.as_raw_fd(),
            Interest::READABLE,
            Box::new(FnHandler::read(|_| {})),
        )
        .unwrap();
    assert_ne!(id, id2);
    assert!(matches!(
        ctx.modify_fd_handler(id, Interest::READABLE),
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
        let reader = fd.try_clone().unwrap();
        let h = FnHandler::read(move |ctx| {
            let _ = reader.read();
            calls.fetch_add(1, Ordering::SeqCst);
            let other = ids.lock().unwrap()[1 - k];
            // Whoever runs first removes the other one, whose event is
            // already in this iteration's ready list.
            let _ = ctx.remove_fd_handler(other);
        });
        handlers.push(
            ctx.add_fd_handler(fd.as_raw_fd(), Interest::READABLE, Box::new(h))
                .unwrap(),
        );
    }
    *ids.lock().unwrap() = handlers.clone();
    wa.write(1).unwrap();
    wb.write(1).unwrap();
    assert!(ctx.poll(true));
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
    assert!(ctx.poll(true));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    ctx.remove_fd_handler(survivor).unwrap();
    assert_eq!(ctx.handler_count(), 0);
}

#[test]
fn add_and_modify_from_callback() {
    let mut ctx = AioContext::new().unwrap();
    let (a, wa) = eventfd();
    let (b, wb) = eventfd();
    let b_raw = b.as_raw_fd();
    let b_calls = Arc::new(AtomicU64::new(0));
    let bc = b_calls.clone();
    let added: Arc<Mutex<Option<HandlerId>>> = Arc::new(Mutex::new(None));
    let added2 = added.clone();
    let reader_a = a.try_clone().unwrap();
    let mut b_reader = Some(b.try_clone().unwrap());
    let id_a = ctx
        .add_fd_handler(
            a.as_raw_fd(),
            Interest::READABLE,
            Box::new(FnHandler::read(move |ctx| {
                let _ = reader_a.read();
                if let Some(r) = b_reader.take() {
                    let bc = bc.clone();
                    let id = ctx
                        .add_fd_handler(
                            b_raw,
                            Interest::READABLE,
                            Box::new(FnHandler::read(move |_| {
                                let _ = r.read();
                                bc.fetch_add(1, Ordering::SeqCst);
                            })),
                        )
                        .unwrap();
                    *added2.lock().unwrap() = Some(id);
                }
            })),
        )
        .unwrap();
    wa.write(1).unwrap();
    assert!(ctx.poll(true));
    let id_b = added.lock().unwrap().expect("added from callback");
    wb.write(1).unwrap();
    assert!(ctx.poll(true));
    assert_eq!(b_calls.load(Ordering::SeqCst), 1);
    // Interest empty: the fd stays registered but is silent.
    ctx.modify_fd_handler(id_b, Interest::empty()).unwrap();
    wb.write(1).unwrap();
    assert!(!ctx.poll(false));
    ctx.modify_fd_handler(id_b, Interest::READABLE).unwrap();
    assert!(ctx.poll(false));
    assert_eq!(b_calls.load(Ordering::SeqCst), 2);
    ctx.remove_fd_handler(id_a).unwrap();
    ctx.remove_fd_handler(id_b).unwrap();
}

#[test]
fn write_interest_and_errors() {
    let mut ctx = AioContext::new().unwrap();
    let (a, _wa) = eventfd();
    let writes = Arc::new(AtomicU64::new(0));
    let w = writes.clone();
    let id = ctx
        .add_fd_handler(
            a.as_raw_fd(),
            Interest::WRITABLE,
            Box::new(FnHandler::write(move |_| {
                w.fetch_add(1, Ordering::SeqCst);
            })),
        )
        .unwrap();
    // An eventfd is always writable (level-triggered).
    assert!(ctx.poll(false));
    assert!(ctx.poll(false));
    assert_eq!(writes.load(Ordering::SeqCst), 2);
    ctx.remove_fd_handler(id).unwrap();
    // Same fd twice is an epoll error, reported, not a panic.
    let id = ctx
        .add_fd_handler(
            a.as_raw_fd(),
            Interest::READABLE,
            FnHandler::read(|_| {}).boxed(),
        )
        .unwrap();
    let e = ctx
        .add_fd_handler(
            a.as_raw_fd(),
            Interest::READABLE,
            FnHandler::read(|_| {}).boxed(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e}");
    assert_eq!(ctx.handler_count(), 1);
    // A bad fd likewise.
    assert!(ctx
        .add_fd_handler(-1, Interest::READABLE, FnHandler::read(|_| {}).boxed())
        .is_err());
    ctx.remove_fd_handler(id).unwrap();
}

#[test]
fn remove_poll_handler_on_poll_list_during_poll_ready() {
    use common::{add_queue, Probe, Queue};
    let mut ctx = AioContext::new().unwrap();
    let q = Queue::new();
    let probe = Probe::default();
    let id = add_queue(&mut ctx, &q, &probe);
    q.push();
    assert!(ctx.poll(true));
    assert!(ctx.is_on_poll_list(id));
    // Remove it from a BH while it is on the poll list (and in poll mode).
    ctx.schedule_oneshot(move |ctx| ctx.remove_fd_handler(id).unwrap());
    assert!(ctx.poll(false));
    assert!(probe.dropped.load(Ordering::SeqCst));
    assert!(!ctx.is_on_poll_list(id));
    assert!(ctx.stats().handlers.is_empty());
    q.push();
    assert!(!ctx.poll(false));
}

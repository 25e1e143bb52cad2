// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Creating, naming, deleting and stopping IOThreads.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{held, task_comm, task_exists, task_gone, wait_until};
use iothread_registry::aio_poll::PollParams;
use iothread_registry::{Error, IoThreadParams, IoThreadRegistry, IoThreadState};

#[test]
fn create_lists_ids_in_creation_order() {
    let r = IoThreadRegistry::new();
    r.create("io1", IoThreadParams::default()).unwrap();
    r.create("io0", IoThreadParams::default()).unwrap();
    r.create("a.b-c_d", IoThreadParams::default()).unwrap();
    assert_eq!(r.ids(), ["io1", "io0", "a.b-c_d"]);
    assert!(r.contains("io0"));
    assert!(!r.contains("io2"));
    assert_eq!(r.state("io0").unwrap(), IoThreadState::Running);
}

#[test]
fn threads_are_named_and_report_their_tid() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    r.create("iothread-long-name", IoThreadParams::default())
        .unwrap();
    let t0 = r.thread_id("io0").unwrap();
    let t1 = r.thread_id("iothread-long-name").unwrap();
    // SAFETY: getpid(2) has no preconditions.
    let pid = i64::from(unsafe { libc::getpid() });
    assert!(t0 > 0 && t1 > 0 && t0 != t1 && t0 != pid);
    assert!(task_exists(t0));
    assert_eq!(task_comm(t0), "IO io0");
    // The kernel keeps 15 bytes of a thread name.
    assert_eq!(task_comm(t1), "IO iothread-lon");
    // The loop runs on that thread.
    let tid_inside = held(&r, "io0")
        .call(|_| std::fs::read_link("/proc/thread-self").unwrap())
        .unwrap();
    assert!(tid_inside.ends_with(format!("task/{t0}")), "{tid_inside:?}");
    let name_inside = held(&r, "iothread-long-name")
        .call(|_| std::thread::current().name().map(str::to_owned))
        .unwrap();
    assert_eq!(name_inside.as_deref(), Some("IO iothread-long-name"));
}

#[test]
fn duplicate_id_refused() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    let err = r.create("io0", IoThreadParams::default()).unwrap_err();
    assert!(matches!(&err, Error::AlreadyExists { id } if id == "io0"));
    assert_eq!(err.to_string(), "an IOThread with id 'io0' already exists");
    assert_eq!(r.ids(), ["io0"]);
}

#[test]
fn bad_ids_refused() {
    let r = IoThreadRegistry::new();
    for id in ["", "0io", "_io", "io 0", "io/0", "io\u{e9}", "io:0"] {
        let err = r.create(id, IoThreadParams::default()).unwrap_err();
        assert!(matches!(err, Error::InvalidId { .. }), "{id:?}: {err}");
    }
    assert!(r.ids().is_empty());
}

#[test]
fn bad_params_refused_at_creation() {
    let r = IoThreadRegistry::new();
    let p = IoThreadParams::default().with_poll(PollParams::default().with_weight(64));
    let err = r.create("io0", p).unwrap_err();
    assert_eq!(
        err.to_string(),
        "poll-weight value must be in range [0, 63]"
    );
    let p = IoThreadParams::default().with_poll(PollParams::default().with_max_ns(-1));
    assert!(matches!(
        r.create("io0", p).unwrap_err(),
        Error::InvalidValue(e) if e.name() == "poll-max-ns" && e.value() == -1
    ));
    assert!(!r.contains("io0"));
}

#[test]
fn delete_stops_and_joins() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    r.create("io1", IoThreadParams::default()).unwrap();
    let tid = r.thread_id("io0").unwrap();
    // Work queued before the delete runs before the in-loop stop request, and delete
    // returns only after the thread ended (joined).
    let finished = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&finished);
    held(&r, "io0").submit(move |_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        f.store(true, Ordering::SeqCst);
    });
    r.delete("io0").unwrap();
    assert!(finished.load(Ordering::SeqCst));
    assert!(task_gone(tid));
    assert_eq!(r.ids(), ["io1"]);
    assert!(matches!(r.thread_id("io0"), Err(Error::NotFound { .. })));
    // The id can be reused.
    r.create("io0", IoThreadParams::default()).unwrap();
    assert_eq!(r.ids(), ["io1", "io0"]);
    assert_ne!(r.thread_id("io0").unwrap(), tid);
}

#[test]
fn delete_unknown_is_not_found() {
    let r = IoThreadRegistry::new();
    let err = r.delete("nope").unwrap_err();
    assert!(matches!(&err, Error::NotFound { id } if id == "nope"));
    assert_eq!(err.to_string(), "Cannot find iothread nope");
}

#[test]
fn dropping_the_registry_stops_all() {
    let r = IoThreadRegistry::new();
    let clone = r.clone();
    r.create("io0", IoThreadParams::default()).unwrap();
    r.create("io1", IoThreadParams::default()).unwrap();
    let tids = [r.thread_id("io0").unwrap(), r.thread_id("io1").unwrap()];
    drop(r);
    // A clone keeps them alive.
    assert!(tids.iter().all(|&t| task_exists(t)));
    assert_eq!(held(&clone, "io1").call(|_| 5).unwrap(), 5);
    drop(clone);
    assert!(tids.iter().all(|&t| task_gone(t)));
}

#[test]
fn submit_and_call_run_on_the_iothread() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    let tid = r.thread_id("io0").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..100 {
        let tx = tx.clone();
        held(&r, "io0").submit(move |_| tx.send(i).unwrap());
    }
    // Fire-and-forget closures run in submission order.
    let got: Vec<i32> = (0..100)
        .map(|_| rx.recv_timeout(common::TIMEOUT).unwrap())
        .collect();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    let inside = held(&r, "io0")
        .call(|_| std::fs::read_link("/proc/thread-self").unwrap())
        .unwrap();
    assert!(inside.ends_with(format!("task/{tid}")));
    // No holder, no context: an unknown IOThread cannot even be held.
    assert!(matches!(
        r.acquire(
            "nope",
            iothread_registry::IoThreadHolder::block_node("test")
        ),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn waiting_on_itself_is_refused() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    r.create("io1", IoThreadParams::default()).unwrap();
    let inner = r.clone();
    let (same, other, delete) = held(&r, "io0")
        .call(move |_| {
            (
                held(&inner, "io0").call(|_| 1),
                held(&inner, "io1").call(|_| 2),
                inner.delete("io0"),
            )
        })
        .unwrap();
    assert!(matches!(same, Err(Error::WouldDeadlock { ref id }) if id == "io0"));
    assert_eq!(other.unwrap(), 2);
    assert!(matches!(delete, Err(Error::WouldDeadlock { .. })));
    assert_eq!(r.ids(), ["io0", "io1"]);
    r.delete("io0").unwrap();
}

#[test]
fn panics_are_contained_and_reported() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    r.create("io1", IoThreadParams::default()).unwrap();
    let guard = held(&r, "io0");
    guard.submit(|_| panic!("boom in io0"));
    assert!(wait_until(
        || r.state("io0").unwrap() != IoThreadState::Running
    ));
    assert_eq!(
        r.state("io0").unwrap(),
        IoThreadState::Panicked {
            message: "boom in io0".into()
        }
    );
    assert!(matches!(guard.call(|_| 1), Err(Error::ThreadGone { .. })));
    // Submitting to a dead loop is dropped silently (call() reports it).
    guard.submit(|_| ());
    drop(guard);
    let stats = r.stats("io0").unwrap();
    assert!(matches!(stats.state, IoThreadState::Panicked { .. }));
    // Other IOThreads are unaffected; the dead one can still be listed and deleted.
    assert_eq!(held(&r, "io1").call(|_| 7).unwrap(), 7);
    assert_eq!(r.query_iothreads().len(), 2);
    r.delete("io0").unwrap();
    assert_eq!(r.ids(), ["io1"]);
}

#[test]
fn call_racing_with_a_panic_never_hangs() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    // The first closure kills the loop; the second is queued behind it and can never
    // run: call() must notice and fail.
    held(&r, "io0").submit(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        panic!("second closure never runs");
    });
    match held(&r, "io0").call(|_| 1) {
        Err(Error::ThreadGone { id }) => assert_eq!(id, "io0"),
        other => panic!("expected ThreadGone, got {other:?}"),
    }
}

#[test]
fn registries_are_independent_and_types_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<IoThreadRegistry>();
    send_sync::<iothread_registry::HolderGuard>();
    send_sync::<Error>();

    // Both registries have an "io0"; waiting on the other registry's io0 from inside
    // this one's io0 is not a self-wait.
    let a = IoThreadRegistry::new();
    let b = IoThreadRegistry::new();
    a.create("io0", IoThreadParams::default()).unwrap();
    b.create("io0", IoThreadParams::default()).unwrap();
    assert_ne!(a.thread_id("io0").unwrap(), b.thread_id("io0").unwrap());
    let b2 = b.clone();
    let got = held(&a, "io0")
        .call(move |_| held(&b2, "io0").call(|_| 11))
        .unwrap();
    assert_eq!(got.unwrap(), 11);
}

#[test]
fn state_serializes_as_documented() {
    assert_eq!(
        serde_json::to_string(&IoThreadState::Running).unwrap(),
        r#""running""#
    );
    assert_eq!(
        serde_json::to_string(&IoThreadState::Panicked {
            message: "x".into()
        })
        .unwrap(),
        r#"{"panicked":{"message":"x"}}"#
    );
}

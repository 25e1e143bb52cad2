//! Holder registration: acquire/release, duplicates, errors, delete-in-use and
//! concurrency.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;

use iothread_registry::{Error, IoThreadHolder, IoThreadParams, IoThreadRegistry};

fn dev(n: usize) -> IoThreadHolder {
    IoThreadHolder::qom_object(format!("/machine/peripheral/blk{n}/virtio-backend"))
}

fn registry(ids: &[&str]) -> IoThreadRegistry {
    let r = IoThreadRegistry::new();
    for id in ids {
        r.create(id, IoThreadParams::default()).unwrap();
    }
    r
}

#[test]
fn acquire_registers_and_drop_releases() {
    let r = registry(&["io0"]);
    let g = r.acquire("io0", dev(0)).unwrap();
    assert_eq!(g.iothread_id(), "io0");
    assert_eq!(g.holder(), &dev(0));
    assert_eq!(r.holders("io0").unwrap(), [dev(0)]);
    // The guard's context is the IOThread's.
    assert_eq!(g.call(|_| 3).unwrap(), 3);
    drop(g);
    assert!(r.holders("io0").unwrap().is_empty());
}

#[test]
fn same_holder_may_hold_several_times() {
    let r = registry(&["io0"]);
    let disk = IoThreadHolder::block_node("disk0");
    let a = r.acquire("io0", disk.clone()).unwrap();
    let b = r.acquire("io0", dev(1)).unwrap();
    let c = r.acquire("io0", disk.clone()).unwrap();
    assert_eq!(
        r.holders("io0").unwrap(),
        [disk.clone(), dev(1), disk.clone()]
    );
    // Release removes one matching entry (the earliest).
    a.release().unwrap();
    assert_eq!(r.holders("io0").unwrap(), [dev(1), disk.clone()]);
    drop(c);
    assert_eq!(r.holders("io0").unwrap(), [dev(1)]);
    b.release().unwrap();
    assert!(r.holders("io0").unwrap().is_empty());
}

#[test]
fn releasing_what_is_not_held_is_an_error() {
    let r = registry(&["io0", "io1"]);
    let err = r.release("io0", &dev(0)).unwrap_err();
    assert!(matches!(&err, Error::NotHeld { id, holder } if id == "io0" && *holder == dev(0)));
    assert_eq!(
        err.to_string(),
        "qom-object /machine/peripheral/blk0/virtio-backend does not hold IOThread 'io0'"
    );
    let _g = r.acquire("io1", dev(0)).unwrap();
    // Held elsewhere, or same name but other kind: still not held here.
    assert!(matches!(
        r.release("io0", &dev(0)),
        Err(Error::NotHeld { .. })
    ));
    let as_node = IoThreadHolder::block_node("/machine/peripheral/blk0/virtio-backend");
    assert!(matches!(
        r.release("io1", &as_node),
        Err(Error::NotHeld { .. })
    ));
    assert!(matches!(
        r.release("nope", &dev(0)),
        Err(Error::NotFound { .. })
    ));
    // A guard whose registration was already released by id reports it cleanly.
    let g = r.acquire("io0", dev(5)).unwrap();
    r.release("io0", &dev(5)).unwrap();
    assert!(matches!(g.release(), Err(Error::NotHeld { .. })));
    assert_eq!(r.holders("io1").unwrap(), [dev(0)]);
}

#[test]
fn acquire_unknown_is_not_found() {
    let r = registry(&[]);
    assert!(matches!(
        r.acquire("io0", dev(0)),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(r.holders("io0"), Err(Error::NotFound { .. })));
}

#[test]
fn delete_in_use_is_refused_listing_holders() {
    let r = registry(&["io0"]);
    let g1 = r.acquire("io0", dev(0)).unwrap();
    let g2 = r
        .acquire("io0", IoThreadHolder::block_node("disk0"))
        .unwrap();
    let err = r.delete("io0").unwrap_err();
    match &err {
        Error::InUse { id, holders } => {
            assert_eq!(id, "io0");
            assert_eq!(holders, &[dev(0), IoThreadHolder::block_node("disk0")]);
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "IOThread 'io0' is in use by qom-object /machine/peripheral/blk0/virtio-backend, block-node disk0"
    );
    // Still fully usable.
    assert_eq!(g2.call(|_| 1).unwrap(), 1);
    drop(g1);
    assert!(matches!(r.delete("io0"), Err(Error::InUse { ref holders, .. }) if holders.len() == 1));
    g2.release().unwrap();
    r.delete("io0").unwrap();
    assert!(!r.contains("io0"));
}

#[test]
fn guard_outliving_the_registry_fails_cleanly() {
    let r = registry(&["io0"]);
    let g = r.acquire("io0", dev(0)).unwrap();
    let tid = r.thread_id("io0").unwrap();
    drop(r);
    // The registry stopped and joined its threads even though a guard remained.
    assert!(common::task_gone(tid));
    assert!(matches!(g.call(|_| 1), Err(Error::ThreadGone { .. })));
    g.submit(|_| ());
    assert!(matches!(g.release(), Err(Error::ThreadGone { .. })));
}

#[test]
fn concurrent_acquire_release_is_consistent() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 1000;
    let r = registry(&["io0", "io1"]);
    let barrier = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let r = r.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let mut kept = Vec::new();
                for round in 0..ROUNDS {
                    let id = if (t + round) % 2 == 0 { "io0" } else { "io1" };
                    let holder = if round % 3 == 0 {
                        IoThreadHolder::block_node(format!("node{t}"))
                    } else {
                        dev(t)
                    };
                    let g = r.acquire(id, holder).unwrap();
                    // While this worker holds `id`, deleting it must be refused.
                    if round % 97 == 0 {
                        match r.delete(id) {
                            Err(Error::InUse { holders, .. }) => {
                                assert!(holders.contains(g.holder()))
                            }
                            other => panic!("delete of a held IOThread: {other:?}"),
                        }
                    }
                    // Keep the last t guards; release the rest in alternating ways.
                    if round >= ROUNDS - t {
                        kept.push(g);
                    } else if round % 2 == 0 {
                        g.release().unwrap();
                    } else {
                        drop(g);
                    }
                }
                kept
            })
        })
        .collect();
    let kept: Vec<_> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let expected: usize = (0..THREADS).sum();
    assert_eq!(kept.len(), expected);
    let total = r.holders("io0").unwrap().len() + r.holders("io1").unwrap().len();
    assert_eq!(total, expected);
    // Every kept guard appears exactly as many times as it was kept.
    for id in ["io0", "io1"] {
        let mut want: Vec<_> = kept
            .iter()
            .filter(|g| g.iothread_id() == id)
            .map(|g| g.holder().to_string())
            .collect();
        let mut got: Vec<_> = r
            .holders(id)
            .unwrap()
            .iter()
            .map(|h| h.to_string())
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{id}");
    }
    drop(kept);
    assert!(r.holders("io0").unwrap().is_empty());
    assert!(r.holders("io1").unwrap().is_empty());
    r.delete("io0").unwrap();
    r.delete("io1").unwrap();
}

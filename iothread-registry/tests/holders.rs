// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Holder registration: acquire/release, duplicates, errors, delete-in-use and
//! concurrency.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;

use iothread_registry::{
    Error, IoThreadHolder, IoThreadParams, IoThreadRegistry, IoThreadVqMapping,
};

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
fn remap_moves_the_holder_atomically() {
    const ROUNDS: usize = 1000;
    let r = registry(&["io0", "io1", "io2", "io3", "other"]);
    let d0 = dev(0);
    let _other = r.acquire("other", dev(1)).unwrap();
    let a_side = [IoThreadVqMapping::new("io0"), IoThreadVqMapping::new("io1")];
    let b_side = [IoThreadVqMapping::new("io2"), IoThreadVqMapping::new("io3")];
    let mut assignment = r.acquire_vq_mapping(&a_side, 4, d0.clone()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = {
        let (r, stop, d0) = (r.clone(), Arc::clone(&stop), d0.clone());
        let seen = Arc::clone(&seen);
        thread::spawn(move || {
            let mut snapshots = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // Which IOThreads list d0, from one consistent snapshot.
                let on: Vec<String> = r
                    .all_holders()
                    .into_iter()
                    .filter(|(_, hs)| {
                        let n = hs.iter().filter(|h| **h == d0).count();
                        assert!(n <= 1, "d0 listed {n} times");
                        n == 1
                    })
                    .map(|(id, _)| id)
                    .collect();
                assert!(
                    on == ["io0", "io1"] || on == ["io2", "io3"],
                    "d0 on neither or both sides: {on:?}"
                );
                snapshots += 1;
                seen.store(snapshots, std::sync::atomic::Ordering::SeqCst);
            }
            snapshots
        })
    };
    // The watcher must look while the remaps run: on a loaded host it may not be
    // scheduled at all during 1000 quick remaps, so wait for its first snapshot
    // and keep remapping (an even number of rounds, bounded) until it took more.
    let seen_now = || seen.load(std::sync::atomic::Ordering::SeqCst);
    while seen_now() == 0 {
        thread::yield_now();
    }
    let first = seen_now();
    let mut round = 0usize;
    while round < ROUNDS || (seen_now() < first + 100 && round < 100 * ROUNDS) || round % 2 != 0 {
        let to = if round % 2 == 0 { &b_side } else { &a_side };
        assignment.remap(to).unwrap();
        assert_eq!(assignment.mapping(), to);
        assert_eq!(
            assignment.iothread_for_queue(3),
            Some(to[1].iothread.as_str())
        );
        round += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(watcher.join().unwrap() > first);
    // Even number of rounds: back on io0/io1; the other holder was never touched.
    assert_eq!(r.holders("io0").unwrap(), vec![d0.clone()]);
    assert!(r.holders("io2").unwrap().is_empty());
    assert_eq!(r.holders("other").unwrap(), [dev(1)]);
    // Released IOThreads can go; held ones cannot.
    r.delete("io2").unwrap();
    assert!(matches!(r.delete("io1"), Err(Error::InUse { .. })));
    drop(assignment);
    r.delete("io1").unwrap();
}

#[test]
fn failed_remap_keeps_the_old_mapping() {
    let r = registry(&["io0", "io1", "io2"]);
    let d0 = dev(0);
    let old = [IoThreadVqMapping::new("io0"), IoThreadVqMapping::new("io1")];
    let mut a = r.acquire_vq_mapping(&old, 2, d0.clone()).unwrap();
    // The same six rules and messages as when the mapping was first applied.
    let cases = [
        (
            vec![IoThreadVqMapping::new("io9")],
            "IOThread \"io9\" object does not exist",
        ),
        (
            vec![IoThreadVqMapping::new("io2"), IoThreadVqMapping::new("io2")],
            "duplicate IOThread name \"io2\" in iothread-vq-mapping",
        ),
        (
            vec![
                IoThreadVqMapping::with_vqs("io2", [0]),
                IoThreadVqMapping::new("io1"),
            ],
            "either all items in iothread-vq-mapping must have vqs or none of them must have it",
        ),
        (
            vec![IoThreadVqMapping::with_vqs("io2", [0, 2])],
            "vq index 2 for IOThread \"io2\" must be less than num_queues 2 in iothread-vq-mapping",
        ),
        (
            vec![IoThreadVqMapping::with_vqs("io2", [0])],
            "missing vq 1 IOThread assignment in iothread-vq-mapping",
        ),
        (vec![], "iothread-vq-mapping must not be empty"),
    ];
    for (mapping, msg) in cases {
        let fresh = r.acquire_vq_mapping(&mapping, 2, dev(7)).unwrap_err();
        assert_eq!(fresh.to_string(), msg);
        let err = a.remap(&mapping).unwrap_err();
        assert_eq!(err.to_string(), msg);
        assert_eq!(a.mapping(), old);
        assert_eq!(r.holders("io0").unwrap(), vec![d0.clone()]);
        assert_eq!(r.holders("io1").unwrap(), vec![d0.clone()]);
        assert!(r.holders("io2").unwrap().is_empty());
    }
    // Overlapping mappings keep one registration per IOThread.
    a.remap(&[IoThreadVqMapping::new("io1"), IoThreadVqMapping::new("io2")])
        .unwrap();
    assert!(r.holders("io0").unwrap().is_empty());
    assert_eq!(r.holders("io1").unwrap(), vec![d0.clone()]);
    assert_eq!(r.holders("io2").unwrap(), vec![d0.clone()]);
    // The guards of the new mapping reach the new IOThreads.
    let tid = r.thread_id("io2").unwrap();
    let inside = a
        .guard_for_queue(1)
        .unwrap()
        .call(|_| std::fs::read_link("/proc/thread-self").unwrap())
        .unwrap();
    assert!(inside.ends_with(format!("task/{tid}")), "{inside:?}");
    a.release().unwrap();
    assert!(r.all_holders().iter().all(|(_, hs)| hs.is_empty()));
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

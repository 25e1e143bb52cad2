// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Every `iothread-vq-mapping` rule, assignment results, and a property test that
//! valid mappings assign every queue exactly once.

use iothread_registry::{assign_vqs, Error, IoThreadVqMapping, MappingError};
use proptest::prelude::*;

const KNOWN: [&str; 4] = ["io0", "io1", "io2", "io3"];

fn exists(id: &str) -> bool {
    KNOWN.contains(&id)
}

fn rr(ids: &[&str]) -> Vec<IoThreadVqMapping> {
    ids.iter().map(|id| IoThreadVqMapping::new(*id)).collect()
}

fn explicit(entries: &[(&str, &[u16])]) -> Vec<IoThreadVqMapping> {
    entries
        .iter()
        .map(|(id, vqs)| IoThreadVqMapping::with_vqs(*id, vqs.to_vec()))
        .collect()
}

fn mapping_err(m: &[IoThreadVqMapping], num_queues: u16) -> MappingError {
    match assign_vqs(m, num_queues, exists) {
        Err(Error::Mapping(e)) => e,
        other => panic!("expected a mapping error, got {other:?}"),
    }
}

#[test]
fn rule1_unknown_iothread() {
    let e = mapping_err(&rr(&["io0", "nope"]), 4);
    assert_eq!(
        e,
        MappingError::NoSuchIoThread {
            iothread: "nope".into()
        }
    );
    assert_eq!(e.to_string(), "IOThread \"nope\" object does not exist");
}

#[test]
fn rule2_duplicate_iothread() {
    let e = mapping_err(&rr(&["io0", "io1", "io0"]), 4);
    assert_eq!(
        e.to_string(),
        "duplicate IOThread name \"io0\" in iothread-vq-mapping"
    );
}

#[test]
fn rule3_mixed_vqs() {
    let m = vec![
        IoThreadVqMapping::with_vqs("io0", [0]),
        IoThreadVqMapping::new("io1"),
    ];
    assert_eq!(mapping_err(&m, 2), MappingError::MixedVqs);
    let m = vec![
        IoThreadVqMapping::new("io0"),
        IoThreadVqMapping::with_vqs("io1", [0]),
    ];
    let e = mapping_err(&m, 2);
    assert_eq!(
        e.to_string(),
        "either all items in iothread-vq-mapping must have vqs or none of them must have it"
    );
}

#[test]
fn rule4_vq_out_of_range() {
    let e = mapping_err(&explicit(&[("io0", &[0, 1]), ("io1", &[4])]), 4);
    assert_eq!(
        e.to_string(),
        "vq index 4 for IOThread \"io1\" must be less than num_queues 4 in iothread-vq-mapping"
    );
}

#[test]
fn rule5_vq_assigned_twice() {
    let e = mapping_err(&explicit(&[("io0", &[0, 1]), ("io1", &[2, 1])]), 3);
    assert_eq!(
        e,
        MappingError::VqAssignedTwice {
            vq: 1,
            iothread: "io1".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "cannot assign vq 1 to IOThread \"io1\" because it is already assigned"
    );
    // Twice within one entry counts too.
    let e = mapping_err(&explicit(&[("io0", &[0, 0])]), 1);
    assert_eq!(
        e,
        MappingError::VqAssignedTwice {
            vq: 0,
            iothread: "io0".into()
        }
    );
}

#[test]
fn rule6_vq_not_covered() {
    let e = mapping_err(&explicit(&[("io0", &[0, 3]), ("io1", &[1])]), 4);
    assert_eq!(e, MappingError::VqMissing { vq: 2 });
    assert_eq!(
        e.to_string(),
        "missing vq 2 IOThread assignment in iothread-vq-mapping"
    );
}

#[test]
fn checked_entry_by_entry_like_qemu() {
    // Entry 0 has an out-of-range queue, entry 1 names an unknown IOThread: QEMU
    // reports the first offending entry.
    let m = vec![
        IoThreadVqMapping::with_vqs("io0", [9]),
        IoThreadVqMapping::with_vqs("nope", [0]),
    ];
    assert!(matches!(
        mapping_err(&m, 2),
        MappingError::VqOutOfRange { vq: 9, .. }
    ));
    // Within one entry, existence comes before duplication and the vqs checks.
    let m = vec![
        IoThreadVqMapping::with_vqs("io0", [0]),
        IoThreadVqMapping::new("nope"),
    ];
    assert!(matches!(
        mapping_err(&m, 2),
        MappingError::NoSuchIoThread { .. }
    ));
    // Coverage (rule 6) is only checked after all entries passed rules 1-5.
    let m = explicit(&[("io0", &[0]), ("io1", &[0])]);
    assert!(matches!(
        mapping_err(&m, 3),
        MappingError::VqAssignedTwice { .. }
    ));
}

#[test]
fn round_robin_assignment() {
    let got = assign_vqs(&rr(&["io0", "io1", "io2"]), 8, exists).unwrap();
    assert_eq!(
        got,
        ["io0", "io1", "io2", "io0", "io1", "io2", "io0", "io1"]
    );
    // More IOThreads than queues: the extra ones get nothing.
    assert_eq!(
        assign_vqs(&rr(&["io3", "io2", "io1"]), 2, exists).unwrap(),
        ["io3", "io2"]
    );
}

#[test]
fn explicit_assignment() {
    let m = explicit(&[("io1", &[3, 0]), ("io0", &[1]), ("io2", &[2])]);
    assert_eq!(
        assign_vqs(&m, 4, exists).unwrap(),
        ["io1", "io0", "io2", "io1"]
    );
}

#[test]
fn json_form_matches_qemu() {
    let m: Vec<IoThreadVqMapping> = serde_json::from_str(
        r#"[{"iothread": "io0", "vqs": [0, 2]}, {"iothread": "io1", "vqs": [1, 3]}]"#,
    )
    .unwrap();
    assert_eq!(
        assign_vqs(&m, 4, exists).unwrap(),
        ["io0", "io1", "io0", "io1"]
    );
    assert_eq!(
        serde_json::to_string(&m).unwrap(),
        r#"[{"iothread":"io0","vqs":[0,2]},{"iothread":"io1","vqs":[1,3]}]"#
    );
    assert!(serde_json::from_str::<IoThreadVqMapping>(r#"{"iothread":"a","queues":[0]}"#).is_err());
    assert!(serde_json::from_str::<IoThreadVqMapping>(r#"{"vqs":[0]}"#).is_err());
    assert!(serde_json::from_str::<IoThreadVqMapping>(r#"{"iothread":"a","vqs":[-1]}"#).is_err());
}

/// A valid explicit mapping: a random partition of `0..n` among up to 4 IOThreads,
/// each getting at least one queue, queues in random order inside each entry.
fn explicit_partition() -> impl Strategy<Value = (u16, Vec<IoThreadVqMapping>)> {
    (1u16..64)
        .prop_flat_map(|n| (Just(n), 1..=usize::from(n).min(4)))
        .prop_flat_map(|(n, k)| {
            (
                Just(n),
                Just(k),
                proptest::collection::vec(0..k, usize::from(n)),
                Just((0..n).collect::<Vec<u16>>()).prop_shuffle(),
            )
        })
        .prop_map(|(n, k, mut owner, order)| {
            // The first k queues of the shuffled order go to distinct IOThreads so
            // that no entry is empty.
            for (i, &q) in order.iter().take(k).enumerate() {
                owner[usize::from(q)] = i;
            }
            let mut lists = vec![Vec::new(); k];
            for q in order {
                lists[owner[usize::from(q)]].push(q);
            }
            let m = lists
                .into_iter()
                .enumerate()
                .map(|(i, vqs)| IoThreadVqMapping::with_vqs(KNOWN[i], vqs))
                .collect();
            (n, m)
        })
}

proptest! {
    #[test]
    fn valid_explicit_mappings_assign_every_queue_once((n, m) in explicit_partition()) {
        let got = assign_vqs(&m, n, exists).unwrap();
        prop_assert_eq!(got.len(), usize::from(n));
        for entry in &m {
            for &q in entry.vqs.as_deref().unwrap() {
                prop_assert_eq!(&got[usize::from(q)], &entry.iothread);
            }
        }
        let total: usize = m.iter().map(|e| e.vqs.as_ref().unwrap().len()).sum();
        prop_assert_eq!(total, usize::from(n));
    }

    #[test]
    fn round_robin_assigns_every_queue_once(n in 0u16..200, k in 1usize..=4) {
        let m = rr(&KNOWN[..k]);
        let got = assign_vqs(&m, n, exists).unwrap();
        prop_assert_eq!(got.len(), usize::from(n));
        for (q, id) in got.iter().enumerate() {
            prop_assert_eq!(id.as_str(), KNOWN[q % k]);
        }
    }

    #[test]
    fn arbitrary_mappings_never_panic(
        entries in proptest::collection::vec(
            (0usize..6, proptest::option::of(proptest::collection::vec(any::<u16>(), 0..6))),
            0..6,
        ),
        n in any::<u16>(),
    ) {
        let names = ["io0", "io1", "io2", "io3", "x", "io0"];
        let m: Vec<IoThreadVqMapping> = entries
            .into_iter()
            .map(|(i, vqs)| IoThreadVqMapping { iothread: names[i].into(), vqs })
            .collect();
        if let Ok(got) = assign_vqs(&m, n, exists) {
            prop_assert_eq!(got.len(), usize::from(n));
        }
    }
}

#[test]
fn registry_applies_a_mapping_and_holds_every_iothread() {
    use iothread_registry::{IoThreadHolder, IoThreadParams, IoThreadRegistry};
    let r = IoThreadRegistry::new();
    for id in ["io0", "io1", "io2"] {
        r.create(id, IoThreadParams::default()).unwrap();
    }
    let dev = IoThreadHolder::qom_object("/machine/peripheral/blk0/virtio-backend");
    // Round-robin over 3 IOThreads with 2 queues: io2 gets no queue but is held.
    let a = r
        .acquire_vq_mapping(&rr(&["io0", "io1", "io2"]), 2, dev.clone())
        .unwrap();
    assert_eq!(a.num_queues(), 2);
    assert_eq!(a.iothread_for_queue(0), Some("io0"));
    assert_eq!(a.iothread_for_queue(1), Some("io1"));
    assert_eq!(a.iothread_for_queue(2), None);
    assert_eq!(a.guards().len(), 3);
    for id in ["io0", "io1", "io2"] {
        assert_eq!(r.holders(id).unwrap(), std::slice::from_ref(&dev));
    }
    // Each queue's guard runs work on its IOThread.
    let tid = a
        .guard_for_queue(1)
        .unwrap()
        .call(|_| std::fs::read_link("/proc/thread-self").unwrap())
        .unwrap();
    assert!(tid.ends_with(format!("task/{}", r.thread_id("io1").unwrap())));

    // An invalid mapping registers nothing.
    let bad = explicit(&[("io0", &[0]), ("io1", &[0])]);
    assert!(matches!(
        r.acquire_vq_mapping(&bad, 2, IoThreadHolder::block_node("x")),
        Err(Error::Mapping(MappingError::VqAssignedTwice { .. }))
    ));
    assert!(matches!(
        r.acquire_vq_mapping(&rr(&["io0", "nope"]), 2, IoThreadHolder::block_node("x")),
        Err(Error::Mapping(MappingError::NoSuchIoThread { .. }))
    ));
    assert_eq!(r.holders("io0").unwrap(), std::slice::from_ref(&dev));

    a.release().unwrap();
    for id in ["io0", "io1", "io2"] {
        assert!(r.holders(id).unwrap().is_empty());
    }
}

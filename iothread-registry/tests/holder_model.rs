// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Model-based property test: random sequences of acquire / guard release / guard
//! drop / delete / create against a plain list model (guards are the only way to
//! register and release a holder).

use iothread_registry::{Error, HolderGuard, IoThreadHolder, IoThreadParams, IoThreadRegistry};
use proptest::prelude::*;

const IDS: [&str; 2] = ["io0", "io1"];

#[derive(Clone, Debug)]
enum Op {
    Acquire(usize, usize),
    ReleaseGuard(usize),
    DropGuard(usize),
    Delete(usize),
    Create(usize),
}

fn holder(h: usize) -> IoThreadHolder {
    match h {
        0 => IoThreadHolder::qom_object("/machine/peripheral/blk0/virtio-backend"),
        1 => IoThreadHolder::qom_object("/machine/peripheral/blk1/virtio-backend"),
        2 => IoThreadHolder::block_node("disk0"),
        _ => IoThreadHolder::block_node("/machine/peripheral/blk0/virtio-backend"),
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..4usize).prop_map(|(t, h)| Op::Acquire(t, h)),
        2 => any::<usize>().prop_map(Op::ReleaseGuard),
        2 => any::<usize>().prop_map(Op::DropGuard),
        1 => (0..2usize).prop_map(Op::Delete),
        1 => (0..2usize).prop_map(Op::Create),
    ]
}

/// Removes the earliest entry equal to `h`, like the registry.
fn model_release(list: &mut Vec<IoThreadHolder>, h: &IoThreadHolder) -> bool {
    match list.iter().position(|x| x == h) {
        Some(pos) => {
            list.remove(pos);
            true
        }
        None => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn registry_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let r = IoThreadRegistry::new();
        // model[t] = Some(holder list) when IOThread t exists.
        let mut model: Vec<Option<Vec<IoThreadHolder>>> = vec![None, None];
        for (t, id) in IDS.iter().enumerate() {
            r.create(id, IoThreadParams::default()).unwrap();
            model[t] = Some(Vec::new());
        }
        // Creation generation of each IOThread id; guards remember theirs.
        let mut generation = [0u64; 2];
        let mut guards: Vec<(HolderGuard, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire(t, h) => {
                    // t == 2 names an IOThread that never exists.
                    let id = IDS.get(t).copied().unwrap_or("io9");
                    let res = r.acquire(id, holder(h));
                    match model.get_mut(t).and_then(Option::as_mut) {
                        Some(list) => {
                            list.push(holder(h));
                            guards.push((res.unwrap(), generation[t]));
                        }
                        None => {
                            let not_found = matches!(res, Err(Error::NotFound { .. }));
                            prop_assert!(not_found);
                        }
                    }
                }
                Op::ReleaseGuard(i) | Op::DropGuard(i) if !guards.is_empty() => {
                    // A guard releases "one matching entry": after a release by id
                    // it may find another registration of the same holder, or none.
                    let (g, gen) = guards.remove(i % guards.len());
                    let t = IDS.iter().position(|id| *id == g.iothread_id()).unwrap();
                    // Only the IOThread the guard was acquired from counts: a deleted
                    // and re-created IOThread with the same id is another one.
                    let expect = match model[t].as_mut() {
                        None => "not-found",
                        Some(_) if gen != generation[t] => "not-held",
                        Some(list) => {
                            if model_release(list, g.holder()) {
                                "ok"
                            } else {
                                "not-held"
                            }
                        }
                    };
                    if matches!(op, Op::ReleaseGuard(_)) {
                        let res = g.release();
                        let ok = match expect {
                            "ok" => res.is_ok(),
                            "not-held" => matches!(res, Err(Error::NotHeld { .. })),
                            _ => matches!(res, Err(Error::NotFound { .. })),
                        };
                        prop_assert!(ok, "expected {}, got {:?}", expect, res);
                    }
                }
                Op::ReleaseGuard(_) | Op::DropGuard(_) => {}
                Op::Delete(t) => {
                    let res = r.delete(IDS[t]);
                    match model[t].as_ref() {
                        None => {
                            let not_found = matches!(res, Err(Error::NotFound { .. }));
                            prop_assert!(not_found);
                        }
                        Some(list) if list.is_empty() => {
                            prop_assert!(res.is_ok());
                            model[t] = None;
                        }
                        Some(list) => match res {
                            Err(Error::InUse { holders, .. }) => prop_assert_eq!(&holders, list),
                            other => prop_assert!(false, "expected InUse, got {:?}", other),
                        },
                    }
                }
                Op::Create(t) => {
                    let res = r.create(IDS[t], IoThreadParams::default());
                    if model[t].is_some() {
                        let exists = matches!(res, Err(Error::AlreadyExists { .. }));
                        prop_assert!(exists);
                    } else {
                        prop_assert!(res.is_ok());
                        model[t] = Some(Vec::new());
                        generation[t] += 1;
                    }
                }
            }
            for (t, id) in IDS.iter().enumerate() {
                match &model[t] {
                    Some(list) => prop_assert_eq!(&r.holders(id).unwrap(), list),
                    None => prop_assert!(!r.contains(id)),
                }
            }
            let info: Vec<_> = r.query_iothreads().into_iter().map(|i| (i.id, i.holders)).collect();
            prop_assert_eq!(info.len(), model.iter().flatten().count());
        }
        // Dropping the remaining guards leaves every IOThread unheld.
        drop(guards);
        for id in r.ids() {
            prop_assert!(r.holders(&id).unwrap().is_empty());
            r.delete(&id).unwrap();
        }
    }
}

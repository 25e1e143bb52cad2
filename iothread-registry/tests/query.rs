// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Golden output of query-iothreads (JSON) and info iothreads (HMP), and the
//! property interface.

use iothread_registry::aio_poll::PollParams;
use iothread_registry::{Error, IoThreadHolder, IoThreadParams, IoThreadRegistry};
use proptest::prelude::*;

mod common;
use common::held;

const BLK0: &str = "/machine/peripheral/blk0/virtio-backend";

#[test]
fn query_iothreads_golden_json() {
    let r = IoThreadRegistry::new();
    r.create("iothread0", IoThreadParams::default()).unwrap();
    r.create(
        "iothread1",
        IoThreadParams::default()
            .with_poll(
                PollParams::default()
                    .with_max_ns(0)
                    .with_weight(0)
                    .with_grow(0)
                    .with_shrink(4),
            )
            .with_aio_max_batch(16),
    )
    .unwrap();
    let _a = r
        .acquire("iothread0", IoThreadHolder::qom_object(BLK0))
        .unwrap();
    let _b = r
        .acquire("iothread0", IoThreadHolder::block_node("disk0"))
        .unwrap();
    let _c = r
        .acquire("iothread0", IoThreadHolder::qom_object(BLK0))
        .unwrap();
    let t0 = r.thread_id("iothread0").unwrap();
    let t1 = r.thread_id("iothread1").unwrap();
    let json = serde_json::to_string(&r.query_iothreads()).unwrap();
    let expected = format!(
        concat!(
            r#"[{{"id":"iothread0","thread-id":{t0},"holders":["#,
            r#"{{"type":"qom-object","qom-path":"/machine/peripheral/blk0/virtio-backend"}},"#,
            r#"{{"type":"block-node","node-name":"disk0"}},"#,
            r#"{{"type":"qom-object","qom-path":"/machine/peripheral/blk0/virtio-backend"}}],"#,
            r#""poll-max-ns":32768,"poll-grow":2,"poll-shrink":2,"poll-weight":3,"aio-max-batch":0}},"#,
            r#"{{"id":"iothread1","thread-id":{t1},"holders":[],"#,
            r#""poll-max-ns":0,"poll-grow":2,"poll-shrink":4,"poll-weight":3,"aio-max-batch":16}}]"#
        ),
        t0 = t0,
        t1 = t1
    );
    assert_eq!(json, expected);
}

#[test]
fn info_iothreads_golden_text() {
    let r = IoThreadRegistry::new();
    r.create("iothread0", IoThreadParams::default()).unwrap();
    r.create("iothread1", IoThreadParams::default()).unwrap();
    let _a = r
        .acquire("iothread0", IoThreadHolder::qom_object(BLK0))
        .unwrap();
    let _b = r
        .acquire("iothread0", IoThreadHolder::block_node("disk0"))
        .unwrap();
    r.set_property("iothread1", "poll-weight", 5).unwrap();
    r.set_property("iothread1", "aio-max-batch", 32).unwrap();
    let t0 = r.thread_id("iothread0").unwrap();
    let t1 = r.thread_id("iothread1").unwrap();
    let expected = format!(
        "iothread0:
  thread_id={t0}
  holders=
    qom-object /machine/peripheral/blk0/virtio-backend
    block-node disk0
  poll-max-ns=32768
  poll-grow=2
  poll-shrink=2
  poll-weight=3
  aio-max-batch=0
iothread1:
  thread_id={t1}
  holders=
  poll-max-ns=32768
  poll-grow=2
  poll-shrink=2
  poll-weight=5
  aio-max-batch=32
"
    );
    assert_eq!(r.info_iothreads(), expected);
}

#[test]
fn properties_report_values_in_use() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    r.set_property("io0", "poll-grow", 0).unwrap();
    assert_eq!(r.get_property("io0", "poll-grow").unwrap(), 2);
    r.set_property("io0", "poll-max-ns", 100_000).unwrap();
    assert_eq!(r.get_property("io0", "poll-max-ns").unwrap(), 100_000);
    assert_eq!(r.params("io0").unwrap().poll.max_ns, 100_000);
    assert_eq!(r.query_iothreads()[0].poll_max_ns, 100_000);
    // The loop got them too.
    assert_eq!(
        held(&r, "io0")
            .call(|ctx| ctx.poll_params().max_ns)
            .unwrap(),
        100_000
    );
    r.set_property("io0", "aio-max-batch", 8).unwrap();
    assert_eq!(held(&r, "io0").call(|ctx| ctx.aio_max_batch()).unwrap(), 8);

    let err = r.set_property("io0", "poll-weight", 64).unwrap_err();
    assert_eq!(
        err.to_string(),
        "poll-weight value must be in range [0, 63]"
    );
    let err = r.set_property("io0", "poll-shrink", -1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "poll-shrink value must be in range [0, 9223372036854775807]"
    );
    let err = r.set_property("io0", "poll_max_ns", 1).unwrap_err();
    assert_eq!(err.to_string(), "Property 'iothread.poll_max_ns' not found");
    assert!(matches!(
        r.get_property("io0", "thread-id"),
        Err(Error::InvalidProperty { .. })
    ));
    assert!(matches!(
        r.set_property("nope", "poll-grow", 1),
        Err(Error::NotFound { .. })
    ));
    // Failed sets changed nothing.
    assert_eq!(r.get_property("io0", "poll-shrink").unwrap(), 2);
    assert_eq!(r.get_property("io0", "poll-weight").unwrap(), 3);

    let p = IoThreadParams::default()
        .with_poll(
            PollParams::default()
                .with_max_ns(1)
                .with_weight(7)
                .with_grow(3)
                .with_shrink(5),
        )
        .with_aio_max_batch(9);
    r.set_params("io0", p).unwrap();
    assert_eq!(r.params("io0").unwrap(), p);
    let bad = p.with_poll(p.poll.with_grow(-3));
    assert!(r.set_params("io0", bad).is_err());
    assert_eq!(r.params("io0").unwrap(), p);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn set_get_property_round_trip(
        ops in proptest::collection::vec(
            (proptest::sample::select(vec![
                "poll-max-ns", "poll-grow", "poll-shrink", "poll-weight", "aio-max-batch",
                "poll-max", "", "POLL-GROW", "poll-weight ",
            ]), -5i64..100),
            1..20,
        )
    ) {
        let r = IoThreadRegistry::new();
        r.create("io0", IoThreadParams::default()).unwrap();
        let mut model = IoThreadParams::default();
        for (name, value) in ops {
            let res = r.set_property("io0", name, value);
            match name.parse::<iothread_registry::Property>() {
                Err(_) => {
                    let refused = matches!(res, Err(Error::InvalidProperty { .. }));
                    prop_assert!(refused);
                }
                Ok(p) => {
                    let mut next = model;
                    match next.set(p, value) {
                        Ok(()) => {
                            prop_assert!(res.is_ok());
                            model = next.validate().unwrap();
                        }
                        Err(_) => {
                            let refused = matches!(res, Err(Error::InvalidValue { .. }));
                            prop_assert!(refused);
                        }
                    }
                }
            }
            for p in iothread_registry::Property::ALL {
                prop_assert_eq!(r.get_property("io0", p.name()).unwrap(), model.get(p));
            }
        }
    }
}

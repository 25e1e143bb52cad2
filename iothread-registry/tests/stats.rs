// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-IOThread statistics and CPU affinity.

mod common;

use common::held;

use iothread_registry::{Error, IoThreadParams, IoThreadRegistry, IoThreadState};

#[test]
fn stats_report_cpu_time_and_loop_counters() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    let s0 = r.stats("io0").unwrap();
    assert_eq!(s0.id, "io0");
    assert_eq!(s0.thread_id, r.thread_id("io0").unwrap());
    assert_eq!(s0.state, IoThreadState::Running);
    // Burn some CPU on the IOThread: its CPU time must grow.
    held(&r, "io0")
        .call(|_| {
            let mut x = 0u64;
            for i in 0..20_000_000u64 {
                x = x.wrapping_add(std::hint::black_box(i));
            }
            std::hint::black_box(x);
        })
        .unwrap();
    assert!(common::wait_until(
        || r.stats("io0").unwrap().poll.bh_runs > s0.poll.bh_runs
    ));
    let s1 = r.stats("io0").unwrap();
    assert!(
        s1.cpu_time_ns > s0.cpu_time_ns,
        "{} !> {}",
        s1.cpu_time_ns,
        s0.cpu_time_ns
    );
    assert!(s1.poll.iterations > s0.poll.iterations);
    // Serializable for a QMP/diagnostics front end.
    let json = serde_json::to_value(&s1).unwrap();
    assert_eq!(json["id"], "io0");
    assert!(json["cpu-time-ns"].as_u64().unwrap() > 0);
    assert!(matches!(r.stats("nope"), Err(Error::NotFound { .. })));
}

#[test]
fn affinity_set_and_get() {
    let r = IoThreadRegistry::new();
    r.create("io0", IoThreadParams::default()).unwrap();
    let all = r.affinity("io0").unwrap();
    assert!(!all.is_empty());
    let first = all[0];
    r.set_affinity("io0", &[first]).unwrap();
    assert_eq!(r.affinity("io0").unwrap(), [first]);
    // The IOThread really runs there.
    let cpu = held(&r, "io0")
        .call(|_| {
            // SAFETY: sched_getcpu(3) has no preconditions.
            unsafe { libc::sched_getcpu() }
        })
        .unwrap();
    assert_eq!(usize::try_from(cpu).unwrap(), first);
    r.set_affinity("io0", &all).unwrap();
    assert_eq!(r.affinity("io0").unwrap(), all);

    match r.set_affinity("io0", &[100_000]) {
        Err(Error::InvalidCpu { cpu, available }) => {
            assert_eq!(cpu, 100_000);
            assert!(!available.is_empty());
        }
        other => panic!("expected InvalidCpu, got {other:?}"),
    }
    assert!(matches!(
        r.set_affinity("io0", &[]),
        Err(Error::EmptyCpuList { .. })
    ));
    assert_eq!(r.affinity("io0").unwrap(), all, "unchanged after errors");
    assert!(matches!(r.affinity("nope"), Err(Error::NotFound { .. })));
}

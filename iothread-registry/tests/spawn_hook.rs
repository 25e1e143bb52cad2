// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The spawn hook: a seccomp filter (rust-vmm's seccompiler) and CPU affinity applied
//! on each new IOThread before its loop, with the IOThread still serving work; hook
//! failures and panics reported by `create`.

mod common;

// The downstream example is the filter under test: its allow-list and hook.
#[path = "../examples/seccomp_pool.rs"]
mod seccomp_pool;

use std::error::Error as _;
use std::sync::mpsc;
use std::time::Duration;

use common::{task_gone, TIMEOUT};
use iothread_registry::{Error, IoThreadHolder, IoThreadParams, IoThreadRegistry};

/// The last CPU this process may use (differs from the default "all CPUs" mask on
/// any machine with more than one).
fn last_allowed_cpu() -> usize {
    let r = IoThreadRegistry::new();
    r.create("probe", IoThreadParams::default()).unwrap();
    *r.affinity("probe").unwrap().last().unwrap()
}

#[test]
fn seccomp_filter_and_affinity_applied_and_the_iothread_still_serves() {
    let cpu = last_allowed_cpu();
    let filter = seccomp_pool::iothread_filter().unwrap();
    let r = seccomp_pool::locked_down_registry(filter, cpu);
    r.create("io0", IoThreadParams::default()).unwrap();
    r.create("io1", IoThreadParams::default()).unwrap();
    assert_eq!(r.affinity("io0").unwrap(), [cpu]);
    assert_eq!(r.affinity("io1").unwrap(), [cpu]);

    let g = r
        .acquire("io0", IoThreadHolder::block_node("disk0"))
        .unwrap();
    // The filter is in force on the IOThread: a syscall outside the allow-list fails
    // with EPERM there...
    let denied = g
        .call(|_| std::net::UdpSocket::bind("127.0.0.1:0").map(drop))
        .unwrap()
        .unwrap_err();
    assert_eq!(denied.raw_os_error(), Some(libc::EPERM), "{denied}");
    // ...and only there.
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap();

    // It still serves work: cross-thread submissions (eventfd wake-ups), calls,
    // bottom halves scheduled from inside, and timers.
    let (tx, rx) = mpsc::channel();
    for i in 0..50 {
        let tx = tx.clone();
        g.submit(move |_| tx.send(i).unwrap());
    }
    let got: Vec<i32> = (0..50).map(|_| rx.recv_timeout(TIMEOUT).unwrap()).collect();
    assert_eq!(got, (0..50).collect::<Vec<_>>());
    let tx_bh = tx.clone();
    let tx_timer = tx.clone();
    g.call(move |ctx| {
        ctx.schedule_oneshot(move |_| tx_bh.send(100).unwrap());
        let deadline = ctx.now_ns() + Duration::from_millis(5).as_nanos() as u64;
        let mut tx_timer = Some(tx_timer);
        ctx.add_timer(deadline, None, move |_| {
            if let Some(tx) = tx_timer.take() {
                tx.send(200).unwrap();
            }
        });
    })
    .unwrap();
    let mut late: Vec<i32> = (0..2).map(|_| rx.recv_timeout(TIMEOUT).unwrap()).collect();
    late.sort_unstable();
    assert_eq!(late, [100, 200]);
    let on_cpu = g
        .call(|_| {
            // SAFETY: sched_getcpu(3) has no preconditions.
            unsafe { libc::sched_getcpu() }
        })
        .unwrap();
    assert_eq!(usize::try_from(on_cpu).unwrap(), cpu);
    // Statistics (read from outside) and a clean stop under the filter.
    assert!(r.stats("io0").unwrap().poll.iterations > 0);
    drop(g);
    let tid = r.thread_id("io1").unwrap();
    r.delete("io1").unwrap();
    assert!(task_gone(tid));
}

#[test]
fn hook_errors_and_panics_fail_create() {
    let r = IoThreadRegistry::with_spawn_hook(|info| match info.id {
        "refused" => Err("cgroup not writable".into()),
        "panics" => panic!("hook bug"),
        _ => Ok(()),
    });
    let err = r.create("refused", IoThreadParams::default()).unwrap_err();
    assert!(matches!(&err, Error::SpawnHook { id, .. } if id == "refused"));
    assert_eq!(
        err.to_string(),
        "the spawn hook failed for IOThread 'refused'"
    );
    assert_eq!(err.source().unwrap().to_string(), "cgroup not writable");
    let err = r.create("panics", IoThreadParams::default()).unwrap_err();
    assert_eq!(
        err.source().unwrap().to_string(),
        "the spawn hook panicked: hook bug"
    );
    // Nothing was registered and no thread is left; the id stays free.
    assert!(r.ids().is_empty());
    let leftover = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .any(|comm| comm.starts_with("IO refused") || comm.starts_with("IO panics"))
    };
    assert!(
        common::wait_until(|| !leftover()),
        "an IOThread whose hook failed is still running"
    );
    r.create("io0", IoThreadParams::default()).unwrap();
    assert_eq!(r.ids(), ["io0"]);
}

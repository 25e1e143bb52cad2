// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Generous: the test machine is shared with parallel builds.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `cond` until it holds or [`TIMEOUT`] passes; returns whether it held.
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < TIMEOUT {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Whether the host thread `tid` of this process still exists.
pub fn task_exists(tid: i64) -> bool {
    std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// The kernel's name of thread `tid` of this process.
pub fn task_comm(tid: i64) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap()
        .trim_end()
        .to_owned()
}

/// Whether thread `tid` is gone. A joined thread may linger in /proc for a moment
/// after `join` returns (the kernel wakes the joiner before reaping the task), so
/// this waits for it to disappear.
pub fn task_gone(tid: i64) -> bool {
    wait_until(|| !task_exists(tid))
}

/// A holder registration on IOThread `id` of `r`: the way to run work there.
pub fn held(r: &iothread_registry::IoThreadRegistry, id: &str) -> iothread_registry::HolderGuard {
    r.acquire(id, iothread_registry::IoThreadHolder::block_node("test"))
        .unwrap()
}

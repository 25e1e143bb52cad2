// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An idle loop burns no CPU.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use aio_poll::{AioContext, PollParams};
use common::{add_queue, thread_cpu_time_ns, with_watchdog, Probe, Queue};

/// Runs the loop on its own thread while it is idle for ~300 ms and returns
/// the CPU time the loop thread consumed.
fn idle_cpu_ns(params: PollParams, with_poll_handler: bool) -> (u64, u64) {
    with_watchdog(60, move || {
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut ctx = AioContext::with_params(params).unwrap();
            let q = Queue::new();
            let probe = Probe::default();
            if with_poll_handler {
                // Some activity first so that the handler is on the poll list
                // with a non-zero window when the loop goes idle.
                add_queue(&mut ctx, &q, &probe);
                for _ in 0..100 {
                    q.push();
                    ctx.poll(true).unwrap();
                }
            }
            tx.send(ctx.handle()).unwrap();
            let cpu0 = thread_cpu_time_ns();
            let mut iterations = 0u64;
            // Woken only by request_stop after ~300 ms.
            ctx.run(|_| {
                iterations += 1;
                false
            })
            .unwrap();
            (thread_cpu_time_ns() - cpu0, iterations)
        });
        let handle = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        handle.request_stop();
        t.join().unwrap()
    })
}

#[test]
fn zero_cpu_while_idle_without_polling() {
    let (cpu, iterations) = idle_cpu_ns(PollParams::disabled(), false);
    // Generous bound for a loaded machine: one epoll_wait + wake-up.
    assert!(cpu < 20_000_000, "idle loop used {cpu} ns of CPU");
    assert!(iterations <= 3, "idle loop iterated {iterations} times");
}

#[test]
fn zero_cpu_while_idle_with_polling_enabled() {
    // max_ns = 0 with a poll handler: it never even joins the poll list.
    let (cpu, _) = idle_cpu_ns(PollParams::disabled(), true);
    assert!(cpu < 20_000_000, "idle loop used {cpu} ns of CPU");
    // Default params: after the last event, at most one 32 µs window is
    // spent polling, then the loop sleeps.
    let (cpu, iterations) = idle_cpu_ns(PollParams::default(), true);
    assert!(cpu < 20_000_000, "idle loop used {cpu} ns of CPU");
    assert!(iterations <= 3, "idle loop iterated {iterations} times");
}

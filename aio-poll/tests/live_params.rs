// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Changing the polling parameters from another thread while the loop runs.

mod common;

use std::sync::atomic::Ordering;

use aio_poll::{AioContext, PollAlgorithm, PollParams};
use common::{add_queue, with_watchdog, Probe, Queue};

#[test]
fn live_param_change_resets_state_and_shows_in_stats() {
    with_watchdog(120, || {
        let mut ctx =
            AioContext::with_params(PollParams::default().with_max_ns(50_000_000)).unwrap();
        let handle = ctx.handle();
        let q = Queue::new();
        let probe = Probe::default();
        add_queue(&mut ctx, &q, &probe);
        // Build up adaptive state: events ~1 ms apart.
        let q2 = q.clone();
        let loop_thread = std::thread::spawn(move || {
            ctx.run(|_| false).unwrap();
            ctx
        });
        for i in 1..=20u64 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            q2.push();
            while q2.consumed.load(Ordering::SeqCst) < i {
                std::thread::yield_now();
            }
        }
        let before = handle.stats();
        assert!(before.poll_ns > 0, "no adaptive state built: {before:?}");
        assert!(before.handlers.iter().any(|h| h.ns > 0));
        // The histogram saw the polling-enabled iterations.
        let h = &before.poll_ns_histogram;
        assert!(h.samples > 0 && h.samples <= before.iterations);
        assert!(h.mean_poll_ns() > 0.0);
        assert_eq!(h.buckets.iter().sum::<u64>(), h.samples);
        assert!(h.handler_updates > 0);
        assert!(before.grow_count > 0);
        assert_eq!(before.param_updates, 0);

        // Invalid values are rejected at once with a clear message.
        let e = handle
            .set_poll_params(PollParams::default().with_weight(64))
            .unwrap_err();
        assert_eq!(e.to_string(), "poll-weight value must be in range [0, 63]");
        let e = handle
            .set_poll_params(PollParams::default().with_max_ns(-5))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "poll-max-ns value must be in range [0, 9223372036854775807]"
        );

        let new = PollParams::default()
            .with_max_ns(40_000_000)
            .with_grow_shrink(0, 4)
            .with_weight(5)
            .with_algorithm(PollAlgorithm::Classic);
        handle.set_poll_params(new).unwrap();
        // Queries report effective values (grow 0 -> 2), immediately.
        assert_eq!(handle.poll_params().grow, 2);
        assert_eq!(handle.poll_params().weight, 5);
        // The loop applies it (it was woken) without any event.
        let mut spins = 0u64;
        let after = loop {
            let s = handle.stats();
            if s.param_updates == 1 {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            spins += 1;
            assert!(spins < 60_000);
        };
        assert_eq!(after.params, new.with_grow(2));
        assert_eq!(after.poll_ns, 0, "poll_ns reset");
        assert!(
            after.handlers.iter().all(|h| h.ns == 0),
            "handler ns reset: {:?}",
            after.handlers
        );

        // Still works afterwards.
        q2.push();
        while q2.consumed.load(Ordering::SeqCst) < 21 {
            std::thread::yield_now();
        }
        handle.request_stop();
        let ctx = loop_thread.join().unwrap();
        assert_eq!(ctx.poll_params().algorithm, PollAlgorithm::Classic);
        assert_eq!(ctx.poll_params().max_ns, 40_000_000);
    });
}

#[test]
fn disabling_polling_leaves_poll_mode() {
    let mut ctx = AioContext::new().unwrap();
    let q = Queue::new();
    let probe = Probe::default();
    let id = add_queue(&mut ctx, &q, &probe);
    q.push();
    assert!(ctx.poll(true).unwrap());
    assert!(ctx.is_on_poll_list(id));
    ctx.set_poll_params(PollParams::disabled()).unwrap();
    assert!(!ctx.is_on_poll_list(id));
    assert!(!ctx.in_poll_mode());
    assert_eq!(Probe::get(&probe.begins), Probe::get(&probe.ends));
    assert_eq!(ctx.stats().param_updates, 1);
    assert!(ctx
        .set_poll_params(PollParams::default().with_grow_shrink(-1, 0))
        .is_err());
    assert_eq!(
        ctx.poll_params().max_ns,
        0,
        "a rejected change leaves params untouched"
    );
}

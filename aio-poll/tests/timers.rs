// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Timers and bottom halves.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aio_poll::{AioContext, ManualClock, PollParams};
use common::with_watchdog;

#[test]
fn timer_order_deterministic_clock() {
    let clock = ManualClock::new(1_000);
    let mut ctx = AioContext::with_clock(PollParams::disabled(), Arc::new(clock.clone())).unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    for (name, deadline) in [
        ("c", 4_000u64),
        ("a", 2_000),
        ("b1", 3_000),
        ("b2", 3_000),
        ("d", 10_000),
    ] {
        let o = order.clone();
        ctx.add_timer(deadline, None, move |_| o.lock().unwrap().push(name));
    }
    assert!(!ctx.poll(false).unwrap());
    clock.set(3_000);
    assert!(ctx.poll(false).unwrap());
    assert_eq!(*order.lock().unwrap(), vec!["a", "b1", "b2"]);
    clock.set(9_999);
    assert!(ctx.poll(false).unwrap());
    clock.set(10_000);
    assert!(ctx.poll(false).unwrap());
    assert_eq!(*order.lock().unwrap(), vec!["a", "b1", "b2", "c", "d"]);
    assert_eq!(ctx.timer_count(), 0);
    assert!(!ctx.poll(false).unwrap());
}

#[test]
fn periodic_and_cancel() {
    let clock = ManualClock::new(0);
    let mut ctx = AioContext::with_clock(PollParams::disabled(), Arc::new(clock.clone())).unwrap();
    let ticks = Arc::new(AtomicU64::new(0));
    let t = ticks.clone();
    let periodic = ctx.add_timer(100, Some(100), move |_| {
        t.fetch_add(1, Ordering::SeqCst);
    });
    let cancelled = ctx.add_timer(150, None, |_| panic!("cancelled timer ran"));
    assert!(ctx.cancel_timer(cancelled));
    assert!(!ctx.cancel_timer(cancelled));
    for now in [100u64, 200, 250, 300] {
        clock.set(now);
        ctx.poll(false).unwrap();
    }
    assert_eq!(ticks.load(Ordering::SeqCst), 3);
    // Far behind: one run, missed periods skipped.
    clock.set(10_000);
    ctx.poll(false).unwrap();
    assert_eq!(ticks.load(Ordering::SeqCst), 4);
    assert!(ctx.cancel_timer(periodic));
    clock.set(20_000);
    assert!(!ctx.poll(false).unwrap());
    assert_eq!(ticks.load(Ordering::SeqCst), 4);
}

#[test]
fn timer_cancels_itself_and_adds_another() {
    let clock = ManualClock::new(0);
    let mut ctx = AioContext::with_clock(PollParams::disabled(), Arc::new(clock.clone())).unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let id_cell = Arc::new(Mutex::new(None));
    let (r, idc) = (runs.clone(), id_cell.clone());
    let id = ctx.add_timer(10, Some(10), move |ctx| {
        r.fetch_add(1, Ordering::SeqCst);
        let me = idc.lock().unwrap().expect("id");
        assert!(ctx.cancel_timer(me));
        let r2 = r.clone();
        // Already expired, runs on the next iteration (never unbounded).
        ctx.add_timer(0, None, move |_| {
            r2.fetch_add(10, Ordering::SeqCst);
        });
    });
    *id_cell.lock().unwrap() = Some(id);
    clock.set(10);
    assert!(ctx.poll(false).unwrap());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(ctx.poll(false).unwrap());
    assert_eq!(runs.load(Ordering::SeqCst), 11);
    assert_eq!(ctx.timer_count(), 0);
}

/// Real clock: the blocking timeout respects the timer deadlines (including
/// with polling enabled) and timers run in deadline order.
#[test]
fn blocking_waits_for_timers_in_order() {
    for params in [PollParams::disabled(), PollParams::default()] {
        with_watchdog(60, move || {
            let mut ctx = AioContext::with_params(params).unwrap();
            let order = Arc::new(Mutex::new(Vec::new()));
            let now = ctx.now_ns();
            for (k, ms) in [(3u32, 3u64), (1, 1), (2, 2), (4, 4)] {
                let o = order.clone();
                ctx.add_timer(now + ms * 1_000_000, None, move |ctx| {
                    o.lock().unwrap().push((k, ctx.now_ns()));
                });
            }
            ctx.run(|ctx| ctx.timer_count() == 0).unwrap();
            let order = order.lock().unwrap();
            let ks: Vec<u32> = order.iter().map(|x| x.0).collect();
            assert_eq!(ks, vec![1, 2, 3, 4]);
            // Never early.
            for (k, t) in order.iter() {
                assert!(*t >= now + u64::from(*k) * 1_000_000);
            }
        });
    }
}

#[test]
fn bottom_halves() {
    with_watchdog(60, || {
        let mut ctx = AioContext::new().unwrap();
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let bh = ctx.new_bh(move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        });
        // Schedule from another thread; schedule twice = one run.
        let b2 = bh.clone();
        std::thread::spawn(move || {
            b2.schedule();
            b2.schedule();
        })
        .join()
        .unwrap();
        assert!(bh.is_scheduled());
        assert!(ctx.poll(true).unwrap());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(!bh.is_scheduled());
        // Cancel.
        bh.schedule();
        bh.cancel();
        assert!(!ctx.poll(false).unwrap());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Idle BH: poll(true) wakes by itself (10 ms) and runs it; idle work
        // is not progress.
        bh.schedule_idle();
        ctx.poll(true).unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // A normal schedule upgrades an idle one.
        bh.schedule_idle();
        bh.schedule();
        assert!(ctx.poll(true).unwrap());
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        // A BH rescheduling itself runs once per iteration.
        let cell: Arc<Mutex<Option<aio_poll::Bh>>> = Arc::new(Mutex::new(None));
        let (c2, r3) = (cell.clone(), runs.clone());
        let again = ctx.new_bh(move |_| {
            if r3.fetch_add(1, Ordering::SeqCst) < 5 {
                if let Some(b) = c2.lock().unwrap().as_ref() {
                    b.schedule();
                }
            }
        });
        *cell.lock().unwrap() = Some(again.clone());
        again.schedule();
        assert!(ctx.poll(false).unwrap());
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        while ctx.poll(false).unwrap() {}
        assert_eq!(runs.load(Ordering::SeqCst), 6);
        cell.lock().unwrap().take();
        // Dropping every clone deletes the BH: a pending run is skipped.
        bh.schedule();
        drop(bh);
        assert!(!ctx.poll(false).unwrap());
        assert_eq!(runs.load(Ordering::SeqCst), 6);
        assert_eq!(ctx.stats().bh_runs, 6);
    });
}

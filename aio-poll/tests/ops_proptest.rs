// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Random sequences of API operations (the same shape a fuzz target would
//! use): the context never panics, ids stay valid exactly while their
//! handler exists, and callbacks removing handlers never touch freed ones.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aio_poll::{
    AioContext, FdHandler, HandlerId, Interest, ManualClock, PollAlgorithm, PollHandler,
    PollParams, Readiness, SharedEventFd,
};
use proptest::prelude::*;
use vmm_sys_util::eventfd::EventFd;

#[derive(Clone, Debug)]
enum Op {
    Add {
        poll: bool,
    },
    Remove(usize),
    Modify(usize, u8),
    Kick(usize),
    /// The handler at index .0 removes the handler at index .1 when it runs.
    Script(usize, usize),
    Poll,
    Advance(u64),
    AddTimer(u64, bool),
    CancelTimer(usize),
    Oneshot,
    Params(i64, i64, i64, i64, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<bool>().prop_map(|poll| Op::Add { poll }),
        (0usize..8).prop_map(Op::Remove),
        (0usize..8, 0u8..4).prop_map(|(i, m)| Op::Modify(i, m)),
        (0usize..8).prop_map(Op::Kick),
        (0usize..8, 0usize..8).prop_map(|(a, b)| Op::Script(a, b)),
        Just(Op::Poll),
        Just(Op::Poll),
        (0u64..100_000).prop_map(Op::Advance),
        (0u64..100_000, any::<bool>()).prop_map(|(d, p)| Op::AddTimer(d, p)),
        (0usize..8).prop_map(Op::CancelTimer),
        Just(Op::Oneshot),
        (any::<i64>(), -2i64..10, -2i64..10, -2i64..70, any::<bool>())
            .prop_map(|(m, g, s, w, c)| Op::Params(m, g, s, w, c)),
    ]
}

type Scripts = Arc<Mutex<HashMap<HandlerId, HandlerId>>>;

struct H {
    me: Arc<Mutex<Option<HandlerId>>>,
    efd: SharedEventFd,
    scripts: Scripts,
    calls: Arc<AtomicU64>,
}

impl H {
    fn run(&mut self, ctx: &mut AioContext) {
        let _ = self.efd.read();
        self.calls.fetch_add(1, Ordering::SeqCst);
        let me = *self.me.lock().unwrap();
        let target = me.and_then(|m| self.scripts.lock().unwrap().remove(&m));
        if let Some(t) = target {
            // May be ourselves, may be gone already: must never panic.
            let _ = ctx.remove_handler(t);
        }
    }
}

impl FdHandler for H {
    fn ready(&mut self, ctx: &mut AioContext, ready: Readiness) {
        assert!(!ready.is_empty());
        self.run(ctx);
    }
}

impl PollHandler for H {
    fn poll(&mut self) -> bool {
        false
    }
    fn poll_ready(&mut self, ctx: &mut AioContext) {
        self.run(ctx);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn random_operations(ops in proptest::collection::vec(op(), 1..80)) {
        let clock = ManualClock::new(1_000_000);
        let mut ctx = AioContext::with_clock(PollParams::default(), Arc::new(clock.clone())).unwrap();
        let scripts: Scripts = Arc::new(Mutex::new(HashMap::new()));
        let calls = Arc::new(AtomicU64::new(0));
        let mut ids: Vec<HandlerId> = Vec::new();
        let mut writers: HashMap<HandlerId, SharedEventFd> = HashMap::new();
        let mut timers = Vec::new();
        for op in ops {
            match op {
                Op::Add { poll } => {
                    let efd = SharedEventFd::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
                    let writer = efd.clone();
                    let me = Arc::new(Mutex::new(None));
                    let h = H { me: me.clone(), efd: efd.clone(), scripts: scripts.clone(), calls: calls.clone() };
                    let id = if poll {
                        ctx.add_polled_fd_handler(efd, Interest::READABLE, h).unwrap()
                    } else {
                        ctx.add_fd_handler(efd, Interest::READABLE, h).unwrap()
                    };
                    *me.lock().unwrap() = Some(id);
                    ids.push(id);
                    writers.insert(id, writer);
                }
                Op::Remove(i) => {
                    if let Some(id) = ids.get(i % ids.len().max(1)).copied() {
                        let existed = ctx.contains_handler(id);
                        prop_assert_eq!(ctx.remove_handler(id).is_ok(), existed);
                        prop_assert!(!ctx.contains_handler(id));
                    }
                }
                Op::Modify(i, m) => {
                    if let Some(id) = ids.get(i % ids.len().max(1)).copied() {
                        let interest = match m {
                            0 => Interest::empty(),
                            1 => Interest::READABLE,
                            2 => Interest::WRITABLE,
                            _ => Interest::READABLE | Interest::WRITABLE,
                        };
                        let existed = ctx.contains_handler(id);
                        prop_assert_eq!(ctx.set_interest(id, interest).is_ok(), existed);
                    }
                }
                Op::Kick(i) => {
                    if let Some(id) = ids.get(i % ids.len().max(1)) {
                        if let Some(w) = writers.get(id) {
                            w.write(1).unwrap();
                        }
                    }
                }
                Op::Script(a, b) => {
                    let n = ids.len().max(1);
                    if let (Some(x), Some(y)) = (ids.get(a % n), ids.get(b % n)) {
                        scripts.lock().unwrap().insert(*x, *y);
                    }
                }
                Op::Poll => {
                    ctx.poll(false).unwrap();
                }
                Op::Advance(d) => clock.advance(d),
                Op::AddTimer(d, periodic) => {
                    let deadline = ctx.now_ns() + d;
                    let c = calls.clone();
                    timers.push(ctx.add_timer(deadline, periodic.then_some(d), move |_| {
                        c.fetch_add(1, Ordering::SeqCst);
                    }));
                }
                Op::CancelTimer(i) => {
                    if let Some(t) = timers.get(i % timers.len().max(1)) {
                        ctx.cancel_timer(*t);
                    }
                }
                Op::Oneshot => {
                    let c = calls.clone();
                    ctx.schedule_oneshot(move |_| {
                        c.fetch_add(1, Ordering::SeqCst);
                    });
                }
                Op::Params(max_ns, grow, shrink, weight, classic) => {
                    let p = PollParams::default()
                        .with_max_ns(max_ns)
                        .with_grow_shrink(grow, shrink)
                        .with_weight(weight)
                        .with_algorithm(if classic { PollAlgorithm::Classic } else { PollAlgorithm::Weighted });
                    let expect = p.validate();
                    let got = ctx.set_poll_params(p);
                    prop_assert_eq!(got.is_ok(), expect.is_ok());
                    if let Ok(eff) = expect {
                        prop_assert_eq!(ctx.poll_params(), eff);
                    }
                }
            }
            let live = ids.iter().filter(|id| ctx.contains_handler(**id)).count();
            prop_assert_eq!(live, ctx.handler_count());
            let s = ctx.stats();
            prop_assert!(s.poll_ns <= u64::try_from(ctx.poll_params().max_ns).unwrap_or(0));
            prop_assert!(s.handlers.len() <= ctx.handler_count());
        }
        // Drain; ends with a consistent, quiet context.
        for _ in 0..4 {
            ctx.poll(false).unwrap();
        }
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! aio-poll nested in a rust-vmm `event-manager` loop, as a Firecracker-style
//! VMM would run it: one outer loop, an `AioContext` subscriber with a
//! polled virtqueue-like handler, a plain fd handler and a periodic timer,
//! next to the VMM's own subscriber. Adaptive polling and timers keep
//! working with no timeout plumbing: the outer loop just calls `run()`.
//!
//! ```text
//! cargo run -p aio-poll --features event-manager --example nested_event_manager
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aio_poll::{
    AioContext, FdHandler, Interest, NestedContext, PollHandler, PollParams, Readiness,
    SharedEventFd,
};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A virtqueue stand-in shared with the "guest" thread: it publishes entries
/// and kicks the eventfd only while the device wants notifications.
struct Ring {
    produced: AtomicU64,
    consumed: AtomicU64,
    notify: AtomicBool,
    kick: SharedEventFd,
    kicks: AtomicU64,
}

impl Ring {
    fn push(&self) {
        self.produced.fetch_add(1, Ordering::SeqCst);
        if self.notify.load(Ordering::SeqCst) {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            let _ = self.kick.write(1);
        }
    }
}

/// The device side: an fd handler on the kick eventfd that can also be polled.
struct Device {
    ring: Arc<Ring>,
    from_poll: u64,
    from_fd: u64,
}

impl Device {
    fn drain(&self) {
        let p = self.ring.produced.load(Ordering::SeqCst);
        self.ring.consumed.store(p, Ordering::SeqCst);
    }
}

impl FdHandler for Device {
    fn ready(&mut self, _ctx: &mut AioContext, _ready: Readiness) {
        let _ = self.ring.kick.read();
        self.from_fd += 1;
        self.drain();
    }
}

impl PollHandler for Device {
    fn poll(&mut self) -> bool {
        self.ring.produced.load(Ordering::SeqCst) > self.ring.consumed.load(Ordering::SeqCst)
    }
    fn poll_ready(&mut self, _ctx: &mut AioContext) {
        self.from_poll += 1;
        self.drain();
    }
    fn poll_begin(&mut self) {
        // virtio: set VRING_USED_F_NO_NOTIFY.
        self.ring.notify.store(false, Ordering::SeqCst);
    }
    fn poll_end(&mut self) {
        self.ring.notify.store(true, Ordering::SeqCst);
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        println!(
            "device: {} dispatches found by polling, {} by the kick eventfd",
            self.from_poll, self.from_fd
        );
    }
}

/// The VMM's own subscriber (say, a serial console input).
struct Console {
    input: EventFd,
    lines: u64,
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.input, EventSet::IN))
            .expect("register console input");
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.input.read();
        self.lines += 1;
    }
}

/// event-manager holds one subscriber type: an enum of ours (the context
/// is large, so it is boxed).
enum Subscriber {
    Aio(Box<NestedContext>),
    Console(Console),
}

impl MutEventSubscriber for Subscriber {
    fn init(&mut self, ops: &mut EventOps) {
        match self {
            Subscriber::Aio(s) => s.init(ops),
            Subscriber::Console(s) => s.init(ops),
        }
    }
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self {
            Subscriber::Aio(s) => s.process(events, ops),
            Subscriber::Console(s) => s.process(events, ops),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut ctx = AioContext::with_params(PollParams::default())?;

    // The polled device.
    let ring = Arc::new(Ring {
        produced: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        notify: AtomicBool::new(true),
        kick: SharedEventFd::new(EventFd::new(EFD_NONBLOCK)?),
        kicks: AtomicU64::new(0),
    });
    ctx.add_polled_fd_handler(
        ring.kick.clone(),
        Interest::READABLE,
        Device {
            ring: ring.clone(),
            from_poll: 0,
            from_fd: 0,
        },
    )?;

    // A plain fd handler: a control eventfd whose value is a command.
    let control = SharedEventFd::new(EventFd::new(EFD_NONBLOCK)?);
    let reader = control.clone();
    let commands = Arc::new(AtomicU64::new(0));
    let c = commands.clone();
    ctx.add_fd_handler(
        control.clone(),
        Interest::READABLE,
        aio_poll::FnHandler::new(move |_ctx, ready| {
            if ready.is_readable() {
                c.fetch_add(reader.read().unwrap_or(0), Ordering::SeqCst);
            }
        }),
    )?;

    // A periodic timer: wakes the outer loop by itself (internal timerfd).
    let ticks = Arc::new(AtomicU64::new(0));
    let t = ticks.clone();
    let now = ctx.now_ns();
    ctx.add_timer(now + 10_000_000, Some(10_000_000), move |_ctx| {
        t.fetch_add(1, Ordering::SeqCst);
    });

    let mut em = EventManager::<Subscriber>::new()?;
    let aio = em.add_subscriber(Subscriber::Aio(Box::new(NestedContext::new(ctx)?)));
    let console_in = EventFd::new(EFD_NONBLOCK)?;
    let console_writer = console_in.try_clone()?;
    let console = em.add_subscriber(Subscriber::Console(Console {
        input: console_in,
        lines: 0,
    }));

    // The "guest": 20 000 requests 10 µs apart (each after the previous one
    // completed), plus a console line and a control command now and then.
    const REQUESTS: u64 = 20_000;
    let guest_ring = ring.clone();
    let guest = std::thread::spawn(move || {
        for i in 1..=REQUESTS {
            guest_ring.push();
            while guest_ring.consumed.load(Ordering::SeqCst) < i {
                std::hint::spin_loop();
            }
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_micros(10) {
                std::hint::spin_loop();
            }
            if i % 5000 == 0 {
                let _ = console_writer.write(1);
                let _ = control.write(1);
            }
        }
    });

    let started = Instant::now();
    while ring.consumed.load(Ordering::SeqCst) < REQUESTS || ticks.load(Ordering::SeqCst) < 3 {
        // No timeout to compute: the nested context keeps the loop from
        // blocking while it polls, and its timerfd wakes it for timers.
        em.run()?;
    }
    guest.join().expect("guest thread");
    let elapsed = started.elapsed();

    let Ok(Subscriber::Aio(nested)) = em.subscriber_mut(aio) else {
        return Err("aio subscriber missing".into());
    };
    if let Some(e) = nested.take_error() {
        return Err(e.into());
    }
    let stats = nested.context().stats();
    println!(
        "{REQUESTS} requests in {:.1} ms, {} kicks ({} avoided by polling), \
         successful polls {}, poll_ns now {} ns, timer ticks {}, control commands {}",
        elapsed.as_secs_f64() * 1e3,
        ring.kicks.load(Ordering::Relaxed),
        REQUESTS - ring.kicks.load(Ordering::Relaxed),
        stats.successful_polls,
        stats.poll_ns,
        ticks.load(Ordering::SeqCst),
        commands.load(Ordering::SeqCst),
    );
    if let Ok(Subscriber::Console(c)) = em.subscriber_mut(console) {
        println!("console lines served by the same outer loop: {}", c.lines);
    }
    // Back to a standalone context, e.g. to move it to its own thread.
    let Subscriber::Aio(nested) = em.remove_subscriber(aio)? else {
        return Err("aio subscriber missing".into());
    };
    let ctx = nested.into_inner();
    println!("handlers still registered: {}", ctx.handler_count());
    Ok(())
}

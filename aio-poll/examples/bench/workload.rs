// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The emulated guest: a virtqueue-like ring per queue, a producer thread that
//! submits one request at a time per queue (closed loop, iodepth 1, like fio)
//! after a think time, and kicks the eventfd only when the device has
//! notifications enabled (virtio NO_NOTIFY, toggled by poll_begin/poll_end).

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use aio_poll::SharedEventFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `clock_gettime(id)` in ns (0 if the clock is invalid).
pub fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// `CLOCK_MONOTONIC` in ns.
#[inline]
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time of the calling thread in ns.
pub fn thread_cpu_time_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Ring slots (the queue never holds more than `depth` = 1 entry, the ring
/// is there to carry the publish timestamps like descriptors would).
pub const RING: usize = 64;

/// One virtqueue shared between the guest (producer) and the device (consumer).
pub struct Queue {
    ring: Vec<AtomicU64>,
    /// Entries published by the guest (avail idx).
    pub produced: AtomicU64,
    /// Entries completed by the device (used idx).
    pub consumed: AtomicU64,
    /// Device wants kicks (virtio: NO_NOTIFY clear).
    pub notify_enabled: AtomicBool,
    /// The kick eventfd.
    pub kick: SharedEventFd,
    /// Kicks written.
    pub kicks: AtomicU64,
    /// Publishes that needed no kick because the device was polling.
    pub kicks_avoided: AtomicU64,
}

impl Queue {
    pub fn new() -> Arc<Queue> {
        Arc::new(Queue {
            ring: (0..RING).map(|_| AtomicU64::new(0)).collect(),
            produced: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            notify_enabled: AtomicBool::new(true),
            kick: SharedEventFd::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
            kicks: AtomicU64::new(0),
            kicks_avoided: AtomicU64::new(0),
        })
    }

    /// Guest: publish one entry stamped `now`, kick if needed.
    fn publish(&self, now: u64) {
        let p = self.produced.load(Ordering::Relaxed);
        if let Some(slot) = self.ring.get(p as usize % RING) {
            slot.store(now, Ordering::Relaxed);
        }
        self.produced.store(p + 1, Ordering::Release);
        // virtio: publish avail idx, full barrier, then read the flags.
        fence(Ordering::SeqCst);
        if self.notify_enabled.load(Ordering::SeqCst) {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            let _ = self.kick.write(1);
        } else {
            self.kicks_avoided.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Guest: publish one entry now (setup / idle measurements).
    pub fn publish_for_bench(&self) {
        self.publish(monotonic_ns());
    }

    /// Device: whether entries are pending (the cheap `poll()`).
    #[inline]
    pub fn has_work(&self, consumed: u64) -> bool {
        self.produced.load(Ordering::Acquire) > consumed
    }

    /// Device: process all pending entries, recording wake latency (now -
    /// publish time) and spinning `work_ns` per entry. Returns the number.
    pub fn process(&self, consumed: &mut u64, lat: &mut Vec<u32>, work_ns: u64) -> u64 {
        let p = self.produced.load(Ordering::Acquire);
        if p <= *consumed {
            return 0;
        }
        let now = monotonic_ns();
        let mut n = 0;
        while *consumed < p {
            let ts = self
                .ring
                .get(*consumed as usize % RING)
                .map(|s| s.load(Ordering::Relaxed))
                .unwrap_or(now);
            lat.push(u32::try_from(now.saturating_sub(ts)).unwrap_or(u32::MAX));
            spin_for(work_ns);
            *consumed += 1;
            n += 1;
        }
        self.consumed.store(*consumed, Ordering::Release);
        n
    }

    /// Device: poll_begin (suppress kicks).
    pub fn disable_notify(&self) {
        self.notify_enabled.store(false, Ordering::SeqCst);
    }

    /// Device: poll_end (re-enable kicks).
    pub fn enable_notify(&self) {
        self.notify_enabled.store(true, Ordering::SeqCst);
    }
}

/// Busy-waits `ns` on the monotonic clock.
#[inline]
pub fn spin_for(ns: u64) {
    if ns == 0 {
        return;
    }
    let end = monotonic_ns() + ns;
    while monotonic_ns() < end {
        std::hint::spin_loop();
    }
}

/// Think-time distribution of one queue.
#[derive(Clone, Copy, Debug)]
pub enum Gap {
    Fixed(u64),
    /// Exponential with this mean (bursty), from a seeded xorshift.
    Exp(u64),
    /// Bursts: think time `gap` during the first `on` ns of every `period`
    /// ns, silence for the rest (the next request waits for the next burst).
    Burst {
        gap: u64,
        on: u64,
        period: u64,
    },
}

struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

impl Gap {
    /// Think time for a request whose predecessor completed at `now`
    /// (`start` = start of the run).
    fn sample(&self, rng: &mut Rng, now: u64, start: u64) -> u64 {
        match *self {
            Gap::Burst { gap, on, period } => {
                let phase = now.saturating_sub(start) % period.max(1);
                if phase + gap < on {
                    gap
                } else {
                    period - phase
                }
            }
            Gap::Fixed(ns) => ns,
            Gap::Exp(mean) => {
                let x = -rng.next_f64().ln() * mean as f64;
                x.min(mean as f64 * 20.0) as u64
            }
        }
    }
}

/// Runs the guest for `duration_ns`: per queue, wait the think time after the
/// previous completion (spinning precisely on the clock), publish, wait for
/// completion. Returns when done (the caller then stops the consumer).
pub fn run_producer(queues: &[(Arc<Queue>, Gap)], duration_ns: u64, stop: &AtomicBool) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let start = monotonic_ns();
    let end = start + duration_ns;
    // Per queue: next submit time (None while a request is outstanding).
    let mut next: Vec<Option<u64>> = queues
        .iter()
        .map(|(_, g)| Some(start + g.sample(&mut rng, start, start)))
        .collect();
    let mut seen: Vec<u64> = vec![0; queues.len()];
    loop {
        let now = monotonic_ns();
        if now >= end || stop.load(Ordering::Relaxed) {
            break;
        }
        for (i, (q, gap)) in queues.iter().enumerate() {
            let Some(slot) = next.get_mut(i) else {
                continue;
            };
            match *slot {
                Some(t) if now >= t => {
                    q.publish(now);
                    *slot = None;
                }
                Some(_) => {}
                None => {
                    let c = q.consumed.load(Ordering::Acquire);
                    if let Some(s) = seen.get_mut(i) {
                        if c > *s {
                            *s = c;
                            *slot = Some(now + gap.sample(&mut rng, now, start));
                        }
                    }
                }
            }
        }
        std::hint::spin_loop();
    }
}

/// Pins the calling thread to `cpu` (best effort; ignored if the machine has
/// fewer CPUs). Producer and consumer on different CPUs keep them from
/// time-slicing against each other.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if ncpu < 2 || cpu >= usize::try_from(ncpu).unwrap_or(0) {
        return;
    }
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < number of online CPUs <= CPU_SETSIZE, `set` is valid.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 = calling thread; `set` is a valid cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        eprintln!(
            "warning: could not pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Raises the calling thread's scheduling priority to nice -20 (needs
/// CAP_SYS_NICE; best effort). Used by `--boost` so that a loaded, shared
/// machine does not time-slice the producer and consumer away; applies to
/// every mode alike.
pub fn boost_thread() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let Ok(tid) = libc::id_t::try_from(tid) else {
        return;
    };
    // SAFETY: plain syscall on our own thread id.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, -20) };
    if rc != 0 {
        eprintln!(
            "warning: --boost: setpriority failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Puts the calling thread in SCHED_FIFO priority 1 (needs CAP_SYS_NICE;
/// best effort). Used by `--rt`: a woken consumer then preempts CPU hogs at
/// once instead of at the next scheduler tick. The kernel's RT throttling
/// (95 % by default) still leaves other tasks some CPU.
pub fn rt_thread() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 = calling thread; `param` is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        eprintln!(
            "warning: --rt: sched_setscheduler failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether `--boost` was requested (set once by main before any thread starts).
pub static BOOST: AtomicBool = AtomicBool::new(false);
/// Whether `--rt` was requested (set once by main before any thread starts).
pub static RT: AtomicBool = AtomicBool::new(false);

/// Pins (and, with `--boost` / `--rt`, prioritises) a benchmark thread.
pub fn setup_thread(cpu: usize) {
    pin_to_cpu(cpu);
    if BOOST.load(Ordering::Relaxed) {
        boost_thread();
    }
    if RT.load(Ordering::Relaxed) {
        rt_thread();
    }
}

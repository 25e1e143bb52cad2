// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The loop under a seccomp allow-list built from the README's list of the
//! system calls it makes (rust-vmm `seccompiler`, EPERM for anything else),
//! as cloud-hypervisor and Firecracker install per thread: fd handlers,
//! timers, bottom halves from other threads, cross-thread notify, adaptive
//! polling and a nested context all work; removing a needed call from the
//! list makes the loop fail with an error naming it (not hang, not panic).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use aio_poll::{AioContext, Error, FnHandler, Interest, NestedContext, PollParams, SharedEventFd};
use common::{add_queue, with_watchdog, Probe, Queue};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What the Rust runtime, the allocator and this test's own outer loop need
/// on a thread that runs the loop (not the loop's own calls, which come
/// from the README).
const RUNTIME_SYSCALLS: &[&str] = &[
    // malloc / free, thread-local destructors, thread exit
    "mmap",
    "munmap",
    "mremap",
    "madvise",
    "brk",
    "rt_sigprocmask",
    "sigaltstack",
    "exit",
    // test harness: the outer loop of the nested case, panic messages
    "poll",
    "ppoll",
    "write",
];

/// The system calls the README lists for the loop (between the
/// `seccomp-syscalls` markers: the first backticked word of each table row).
fn readme_syscalls() -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- seccomp-syscalls:start -->")
        .expect("README: seccomp-syscalls:start marker");
    let end = readme
        .find("<!-- seccomp-syscalls:end -->")
        .expect("README: seccomp-syscalls:end marker");
    let names: Vec<String> = readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1).map(str::to_owned))
        .collect();
    assert!(
        names.len() >= 10,
        "README lists too few syscalls: {names:?}"
    );
    names
}

fn sysno(name: &str) -> Option<i64> {
    let n = match name {
        "epoll_create1" => libc::SYS_epoll_create1,
        "epoll_ctl" => libc::SYS_epoll_ctl,
        #[cfg(target_arch = "x86_64")]
        "epoll_wait" => libc::SYS_epoll_wait,
        #[cfg(not(target_arch = "x86_64"))]
        "epoll_wait" => return None,
        "epoll_pwait" => libc::SYS_epoll_pwait,
        "epoll_pwait2" => libc::SYS_epoll_pwait2,
        "eventfd2" => libc::SYS_eventfd2,
        "read" => libc::SYS_read,
        "write" => libc::SYS_write,
        "close" => libc::SYS_close,
        "timerfd_create" => libc::SYS_timerfd_create,
        "timerfd_settime" => libc::SYS_timerfd_settime,
        "clock_gettime" => libc::SYS_clock_gettime,
        "futex" => libc::SYS_futex,
        "sched_yield" => libc::SYS_sched_yield,
        "mmap" => libc::SYS_mmap,
        "munmap" => libc::SYS_munmap,
        "mremap" => libc::SYS_mremap,
        "madvise" => libc::SYS_madvise,
        "brk" => libc::SYS_brk,
        "rt_sigprocmask" => libc::SYS_rt_sigprocmask,
        "sigaltstack" => libc::SYS_sigaltstack,
        "exit" => libc::SYS_exit,
        #[cfg(target_arch = "x86_64")]
        "poll" => libc::SYS_poll,
        #[cfg(not(target_arch = "x86_64"))]
        "poll" => return None,
        "ppoll" => libc::SYS_ppoll,
        other => panic!("unknown syscall {other:?} in the allow-list"),
    };
    Some(n)
}

/// The allow-list: README calls (minus `remove`) plus the runtime's, EPERM
/// for everything else.
fn filter_without(remove: &[&str]) -> BpfProgram {
    let mut rules = BTreeMap::new();
    let readme = readme_syscalls();
    let names = readme
        .iter()
        .map(String::as_str)
        .chain(RUNTIME_SYSCALLS.iter().copied());
    for name in names {
        if remove.contains(&name) {
            continue;
        }
        if let Some(n) = sysno(name) {
            rules.insert(n, vec![]);
        }
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).expect("seccompiler arch");
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .expect("seccomp filter");
    BpfProgram::try_from(filter).expect("compile filter")
}

/// What the main test thread hands the filtered loop thread, and back.
struct Report {
    fd_reads: u64,
    timer_runs: u64,
    bh_runs: u64,
    successful_polls: u64,
    nested_bhs: u64,
    nested_timers: u64,
}

/// Runs the whole workload on a new thread that first installs `filter`.
/// Helpers on other (unfiltered) threads kick fds, schedule BHs and produce
/// queue entries, as a VMM's vCPU and management threads would.
fn run_filtered(filter: BpfProgram) -> Result<Report, Error> {
    with_watchdog(120, move || {
        let (htx, hrx) = mpsc::channel::<aio_poll::ContextHandle>();
        let (ktx, krx) = mpsc::channel::<(SharedEventFd, Arc<Queue>)>();
        let loop_thread = std::thread::spawn(move || -> Result<Report, Error> {
            seccompiler::apply_filter(&filter).expect("install seccomp filter");
            workload(htx, ktx)
        });
        // The helpers: they run until the loop thread hangs up.
        let helper = std::thread::spawn(move || {
            let Ok(handle) = hrx.recv() else { return };
            let Ok((kick, q)) = krx.recv() else { return };
            // fd events while the loop sleeps.
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(2));
                let _ = kick.write(1);
            }
            // Cross-thread BHs (notify while it sleeps or polls).
            for _ in 0..50 {
                handle.schedule_oneshot(|_| {});
                std::thread::sleep(Duration::from_micros(300));
            }
            // A guest-like producer for the polling phase.
            for i in 1..=500u64 {
                q.push();
                let t0 = std::time::Instant::now();
                while q.consumed.load(Ordering::SeqCst) < i {
                    if t0.elapsed() > Duration::from_secs(10) {
                        return; // the loop failed; it reports why
                    }
                    std::hint::spin_loop();
                }
            }
        });
        let r = loop_thread.join().expect("loop thread panicked");
        helper.join().expect("helper panicked");
        r
    })
}

fn workload(
    htx: mpsc::Sender<aio_poll::ContextHandle>,
    ktx: mpsc::Sender<(SharedEventFd, Arc<Queue>)>,
) -> Result<Report, Error> {
    // A 10 ms max window: polling stays on even when the loaded machine
    // deschedules the producer for longer than the default 32 µs.
    let mut ctx = AioContext::with_params(PollParams::default().with_max_ns(10_000_000))?;
    let kick = SharedEventFd::new(EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Io {
        op: "eventfd (test)",
        source,
    })?);
    let reader = kick.clone();
    let reads = Arc::new(AtomicU64::new(0));
    let r = reads.clone();
    ctx.add_fd_handler(
        kick.clone(),
        Interest::READABLE,
        FnHandler::new(move |_, _| {
            r.fetch_add(reader.read().unwrap_or(0), Ordering::SeqCst);
        }),
    )?;
    let q = Queue::new();
    let probe = Probe::default();
    let qid = add_queue(&mut ctx, &q, &probe);
    let _ = htx.send(ctx.handle());
    let _ = ktx.send((kick, q.clone()));
    // fd handler, woken from another thread.
    while reads.load(Ordering::SeqCst) < 3 {
        ctx.poll(true)?;
    }
    // Timers (a ns timeout: epoll_pwait2, or its fallback).
    let now = ctx.now_ns();
    ctx.add_timer(now + 1_500_000, None, |_| {});
    while ctx.timer_count() > 0 {
        ctx.poll(true)?;
    }
    // Cross-thread BHs.
    while ctx.stats().bh_runs < 50 {
        ctx.poll(true)?;
    }
    // Polling against the producer.
    while q.consumed.load(Ordering::SeqCst) < 500 {
        ctx.poll(true)?;
    }
    ctx.remove_handler(qid)?;
    let s = ctx.stats();
    // Nested: timerfd and the outer loop's poll().
    let handle = ctx.handle();
    let mut nested = NestedContext::new(ctx)?;
    let now = nested.context().now_ns();
    nested
        .context_mut()
        .add_timer(now + 1_000_000, None, |_| {});
    handle.schedule_oneshot(|_| {});
    let bh0 = nested.context().stats().bh_runs;
    while nested.context().timer_count() > 0 || nested.context().stats().bh_runs == bh0 {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: nested.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, 5_000) };
        assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
        nested.dispatch()?;
    }
    let ns = nested.context().stats();
    Ok(Report {
        fd_reads: reads.load(Ordering::SeqCst),
        timer_runs: s.timer_runs,
        bh_runs: s.bh_runs,
        successful_polls: s.successful_polls,
        nested_bhs: ns.bh_runs - bh0,
        nested_timers: ns.timer_runs - s.timer_runs,
    })
}

#[test]
fn the_loop_runs_under_the_readme_allow_list() {
    let r = run_filtered(filter_without(&[])).expect("workload under seccomp");
    assert_eq!(r.fd_reads, 3);
    assert_eq!(r.timer_runs, 1);
    assert!(r.bh_runs >= 50);
    assert!(r.successful_polls > 0, "polling found nothing");
    assert_eq!(r.nested_bhs, 1);
    assert_eq!(r.nested_timers, 1);
}

/// A filter that refuses `epoll_pwait2` with EPERM (not ENOSYS): the loop
/// falls back to `epoll_wait` and its timers still fire.
#[test]
fn epoll_pwait2_refused_with_eperm_falls_back() {
    let r = run_filtered(filter_without(&["epoll_pwait2"])).expect("fallback to epoll_wait");
    assert_eq!(r.timer_runs, 1);
    assert_eq!(r.fd_reads, 3);
}

/// Each needed call removed from the list: the loop reports an error that
/// names the operation (the allow-list is not larger than needed, and a
/// filter that misses a call fails loudly).
#[test]
fn removing_a_needed_syscall_fails_with_its_name() {
    #[cfg(target_arch = "x86_64")]
    let wait: &[&str] = &["epoll_wait", "epoll_pwait2"];
    #[cfg(not(target_arch = "x86_64"))]
    let wait: &[&str] = &["epoll_pwait", "epoll_pwait2"];
    let cases: [(&[&str], &str); 5] = [
        (&["epoll_create1"], "epoll_create1 failed"),
        (&["eventfd2"], "eventfd failed"),
        (&["epoll_ctl"], "epoll_ctl(EPOLL_CTL_ADD) failed"),
        (wait, "epoll_wait failed"),
        (&["timerfd_create"], "timerfd_create failed"),
    ];
    for (removed, message) in cases {
        let err = match run_filtered(filter_without(removed)) {
            Ok(_) => panic!("the loop worked without {removed:?}"),
            Err(e) => e,
        };
        assert_eq!(err.to_string(), message, "without {removed:?}");
        let source = std::error::Error::source(&err)
            .expect("errno kept")
            .to_string();
        assert!(source.contains("Operation not permitted"), "{source}");
    }
}

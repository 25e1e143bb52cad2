// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An IOThread pool whose threads are pinned to a CPU and run under a seccomp filter,
//! installed by the registry's spawn hook on each new IOThread before its loop starts
//! (what cloud-hypervisor's and Firecracker's thread spawners do for their threads).
//!
//! Run: `cargo run -p iothread-registry --example seccomp_pool`. Copy it: it uses only
//! the public API of iothread-registry and rust-vmm's `seccompiler`.

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;

use iothread_registry::{IoThreadHolder, IoThreadParams, IoThreadRegistry, SpawnHookError};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

/// Every syscall an IOThread makes on x86_64 Linux: the aio-poll loop (wait, control,
/// wake-ups through eventfds, clocks), the registry's stop and statistics, memory
/// allocation by the work it runs, and thread exit. Work that needs more (I/O on
/// files, io_uring, ...) adds its own.
pub const IOTHREAD_SYSCALLS: &[i64] = &[
    // The event loop. epoll_pwait2 is required: aio-poll falls back to epoll_wait
    // only on ENOSYS, so a filter must not answer it with EPERM.
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    // Futexes of the work queue and of waiting callers.
    libc::SYS_futex,
    // Memory of the closures it runs.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_getrandom,
    // Thread exit (signal stack, thread-local destructors).
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_close,
    // std's debug builds check an fd with fcntl(F_GETFD) before closing it.
    libc::SYS_fcntl,
    libc::SYS_exit,
];

/// The allow-list as a BPF program: listed syscalls are allowed, every other one fails
/// with `EPERM` (so that a mistake shows as an error, not as a killed process).
pub fn iothread_filter() -> Result<BpfProgram, Box<dyn Error + Send + Sync>> {
    let rules = IOTHREAD_SYSCALLS
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect::<BTreeMap<_, _>>();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        std::env::consts::ARCH.try_into()?,
    )?;
    Ok(filter.try_into()?)
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is a plain bitmask; all-zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE, so CPU_SET stays inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The first CPU the calling thread may run on.
pub fn first_allowed_cpu() -> std::io::Result<usize> {
    // SAFETY: cpu_set_t is a plain bitmask; all-zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: every probe is below CPU_SETSIZE, so CPU_ISSET stays inside `set`.
    (0..libc::CPU_SETSIZE as usize)
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))
}

/// A registry whose IOThreads are pinned to `cpu` and then locked down by `filter`.
pub fn locked_down_registry(filter: BpfProgram, cpu: usize) -> IoThreadRegistry {
    let filter = Arc::new(filter);
    IoThreadRegistry::with_spawn_hook(move |info| -> Result<(), SpawnHookError> {
        pin_current_thread(cpu)?;
        seccompiler::apply_filter(&filter)?;
        println!(
            "IOThread {} (tid {}): pinned to CPU {cpu}, seccomp filter installed",
            info.id, info.thread_id
        );
        Ok(())
    })
}

#[allow(dead_code)] // The test suite reuses the functions above, not `main`.
fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let registry = locked_down_registry(iothread_filter()?, first_allowed_cpu()?);
    for id in ["io0", "io1"] {
        registry.create(id, IoThreadParams::default())?;
    }
    // Work reaches an IOThread only through a holder registration.
    let disk = registry.acquire("io0", IoThreadHolder::block_node("disk0"))?;
    let answer = disk.call(|_ctx| 6 * 7)?;
    // A syscall outside the allow-list fails inside the IOThread...
    let socket = disk.call(|_ctx| std::net::UdpSocket::bind("127.0.0.1:0").map(drop))?;
    println!("answer from io0: {answer}; socket() inside io0: {socket:?}");
    // ...and not outside it: the filter applies to the IOThreads only.
    assert!(std::net::UdpSocket::bind("127.0.0.1:0").is_ok());
    drop(disk);
    Ok(())
}

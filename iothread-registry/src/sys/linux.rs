// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Linux implementation of the [`sys`](super) helpers.

use std::io;
use std::mem;

/// Largest CPU number + 1 that a `cpu_set_t` can describe.
const CPU_SETSIZE: usize = libc::CPU_SETSIZE as usize;

/// Host thread id of the calling thread.
pub(crate) fn gettid() -> i64 {
    // SAFETY: gettid(2) has no preconditions and cannot fail.
    i64::from(unsafe { libc::gettid() })
}

/// CPU time consumed so far by thread `tid` of this process (user + system), in ns.
///
/// Uses the kernel's per-thread CPU clock id for a TID (what glibc's
/// `pthread_getcpuclockid` computes), so no `pthread_t` has to stay valid; a thread
/// that has exited yields an error.
pub(crate) fn thread_cpu_time_ns(tid: i64) -> io::Result<u64> {
    // MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED): (~tid << 3) | CPUCLOCK_SCHED (2) |
    // CPUCLOCK_PERTHREAD_MASK (4).
    let tid = libc::clockid_t::try_from(tid)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if tid <= 0 {
        // TID 0 would name the calling thread.
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    let clock: libc::clockid_t = ((!tid) << 3) | 2 | 4;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; an unknown clock id yields EINVAL.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

fn empty_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bitmask for which all-zeroes is the empty set.
    unsafe { mem::zeroed() }
}

/// Pins the thread `tid` to `cpus`. Every CPU must be below `CPU_SETSIZE`.
pub(crate) fn set_affinity(tid: i64, cpus: &[usize]) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(tid).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut set = empty_set();
    for &cpu in cpus {
        if cpu >= CPU_SETSIZE {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `cpu` < CPU_SETSIZE, so CPU_SET stays inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(pid, mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs thread `tid` may run on (0 = the calling thread), ascending.
pub(crate) fn get_affinity(tid: i64) -> io::Result<Vec<usize>> {
    let pid =
        libc::pid_t::try_from(tid).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut set = empty_set();
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(pid, mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `cpu` < CPU_SETSIZE for every probe, so CPU_ISSET stays inside `set`.
    Ok((0..CPU_SETSIZE)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// CPUs an IOThread may be pinned to: the online CPUs (`/sys/devices/system/cpu/online`)
/// that the process may use (its main thread's affinity), ascending.
pub(crate) fn available_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: getpid(2) has no preconditions and cannot fail.
    let pid = i64::from(unsafe { libc::getpid() });
    let allowed = get_affinity(pid)?;
    match std::fs::read_to_string("/sys/devices/system/cpu/online") {
        Ok(text) => {
            let online = parse_cpu_list(text.trim())?;
            Ok(allowed.into_iter().filter(|c| online.contains(c)).collect())
        }
        Err(_) => Ok(allowed),
    }
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub(crate) fn parse_cpu_list(text: &str) -> io::Result<Vec<usize>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad CPU list {text:?}"));
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Ok(cpus);
    }
    for part in text.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo > hi || hi >= CPU_SETSIZE {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11").unwrap(),
            [0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("0").unwrap(), [0]);
        assert!(parse_cpu_list("").unwrap().is_empty());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("0-99999").is_err());
    }

    #[test]
    fn own_thread() {
        let tid = gettid();
        assert!(tid > 0);
        let cpus = get_affinity(tid).unwrap();
        assert!(!cpus.is_empty());
        assert!(!available_cpus().unwrap().is_empty());
        let t0 = thread_cpu_time_ns(tid).unwrap();
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time_ns(tid).unwrap() > t0);
        assert!(thread_cpu_time_ns(0).is_err());
    }
}

"""Shared parts of the VMM benchmarks (ci/bench-vmm.sh, ci/bench-poll.sh).

One VM run: start the VMM, watch the guest's serial output, take snapshots of
per-thread CPU (and whatever else the caller wants, e.g. QMP statistics) when
the guest prints its start and end markers, and parse its report. Plus the
statistics both scripts print: medians, paired per-round ratios with their
ranges.
"""

import json
import os
import re
import resource
import socket
import statistics
import subprocess
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")
# vCPU threads: vmm-ref `vcpuN`, QEMU `CPU N/KVM` (with debug-threads=on).
VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")
# IOThreads: both name them "IO <id>".
IOTHREAD_THREAD = re.compile(r"^IO ")
# io_uring io-wq workers and SQPOLL threads.
IO_WORKER_THREAD = re.compile(r"^iou-(wrk|sqp)-")


def stat_cpu(stat):
    """(comm, utime + stime in seconds) from a /proc stat line."""
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return name, (int(fields[11]) + int(fields[12])) / TICK


def voluntary_switches(pid, tid):
    """How often a thread blocked (voluntary context switches: each sleep
    in epoll_wait / ppoll / io_uring_enter is one), or 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def snapshot(pid):
    """CPU of a live process: {"t": monotonic time, "total": process seconds,
    "threads": {tid: (name, seconds)}, "sleeps": {tid: voluntary context
    switches} (IOThreads only)}, or None when it is gone. The process total
    (/proc/<pid>/stat) includes threads that already exited (io-wq workers
    come and go)."""
    t = time.monotonic()
    try:
        with open(f"/proc/{pid}/stat") as f:
            total = stat_cpu(f.read())[1]
        tids = os.listdir(f"/proc/{pid}/task")
    except (OSError, ValueError):
        return None
    threads = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                threads[tid] = stat_cpu(f.read())
        except (OSError, ValueError):
            continue
    sleeps = {tid: voluntary_switches(pid, tid)
              for tid, (name, _) in threads.items() if IOTHREAD_THREAD.match(name)}
    return {"t": t, "total": total, "threads": threads, "sleeps": sleeps}


def cpu_split(s0, s1):
    """CPU seconds between two snapshots of one process: {"wall", "total",
    "vcpu", "device" (everything but the vCPU threads: IOThreads, io workers,
    main loop, monitor), "iothread", "workers", "iothread_sleeps" (voluntary
    context switches of the IOThreads: how often they blocked)}; None if the vCPU threads are
    not visible at the end (the VM was already gone)."""
    if s0 is None or s1 is None:
        return None
    if not any(VCPU_THREAD.match(n) for n, _ in s1["threads"].values()):
        return None

    def cls(pattern):
        return sum(c - s0["threads"].get(tid, (name, 0.0))[1]
                   for tid, (name, c) in s1["threads"].items() if pattern.match(name))

    total = s1["total"] - s0["total"]
    vcpu = cls(VCPU_THREAD)
    return {"wall": s1["t"] - s0["t"], "total": total, "vcpu": vcpu,
            "device": max(total - vcpu, 0.0), "iothread": cls(IOTHREAD_THREAD),
            "workers": cls(IO_WORKER_THREAD),
            "iothread_sleeps": sum(n - s0["sleeps"].get(tid, 0) for tid, n in s1["sleeps"].items())}


class Qmp:
    """A minimal QMP client over a unix socket (one JSON object per line)."""

    def __init__(self, path, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, cmd, args=None):
        req = {"execute": cmd}
        if args is not None:
            req["arguments"] = args
        self.f.write(json.dumps(req) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise OSError(f"QMP connection closed during {cmd}")
            msg = json.loads(line)
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {cmd}: {msg['error']}")

    def close(self):
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def run_vm(cmd, start_marker, end_marker, timeout, on_start=None, on_end=None):
    """Runs one VM. When a guest line starts with `start_marker`, takes a CPU
    snapshot (then calls `on_start(pid)`); likewise at `end_marker`. Returns
    {"lines", "stderr", "status", "cpu" (cpu_split of the window or None),
    "start", "end" (what on_start / on_end returned), "run_cpu" (getrusage of
    the reaped child: the whole run), "timed_out"}."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, bufsize=1)
    err_lines = []
    err_reader = threading.Thread(target=lambda: err_lines.extend(p.stderr), daemon=True)
    err_reader.start()
    timed_out = []
    killer = threading.Timer(timeout, lambda: (timed_out.append(True), p.kill()))
    killer.start()
    lines, s0, s1, r0, r1 = [], None, None, None, None
    try:
        for line in p.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if s0 is None and line.startswith(start_marker):
                s0 = snapshot(p.pid)
                if on_start:
                    r0 = on_start(p.pid)
            elif s0 is not None and s1 is None and line.startswith(end_marker):
                s1 = snapshot(p.pid)
                if on_end:
                    r1 = on_end(p.pid)
    finally:
        p.wait()
        killer.cancel()
        err_reader.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"lines": lines, "stderr": [l.rstrip("\n") for l in err_lines],
            "status": p.returncode, "cpu": cpu_split(s0, s1), "start": r0, "end": r1,
            "run_cpu": run_cpu, "timed_out": bool(timed_out)}


def fields(line):
    """key=value words of a report line as a dict of strings."""
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


def tail(run, n=12):
    return "\n".join((run["lines"] + run["stderr"])[-n:])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratios(a, b):
    """Per-round ratios a[i] / b[i] over the rounds where both exist."""
    return [x / y for x, y in zip(a, b) if x is not None and y is not None and y != 0]


def ratio_range(ratios, nd=2):
    """'0.95x [0.90-1.01]' (median [min-max]) or '-'."""
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.{nd}f}x [{min(ratios):.{nd}f}-{max(ratios):.{nd}f}]"


def fmt(v, nd=1):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def steal_share(t0, t1):
    """Share of all CPU time the hypervisor below gave to others between two
    readings of /proc/stat's cpu line (see cpu_ticks)."""
    total = sum(t1) - sum(t0)
    return (t1[7] - t0[7]) / total if total > 0 else 0.0


def cpu_ticks():
    """The aggregate `cpu` line of /proc/stat as a list of ints."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                return [int(x) for x in line.split()[1:]]
    return [0] * 10

#!/usr/bin/env bash
# vmm-ref vs QEMU microvm on identical guest work (not run in CI).
#
# The same test-guest ELF (vmm-ref/guest, PVH entry under QEMU, 64-bit entry
# under vmm-ref) runs `scenario=bench` against one virtio-mmio virtio-blk
# device backed by the same raw image on tmpfs, O_DIRECT + io_uring on both
# sides, every queue served by one IOThread with the same poll-max-ns.
# Configurations are run interleaved (A B C, C B A, A B C, ...) for --rounds
# rounds; per run the table shows the guest's IOPS, I/Os per kick and
# latency, and the host CPU time of the whole VMM process per I/O over the
# benchmark window: utime+stime from /proc/<pid>/stat (all threads, exited
# io_uring workers included) when the guest prints `seed:` (right before the
# bench starts) and when it prints its BENCH line (the guest then runs
# `hold` for a second, so that the VM is still complete at that moment; its
# RESULT must PASS too). The guest busy-polls its used rings, so its vCPU
# thread is ~100% busy (when scheduled) in both VMMs; the column
# "non-vCPU" leaves the vCPU threads (vmm-ref `vcpuN`, QEMU `CPU N/KVM`) out:
# that is the device side (IOThread, io workers, main loop); "IOThread" (`IO
# io0` in both) and "io_uring workers" (`iou-wrk-*`, live at the end) are
# parts of it. All CPU columns are µs per I/O. "vCPU %" is the CPU the vCPU
# thread got during the bench: on a loaded host the spinning guest is the
# bottleneck, so IOPS follow the scheduler's share, and "process" CPU/IO
# mostly reflects that spin - compare "non-vCPU" for what the VMM costs.
# "CPU s whole run" is getrusage of the reaped child (boot and exit included).
# Finally medians per configuration and the vmm-ref/QEMU ratios, and vmm-ref
# with poll-max-ns=0 against the default.
#
# usage: ci/bench-vmm.sh [options]
#   --secs N          bench.secs per run (default 5)
#   --rounds N        interleaved rounds (default 3)
#   --qd N            bench.qd, requests in flight per queue (default 32)
#   --queues "1 4"    num-queues values (default "1 4")
#   --rw MODE         randread | randwrite (default randread)
#   --poll-max-ns N   IOThread poll-max-ns of both VMMs (default 32768)
#   --disk-size SIZE  image size (default 256M), created in --disk-dir
#   --disk-dir DIR    tmpfs directory for the image (default /dev/shm)
#   --vmm PATH        vmm-ref binary (default: cargo build --release -p vmm-ref)
#   --elf PATH        guest image (default: test-guest.elf of that build)
#   --qemu PATH       QEMU binary (default qemu-system-x86_64)
#   --only vmm-ref|qemu   run one side only (e.g. while the other cannot run)
#   --no-poll0        skip the vmm-ref poll-max-ns=0 runs
#   --out FILE        also write the markdown report to FILE
# Environment: CARGO_TARGET_DIR (where to build / look for the binaries).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

usage() { sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "bench-vmm.sh: $*" >&2; exit 2; }

secs=5 rounds=3 qd=32 queues="1 4" rw=randread poll_max_ns=32768
disk_size=256M disk_dir=/dev/shm vmm= elf= qemu=qemu-system-x86_64
only= poll0=1 out=
while [ $# -gt 0 ]; do
    case $1 in
        --secs) secs=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --qd) qd=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --rw) rw=$2; shift 2 ;;
        --poll-max-ns) poll_max_ns=$2; shift 2 ;;
        --disk-size) disk_size=$2; shift 2 ;;
        --disk-dir) disk_dir=$2; shift 2 ;;
        --vmm) vmm=$2; shift 2 ;;
        --elf) elf=$2; shift 2 ;;
        --qemu) qemu=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --no-poll0) poll0=0; shift ;;
        --out) out=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case $only in ''|vmm-ref|qemu) ;; *) die "--only takes vmm-ref or qemu" ;; esac
case $rw in randread|randwrite) ;; *) die "--rw takes randread or randwrite" ;; esac
for n in "$secs" "$rounds" "$qd" "$poll_max_ns" $queues; do
    [[ $n =~ ^[0-9]+$ ]] || die "not a number: '$n'"
done
[ "$rounds" -ge 1 ] && [ "$secs" -ge 1 ] || die "--rounds and --secs must be >= 1"
[ -c /dev/kvm ] || die "/dev/kvm not available"

target_dir=${CARGO_TARGET_DIR:-$root/target}
if [ -z "$vmm" ] && [ "$only" != qemu ]; then
    echo "bench-vmm.sh: cargo build --release -p vmm-ref" >&2
    (cd "$root" && cargo build --release -p vmm-ref >&2)
    vmm=$target_dir/release/vmm-ref
fi
if [ -z "$elf" ]; then
    # The guest build is bit-for-bit the same in every profile.
    elf=$(ls -t "$target_dir"/*/build/vmm-ref-*/out/test-guest.elf 2>/dev/null | head -n 1 || true)
    [ -n "$elf" ] || die "no test-guest.elf under $target_dir: build vmm-ref or pass --elf"
fi
[ -f "$elf" ] || die "guest image $elf not found"
[ -z "$vmm" ] || [ -x "$vmm" ] || die "vmm-ref binary $vmm not found"
[ "$only" = vmm-ref ] || command -v "$qemu" >/dev/null || die "$qemu not found"

disk=$(mktemp "$disk_dir/bench-vmm-XXXXXX.img")
trap 'rm -f "$disk"' EXIT
# Allocated (not sparse), so that reads hit real tmpfs pages on both sides.
fallocate -l "$disk_size" "$disk" 2>/dev/null || truncate -s "$disk_size" "$disk"

export BENCH_SECS=$secs BENCH_ROUNDS=$rounds BENCH_QD=$qd BENCH_QUEUES=$queues
export BENCH_RW=$rw BENCH_POLL_MAX_NS=$poll_max_ns BENCH_DISK=$disk
export BENCH_VMM=$vmm BENCH_ELF=$elf BENCH_QEMU=$qemu BENCH_ONLY=$only
export BENCH_POLL0=$poll0 BENCH_OUT=$out

python3 -u - <<'PY'
import os, re, resource, statistics, subprocess, sys, threading, time

env = os.environ
SECS = int(env["BENCH_SECS"]); ROUNDS = int(env["BENCH_ROUNDS"]); QD = int(env["BENCH_QD"])
QUEUES = [int(q) for q in env["BENCH_QUEUES"].split()]
RW = env["BENCH_RW"]; POLL = int(env["BENCH_POLL_MAX_NS"]); DISK = env["BENCH_DISK"]
VMM = env["BENCH_VMM"]; ELF = env["BENCH_ELF"]; QEMU = env["BENCH_QEMU"]
ONLY = env["BENCH_ONLY"]; POLL0 = env["BENCH_POLL0"] == "1"; OUT = env["BENCH_OUT"]
TIMEOUT = SECS + 240  # boot + bench on a loaded 2-core machine
VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")
IOTHREAD_THREAD = re.compile(r"^IO ")          # both name IOThreads "IO <id>"
IO_WORKER_THREAD = re.compile(r"^iou-(wrk|sqp)-")  # io_uring io-wq workers / SQPOLL
BENCH_RE = re.compile(r"^BENCH queues=(\d+) qd=(\d+) rw=\S+ ios=(\d+) secs=([\d.]+) iops=(\d+) "
                      r"lat_p50_us=([\d.]+) lat_p99_us=([\d.]+) kicks=(\d+)")
TICK = os.sysconf("SC_CLK_TCK")
tsc_khz = None  # taken from the first vmm-ref run (KVM_GET_TSC_KHZ), then given to QEMU too

def guest_cmdline():
    # `hold` keeps the VM (vCPU, IOThread) alive for a second after the BENCH
    # line, so that the per-thread CPU snapshot taken then is complete.
    words = ["scenario=bench,hold", "hold.secs=1", f"bench.secs={SECS}", f"bench.qd={QD}",
             f"bench.rw={RW}"]
    if tsc_khz:
        words.append(f"tsc_khz={tsc_khz}")
    return " ".join(words)

def vmm_ref_cmd(queues, poll):
    # vmm-ref appends virtio_mmio.device= and tsc_khz= itself.
    cmdline = " ".join(w for w in guest_cmdline().split() if not w.startswith("tsc_khz="))
    return [VMM, "--kernel", ELF, "--memory", "256M", "--vcpus", "1", "--cmdline", cmdline,
            "--object", f"iothread,id=io0,poll-max-ns={poll}",
            "--drive", f"id=d0,file={DISK},num-queues={queues},queue-size=256,iothread=io0,"
                       "aio=io_uring,direct=on"]

def qemu_cmd(queues, poll):
    return [QEMU, "-M", "microvm,x-option-roms=on,acpi=off", "-accel", "kvm",
            "-cpu", "host,arch-capabilities=off", "-m", "256M", "-smp", "1",
            "-name", "bench-vmm,debug-threads=on", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", ELF, "-append", guest_cmdline(),
            "-global", "virtio-mmio.force-legacy=false",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-object", f"iothread,id=io0,poll-max-ns={poll}",
            "-drive", f"id=d0,file={DISK},format=raw,if=none,cache=none,aio=io_uring",
            "-device", f"virtio-blk-device,drive=d0,num-queues={queues},queue-size=256,iothread=io0"]

def snapshot(pid):
    """(process cpu seconds, {tid: (name, cpu seconds)}) of a live process, or None.
    The process total (/proc/<pid>/stat) includes threads that already exited."""
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
    return total, threads

def stat_cpu(stat):
    """(comm, utime + stime in seconds) from a /proc stat line."""
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return name, (int(fields[11]) + int(fields[12])) / TICK

def run(kind, queues, poll):
    """One VMM run. CPU is counted over the benchmark window only: from the guest's
    `seed:` line (printed right before the bench starts) to its BENCH line."""
    cmd = vmm_ref_cmd(queues, poll) if kind == "vmm-ref" else qemu_cmd(queues, poll)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, bufsize=1)
    err_lines = []
    err_reader = threading.Thread(target=lambda: err_lines.extend(p.stderr), daemon=True)
    err_reader.start()
    killer = threading.Timer(TIMEOUT, p.kill)
    killer.start()
    lines, s0, s1 = [], None, None
    for line in p.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("seed: "):
            s0 = snapshot(p.pid)
        elif line.startswith("BENCH "):
            s1 = snapshot(p.pid)
    p.wait()
    killer.cancel()
    err_reader.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    m = next((BENCH_RE.match(l) for l in lines if BENCH_RE.match(l)), None)
    ok = m is not None and any(l.startswith("RESULT bench PASS") for l in lines) \
        and any(l.startswith("RESULT hold PASS") for l in lines)
    if not ok or s0 is None:
        tail = "\n".join((lines + [l.rstrip() for l in err_lines])[-12:])
        why = "no bench start seen" if ok else "no passing BENCH result"
        return {"ok": False, "error": f"{why}, exit {p.returncode}: {tail}"}
    global tsc_khz
    if kind == "vmm-ref" and tsc_khz is None:
        t = next((re.match(r"tsc: (\d+) kHz \(cmdline\)", l) for l in lines
                  if l.startswith("tsc: ")), None)
        if t:
            tsc_khz = int(t.group(1))
    ios, kicks = int(m.group(3)), int(m.group(8))
    if s1 is not None and any(VCPU_THREAD.match(n) for n, _ in s1[1].values()):
        cpu = s1[0] - s0[0]
        def cls(pattern):
            return sum(c - s0[1].get(tid, (name, 0.0))[1]
                       for tid, (name, c) in s1[1].items() if pattern.match(name))
        vcpu = cls(VCPU_THREAD)
        dev = max(cpu - vcpu, 0.0) * 1e6 / ios
        vcpu_share = 100.0 * vcpu / float(m.group(4)) if float(m.group(4)) > 0 else None
        iothread = cls(IOTHREAD_THREAD) * 1e6 / ios
        workers = cls(IO_WORKER_THREAD) * 1e6 / ios
    else:  # the VM was gone at the end snapshot: whole run minus the part before the bench
        cpu = run_cpu - s0[0]
        dev = iothread = workers = vcpu_share = None
    return {"ok": True, "iops": int(m.group(5)), "ios": ios, "kicks": kicks,
            "ios_per_kick": ios / kicks if kicks else float(ios),
            "p50": float(m.group(6)), "p99": float(m.group(7)),
            "cpu_us": cpu * 1e6 / ios, "dev_us": dev, "iothread_us": iothread,
            "workers_us": workers, "vcpu_share": vcpu_share, "run_cpu": run_cpu}

def fmt(v, nd=1):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

configs = []
for q in QUEUES:
    if ONLY != "qemu":
        configs.append(("vmm-ref", q, POLL))
    if ONLY != "vmm-ref":
        configs.append(("qemu", q, POLL))
    if ONLY != "qemu" and POLL0 and POLL != 0:
        configs.append(("vmm-ref", q, 0))

results = {c: [] for c in configs}
rows = []
for r in range(1, ROUNDS + 1):
    # A B C, C B A, A B C, ...: interleaved, and a linear drift of the host
    # load favours no configuration.
    for c in (configs if r % 2 else configs[::-1]):
        kind, q, poll = c
        res = run(kind, q, poll)
        results[c].append(res)
        label = f"{kind} q={q} poll-max-ns={poll}"
        if res["ok"]:
            line = (f"| {r} | {label} | {res['iops']} | {res['ios_per_kick']:.1f} | "
                    f"{res['cpu_us']:.2f} | {fmt(res['dev_us'], 2)} | {fmt(res['iothread_us'], 2)} | "
                    f"{fmt(res['workers_us'], 2)} | {fmt(res['vcpu_share'], 0)} | {res['p50']:.1f} | "
                    f"{res['p99']:.1f} | {res['run_cpu']:.2f} |")
        else:
            line = f"| {r} | {label} | FAILED | | | | | | | | | |"
            print(f"bench-vmm.sh: {label} failed: {res['error']}", file=sys.stderr)
        rows.append(line)
        print(line, file=sys.stderr, flush=True)

def med(c, key):
    vals = [x[key] for x in results[c] if x["ok"] and x[key] is not None]
    return statistics.median(vals) if vals else None

def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

load = open("/proc/loadavg").read().split()[:3]
report = []
report.append(f"guest `{guest_cmdline()}`, disk {DISK} (tmpfs), O_DIRECT + io_uring, "
              f"1 IOThread (poll-max-ns={POLL}), queue-size 256, {ROUNDS} interleaved rounds; "
              f"load average before the summary: {' '.join(load)}")
report.append("")
report.append("| round | VMM | IOPS | I/Os per kick | CPU µs/IO (process) | non-vCPU | IOThread | io_uring workers | vCPU % | p50 µs | p99 µs | CPU s whole run |")
report.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
report += rows
report.append("")
report.append("Medians:")
report.append("")
report.append("| VMM | queues | poll-max-ns | IOPS | I/Os per kick | CPU µs/IO (process) | non-vCPU | IOThread | io_uring workers | vCPU % |")
report.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for c in configs:
    kind, q, poll = c
    report.append(f"| {kind} | {q} | {poll} | {fmt(med(c, 'iops'))} | {fmt(med(c, 'ios_per_kick'))} | "
                  f"{fmt(med(c, 'cpu_us'), 2)} | {fmt(med(c, 'dev_us'), 2)} | "
                  f"{fmt(med(c, 'iothread_us'), 2)} | {fmt(med(c, 'workers_us'), 2)} | "
                  f"{fmt(med(c, 'vcpu_share'), 0)} |")
report.append("")
report.append("Ratios of medians:")
report.append("")
report.append("| comparison | queues | IOPS | I/Os per kick | CPU/IO (process) | CPU/IO (non-vCPU) |")
report.append("|---|---:|---:|---:|---:|---:|")
for q in QUEUES:
    pairs = []
    if ONLY == "":
        pairs.append(("vmm-ref / QEMU", ("vmm-ref", q, POLL), ("qemu", q, POLL)))
    if ONLY != "qemu" and POLL0 and POLL != 0:
        pairs.append((f"vmm-ref poll-max-ns={POLL} / 0", ("vmm-ref", q, POLL), ("vmm-ref", q, 0)))
    for name, a, b in pairs:
        report.append(f"| {name} | {q} | {ratio(med(a, 'iops'), med(b, 'iops'))} | "
                      f"{ratio(med(a, 'ios_per_kick'), med(b, 'ios_per_kick'))} | "
                      f"{ratio(med(a, 'cpu_us'), med(b, 'cpu_us'))} | "
                      f"{ratio(med(a, 'dev_us'), med(b, 'dev_us'))} |")
text = "\n".join(report) + "\n"
sys.stdout.write(text)
if OUT:
    with open(OUT, "w") as f:
        f.write(text)
failed = sum(1 for c in configs for x in results[c] if not x["ok"])
sys.exit(1 if failed else 0)
PY

#!/usr/bin/env bash
# Adaptive polling on the workload the weighted algorithm was published for
# (issue #14; not run in CI): many virtio-blk drives on storage with real
# service time, served by 1 or 2 IOThreads of vmm-ref.
#
# The test guest (vmm-ref/guest, scenario `bench-all`) drives all --drives
# drives at once (1 queue each, --iodepth requests in flight per drive, 4 KiB
# random I/O) from its one vCPU. Drive images are files on the host's real
# disk (--disk-dir, ext4 /var/tmp here, written with data so that reads reach
# the device) and, as the low-latency contrast, on tmpfs (--tmpfs-dir);
# vmm-ref opens them `direct=on,aio=io_uring`. Drives are spread round-robin
# over the IOThreads (io0, io1, ...). Modes: `classic` (poll-algorithm=classic),
# `w1`..`w5` (weighted, poll-weight=N; the published algorithm, vmm-ref's
# default) and `poll0` (poll-max-ns=0: no polling), everything else default
# (poll-max-ns 32768, grow 2, shrink 2).
#
# Per run, over the guest's benchmark window (from its `bench: start` line to
# its BENCHALL line): aggregate IOPS (guest), device-side CPU = the vmm-ref
# process minus its vCPU thread (IOThreads + io_uring io-wq workers + main
# loop + monitor; per-thread utime+stime from /proc/PID/task/*/stat, exited
# workers included through the process total) in % of one CPU over the
# window, and from `x-query-iothread-stats` (deltas over the window, summed
# over the IOThreads): mean poll_ns, reset rate (per-handler ns resets / ns
# recomputations), time near max (share of loop time with poll_ns >= 0.9 *
# poll-max-ns), polling % (time spent busy-polling, % of one CPU: what any
# polling policy could save at most, before the cost of the extra sleeps) and
# sleeps per 1k I/O (blocking epoll_waits: each one is a wake-up to pay).
# Rounds are interleaved (every configuration and mode once per
# round, mode order reversed every other round), so slow drifts of the host
# load hit all modes alike; the ratios vs classic are paired per round (same
# round, same configuration) and reported as median [min-max].
#
# The guest iodepth per drive: unless --iodepth is given, fio (4 KiB randread,
# O_DIRECT, io_uring) measures the disk first at increasing depths; the knee
# is the smallest depth reaching 90 % of the best IOPS, and the total depth
# of the guest (drives x iodepth) is set to twice the knee: beyond the knee
# more requests in flight only queue in the disk, so the disk is the
# bottleneck, while the guest (which drives several times the disk's IOPS
# from tmpfs) is not. The report compares the guest's IOPS with fio's.
#
# The last line is always
#   RESULT weighted(3)/classic cpu=<ratio> iops=<ratio>
# the medians of the paired per-round ratios w3/classic of device-side CPU and
# of IOPS, on the first storage of --storage (disk by default), 1 IOThread,
# randread ("n/a" when that configuration did not run).
#
# usage: ci/bench-poll.sh [options]
#   --quick            short run (< 5 min): --secs 5 --rounds 3 --iothreads 1
#                      --storage disk --image-size 64M, quick fio calibration
#   --secs N           bench.secs per run (default 10)
#   --rounds N         interleaved rounds (default 5)
#   --drives N         drives (default 16)
#   --iothreads "1 2"  IOThread counts (default "1 2")
#   --storage "disk tmpfs"   image locations (default both)
#   --rw "randread"    any of randread randwrite randrw (default randread)
#   --rwmixread N      read percentage of randrw (default 70)
#   --modes "classic w1 w2 w3 w4 w5 poll0"   modes (default all; classic and w3 are needed
#                      for the RESULT line)
#   --iodepth N        requests in flight per drive (default: from the fio calibration)
#   --image-size SIZE  per drive (default 128M)
#   --disk-dir DIR     real-disk directory (default /var/tmp)
#   --tmpfs-dir DIR    tmpfs directory (default /dev/shm)
#   --vmm PATH         vmm-ref binary (default: cargo build --release -p vmm-ref)
#   --elf PATH         guest image (default: test-guest.elf of that build)
#   --out FILE         also write the markdown report to FILE
# Needs fio unless --iodepth is given (ci/setup.sh installs it).
# Environment: CARGO_TARGET_DIR (where to build / look for the binaries).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

usage() { sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "bench-poll.sh: $*" >&2; exit 2; }

secs=10 rounds=5 drives=16 iothreads="1 2" storage="disk tmpfs" rw=randread
rwmixread=70 modes="classic w1 w2 w3 w4 w5 poll0" iodepth= image_size=128M
disk_dir=/var/tmp tmpfs_dir=/dev/shm vmm= elf= out= quick=0
args=("$@")
# --quick first sets its defaults; options given explicitly still win.
for a in "${args[@]}"; do
    if [ "$a" = --quick ]; then
        quick=1 secs=5 rounds=3 iothreads=1 storage=disk image_size=64M
    fi
done
while [ $# -gt 0 ]; do
    case $1 in
        --quick) shift ;;
        --secs) secs=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --drives) drives=$2; shift 2 ;;
        --iothreads) iothreads=$2; shift 2 ;;
        --storage) storage=$2; shift 2 ;;
        --rw) rw=$2; shift 2 ;;
        --rwmixread) rwmixread=$2; shift 2 ;;
        --modes) modes=$2; shift 2 ;;
        --iodepth) iodepth=$2; shift 2 ;;
        --image-size) image_size=$2; shift 2 ;;
        --disk-dir) disk_dir=$2; shift 2 ;;
        --tmpfs-dir) tmpfs_dir=$2; shift 2 ;;
        --vmm) vmm=$2; shift 2 ;;
        --elf) elf=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
for n in "$secs" "$rounds" "$drives" "$rwmixread" $iothreads ${iodepth:+"$iodepth"}; do
    [[ $n =~ ^[0-9]+$ ]] || die "not a number: '$n'"
done
[ "$rounds" -ge 1 ] && [ "$secs" -ge 1 ] || die "--rounds and --secs must be >= 1"
[ "$drives" -ge 1 ] && [ "$drives" -le 16 ] || die "--drives must be 1..16"
[ "$rwmixread" -le 100 ] || die "--rwmixread must be 0..100"
for t in $iothreads; do [ "$t" -ge 1 ] && [ "$t" -le "$drives" ] || die "--iothreads: 1..drives"; done
for s in $storage; do case $s in disk|tmpfs) ;; *) die "--storage takes disk and/or tmpfs" ;; esac; done
for r in $rw; do case $r in randread|randwrite|randrw) ;; *) die "--rw takes randread randwrite randrw" ;; esac; done
for m in $modes; do [[ $m =~ ^(classic|w[0-9]+|poll0)$ ]] || die "unknown mode $m"; done
[ -c /dev/kvm ] || die "/dev/kvm not available"
if [ -z "$iodepth" ]; then
    command -v fio >/dev/null || die "fio not found (run ci/setup.sh) or pass --iodepth N"
fi

target_dir=${CARGO_TARGET_DIR:-$root/target}
if [ -z "$vmm" ]; then
    echo "bench-poll.sh: cargo build --release -p vmm-ref" >&2
    (cd "$root" && cargo build --release -p vmm-ref >&2)
    vmm=$target_dir/release/vmm-ref
fi
if [ -z "$elf" ]; then
    elf=$(ls -t "$target_dir"/*/build/vmm-ref-*/out/test-guest.elf 2>/dev/null | head -n 1 || true)
    [ -n "$elf" ] || die "no test-guest.elf under $target_dir: build vmm-ref or pass --elf"
fi
[ -f "$elf" ] || die "guest image $elf not found"
[ -x "$vmm" ] || die "vmm-ref binary $vmm not found"

work_disk=$(mktemp -d "$disk_dir/bench-poll-XXXXXX")
work_tmpfs=$(mktemp -d "$tmpfs_dir/bench-poll-XXXXXX")
trap 'rm -rf "$work_disk" "$work_tmpfs"' EXIT

export BP_SECS=$secs BP_ROUNDS=$rounds BP_DRIVES=$drives BP_IOTHREADS=$iothreads
export BP_STORAGE=$storage BP_RW=$rw BP_RWMIXREAD=$rwmixread BP_MODES=$modes
export BP_IODEPTH=$iodepth BP_IMAGE_SIZE=$image_size BP_WORK_DISK=$work_disk
export BP_WORK_TMPFS=$work_tmpfs BP_VMM=$vmm BP_ELF=$elf BP_OUT=$out BP_QUICK=$quick
export BP_LIB=$here

python3 -u - <<'PY'
import json, math, os, subprocess, sys, time
env = os.environ
T0 = time.monotonic()
sys.path.insert(0, env["BP_LIB"])
from benchlib import (Qmp, fields, fmt, load_average, median, paired_ratios, ratio_range,
                      run_vm, tail, cpu_ticks, steal_share)

SECS = int(env["BP_SECS"]); ROUNDS = int(env["BP_ROUNDS"]); DRIVES = int(env["BP_DRIVES"])
IOTHREADS = [int(t) for t in env["BP_IOTHREADS"].split()]
STORAGE = env["BP_STORAGE"].split(); RWS = env["BP_RW"].split()
RWMIX = int(env["BP_RWMIXREAD"]); MODES = env["BP_MODES"].split()
VMM = env["BP_VMM"]; ELF = env["BP_ELF"]; OUT = env["BP_OUT"]; QUICK = env["BP_QUICK"] == "1"
WORK = {"disk": env["BP_WORK_DISK"], "tmpfs": env["BP_WORK_TMPFS"]}
TIMEOUT = SECS + 240


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


SIZE = parse_size(env["BP_IMAGE_SIZE"])
if SIZE < 4 << 20 or SIZE % (1 << 20):
    sys.exit("bench-poll.sh: --image-size must be a whole number of MiB, at least 4M")


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def make_images():
    """DRIVES images per storage. On the disk the data is really written (an
    allocated-but-unwritten extent reads as zeros without touching the
    device); every MiB differs, so nothing below can share blocks."""
    images = {}
    chunk = bytearray(os.urandom(1 << 20))
    for st in STORAGE:
        images[st] = []
        for i in range(DRIVES):
            path = os.path.join(WORK[st], f"d{i}.img")
            with open(path, "wb") as f:
                for mib in range(SIZE >> 20):
                    chunk[0:16] = i.to_bytes(8, "little") + mib.to_bytes(8, "little")
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            images[st].append(path)
    return images


def fio_iops(path, qd, secs):
    out = subprocess.run(
        ["fio", "--name=probe", f"--filename={path}", "--direct=1", "--ioengine=io_uring",
         "--rw=randread", "--bs=4k", f"--iodepth={qd}", f"--runtime={secs}", "--time_based",
         "--output-format=json"], capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0]["read"]
    return job["iops"], job["clat_ns"]["percentile"]["50.000000"] / 1000


def calibrate(images):
    """fio on the first disk image; returns (iodepth per drive, report lines, fio rows)."""
    depths = [1, 4, 16, 64] if QUICK else [1, 2, 4, 8, 16, 32, 64, 128]
    secs = 1 if QUICK else 3
    rows = []
    for qd in depths:
        iops, p50 = fio_iops(images[0], qd, secs)
        rows.append((qd, iops, p50))
        log(f"fio randread 4k O_DIRECT io_uring qd={qd}: {iops:.0f} IOPS, p50 {p50:.0f} µs")
    best = max(r[1] for r in rows)
    knee = next(qd for qd, iops, _ in rows if iops >= 0.9 * best)
    depth = max(1, math.ceil(2 * knee / DRIVES))
    text = [f"fio (4 KiB randread, O_DIRECT, io_uring, {secs} s per depth, on {images[0]}):",
            "", "| iodepth | IOPS | p50 µs |", "|---:|---:|---:|"]
    text += [f"| {qd} | {iops:.0f} | {p50:.0f} |" for qd, iops, p50 in rows]
    text += ["", f"Knee: iodepth {knee} reaches >= 90 % of the best {best:.0f} IOPS; guest iodepth "
             f"per drive {depth} = ceil(2 x {knee} / {DRIVES} drives): {DRIVES * depth} requests in "
             "flight, twice the knee, so the disk is saturated (more depth only queues) and the "
             "guest is not the limit."]
    return depth, text, rows


def mode_opts(mode):
    if mode == "classic":
        return ",poll-algorithm=classic"
    if mode == "poll0":
        return ",poll-max-ns=0"
    return f",poll-weight={int(mode[1:])}"


def mode_name(mode):
    return {"classic": "classic", "poll0": "poll-max-ns=0"}.get(mode) or f"weighted({mode[1:]})"


def vmm_cmd(st, nthreads, rw, mode, depth, sock):
    cmdline = (f"scenario=bench-all bench.secs={SECS} bench.qd={depth} bench.rw={rw} "
               f"bench.rwmixread={RWMIX}")
    cmd = [VMM, "--kernel", ELF, "--memory", "256M", "--vcpus", "1", "--cmdline", cmdline,
           "--qmp", f"unix:{sock}"]
    for t in range(nthreads):
        cmd += ["--object", f"iothread,id=io{t}{mode_opts(mode)}"]
    for i, img in enumerate(IMAGES[st]):
        cmd += ["--drive", f"id=d{i},file={img},num-queues=1,iothread=io{i % nthreads},"
                           "aio=io_uring,direct=on"]
    return cmd


HIST_KEYS = ("samples", "sum_poll_ns", "total_time_ns", "near_max_time_ns",
             "handler_updates", "handler_resets")
# Loop counters: time spent busy-polling, and sleeps (blocking epoll_waits).
LOOP_KEYS = ("poll_time_ns", "blocking_waits")


def poll_totals(stats):
    """Sums of the poll_ns histogram counters over all IOThreads."""
    tot = dict.fromkeys(HIST_KEYS + LOOP_KEYS, 0)
    for s in stats:
        h = s["poll"]["poll_ns_histogram"]
        for k in HIST_KEYS:
            tot[k] += h[k]
        for k in LOOP_KEYS:
            tot[k] += s["poll"][k]
    return tot


def run_one(st, nthreads, rw, mode, depth, n):
    sock = os.path.join(WORK["tmpfs"], f"qmp-{n}.sock")
    qmp = {}

    def stats(_pid):
        try:
            if "c" not in qmp:
                qmp["c"] = Qmp(sock)
            return poll_totals(qmp["c"].execute("x-query-iothread-stats"))
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            return {"error": str(e)}

    t0 = cpu_ticks()
    r = run_vm(vmm_cmd(st, nthreads, rw, mode, depth, sock), "bench: start", "BENCHALL ",
               TIMEOUT, stats, stats)
    steal = steal_share(t0, cpu_ticks())
    if "c" in qmp:
        qmp["c"].close()
    try:
        os.unlink(sock)
    except OSError:
        pass
    line = next((l for l in r["lines"] if l.startswith("BENCHALL ")), None)
    ok = (line is not None and r["status"] == 0
          and any(l.startswith("RESULT bench-all PASS") for l in r["lines"]))
    if not ok or r["cpu"] is None:
        why = "no passing BENCHALL" if not ok else "VM gone before the end snapshot"
        return {"ok": False, "error": f"{why}, exit {r['status']}: {tail(r)}"}
    f = fields(line)
    cpu = r["cpu"]
    res = {"ok": True, "iops": int(f["iops"]), "ios": int(f["ios"]),
           "p50": float(f["lat_p50_us"]), "p99": float(f["lat_p99_us"]),
           "cpu_pct": 100.0 * cpu["device"] / cpu["wall"] if cpu["wall"] > 0 else None,
           "cpu_us": cpu["device"] * 1e6 / int(f["ios"]) if int(f["ios"]) else None,
           "vcpu_pct": 100.0 * cpu["vcpu"] / cpu["wall"] if cpu["wall"] > 0 else None,
           "steal": steal, "mean_poll_ns": None, "reset_rate": None, "near_max": None,
           "poll_pct": None, "sleeps_kio": None}
    s0, s1 = r["start"], r["end"]
    if s0 and s1 and "error" not in s0 and "error" not in s1:
        d = {k: s1[k] - s0[k] for k in HIST_KEYS + LOOP_KEYS}
        if d["samples"] > 0:
            res["mean_poll_ns"] = d["sum_poll_ns"] / d["samples"]
        if d["handler_updates"] > 0:
            res["reset_rate"] = d["handler_resets"] / d["handler_updates"]
        if d["total_time_ns"] > 0:
            res["near_max"] = d["near_max_time_ns"] / d["total_time_ns"]
            # total_time_ns is loop time summed over the IOThreads: per
            # IOThread it is the window, so this is % of one CPU.
            res["poll_pct"] = 100.0 * nthreads * d["poll_time_ns"] / d["total_time_ns"]
        if res["ios"] > 0:
            res["sleeps_kio"] = 1000.0 * d["blocking_waits"] / res["ios"]
    else:
        log(f"bench-poll.sh: x-query-iothread-stats failed: {s0} {s1}")
    return res


log(f"writing {DRIVES} images of {SIZE >> 20} MiB on {' and '.join(STORAGE)}")
IMAGES = make_images()
load0 = load_average()
if env["BP_IODEPTH"]:
    DEPTH, calib_text, fio_rows = int(env["BP_IODEPTH"]), ["iodepth per drive given: "
                                                          f"{env['BP_IODEPTH']}"], []
elif "disk" in IMAGES:
    DEPTH, calib_text, fio_rows = calibrate(IMAGES["disk"])
else:
    DEPTH, calib_text, fio_rows = calibrate(IMAGES["tmpfs"])

configs = [(st, t, rw) for st in STORAGE for t in IOTHREADS for rw in RWS]
results = {(c, m): [] for c in configs for m in MODES}
rows, n = [], 0
for rnd in range(1, ROUNDS + 1):
    for c in configs:
        for m in (MODES if rnd % 2 else MODES[::-1]):
            n += 1
            res = run_one(*c, m, DEPTH, n)
            results[(c, m)].append(res)
            label = f"{c[0]} {c[1]} IOThread(s) {c[2]} {mode_name(m)}"
            if res["ok"]:
                row = (f"| {rnd} | {c[0]} | {c[1]} | {c[2]} | {mode_name(m)} | {res['iops']} | "
                       f"{fmt(res['cpu_pct'])} | {fmt(res['cpu_us'], 2)} | {fmt(res['vcpu_pct'], 0)} | "
                       f"{res['p50']:.0f} | {res['p99']:.0f} | {fmt(res['mean_poll_ns'], 0)} | "
                       f"{fmt(res['reset_rate'] and 100 * res['reset_rate'])} | "
                       f"{fmt(res['near_max'] and 100 * res['near_max'])} | {fmt(res['poll_pct'])} | "
                       f"{fmt(res['sleeps_kio'], 0)} | {100 * res['steal']:.1f} |")
            else:
                row = f"| {rnd} | {c[0]} | {c[1]} | {c[2]} | {mode_name(m)} | FAILED | | | | | | | | | | | |"
                log(f"bench-poll.sh: {label} failed: {res['error']}")
            rows.append(row)
            log(row)


def series(c, m, key):
    """Per-round values (None for failed runs), aligned by round."""
    return [x[key] if x["ok"] else None for x in results[(c, m)]]


def pct(r):
    return "-" if r is None else f"{100 * (r - 1):+.1f} %"


report = [f"vmm-ref, {DRIVES} virtio-blk drives (1 queue each, iodepth {DEPTH} per drive, 4 KiB), "
          f"images {SIZE >> 20} MiB each, `direct=on,aio=io_uring`; guest `bench-all` "
          f"bench.secs={SECS}, {ROUNDS} interleaved rounds; load average {load0} before, "
          f"{load_average()} after.", ""]
report += calib_text + [""]
report += ["Per run (device CPU = vmm-ref minus its vCPU thread, % of one CPU over the window; "
           "poll statistics summed over the IOThreads; steal = host CPU stolen by the hypervisor "
           "during the run):", "",
           "| round | storage | IOThreads | rw | mode | IOPS | device CPU % | CPU µs/IO | vCPU % | "
           "p50 µs | p99 µs | mean poll_ns | reset rate % | time near max % | polling % | "
           "sleeps per 1k I/O | steal % |",
           "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"] + rows
result_line = "RESULT weighted(3)/classic cpu=n/a iops=n/a"
for c in configs:
    st, t, rw = c
    report += ["", f"### {st}, {t} IOThread{'s' if t > 1 else ''}, {rw}", "",
               "Medians over the rounds; \"vs classic\" = median of the per-round ratios "
               "mode/classic (paired: same round), as a change in %, then the ratios' "
               "median [min-max].", "",
               "| mode | IOPS | device CPU % | CPU µs/IO | throughput vs classic | CPU vs classic | "
               "IOPS ratio | CPU ratio | mean poll_ns | reset rate | time near max | polling % | "
               "sleeps per 1k I/O |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in MODES:
        iops_r = cpu_r = []
        if "classic" in MODES:
            iops_r = paired_ratios(series(c, m, "iops"), series(c, "classic", "iops"))
            cpu_r = paired_ratios(series(c, m, "cpu_pct"), series(c, "classic", "cpu_pct"))
        mi, mc = median(iops_r), median(cpu_r)
        rr, nm = median(series(c, m, "reset_rate")), median(series(c, m, "near_max"))
        report.append(
            f"| {mode_name(m)} | {fmt(median(series(c, m, 'iops')), 0)} | "
            f"{fmt(median(series(c, m, 'cpu_pct')))} | {fmt(median(series(c, m, 'cpu_us')), 2)} | "
            f"{pct(mi)} | {pct(mc)} | {ratio_range(iops_r)} | {ratio_range(cpu_r)} | "
            f"{fmt(median(series(c, m, 'mean_poll_ns')), 0)} | "
            f"{'-' if rr is None else f'{100 * rr:.1f} %'} | "
            f"{'-' if nm is None else f'{100 * nm:.1f} %'} | "
            f"{fmt(median(series(c, m, 'poll_pct')))} | "
            f"{fmt(median(series(c, m, 'sleeps_kio')), 0)} |")
        if (m == "w3" and st == STORAGE[0] and t == 1 and rw == "randread"
                and mi is not None and mc is not None):
            result_line = f"RESULT weighted(3)/classic cpu={mc:.3f} iops={mi:.3f}"
    if fio_rows and st == "disk" and "classic" in MODES:
        total = DRIVES * DEPTH
        near = min(fio_rows, key=lambda r: abs(math.log(r[0] / total)))
        g = median(series(c, "classic", "iops"))
        if g is not None:
            report += ["", f"Disk-bound check: classic's {g:.0f} guest IOPS at {total} in flight vs "
                       f"fio's {near[1]:.0f} at iodepth {near[0]} ({g / near[1]:.2f}x)."]
    vcpu = median([v for m in MODES for v in series(c, m, "vcpu_pct")])
    if vcpu is not None and vcpu < 80:
        report += ["", f"WARNING: the guest's vCPU thread got a median {vcpu:.0f} % of a CPU "
                   "during these runs: the host was loaded, so the guest (not the disk) limited "
                   "IOPS, and CPU the IOThread spends polling was taken from the guest. Such "
                   "numbers do not describe the disk-bound regime; rerun on a quiet machine."]
text = "\n".join(report) + "\n"
sys.stdout.write(text)
if OUT:
    with open(OUT, "w") as f:
        f.write(text + "\n" + result_line + "\n")
failed = sum(1 for v in results.values() for x in v if not x["ok"])
if failed:
    log(f"bench-poll.sh: {failed} run(s) failed")
print(result_line)
sys.exit(1 if failed else 0)
PY

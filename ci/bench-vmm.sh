#!/usr/bin/env bash
# vmm-ref vs QEMU microvm on identical guest work (issue #15; not run in CI).
#
# The same test-guest ELF (vmm-ref/guest, PVH entry under QEMU, 64-bit entry
# under vmm-ref) runs `scenario=bench` against one virtio-mmio virtio-blk
# device backed by the same raw image, O_DIRECT + io_uring on both sides
# (vmm-ref `direct=on,aio=io_uring`, QEMU `cache=none,aio=io_uring`), with the
# same IOThread poll-max-ns. Two guest driver profiles (`bench.profile=`):
# `ours` (our driver's habits: up to 256-entry rings, descriptors from a free
# list, one avail-index store per batch, used_event one behind, rewritten at
# every completion) and `alt` (an independent polled driver's habits:
# 128-entry rings, fixed 3-descriptor chains, every chain published on its
# own, used_event kept far ahead; both: a kick only when
# vring_need_event(avail_event, new, old) says so, after a full barrier).
# Two image locations: tmpfs (--tmpfs-dir; io_uring cannot complete tmpfs
# reads inline, every request goes to an io-wq worker) and the host's real
# disk (--disk-dir, ext4 /var/tmp here; written with data; O_DIRECT reads
# complete inline with real service time). Queue configurations: `1` (one
# queue), `4` (four queues, one IOThread), `4x2` (four queues over io0:io1:
# vmm-ref `iothread-vq-mapping=io0:io1`; QEMU 7.2 has no vq mapping, so its
# side of that pair is its `4` run of the same round, all queues on one
# IOThread).
#
# Runs are interleaved: every configuration once per round, order reversed
# every other round, so a drift of the host load favours none. Per run:
# the guest's IOPS, I/Os per kick and latency, and the host CPU of the VMM
# process over the benchmark window (from the guest's `bench: start` line to
# its BENCH line; the guest then runs `hold` for a second so that the VM is
# complete at that moment; its RESULT must PASS too): utime+stime from
# /proc/<pid>/stat (exited io_uring workers included) and per thread from
# /proc/<pid>/task/*/stat, and how often the IOThreads blocked (voluntary
# context switches from /proc/<pid>/task/*/status: a sleep in epoll_wait,
# ppoll or io_uring_enter is one). "device" CPU leaves the vCPU threads out (vmm-ref
# `vcpuN`, QEMU `CPU N/KVM`): IOThreads, io_uring workers, main loop;
# "total" is the whole process. All CPU columns are µs per I/O. The guest
# busy-polls its used rings, so its vCPU is ~100 % busy when scheduled: on a
# loaded host IOPS follow the scheduler's share ("vCPU %"); compare CPU per
# I/O and I/Os per kick.
#
# Report: per-run table, medians per configuration, and the vmm-ref/QEMU
# ratios paired per round (median [min-max]) of IOPS, I/Os per kick, device
# CPU per I/O and total CPU per I/O; likewise vmm-ref poll-max-ns=N / 0.
# With --base PATH a second vmm-ref binary (e.g. main's build) runs every
# vmm-ref configuration too, as VMM `base`, interleaved with the others in
# the same rounds: the report adds vmm-ref / base and base / QEMU, an A/B of
# a change against the code it started from under the same host load.
#
# usage: ci/bench-vmm.sh [options]
#   --quick           short run (~4 min): --secs 2 --rounds 2 --queues "1 4x2" --no-poll0
#   --secs N          bench.secs per run (default 5)
#   --rounds N        interleaved rounds (default 5)
#   --qd N            bench.qd, requests in flight per queue (default 32)
#   --queues "1 4 4x2"  queue configurations (default all three)
#   --profiles "ours alt"  guest driver profiles (default both)
#   --storage "tmpfs disk" image locations (default both)
#   --rw MODE         randread | randwrite | randrw (default randread)
#   --poll-max-ns N   IOThread poll-max-ns of both VMMs (default 32768)
#   --disk-size SIZE  image size (default 256M)
#   --tmpfs-dir DIR   tmpfs directory (default /dev/shm)
#   --disk-dir DIR    real-disk directory (default /var/tmp)
#   --vmm PATH        vmm-ref binary (default: cargo build --release -p vmm-ref)
#   --base PATH       a second vmm-ref binary run as VMM `base` (A/B against it);
#                     may be the --vmm binary itself, run with --base-opts
#   --vmm-opts OPTS   extra IOThread properties for vmm-ref, e.g. poll-algorithm=classic
#   --base-opts OPTS  extra IOThread properties for `base` (e.g. --base <same binary>
#                     --base-opts poll-algorithm=classic: weighted and classic polling
#                     against QEMU 7.2, whose polling is the classic algorithm, in one run)
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

secs=5 rounds=5 qd=32 queues="1 4 4x2" profiles="ours alt" storage="tmpfs disk"
rw=randread poll_max_ns=32768 disk_size=256M tmpfs_dir=/dev/shm disk_dir=/var/tmp
vmm= base= elf= qemu=qemu-system-x86_64 only= poll0=1 out= vmm_opts= base_opts=
# --quick first sets its defaults; options given explicitly still win.
for a in "$@"; do
    if [ "$a" = --quick ]; then
        secs=2 rounds=2 queues="1 4x2" poll0=0
    fi
done
while [ $# -gt 0 ]; do
    case $1 in
        --quick) shift ;;
        --secs) secs=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --qd) qd=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --profiles) profiles=$2; shift 2 ;;
        --storage) storage=$2; shift 2 ;;
        --rw) rw=$2; shift 2 ;;
        --poll-max-ns) poll_max_ns=$2; shift 2 ;;
        --disk-size) disk_size=$2; shift 2 ;;
        --tmpfs-dir) tmpfs_dir=$2; shift 2 ;;
        --disk-dir) disk_dir=$2; shift 2 ;;
        --vmm) vmm=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --vmm-opts) vmm_opts=$2; shift 2 ;;
        --base-opts) base_opts=$2; shift 2 ;;
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
case $rw in randread|randwrite|randrw) ;; *) die "--rw takes randread, randwrite or randrw" ;; esac
for o in "$vmm_opts" "$base_opts"; do
    [[ $o =~ ^([a-z-]+=[A-Za-z0-9_.-]+)?(,[a-z-]+=[A-Za-z0-9_.-]+)*$ ]] ||
        die "--vmm-opts/--base-opts take key=value[,key=value...]: '$o'"
done
for n in "$secs" "$rounds" "$qd" "$poll_max_ns"; do
    [[ $n =~ ^[0-9]+$ ]] || die "not a number: '$n'"
done
for q in $queues; do [[ $q =~ ^(1|4|4x2)$ ]] || die "--queues takes 1, 4 and/or 4x2"; done
for p in $profiles; do case $p in ours|alt) ;; *) die "--profiles takes ours and/or alt" ;; esac; done
for s in $storage; do case $s in tmpfs|disk) ;; *) die "--storage takes tmpfs and/or disk" ;; esac; done
[ -n "$queues" ] && [ -n "$profiles" ] && [ -n "$storage" ] || die "empty --queues/--profiles/--storage"
[ "$rounds" -ge 1 ] && [ "$secs" -ge 1 ] || die "--rounds and --secs must be >= 1"
[[ $disk_size =~ ^[0-9]+[MG]$ ]] || die "--disk-size takes <n>M or <n>G"
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
[ -z "$base" ] || [ -x "$base" ] || die "base vmm-ref binary $base not found"
[ -z "$base" ] || [ "$only" != qemu ] || die "--base runs vmm-ref configurations: not with --only qemu"
[ "$only" = vmm-ref ] || command -v "$qemu" >/dev/null || die "$qemu not found"

images=()
trap 'rm -f "${images[@]}"' EXIT
image_tmpfs= image_disk=
for s in $storage; do
    if [ "$s" = tmpfs ]; then
        image_tmpfs=$(mktemp "$tmpfs_dir/bench-vmm-XXXXXX.img")
        images+=("$image_tmpfs")
        # Allocated (not sparse), so that reads hit real tmpfs pages on both sides.
        fallocate -l "$disk_size" "$image_tmpfs" 2>/dev/null || truncate -s "$disk_size" "$image_tmpfs"
    else
        image_disk=$(mktemp "$disk_dir/bench-vmm-XXXXXX.img")
        images+=("$image_disk")
        # Written with data: an allocated but unwritten extent reads as zeros
        # without reaching the device.
        echo "bench-vmm.sh: writing $disk_size to $image_disk" >&2
        mib=${disk_size%[MG]}
        [ "${disk_size: -1}" = G ] && mib=$((mib * 1024))
        dd if=/dev/urandom of="$image_disk" bs=1M count="$mib" conv=fsync status=none
    fi
done

export BENCH_SECS=$secs BENCH_ROUNDS=$rounds BENCH_QD=$qd BENCH_QUEUES=$queues
export BENCH_PROFILES=$profiles BENCH_STORAGE=$storage BENCH_RW=$rw
export BENCH_POLL_MAX_NS=$poll_max_ns BENCH_IMAGE_TMPFS=$image_tmpfs BENCH_IMAGE_DISK=$image_disk
export BENCH_VMM=$vmm BENCH_BASE=$base BENCH_ELF=$elf BENCH_QEMU=$qemu BENCH_ONLY=$only
export BENCH_POLL0=$poll0 BENCH_OUT=$out BENCH_LIB=$here
export BENCH_VMM_OPTS=$vmm_opts BENCH_BASE_OPTS=$base_opts

python3 -u - <<'PY'
import os, re, sys, time
env = os.environ
sys.path.insert(0, env["BENCH_LIB"])
from benchlib import fields, fmt, load_average, median, paired_ratios, ratio_range, run_vm, tail

SECS = int(env["BENCH_SECS"]); ROUNDS = int(env["BENCH_ROUNDS"]); QD = int(env["BENCH_QD"])
QUEUES = env["BENCH_QUEUES"].split(); PROFILES = env["BENCH_PROFILES"].split()
STORAGE = env["BENCH_STORAGE"].split(); RW = env["BENCH_RW"]; POLL = int(env["BENCH_POLL_MAX_NS"])
IMAGE = {"tmpfs": env["BENCH_IMAGE_TMPFS"], "disk": env["BENCH_IMAGE_DISK"]}
VMM = env["BENCH_VMM"]; BASE = env["BENCH_BASE"]; ELF = env["BENCH_ELF"]; QEMU = env["BENCH_QEMU"]
ONLY = env["BENCH_ONLY"]; POLL0 = env["BENCH_POLL0"] == "1"; OUT = env["BENCH_OUT"]
VMM_OPTS = env["BENCH_VMM_OPTS"]; BASE_OPTS = env["BENCH_BASE_OPTS"]
TIMEOUT = SECS + 240  # boot + bench on a loaded 2-core machine
T0 = time.monotonic()
tsc_khz = None  # taken from the first vmm-ref run (KVM_GET_TSC_KHZ), then given to QEMU too


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def guest_cmdline(profile, with_tsc):
    # `hold` keeps the VM (vCPU, IOThread) alive for a second after the BENCH
    # line, so that the per-thread CPU snapshot taken then is complete.
    words = ["scenario=bench,hold", "hold.secs=1", f"bench.secs={SECS}", f"bench.qd={QD}",
             f"bench.rw={RW}", f"bench.profile={profile}"]
    if with_tsc and tsc_khz:
        words.append(f"tsc_khz={tsc_khz}")
    return " ".join(words)


def nqueues(qcfg):
    return int(qcfg.split("x")[0])


def vmm_ref_cmd(profile, storage, qcfg, poll, binary, opts):
    # vmm-ref appends virtio_mmio.device= and tsc_khz= itself.
    mapping = "iothread-vq-mapping=io0:io1" if qcfg == "4x2" else "iothread=io0"
    extra = f",{opts}" if opts else ""
    cmd = [binary, "--kernel", ELF, "--memory", "256M", "--vcpus", "1",
           "--cmdline", guest_cmdline(profile, False),
           "--object", f"iothread,id=io0,poll-max-ns={poll}{extra}"]
    if qcfg == "4x2":
        cmd += ["--object", f"iothread,id=io1,poll-max-ns={poll}{extra}"]
    return cmd + ["--drive", f"id=d0,file={IMAGE[storage]},num-queues={nqueues(qcfg)},"
                             f"queue-size=256,{mapping},aio=io_uring,direct=on"]


def qemu_cmd(profile, storage, qcfg, poll):
    return [QEMU, "-M", "microvm,x-option-roms=on,acpi=off", "-accel", "kvm",
            "-cpu", "host,arch-capabilities=off", "-m", "256M", "-smp", "1",
            "-name", "bench-vmm,debug-threads=on", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", ELF, "-append", guest_cmdline(profile, True),
            "-global", "virtio-mmio.force-legacy=false",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-object", f"iothread,id=io0,poll-max-ns={poll}",
            "-drive", f"id=d0,file={IMAGE[storage]},format=raw,if=none,cache=none,aio=io_uring",
            "-device", f"virtio-blk-device,drive=d0,num-queues={nqueues(qcfg)},queue-size=256,"
                       "iothread=io0"]


def run(unit):
    """One VMM run; CPU over the benchmark window only."""
    kind, profile, storage, qcfg, poll = unit
    if kind == "qemu":
        cmd = qemu_cmd(profile, storage, qcfg, poll)
    else:
        binary, opts = (BASE, BASE_OPTS) if kind == "base" else (VMM, VMM_OPTS)
        cmd = vmm_ref_cmd(profile, storage, qcfg, poll, binary, opts)
    r = run_vm(cmd, "bench: start", "BENCH ", TIMEOUT)
    line = next((l for l in r["lines"] if l.startswith("BENCH ")), None)
    ok = (line is not None and any(l.startswith("RESULT bench PASS") for l in r["lines"])
          and any(l.startswith("RESULT hold PASS") for l in r["lines"]))
    if not ok or r["cpu"] is None:
        why = "no passing BENCH result" if not ok else "VM gone before the end snapshot"
        return {"ok": False, "error": f"{why}, exit {r['status']}: {tail(r)}"}
    global tsc_khz
    if kind == "vmm-ref" and tsc_khz is None:
        t = next((re.match(r"tsc: (\d+) kHz \(cmdline\)", l) for l in r["lines"]
                  if l.startswith("tsc: ")), None)
        if t:
            tsc_khz = int(t.group(1))
    f = fields(line)
    ios, kicks, c = int(f["ios"]), int(f["kicks"]), r["cpu"]
    return {"ok": True, "iops": int(f["iops"]), "ios": ios, "kicks": kicks,
            "ios_per_kick": ios / kicks if kicks else float(ios),
            "p50": float(f["lat_p50_us"]), "p99": float(f["lat_p99_us"]),
            "cpu_us": c["total"] * 1e6 / ios, "dev_us": c["device"] * 1e6 / ios,
            "iothread_us": c["iothread"] * 1e6 / ios, "workers_us": c["workers"] * 1e6 / ios,
            "sleeps_per_k": c["iothread_sleeps"] * 1000 / ios, "kicks_per_k": kicks * 1000 / ios,
            "vcpu_share": 100.0 * c["vcpu"] / c["wall"] if c["wall"] > 0 else None,
            "run_cpu": r["run_cpu"]}


def qemu_qcfg(qcfg):
    # QEMU 7.2 cannot map queues to two IOThreads: its side of a 4x2 pair is its 4-queue run.
    return "4" if qcfg == "4x2" else qcfg


units = []
for profile in PROFILES:
    for storage in STORAGE:
        for q in QUEUES:
            if ONLY != "qemu":
                units.append(("vmm-ref", profile, storage, q, POLL))
                if BASE:
                    units.append(("base", profile, storage, q, POLL))
            qu = ("qemu", profile, storage, qemu_qcfg(q), POLL)
            if ONLY != "vmm-ref" and qu not in units:
                units.append(qu)
            if ONLY != "qemu" and POLL0 and POLL != 0:
                units.append(("vmm-ref", profile, storage, q, 0))


def label(u):
    kind, profile, storage, q, poll = u
    return f"{kind} {profile} {storage} q={q} poll-max-ns={poll}"


results = {u: [] for u in units}
rows = []
for rnd in range(1, ROUNDS + 1):
    for u in (units if rnd % 2 else units[::-1]):
        res = run(u)
        results[u].append(res)
        kind, profile, storage, q, poll = u
        head = f"| {rnd} | {kind} | {profile} | {storage} | {q} | {poll} |"
        if res["ok"]:
            line = (f"{head} {res['iops']} | {res['ios_per_kick']:.1f} | {res['dev_us']:.2f} | "
                    f"{res['cpu_us']:.2f} | {res['iothread_us']:.2f} | {res['workers_us']:.2f} | "
                    f"{fmt(res['vcpu_share'], 0)} | {res['sleeps_per_k']:.1f} | {res['p50']:.1f} | "
                    f"{res['p99']:.1f} | {res['run_cpu']:.2f} |")
        else:
            line = f"{head} FAILED | | | | | | | | | | |"
            log(f"bench-vmm.sh: {label(u)} failed: {res['error']}")
        rows.append(line)
        log(line)


def series(u, key):
    """Per-round values of a unit (None where the run failed)."""
    return [x[key] if x["ok"] else None for x in results.get(u, [])]


def med(u, key):
    return median(series(u, key))


METRICS = (("iops", "IOPS"), ("ios_per_kick", "I/Os per kick"),
           ("dev_us", "device CPU per I/O"), ("cpu_us", "total CPU per I/O"))
report = [f"guest `{guest_cmdline('<profile>', False)}`, one virtio-blk device, O_DIRECT + io_uring "
          f"on both sides, poll-max-ns={POLL}, queue-size 256 offered; images: "
          + ", ".join(f"{s} {IMAGE[s]}" for s in STORAGE)
          + f"; {ROUNDS} interleaved rounds; load average after the runs: {load_average()}"
          + (f"; vmm-ref IOThread options `{VMM_OPTS}`" if VMM_OPTS else "")
          + (f"; VMM `base` = {BASE}" if BASE else "")
          + (f" with IOThread options `{BASE_OPTS}`" if BASE and BASE_OPTS else ""), "",
          "| round | VMM | profile | storage | queues | poll-max-ns | IOPS | I/Os per kick | "
          "device CPU µs/IO | total CPU µs/IO | IOThread | io_uring workers | vCPU % | "
          "IOThread sleeps per 1k I/O | p50 µs | p99 µs | CPU s whole run |",
          "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
report += rows
report += ["", "Medians:", "",
           "| VMM | profile | storage | queues | poll-max-ns | IOPS | I/Os per kick | device CPU µs/IO | "
           "total CPU µs/IO | IOThread | io_uring workers | vCPU % | IOThread sleeps per 1k I/O | "
           "kicks per 1k I/O |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for u in units:
    kind, profile, storage, q, poll = u
    report.append(f"| {kind} | {profile} | {storage} | {q} | {poll} | {fmt(med(u, 'iops'), 0)} | "
                  f"{fmt(med(u, 'ios_per_kick'))} | {fmt(med(u, 'dev_us'), 2)} | "
                  f"{fmt(med(u, 'cpu_us'), 2)} | {fmt(med(u, 'iothread_us'), 2)} | "
                  f"{fmt(med(u, 'workers_us'), 2)} | {fmt(med(u, 'vcpu_share'), 0)} | "
                  f"{fmt(med(u, 'sleeps_per_k'))} | {fmt(med(u, 'kicks_per_k'))} |")
report += ["", "Paired ratios (per round: same round, same profile and image; median [min-max]):", "",
           "| comparison | profile | storage | queues | " + " | ".join(m[1] for m in METRICS) + " |",
           "|---|---|---|---|" + "---:|" * len(METRICS)]
for profile in PROFILES:
    for storage in STORAGE:
        for q in QUEUES:
            pairs = []
            a = ("vmm-ref", profile, storage, q, POLL)
            if ONLY == "":
                name = "vmm-ref / QEMU" + (" (QEMU: 4 queues on io0)" if q == "4x2" else "")
                pairs.append((name, a, ("qemu", profile, storage, qemu_qcfg(q), POLL)))
            if BASE:
                pairs.append(("vmm-ref / base", a, ("base", profile, storage, q, POLL)))
                if ONLY == "":
                    name = "base / QEMU" + (" (QEMU: 4 queues on io0)" if q == "4x2" else "")
                    pairs.append((name, ("base", profile, storage, q, POLL),
                                  ("qemu", profile, storage, qemu_qcfg(q), POLL)))
            if ONLY != "qemu" and POLL0 and POLL != 0:
                pairs.append((f"vmm-ref poll-max-ns={POLL} / 0", a, ("vmm-ref", profile, storage, q, 0)))
            for name, x, y in pairs:
                cells = [ratio_range(paired_ratios(series(x, k), series(y, k))) for k, _ in METRICS]
                report.append(f"| {name} | {profile} | {storage} | {q} | " + " | ".join(cells) + " |")
text = "\n".join(report) + "\n"
sys.stdout.write(text)
if OUT:
    with open(OUT, "w") as f:
        f.write(text)
failed = sum(1 for u in units for x in results[u] if not x["ok"])
sys.exit(1 if failed else 0)
PY

#!/usr/bin/env bash
# bench-export-kvm.sh — the export benchmark with vmm-ref + the test guest on KVM
# as the vhost-user front-end (`FRONTEND=kvm ci/bench-export.sh` runs this).
#
# The TCG Linux guest of bench-export.sh saturates its own CPU at ~5-11k IOPS;
# here the front-end is vmm-ref with the freestanding test guest (its `bench`
# scenario, a fixed profile: random 4 KiB reads, QD requests in flight on every
# queue, polled at CPL3), connected with `--device vhost-user-blk` to:
#   qsd              qemu-storage-daemon, vhost-user-blk export, aio=io_uring
#   qsd:aio=threads  the same with QEMU's thread pool
#   ours             `vmm-ref export` (default engine)
#   ours:aio=X       `vmm-ref export` with --drive ...,aio=X
# all with one IOThread `io0` with the same poll-max-ns, the same image, the
# same queue count, and on two disks:
#   tmpfs  the image in /dev/shm (io_uring cannot complete tmpfs reads inline:
#          every read goes to an io-wq worker), no O_DIRECT (tmpfs has none)
#   disk   the image in /var/tmp on the real disk, O_DIRECT on both sides
#          (qsd cache.direct=on, ours cache.direct=on)
# Rounds are interleaved (every configuration once per round, even rounds in
# reverse order). Per run the back-end process's CPU time (utime+stime, all
# threads incl. io_uring workers, from /proc/<pid>/stat) is sampled when the
# guest starts the benchmark (its `seed:` line) and when it reports (its
# `BENCH` line; `hold` then keeps the VM up for a second): back-end CPU per
# I/O = that delta / the guest's I/O count (per run also its IOThread and
# io_uring-worker shares, by thread name: qemu-storage-daemon does not name
# its IOThread, so only its io workers show). Reported per disk and
# configuration: median IOPS and CPU per I/O, and the paired ratios to
# qemu-storage-daemon (each run / the qsd run of the same round): median and
# [min-max] over the rounds. CPU ratio < 1 = cheaper per I/O than QEMU.
#
# The front-end (vmm-ref, its vCPU spinning on the used rings) is pinned to
# CPU $GUEST_CPU, the back-end to CPU $BACKEND_CPU.
#
# Environment: ROUNDS (5), SECS (10, bench.secs), QD (32 per queue), QUEUES (2),
# RW (randread|randwrite), CONFIGS ("qsd qsd:aio=threads ours"), DISKS
# ("tmpfs disk"), POLL_MAX_NS (32768), IMG_MIB (256), GUEST_CPU (0),
# BACKEND_CPU (1), PIN (1), OUT (/tmp/bench-export-kvm.txt),
# VMM (vmm-ref binary; default: cargo build --release), ELF (test guest).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
log() { printf '[bench-export-kvm] %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[ -c /dev/kvm ] || die "/dev/kvm not available"
command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not found (ci/setup.sh installs it)"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${VMM:-}" ]; then
    log "cargo build --release -p vmm-ref"
    (cd "$ROOT" && cargo build -j 2 --release -p vmm-ref >&2)
    VMM=$TARGET/release/vmm-ref
fi
if [ -z "${ELF:-}" ]; then
    # The guest build is bit-for-bit the same in every profile.
    ELF=$(ls -t "$TARGET"/*/build/vmm-ref-*/out/test-guest.elf 2>/dev/null | head -n 1 || true)
    [ -n "$ELF" ] || die "no test-guest.elf under $TARGET: build vmm-ref or set ELF"
fi
[ -x "$VMM" ] || die "vmm-ref binary $VMM not found"

WORK=$(mktemp -d /tmp/bench-export-kvm.XXXXXX)
IMGS=()
cleanup() {
    rm -rf "$WORK"
    [ ${#IMGS[@]} -eq 0 ] || rm -f "${IMGS[@]}"
}
trap cleanup EXIT

IMG_MIB=${IMG_MIB:-256}
declare -A IMAGE
for d in ${DISKS:-tmpfs disk}; do
    case $d in
        tmpfs) IMAGE[$d]=/dev/shm/bench-export-kvm-$$.img ;;
        disk) IMAGE[$d]=/var/tmp/bench-export-kvm-$$.img ;;
        *) die "unknown disk '$d' (tmpfs or disk)" ;;
    esac
    IMGS+=("${IMAGE[$d]}")
    # Written once (not sparse): reads hit real pages / real blocks.
    dd if=/dev/urandom of="${IMAGE[$d]}" bs=1M count="$IMG_MIB" status=none conv=fsync
done
export BENCH_IMAGES
BENCH_IMAGES=$(for d in "${!IMAGE[@]}"; do printf '%s=%s ' "$d" "${IMAGE[$d]}"; done)

export BENCH_VMM=$VMM BENCH_ELF=$ELF BENCH_WORK=$WORK
export BENCH_ROUNDS=${ROUNDS:-5} BENCH_SECS=${SECS:-10} BENCH_QD=${QD:-32}
export BENCH_QUEUES=${QUEUES:-2} BENCH_RW=${RW:-randread}
export BENCH_CONFIGS=${CONFIGS:-"qsd qsd:aio=threads ours"} BENCH_DISKS=${DISKS:-"tmpfs disk"}
export BENCH_POLL=${POLL_MAX_NS:-32768} BENCH_PIN=${PIN:-1}
export BENCH_GUEST_CPU=${GUEST_CPU:-0} BENCH_BACKEND_CPU=${BACKEND_CPU:-1}
export BENCH_OUT=${OUT:-/tmp/bench-export-kvm.txt} BENCH_LIB=$HERE

python3 -u - <<'PY'
import os, subprocess, sys, time
env = os.environ
sys.path.insert(0, env["BENCH_LIB"])
from benchlib import (IO_WORKER_THREAD, IOTHREAD_THREAD, fields, load_average, median,
                      paired_ratios, ratio_range, run_vm, snapshot, tail)

VMM, ELF, WORK = env["BENCH_VMM"], env["BENCH_ELF"], env["BENCH_WORK"]
ROUNDS, SECS, QD = int(env["BENCH_ROUNDS"]), int(env["BENCH_SECS"]), int(env["BENCH_QD"])
QUEUES, RW, POLL = int(env["BENCH_QUEUES"]), env["BENCH_RW"], int(env["BENCH_POLL"])
CONFIGS, DISKS = env["BENCH_CONFIGS"].split(), env["BENCH_DISKS"].split()
IMAGES = dict(kv.split("=", 1) for kv in env["BENCH_IMAGES"].split())
PIN = env["BENCH_PIN"] == "1"
GUEST_CPU, BACKEND_CPU = env["BENCH_GUEST_CPU"], env["BENCH_BACKEND_CPU"]
OUT = env["BENCH_OUT"]
TIMEOUT = SECS + 240  # boot + bench on a loaded 2-core machine


def log(msg):
    print(f"[bench-export-kvm] {msg}", file=sys.stderr, flush=True)


def pin(cpu):
    return ["taskset", "-c", cpu] if PIN else []


def backend_cmd(cfg, disk, sock):
    img, direct = IMAGES[disk], disk == "disk"
    name, _, opts = cfg.partition(":")
    opts = dict(o.split("=", 1) for o in opts.split(",") if o)
    iothread = f"iothread,id=io0,poll-max-ns={POLL}"
    if name == "qsd":
        aio = opts.pop("aio", "io_uring")
        bd = f"driver=file,node-name=f0,filename={img},aio={aio}"
        if direct:
            bd += ",cache.direct=on"
        cmd = ["qemu-storage-daemon", "--blockdev", bd, "--object", iothread, "--export",
               f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
               f"writable=on,num-queues={QUEUES},iothread=io0"]
    elif name == "ours":
        drive = f"id=d0,file={img}"
        if direct:
            drive += ",cache.direct=on"
        if "aio" in opts:
            drive += f",aio={opts.pop('aio')}"
        cmd = [VMM, "export", "--drive", drive, "--object", iothread, "--export",
               f"vhost-user-blk,id=e0,node-name=d0,addr=unix:{sock},num-queues={QUEUES},iothread=io0"]
    else:
        sys.exit(f"unknown configuration {cfg}")
    if opts:
        sys.exit(f"unknown options {opts} in configuration {cfg}")
    return pin(BACKEND_CPU) + cmd  # taskset execs: the pid is the back-end's


def frontend_cmd(sock):
    # `hold` keeps the VM up for a second after the BENCH line.
    cmdline = (f"scenario=bench,hold hold.secs=1 bench.secs={SECS} bench.qd={QD} "
               f"bench.rw={RW} verify.seed=1")
    return pin(GUEST_CPU) + [VMM, "--kernel", ELF, "--memory", "256M", "--cmdline", cmdline,
        "--chardev", f"socket,id=c0,path={sock}",
        "--device", f"vhost-user-blk,id=vu0,chardev=c0,num-queues={QUEUES},queue-size=256"]


def backend_cpu(s0, s1):
    """Back-end CPU seconds between two snapshots: total, IOThread, io workers."""
    def cls(pattern):
        return sum(c - s0["threads"].get(tid, (name, 0.0))[1]
                   for tid, (name, c) in s1["threads"].items() if pattern.match(name))
    return s1["total"] - s0["total"], cls(IOTHREAD_THREAD), cls(IO_WORKER_THREAD)


def run_one(n, disk, cfg):
    sock = f"{WORK}/s{n}.sock"
    blog_path = f"{WORK}/backend.{n}.log"
    with open(blog_path, "w") as blog:
        b = subprocess.Popen(backend_cmd(cfg, disk, sock), stdin=subprocess.DEVNULL,
                             stdout=blog, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not os.path.exists(sock):
        if b.poll() is not None or time.time() > deadline:
            sys.exit(f"{cfg}: back-end did not listen: {open(blog_path).read()}")
        time.sleep(0.02)
    run = run_vm(frontend_cmd(sock), "seed: ", "BENCH ", TIMEOUT,
                 on_start=lambda _pid: snapshot(b.pid), on_end=lambda _pid: snapshot(b.pid))
    b.terminate()
    b.wait()
    bench = next((l for l in run["lines"] if l.startswith("BENCH ")), None)
    ok = any(l.startswith("RESULT bench PASS") for l in run["lines"])
    if not (ok and bench and run["start"] and run["end"] and run["cpu"]):
        sys.exit(f"{disk} {cfg}: the guest did not pass its bench:\n{tail(run, 20)}\n"
                 f"back-end log:\n{open(blog_path).read()}")
    f = fields(bench)
    ios, iops = int(f["ios"]), int(f["iops"])
    total, iothread, workers = backend_cpu(run["start"], run["end"])
    us = lambda s: s / ios * 1e6
    return {"iops": iops, "cpu": us(total), "iothread": us(iothread), "workers": us(workers),
            "front": us(run["cpu"]["total"]), "p50": float(f["lat_p50_us"]),
            "per_kick": ios / max(int(f["kicks"]), 1)}


report = [f"# bench-export FRONTEND=kvm: vmm-ref + test guest (bench: {RW} 4k, "
          f"{QUEUES} queues x QD {QD}, {SECS} s), {ROUNDS} interleaved rounds, "
          f"IOThread poll-max-ns={POLL}, {time.strftime('%Y-%m-%d', time.gmtime())}, "
          f"load average {load_average()}"
          + (f", front-end on CPU {GUEST_CPU}, back-end on CPU {BACKEND_CPU}" if PIN else "")]
n = 0
for disk in DISKS:
    runs = {}  # (round, cfg) -> result
    for r in range(1, ROUNDS + 1):
        for cfg in (CONFIGS if r % 2 else list(reversed(CONFIGS))):
            n += 1
            res = runs[(r, cfg)] = run_one(n, disk, cfg)
            log(f"{disk} round {r}: {cfg:<16} {res['iops']:>8} IOPS  back-end {res['cpu']:6.2f} us/IO "
                f"(IOThread {res['iothread']:.2f}, io workers {res['workers']:.2f})  "
                f"front-end {res['front']:6.2f} us/IO  p50 {res['p50']:.1f} us  "
                f"{res['per_kick']:.1f} IOs/kick")
    what = {"tmpfs": "image on tmpfs (/dev/shm), buffered",
            "disk": "image in /var/tmp, O_DIRECT"}[disk]
    report.append(f"## {disk}: {what}")
    report.append("# per run: round config IOPS back-end-us/IO (IOThread, io workers) front-end-us/IO")
    for (r, cfg), res in sorted(runs.items()):
        report.append(f"#   {r:2} {cfg:<16} {res['iops']:8} {res['cpu']:8.2f} "
                      f"({res['iothread']:.2f}, {res['workers']:.2f}) {res['front']:8.2f}")
    report.append("# back-end us/IO and IOPS: medians; paired = each run / the qsd run of "
                  "the same round: median [min-max]")
    report.append(f"{'config':<16} {'IOPS':>9} {'us/IO':>7} {'IOPS/qsd paired':>22} "
                  f"{'CPU/qsd paired':>22}")
    for cfg in CONFIGS:
        col = lambda key, c=cfg: [runs[(r, c)][key] for r in range(1, ROUNDS + 1)]
        qsd = "qsd" in CONFIGS
        pi = paired_ratios(col("iops"), col("iops", "qsd")) if qsd else []
        pc = paired_ratios(col("cpu"), col("cpu", "qsd")) if qsd else []
        report.append(f"{cfg:<16} {median(col('iops')):9.0f} {median(col('cpu')):7.2f} "
                      f"{ratio_range(pi):>22} {ratio_range(pc):>22}")
text = "\n".join(report)
print(text)
with open(OUT, "w") as f:
    f.write(text + "\n")
log(f"results in {OUT}")
PY

#!/usr/bin/env bash
# bench-export.sh — vhost-user-blk export benchmark (not part of CI).
#
# The same Linux guest (Debian cloud kernel under QEMU TCG, see
# vhost-guest.sh) runs the same fio job against:
#   qsd            qemu-storage-daemon, vhost-user-blk export on an IOThread
#                  (QEMU's default adaptive polling), aio=io_uring
#   qsd:aio=threads  the same with QEMU's default engine (thread pool)
#   ours:weight=N  our export (2 queues on 1 IOThread, default engine:
#                  synchronous for this tmpfs image), poll-weight N
#   ours:classic   our export with the classic polling algorithm
#   ours:OPTS      e.g. ours:aio=threads,poll-max-ns=0 (see start_backend)
# with the image on tmpfs. Runs are interleaved (round-robin over the
# configurations, ROUNDS times) so that host noise hits all of them alike;
# even rounds run the configurations in reverse order, because a run's
# position in its round measurably shifts the TCG guest's IOPS (one day's
# 6 rounds: ours 0.84x qsd's IOPS when it ran second, 1.09x when first).
#
# Per run: guest-reported IOPS of the measured fio window, and the back-end
# process's CPU time (utime + stime from /proc/<pid>/stat, all threads)
# during that window, as CPU seconds per 1000 I/Os. The host samples the CPU
# time when the guest prints BENCH-START / BENCH-END on its serial console.
# Printed: every run, then per configuration the medians and the ratios to
# qemu-storage-daemon (CPU ratio < 1 = cheaper per I/O than QEMU).
#
# The front-end (QEMU, all its threads) is pinned to host CPU $GUEST_CPU and
# the back-end to CPU $BACKEND_CPU, so that a polling back-end does not
# steal time from the TCG guest (the bottleneck) and host scheduling noise
# hits every configuration alike. Ratios are computed per round (each
# configuration against the qemu-storage-daemon run of the same round) and
# their median printed beside the ratio of the medians.
#
# Environment: ROUNDS (3), FIO_TIME (10 s), QD (16 per job, 2 jobs pinned to
# the 2 vCPUs => both queues), RW (randread), CONFIGS (default: all below),
# GUEST_CPU (0), BACKEND_CPU (1), PIN (1; 0 = no pinning),
# EXPORT_CMD (default: `vmm-ref export`, release build), OUT (result file),
# SYSCALLS (0; 1 = count the back-end's and the front-end's system calls
# during the window with `perf stat` and print them per I/O: the guest's
# kicks and the back-end's interrupts are eventfd writes, the same for
# every back-end).
#
# FRONTEND=kvm: the front-end is vmm-ref with the freestanding test guest on
# KVM instead of the TCG Linux guest (no TCG ceiling: the back-ends' IOPS and
# CPU per I/O on tmpfs and on the real disk, >= 5 interleaved rounds, paired
# ratios with ranges); see ci/bench-export-kvm.sh for its settings. The
# default (FRONTEND=tcg) is the real-Linux-driver benchmark described above.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case "${FRONTEND:-tcg}" in
    tcg) ;;
    kvm) exec bash "$HERE/bench-export-kvm.sh" "$@" ;;
    *) echo "[bench-export] FAIL: FRONTEND must be tcg or kvm, not '$FRONTEND'" >&2; exit 2 ;;
esac
CACHE=${VMM_REF_TEST_CACHE:-/var/cache/vmm-ref-test}
ROUNDS=${ROUNDS:-3}
FIO_TIME=${FIO_TIME:-10}
QD=${QD:-16}
RW=${RW:-randread}
CONFIGS=${CONFIGS:-"qsd qsd:aio=threads ours:weight=3 ours:weight=1 ours:weight=2 ours:weight=4 ours:weight=5 ours:classic"}
OUT=${OUT:-/tmp/bench-export.txt}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-900}
GUEST_CPU=${GUEST_CPU:-0}
BACKEND_CPU=${BACKEND_CPU:-1}
PIN=${PIN:-1}
SYSCALLS=${SYSCALLS:-0}
SYSCALL_EVENTS=syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_ppoll,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_pread64,syscalls:sys_enter_preadv2,syscalls:sys_enter_futex
if [ "$PIN" = 1 ]; then
    ON_GUEST_CPU=(taskset -c "$GUEST_CPU")
    ON_BACKEND_CPU=(taskset -c "$BACKEND_CPU")
else
    ON_GUEST_CPU=()
    ON_BACKEND_CPU=()
fi
DISK_MIB=256

log() { printf '[bench-export] %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# shellcheck source=vhost-guest.sh
. "$HERE/vhost-guest.sh"
ensure_export_cmd --release
CLK_TCK=$(getconf CLK_TCK)

INIT=$(mktemp)
cat >"$INIT" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "BENCH-FAIL: $*"; poweroff -f; sleep 5; exit 1; }
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do i=$((i + 1)); [ $i -gt 300 ] && fail "no /dev/vda"; sleep 0.1; done
job() { # name runtime
    fio --name=$1 --filename=/dev/vda --direct=1 --ioengine=libaio --rw=$(arg b.rw) --bs=4k \
        --iodepth=$(arg b.qd) --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
        --runtime=$2 --time_based --group_reporting --output-format=terse --terse-version=3
}
# Interrupts the guest took from the disk's request queues (all CPUs).
irqs() { grep 'virtio[0-9]*-req' /proc/interrupts | awk '{for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i} END {print s + 0}'; }
job warm 2 >/dev/null 2>&1 || fail "warm-up"
i0=$(irqs)
echo "BENCH-START"
job bench $(arg b.time) >/tmp/b 2>&1 || { cat /tmp/b; fail "fio"; }
echo "BENCH-END"
i1=$(irqs)
l=$(grep '^3;' /tmp/b) || fail "no result"
# terse v3: 6 read KiB, 8 read IOPS, 47 write KiB, 49 write IOPS
echo "BENCH-RESULT $(echo "$l" | cut -d';' -f6,8,47,49)"
echo "BENCH-IRQS $((i1 - i0))"
poweroff -f
EOF
INITRD=$(build_initramfs "$INIT" /nonexistent bench)
rm -f "$INIT"

WORK=$(mktemp -d /tmp/bench-export.XXXXXX)
IMG=/dev/shm/vmm-ref-bench-$$.img
BACKEND_PID=
QEMU_PID=
cleanup() {
    for p in $QEMU_PID $BACKEND_PID; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$WORK" "$IMG"
}
trap cleanup EXIT
dd if=/dev/urandom of="$IMG" bs=1M count=$DISK_MIB status=none

start_backend() { # config socket log
    case "$1" in
        qsd | qsd:aio=*)
            # qsd: aio=io_uring; qsd:aio=threads: QEMU's default thread pool.
            local aio=io_uring
            [ "$1" = qsd ] || aio=${1#qsd:aio=}
            "${ON_BACKEND_CPU[@]}" qemu-storage-daemon \
                --blockdev driver=file,node-name=f0,filename="$IMG",aio="$aio" \
                --object iothread,id=io0 \
                --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="$2",writable=on,num-queues=2,iothread=io0 \
                >"$3" 2>&1 &
            ;;
        ours | ours:*)
            # ours:OPT,OPT...: weight=N (poll-weight), classic (poll-algorithm),
            # aio=... (the drive's engine), any other KEY=VALUE goes to the IOThread.
            local drive="id=d0,file=$IMG" iothread="iothread,id=io0" o opts
            IFS=, read -r -a opts <<<"${1#ours}"
            for o in "${opts[@]}"; do
                o=${o#:}
                case "$o" in
                    "") ;;
                    weight=*) iothread+=",poll-weight=${o#weight=}" ;;
                    classic) iothread+=",poll-algorithm=classic" ;;
                    aio=*) drive+=",$o" ;;
                    *=*) iothread+=",$o" ;;
                    *) die "unknown option '$o' in configuration $1" ;;
                esac
            done
            # shellcheck disable=SC2086
            "${ON_BACKEND_CPU[@]}" $EXPORT_CMD --drive "$drive" --object "$iothread" \
                --export vhost-user-blk,id=e0,node-name=d0,addr=unix:"$2",num-queues=2,iothread=io0 \
                --qmp unix:"$2.qmp" >"$3" 2>&1 &
            ;;
        *) die "unknown configuration $1" ;;
    esac
    BACKEND_PID=$!
    wait_socket "$2" "$BACKEND_PID" "$3"
}

wait_serial() { # file marker pid -> 0 when seen, 1 if qemu ended
    while ! grep -q "$2" "$1" 2>/dev/null; do
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.05
    done
}

# One run: prints "config iops cpu_s ios".
run_one() {
    local cfg=$1 n=$2 sock=$WORK/s$n.sock serial=$WORK/serial.$n blog=$WORK/backend.$n
    start_backend "$cfg" "$sock" "$blog"
    "${ON_GUEST_CPU[@]}" timeout "$GUEST_TIMEOUT" qemu-system-x86_64 \
        -M q35,accel=tcg,memory-backend=mem \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -cpu max -smp 2 -m 512 -nodefaults -display none -serial stdio -no-reboot \
        -kernel "$VMLINUZ" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 quiet b.time=$FIO_TIME b.qd=$QD b.rw=$RW" \
        -chardev socket,id=vu0,path="$sock" \
        -device vhost-user-blk-pci,chardev=vu0,num-queues=2 \
        </dev/null >"$serial" 2>&1 &
    QEMU_PID=$!
    wait_serial "$serial" BENCH-START "$QEMU_PID" || { tail -20 "$serial" >&2; die "$cfg: guest did not start the benchmark"; }
    local t0 t1
    t0=$(proc_cpu_ticks "$BACKEND_PID")
    queue_counters "$sock.qmp" >"$WORK/q0.$n"
    thread_ticks "$BACKEND_PID" >"$WORK/threads0.$n"
    # QEMU itself (the child of `timeout`), for the front-end's counts.
    local front
    front=$(pgrep -P "$QEMU_PID" | head -1)
    front=${front:-$QEMU_PID}
    thread_ticks "$front" >"$WORK/fthreads0.$n"
    local idle0
    idle0=$(cpu_idle_steal_ticks "$GUEST_CPU")
    local perf_pids=()
    if [ "$SYSCALLS" = 1 ]; then
        perf stat -x, -e "$SYSCALL_EVENTS" -p "$BACKEND_PID" -o "$WORK/sys-backend.$n" &
        perf_pids+=($!)
        perf stat -x, -e "$SYSCALL_EVENTS" -p "$front" -o "$WORK/sys-frontend.$n" &
        perf_pids+=($!)
    fi
    wait_serial "$serial" BENCH-END "$QEMU_PID" || { tail -20 "$serial" >&2; die "$cfg: guest did not finish"; }
    t1=$(proc_cpu_ticks "$BACKEND_PID")
    thread_ticks "$BACKEND_PID" >"$WORK/threads1.$n"
    thread_ticks "$front" >"$WORK/fthreads1.$n"
    local idle1
    idle1=$(cpu_idle_steal_ticks "$GUEST_CPU")
    if [ ${#perf_pids[@]} -gt 0 ]; then
        kill -INT "${perf_pids[@]}" 2>/dev/null || true
        wait "${perf_pids[@]}" 2>/dev/null || true
    fi
    queue_counters "$sock.qmp" >"$WORK/q1.$n"
    # Ours only: guest notifications (kicks) and interrupts per request.
    paste "$WORK/q0.$n" "$WORK/q1.$n" | awk -v cfg="$cfg" '
        NF == 6 { r += $4 - $1; k += $5 - $2; i += $6 - $3 }
        END { if (r > 0) printf "[bench-export]   %s per request: %.3f kick wake-ups, %.3f interrupts\n", cfg, k / r, i / r > "/dev/stderr" }'
    # Per-thread CPU during the window (threads grouped by name), to stderr.
    awk -v cfg="$cfg" 'NR == FNR { a[$1] = $3; next } { d[$2] += $3 - a[$1] }
        END { s = ""; for (k in d) if (d[k] > 0) s = s " " k "=" d[k]; print "[bench-export]   " cfg " thread ticks:" s > "/dev/stderr" }' \
        "$WORK/threads0.$n" "$WORK/threads1.$n"
    awk -v cfg="$cfg" -v idle="${idle1% *} ${idle0% *}" -v steal="${idle1#* } ${idle0#* }" 'NR == FNR { a[$1] = $3; next } { d[$2] += $3 - a[$1] }
        END { s = ""; for (k in d) if (d[k] > 0) s = s " " k "=" d[k]; split(idle, ia, " "); split(steal, sa, " ")
            print "[bench-export]   " cfg " front-end thread ticks:" s "; guest CPU idle ticks: " ia[1] - ia[2] ", steal ticks: " sa[1] - sa[2] > "/dev/stderr" }' \
        "$WORK/fthreads0.$n" "$WORK/fthreads1.$n"
    wait "$QEMU_PID" || true
    QEMU_PID=
    kill "$BACKEND_PID"
    wait "$BACKEND_PID" || true
    BACKEND_PID=
    local res
    res=$(grep -a 'BENCH-RESULT' "$serial" | tr -d '\r' | awk '{print $2}') || die "$cfg: no result"
    # Interrupts per I/O as the guest counted them (any back-end), to stderr.
    grep -a 'BENCH-IRQS' "$serial" | tr -d '\r' | awk -v r="$res" -v cfg="$cfg" '{
        split(r, f, ";"); ios = (f[1] + f[3]) / 4;
        if (ios > 0) printf "[bench-export]   %s guest interrupts per I/O: %.3f\n", cfg, $2 / ios > "/dev/stderr" }'
    if [ "$SYSCALLS" = 1 ]; then
        local side
        for side in backend frontend; do
            awk -F, -v r="$res" -v cfg="$cfg" -v side="$side" '
                BEGIN { split(r, f, ";"); ios = (f[1] + f[3]) / 4 }
                $3 ~ /^syscalls:sys_enter_/ && $1 ~ /^[0-9]+$/ && $1 > 0 {
                    name = $3; sub(/^syscalls:sys_enter_/, "", name); s = s sprintf(" %s=%.3f", name, $1 / ios) }
                END { if (ios > 0) print "[bench-export]   " cfg " " side " syscalls per I/O:" s > "/dev/stderr" }' \
                "$WORK/sys-$side.$n"
        done
    fi
    # read KiB; read IOPS; write KiB; write IOPS
    awk -v r="$res" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" -v cfg="$cfg" 'BEGIN {
        split(r, f, ";"); ios = (f[1] + f[3]) / 4; iops = f[2] + f[4];
        cpu = (t1 - t0) / hz;
        printf "%s %.0f %.6f %.0f\n", cfg, iops, (ios > 0 ? cpu / (ios / 1000) : 0), ios }'
}

# queue_counters QMP_SOCKET: "requests notifications interrupts" summed over
# the queues of our export (nothing for back-ends without that socket).
queue_counters() {
    [ -S "$1" ] || return 0
    python3 - "$1" <<'PY' || true
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
for cmd in ("qmp_capabilities", "query-block"):
    f.write(json.dumps({"execute": cmd}) + "\n")
    f.flush()
    while True:
        msg = json.loads(f.readline())
        if "return" in msg or "error" in msg:
            break
t = [0, 0, 0]
for b in msg.get("return", []):
    for q in b.get("queues", []):
        t = [t[0] + q.get("requests", 0), t[1] + q.get("notifications", 0), t[2] + q.get("interrupts", 0)]
print(*t)
PY
}

# cpu_idle_steal_ticks CPU: "idle+iowait steal" ticks of one host CPU (steal: time
# the hypervisor below this machine gave to someone else).
cpu_idle_steal_ticks() {
    awk -v c="cpu$1" '$1 == c { print $5 + $6, $9 }' /proc/stat
}

# thread_ticks PID: "tid comm ticks" for every thread.
thread_ticks() {
    local t
    for t in /proc/"$1"/task/*; do
        [ -r "$t/stat" ] || continue
        printf '%s %s %s\n' "${t##*/}" "$(tr ' ' '_' <"$t/comm")" "$(sed 's/^.*) //' "$t/stat" | awk '{print $12 + $13}')"
    done
}

log "configs: $CONFIGS; $ROUNDS rounds of $FIO_TIME s ($RW 4k, 2 jobs x QD $QD); backend: $EXPORT_CMD; pinning: $([ "$PIN" = 1 ] && echo "guest CPU $GUEST_CPU, back-end CPU $BACKEND_CPU" || echo off)"
: >"$WORK/runs"
n=0
# shellcheck disable=SC2086
read -r -a FORWARD <<<"$(echo $CONFIGS)"
REVERSE=()
for ((i = ${#FORWARD[@]} - 1; i >= 0; i--)); do REVERSE+=("${FORWARD[i]}"); done
for r in $(seq 1 "$ROUNDS"); do
    order=("${FORWARD[@]}")
    [ $((r % 2)) = 0 ] && order=("${REVERSE[@]}")
    for cfg in "${order[@]}"; do
        n=$((n + 1))
        line=$(run_one "$cfg" "$n")
        log "round $r: $line"
        echo "$r $line" >>"$WORK/runs"
    done
done

{
    echo "# bench-export: $RW 4k, 2 jobs x QD $QD, $FIO_TIME s, $ROUNDS interleaved rounds, image on tmpfs, QEMU TCG guest$([ "$PIN" = 1 ] && echo ", guest on CPU $GUEST_CPU, back-end on CPU $BACKEND_CPU") ($(date -u +%F))"
    echo "# per run: round config IOPS cpu-ms-per-1000-IOs"
    awk '{printf "#   %2s %-14s %8s %8.2f\n", $1, $2, $3, $4 * 1000}' "$WORK/runs"
    echo "# IOPS/qsd and CPU/qsd: ratio of the medians; paired: median over rounds of (run / qsd run of the same round)"
    printf "%-14s %10s %16s %10s %10s %14s %14s\n" config IOPS "CPU-ms/1000IO" "IOPS/qsd" "CPU/qsd" "IOPS/qsd pair" "CPU/qsd pair"
    awk '
        { r = $1; c = $2; iops[c] = iops[c] " " $3; cpu[c] = cpu[c] " " $4; I[r, c] = $3; C[r, c] = $4; R[r] = 1
          if (!(c in seen)) { order[++k] = c; seen[c] = 1 } }
        function median(s,   a, n, i, j, t) {
            n = split(s, a, " ");
            if (n == 0) return 0;
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        END {
            q = ("qsd" in seen); qi = q ? median(iops["qsd"]) : 0; qc = q ? median(cpu["qsd"]) : 0;
            for (x = 1; x <= k; x++) {
                c = order[x]; mi = median(iops[c]); mc = median(cpu[c]); pi = ""; pc = "";
                for (r in R) if (((r, c) in I) && ((r, "qsd") in I) && I[r, "qsd"] > 0 && C[r, "qsd"] > 0) {
                    pi = pi " " I[r, c] / I[r, "qsd"]; pc = pc " " C[r, c] / C[r, "qsd"] }
                printf "%-14s %10.0f %16.2f %10s %10s %14s %14s\n", c, mi, mc * 1000,
                    (qi > 0 ? sprintf("%.2f", mi / qi) : "-"), (qc > 0 ? sprintf("%.2f", mc / qc) : "-"),
                    (pi != "" ? sprintf("%.2f", median(pi)) : "-"), (pc != "" ? sprintf("%.2f", median(pc)) : "-")
            }
        }' "$WORK/runs"
} | tee "$OUT"
log "results in $OUT"

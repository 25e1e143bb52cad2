#!/usr/bin/env bash
# vhost-test.sh — a real Linux virtio-blk driver in front of a vhost-user-blk export.
#
# Boots Debian's cloud kernel under QEMU TCG (no KVM needed, see
# shared/design/vmm-ref.md section 3) with `-device vhost-user-blk-pci,num-queues=2`
# connected to a vhost-user-blk back-end, and checks, inside the guest:
#   - the disk has the expected size and 2 hardware queues;
#   - O_DIRECT reads return the pattern the host wrote before boot;
#   - O_DIRECT writes of known patterns (start, middle, last MiB) read back equal;
#   - a flush (sync + blockdev --flushbufs) and, if offered, a discard succeed;
#   - fio: 4 KiB random writes with crc32c verify and a mixed randrw run, two jobs
#     pinned to the two vCPUs so that both virtqueues carry I/O;
# and afterwards, on the host, that the image holds the guest's patterns at the
# expected offsets.
#
# Back-ends (one run each, in this order unless --only is given):
#   qsd    qemu-storage-daemon with an IOThread (proves the harness; QEMU's own export)
#   ours1  our export: 2 queues on 1 IOThread; the guest is booted TWICE against the
#          same daemon process (front-end reconnect, state reset between sessions)
#   ours2  our export: 2 queues on 2 IOThreads (iothread-vq-mapping=io0:io1), the
#          image on tmpfs (/dev/shm when writable): the synchronous engine, with
#          reads copied out of a mapping of the image that both IOThreads share
#   ro     our export of a read-only drive: the guest sees it read-only, its
#          write fails, the image is unchanged
#
# Our export is started as `$EXPORT_CMD --drive ... --object iothread,... --export
# vhost-user-blk,...`. EXPORT_CMD defaults to `vmm-ref export`, built here with cargo.
#
# Everything needed is installed by the script (apt-get) and cached under
# $VMM_REF_TEST_CACHE (default /var/cache/vmm-ref-test): reruns are fast.
#
# Usage: vhost-test.sh [--only qsd|ours1|ours2|ro]... [--keep]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VMM_REF_TEST_CACHE:-/var/cache/vmm-ref-test}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-900}
DISK_MIB=64
ONLY=()
KEEP=0

while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY+=("$2"); shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ ${#ONLY[@]} -eq 0 ] && ONLY=(qsd ours1 ours2 ro)

log() { printf '[vhost-test] %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# shellcheck source=vhost-guest.sh
. "$HERE/vhost-guest.sh"

# ---------------------------------------------------------------- patterns
# Deterministic pattern files (1 MiB each), shared by the guest (in the initramfs)
# and the host checks.
PAT=$CACHE/patterns
if [ ! -f "$PAT/.done" ]; then
    mkdir -p "$PAT"
    for name in host guest0 guest1 guest2; do
        # A seeded keystream: reproducible, incompressible, different per name.
        openssl enc -aes-128-ctr -nosalt -pass "pass:vmm-ref-$name" -pbkdf2 \
            -in <(head -c 1048576 /dev/zero) -out "$PAT/$name.bin" 2>/dev/null ||
            python3 -c "import random,sys; r=random.Random('$name'); sys.stdout.buffer.write(bytes(r.getrandbits(8) for _ in range(1<<20)))" >"$PAT/$name.bin"
    done
    touch "$PAT/.done"
fi

# ---------------------------------------------------------------- guest /init
INIT=$(mktemp)
cat >"$INIT" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "VHOST-TEST: FAIL: $*"; sync; poweroff -f; sleep 5; exit 1; }
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "no /dev/vda"
    sleep 0.1
done
MIB=$(arg vt.mib)
SECTORS=$(cat /sys/block/vda/size)
[ "$SECTORS" = $((MIB * 2048)) ] || fail "size $SECTORS sectors, want $((MIB * 2048))"
NQ=$(ls /sys/block/vda/mq | wc -l)
[ "$NQ" = "$(arg vt.nq)" ] || fail "$NQ hardware queues, want $(arg vt.nq)"
echo "vhost-test: /dev/vda $SECTORS sectors, $NQ queues, ro=$(cat /sys/block/vda/ro)"
echo "vhost-test: features $(cat /sys/block/vda/device/features 2>/dev/null)"

# 1. the host's pattern at offset 0
dd if=/dev/vda of=/tmp/h.bin bs=65536 count=16 iflag=direct 2>/dev/null || fail "read host pattern"
cmp /tmp/h.bin /pat/host.bin || fail "host pattern differs"
rm /tmp/h.bin

# Read-only export: the driver must see it read-only and writes must fail.
if [ "$(arg vt.ro)" = 1 ]; then
    [ "$(cat /sys/block/vda/ro)" = 1 ] || fail "read-only export not seen as read-only"
    blockdev --setrw /dev/vda 2>/dev/null
    if dd if=/pat/guest0.bin of=/dev/vda bs=65536 seek=64 oflag=direct conv=notrunc 2>/dev/null; then
        fail "write to a read-only export succeeded"
    fi
    echo "vhost-test: read-only ok"
    echo "VHOST-TEST: PASS"
    poweroff -f
fi

# 2. guest patterns: 4 MiB, 1 MiB + 512 bytes (unaligned to 4k), last MiB
put() { # file byte-offset bs
    dd if=/pat/$1 of=/dev/vda bs=$3 seek=$(($2 / $3)) oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write $1 at $2"
    dd if=/dev/vda of=/tmp/r.bin bs=$3 skip=$(($2 / $3)) count=$((1048576 / $3)) iflag=direct 2>/dev/null || fail "read back $1 at $2"
    cmp /tmp/r.bin /pat/$1 || fail "readback $1 at $2 differs"
    rm /tmp/r.bin
}
put guest0.bin $((4 * 1048576)) 65536
put guest1.bin $((8 * 1048576 + 512)) 512
put guest2.bin $(((MIB - 1) * 1048576)) 131072
# reading past the end must fail or return nothing, never hang
n=$(dd if=/dev/vda bs=4096 skip=$((MIB * 256)) count=1 iflag=direct 2>/dev/null | wc -c)
[ "$n" = 0 ] || fail "read past the end returned $n bytes"

# 3. flush
sync
blockdev --flushbufs /dev/vda || fail "flushbufs"

# 4. discard if offered (contents afterwards are unspecified: only the status is checked)
if [ "$(cat /sys/block/vda/queue/discard_max_bytes)" != 0 ]; then
    blkdiscard -o $((40 * 1048576)) -l 1048576 /dev/vda || fail "discard"
    echo "vhost-test: discard ok"
fi

# 5. fio: two jobs pinned to the two vCPUs (=> both queues), region 16..48 MiB
if [ -x /usr/bin/fio ]; then
    fio --name=wv --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 \
        --rw=randwrite --bs=4k --offset=16m --size=8m --offset_increment=8m --numjobs=2 \
        --cpus_allowed=0-1 --cpus_allowed_policy=split --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --group_reporting --output-format=terse --terse-version=3 \
        >/tmp/fio1 2>&1 || { cat /tmp/fio1; fail "fio randwrite+verify"; }
    fio --name=rw --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 \
        --rw=randrw --bs=4k --offset=32m --size=8m --offset_increment=8m --numjobs=2 \
        --cpus_allowed=0-1 --cpus_allowed_policy=split --runtime=$(arg vt.fiotime) --time_based \
        --verify=crc32c --verify_fatal=1 --group_reporting --output-format=terse --terse-version=3 \
        >/tmp/fio2 2>&1 || { cat /tmp/fio2; fail "fio randrw"; }
    # terse v3: field 8 = read IOPS, 49 = write IOPS (group_reporting: one line)
    for f in fio1 fio2; do
        l=$(grep '^3;' /tmp/$f) || fail "no fio result in $f"
        echo "vhost-test: fio $f read_iops=$(echo "$l" | cut -d';' -f8) write_iops=$(echo "$l" | cut -d';' -f49)"
    done
else
    fail "no fio in the initramfs"
fi
sync
blockdev --flushbufs /dev/vda || fail "final flush"
echo "VHOST-TEST: PASS"
poweroff -f
EOF

# ---------------------------------------------------------------- initramfs
INITRD=$(build_initramfs "$INIT" "$PAT" test)
rm -f "$INIT"

# ---------------------------------------------------------------- helpers
WORK=$(mktemp -d /tmp/vhost-test.XXXXXX)
BACKEND_PID=
cleanup() {
    if [ -n "$BACKEND_PID" ] && kill -0 "$BACKEND_PID" 2>/dev/null; then
        kill "$BACKEND_PID" 2>/dev/null || true
        wait "$BACKEND_PID" 2>/dev/null || true
    fi
    [ -z "${SHM_IMG:-}" ] || rm -f "$SHM_IMG"
    [ "$KEEP" = 1 ] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

new_image() { # path
    truncate -s 0 "$1"
    truncate -s ${DISK_MIB}M "$1"
    dd if="$PAT/host.bin" of="$1" bs=1M conv=notrunc status=none
}

boot_guest() { # socket serial-log [extra kernel arguments]
    local start=$SECONDS rc=0
    timeout "$GUEST_TIMEOUT" qemu-system-x86_64 \
        -M q35,accel=tcg,memory-backend=mem \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -cpu max -smp 2 -m 512 -nodefaults -display none -serial stdio -no-reboot \
        -kernel "$VMLINUZ" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 quiet vt.mib=$DISK_MIB vt.nq=2 vt.fiotime=${FIO_TIME:-5} ${3:-}" \
        -chardev socket,id=vu0,path="$1" \
        -device vhost-user-blk-pci,chardev=vu0,num-queues=2 \
        </dev/null >"$2" 2>&1 || rc=$?
    log "guest ran $((SECONDS - start)) s (qemu status $rc)"
    grep 'vhost-test' "$2" >&2 || true
    if ! grep -q 'VHOST-TEST: PASS' "$2"; then
        tail -n 40 "$2" >&2
        return 1
    fi
}

check_image() { # image
    cmp <(dd if="$1" bs=1M count=1 status=none) "$PAT/host.bin" || die "image: host pattern changed"
    cmp <(dd if="$1" bs=1M skip=4 count=1 status=none) "$PAT/guest0.bin" || die "image: guest0 not at 4 MiB"
    cmp <(dd if="$1" bs=512 skip=$((8 * 2048 + 1)) count=2048 status=none) "$PAT/guest1.bin" ||
        die "image: guest1 not at 8 MiB + 512"
    cmp <(dd if="$1" bs=1M skip=$((DISK_MIB - 1)) count=1 status=none) "$PAT/guest2.bin" ||
        die "image: guest2 not in the last MiB"
    [ "$(stat -c %s "$1")" = $((DISK_MIB * 1048576)) ] || die "image size changed"
    log "image content OK (host pattern, guest patterns at 4 MiB, 8 MiB+512, last MiB)"
}

stop_backend() {
    kill -0 "$BACKEND_PID" 2>/dev/null || die "back-end died during the test"
    kill -TERM "$BACKEND_PID"
    local rc=0
    wait "$BACKEND_PID" || rc=$?
    BACKEND_PID=
    # SIGTERM exit (143) is what qemu-storage-daemon does on a signal; ours exits 0.
    [ $rc = 0 ] || [ $rc = 143 ] || die "back-end exit status $rc"
}

# ---------------------------------------------------------------- runs
run_qsd() {
    local img=$WORK/qsd.img sock=$WORK/qsd.sock
    new_image "$img"
    qemu-storage-daemon \
        --blockdev driver=file,node-name=f0,filename="$img" \
        --object iothread,id=io0 \
        --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2,iothread=io0 \
        >"$WORK/qsd.log" 2>&1 &
    BACKEND_PID=$!
    wait_socket "$sock" "$BACKEND_PID" "$WORK/qsd.log"
    boot_guest "$sock" "$WORK/qsd.serial" || die "qsd: guest did not pass"
    stop_backend
    check_image "$img"
    log "PASS qsd"
}

run_ours() { # name iothread-option boots [image-directory]
    local name=$1 opt=$2 boots=$3 img=${4:-$WORK}/vhost-test-$$-$1.img sock=$WORK/$1.sock
    SHM_IMG=$img
    ensure_export_cmd
    new_image "$img"
    # shellcheck disable=SC2086
    $EXPORT_CMD \
        --drive id=d0,file="$img" \
        --object iothread,id=io0 --object iothread,id=io1 \
        --export vhost-user-blk,id=e0,node-name=d0,addr=unix:"$sock",num-queues=2,"$opt" \
        >"$WORK/$name.log" 2>&1 &
    BACKEND_PID=$!
    wait_socket "$sock" "$BACKEND_PID" "$WORK/$name.log"
    local b
    for b in $(seq 1 "$boots"); do
        log "$name: boot $b/$boots"
        boot_guest "$sock" "$WORK/$name.serial.$b" || { cat "$WORK/$name.log" >&2; die "$name: guest did not pass (boot $b)"; }
    done
    stop_backend
    local status
    status=$(grep '^export-status ' "$WORK/$name.log") || { cat "$WORK/$name.log" >&2; die "$name: no export status"; }
    # Both virtqueues must have carried requests (fio pins a job per vCPU).
    local reqs
    reqs=$(echo "$status" | grep -o '"requests":[0-9]*' | cut -d: -f2 | tr '\n' ' ')
    log "$name: requests per queue: $reqs"
    [ "$(echo "$reqs" | wc -w)" = 2 ] || die "$name: expected 2 queue counters in $status"
    for r in $reqs; do [ "$r" -gt 0 ] || die "$name: a queue carried no requests ($reqs)"; done
    echo "$status" | grep -q '"protocol-errors":0' || die "$name: protocol errors: $status"
    check_image "$img"
    [ "${img%/*}" = "$WORK" ] || rm -f "$img"
    SHM_IMG=
    log "PASS $name"
}

run_ro() {
    local img=$WORK/ro.img sock=$WORK/ro.sock
    ensure_export_cmd
    new_image "$img"
    local before
    before=$(sha256sum <"$img")
    $EXPORT_CMD --drive id=d0,file="$img",readonly=on --object iothread,id=io0 \
        --export vhost-user-blk,id=e0,node-name=d0,addr=unix:"$sock",num-queues=2,iothread=io0 \
        >"$WORK/ro.log" 2>&1 &
    BACKEND_PID=$!
    wait_socket "$sock" "$BACKEND_PID" "$WORK/ro.log"
    boot_guest "$sock" "$WORK/ro.serial" vt.ro=1 || { cat "$WORK/ro.log" >&2; die "ro: guest did not pass"; }
    stop_backend
    [ "$(sha256sum <"$img")" = "$before" ] || die "ro: the read-only image changed"
    log "PASS ro (image unchanged)"
}

for what in "${ONLY[@]}"; do
    case "$what" in
        qsd) run_qsd ;;
        ours1) run_ours ours1 iothread=io0 2 ;;
        ours2)
            shm=$WORK
            [ -d /dev/shm ] && [ -w /dev/shm ] && shm=/dev/shm
            run_ours ours2 iothread-vq-mapping=io0:io1 1 "$shm"
            ;;
        ro) run_ro ;;
        *) die "unknown run $what" ;;
    esac
done
log "ALL PASSED: ${ONLY[*]}"

#!/usr/bin/env bash
# Boots the vmm-ref test guest under QEMU microvm (PVH entry) with one
# virtio-mmio virtio-blk device and prints the guest's serial output.
# Exit status: the guest's status (0 = all scenarios passed, else the number
# of failures), 124 if the guest stopped without reporting, 125 on usage or
# QEMU errors.
#
# usage: run-qemu.sh [options] [guest command line words...]
#   --elf PATH          guest image (default: $GUEST_ELF, else the newest
#                       test-guest.elf under $CARGO_TARGET_DIR or target/)
#   --disk PATH         raw disk image (default: a fresh sparse file in
#                       /dev/shm, removed afterwards)
#   --disk-size SIZE    size of the default disk (default 256M)
#   --queues N          virtio-blk num-queues (default 4)
#   --iothread          serve the device from IOThread io0
#   --poll-max-ns N     io0's poll-max-ns (default 32768)
#   --accel kvm|tcg     (default kvm)
#   --memory SIZE       guest RAM (default 256M)
#   --readonly          attach the disk read-only
#   --qemu PATH         QEMU binary (default qemu-system-x86_64)
#   --log PATH          also write the serial output to PATH
#   --pidfile PATH      QEMU keeps its pid there while it runs (for CPU time;
#                       threads are named, -name ...,debug-threads=on)
# Words not starting with -- go to the guest command line, e.g.
#   run-qemu.sh --iothread scenario=verify,bench bench.secs=5
# QEMU appends virtio_mmio.device=<size>@<addr>:<irq> itself (microvm with
# acpi=off); --cpu host needs arch-capabilities=off on PVM hosts (QEMU 7.2
# cannot set MSR 0x10a there).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
elf=${GUEST_ELF:-}
disk=
disk_size=256M
queues=4
iothread=0
poll_max_ns=32768
accel=kvm
memory=256M
readonly=0
qemu=qemu-system-x86_64
log=
pidfile=
cmdline=()

die() { echo "run-qemu.sh: $*" >&2; exit 125; }

while [ $# -gt 0 ]; do
    case $1 in
        --elf) elf=$2; shift 2 ;;
        --disk) disk=$2; shift 2 ;;
        --disk-size) disk_size=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --iothread) iothread=1; shift ;;
        --poll-max-ns) poll_max_ns=$2; shift 2 ;;
        --accel) accel=$2; shift 2 ;;
        --memory) memory=$2; shift 2 ;;
        --readonly) readonly=1; shift ;;
        --qemu) qemu=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --pidfile) pidfile=$2; shift 2 ;;
        --help|-h) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --*) die "unknown option $1" ;;
        *) cmdline+=("$1"); shift ;;
    esac
done

if [ -z "$elf" ]; then
    target_dir=${CARGO_TARGET_DIR:-$here/../../target}
    elf=$(ls -t "$target_dir"/*/build/vmm-ref-*/out/test-guest.elf 2>/dev/null | head -n 1 || true)
    [ -n "$elf" ] || die "no test-guest.elf found: run 'cargo build -p vmm-ref' or pass --elf"
fi
[ -f "$elf" ] || die "guest image $elf not found"

cleanup=
if [ -z "$disk" ]; then
    disk=$(mktemp /dev/shm/vmm-ref-guest-XXXXXX.img)
    cleanup=$disk
    truncate -s "$disk_size" "$disk"
fi
serial_log=$(mktemp /tmp/vmm-ref-guest-serial-XXXXXX)
trap 'rm -f $cleanup "$serial_log"' EXIT

drive="id=d0,file=$disk,format=raw,if=none,cache=none,aio=io_uring"
[ "$readonly" = 1 ] && drive+=",readonly=on"
device="virtio-blk-device,drive=d0,num-queues=$queues"
objects=()
if [ "$iothread" = 1 ]; then
    objects=(-object "iothread,id=io0,poll-max-ns=$poll_max_ns")
    device+=",iothread=io0"
fi

set +e
"$qemu" -M microvm,x-option-roms=on,acpi=off -accel "$accel" \
    -cpu "$([ "$accel" = kvm ] && echo host,arch-capabilities=off || echo max)" \
    -m "$memory" -name vmm-ref-guest,debug-threads=on ${pidfile:+-pidfile "$pidfile"} \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel "$elf" -append "${cmdline[*]}" \
    -global virtio-mmio.force-legacy=false \
    -device isa-debug-exit,iobase=0xf4,iosize=4 \
    "${objects[@]}" -drive "$drive" -device "$device" </dev/null | tee "$serial_log" ${log:+"$log"}
rc=${PIPESTATUS[0]}
set -e

# isa-debug-exit makes QEMU exit with (status << 1) | 1; QEMU's own errors
# also exit with 1, so a status of 0 counts only with the guest's DONE line.
if [ $((rc % 2)) = 1 ] && grep -q '^DONE failures=' "$serial_log"; then
    exit $(((rc - 1) / 2))
fi
if [ "$rc" = 0 ]; then
    echo "run-qemu.sh: guest stopped without a debug-exit status" >&2
    exit 124
fi
echo "run-qemu.sh: QEMU failed (exit $rc)" >&2
exit 125

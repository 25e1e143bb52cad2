#!/bin/sh
# Drives the real vmm-ref (needs /dev/kvm) with QEMU's own QMP clients from PyPI's
# qemu.qmp (QMPClient and qmp-shell); ci/setup.sh installs them. Run by the cargo
# test `qmp_python` with the built binary and the test guest:
#   run_real_vmm.sh VMM_REF_BINARY TEST_GUEST_ELF
# Drive d0 has 2 queues mapped io0:io1, so its virtio backend holds both IOThreads.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
vmm=$1
guest=$2
device=/machine/peripheral/d0/virtio-backend
dir=$(mktemp -d /tmp/vmm-ref-qmp-python-XXXXXX)
trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; rm -rf "$dir"' EXIT
pid=
truncate -s 64M "$dir/disk.img"
python3 -c 'import qemu.qmp' || { echo "qemu.qmp missing: run ci/setup.sh" >&2; exit 1; }

start() { # start GUEST_CMDLINE [NUM_QUEUES [IOTHREADS]]; stdin from $dir/in if it exists
    rm -f "$dir/qmp.sock"
    nq=${2:-2}
    ios=${3:-io0:io1}
    objs=$(echo "$ios" | tr ':' ' ' | sed 's/\([^ ]*\)/--object iothread,id=\1/g')
    input=/dev/null
    [ ! -p "$dir/in" ] || input="$dir/in"
    # shellcheck disable=SC2086
    "$vmm" --kernel "$guest" --cmdline "$1" $objs \
        --drive "id=d0,file=$dir/disk.img,num-queues=$nq,iothread-vq-mapping=$ios" \
        --qmp "unix:$dir/qmp.sock" <"$input" >"$dir/vmm.log" 2>&1 &
    pid=$!
    i=0
    while [ ! -S "$dir/qmp.sock" ]; do
        i=$((i + 1)); [ $i -lt 1200 ] || { cat "$dir/vmm.log" >&2; exit 1; }
        sleep 0.1
    done
}

finish() {
    status=0
    wait "$pid" || status=$?
    pid=
    [ "$status" -eq 0 ] || { echo "vmm-ref exited $status" >&2; cat "$dir/vmm.log" >&2; exit 1; }
    [ ! -e "$dir/qmp.sock" ] || { echo "socket left behind" >&2; exit 1; }
}

echo "# QMPClient and hostile raw clients (guest holds its device, test ends with quit)"
start "scenario=hold hold.secs=600"
python3 "$here/hostile_test.py" "$dir/qmp.sock"
python3 "$here/qmp_client_test.py" "$dir/qmp.sock" "$device"
finish

echo "# qmp-shell scripted through stdin (ends with quit)"
start "scenario=hold hold.secs=600"
"$here/qmp_shell_session.sh" "$dir/qmp.sock" "$device"
finish

echo "# guest device reset: activated, not, again; holders unchanged (the guest then exits 0)"
start "scenario=hold,reset,hold hold.secs=3 reset.pause_ms=3000"
python3 "$here/device_reset_test.py" "$dir/qmp.sock" "$device"
finish

echo "# 100 live re-maps while the guest verifies (it stops at serial input, exits 0)"
mkfifo "$dir/in"
exec 3<>"$dir/in" # read-write: opening does not wait for the reader
start "scenario=verify verify.until_input=1" 4 io0:io1:io2:io3
python3 "$here/remap_test.py" "$dir/qmp.sock" "$device"
printf x >&3
exec 3>&-
rm -f "$dir/in"
finish
grep -q "RESULT verify PASS .* rounds=" "$dir/vmm.log" || { cat "$dir/vmm.log" >&2; exit 1; }
grep "RESULT verify" "$dir/vmm.log"
echo "run_real_vmm: all passed"

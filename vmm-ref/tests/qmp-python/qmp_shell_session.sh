#!/bin/sh
# Scripted qmp-shell sessions (from PyPI qemu.qmp) through stdin against a vmm-ref QMP
# socket; checks the transcript. Ends with `quit`.
# Usage: qmp_shell_session.sh SOCKET [DEVICE_QOM_PATH holding io0]
set -eu
sock=$1
device=${2:-/machine/peripheral/d0/virtio-backend}
out=$(mktemp)
trap 'rm -f "$out"' EXIT

expect() {
    if grep -qF -- "$1" "$out"; then
        echo "ok - qmp-shell: $1"
    else
        echo "FAIL - qmp-shell transcript lacks: $1" >&2
        cat "$out" >&2
        exit 1
    fi
}

# HMP mode (-H): commands go through human-monitor-command.
printf '%s\n' 'info iothreads' 'info status' 'no-such-hmp' \
    'object_add iothread,id=io8,poll-weight=7' 'qom-get /objects/io8 poll-weight' \
    'object_del io8' 'object_del io0' |
    timeout 60 qmp-shell -H "$sock" >"$out" 2>&1
expect "io0:"
expect "poll-weight=3"
expect "holders="
expect "VM status: running"
expect "unknown command: 'no-such-hmp'"
expect "(QEMU) 7"
expect "Error: IOThread 'io0' is in use by qom-object $device"

# QMP mode: key=value arguments.
# After `quit` the server closes the connection (as QEMU does by exiting), and
# qemu.qmp 0.0.x's legacy close() then re-raises the reader's EOFError: qmp-shell exits
# 1 with a traceback. Accept exactly that case.
rc=0
timeout 60 qmp-shell "$sock" >"$out" 2>&1 <<'CMDS' || rc=$?
query-status
query-iothreads
qom-set path=/objects/io1 property=poll-weight value=5
qom-get path=/objects/io1 property=poll-weight
object-add qom-type=iothread id=io7 poll-max-ns=0
object-del id=io7
object-del id=io0
query-iothreads
no-such-command
quit
CMDS
expect '{"return": {"status": "running", "running": true}}'
expect "\"holders\": [{\"type\": \"qom-object\", \"qom-path\": \"$device\"}]"
expect '{"return": 5}'
expect "IOThread 'io0' is in use by qom-object $device"
expect '"poll-weight": 5'
expect '"class": "CommandNotFound"'
if [ "$rc" -ne 0 ]; then
    expect "EOFError"
    echo "# qmp-shell exited $rc after quit (EOFError on the closed connection)"
fi
echo "qmp-shell sessions passed"

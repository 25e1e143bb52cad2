#!/usr/bin/env bash
# User-space instructions per dispatched event, aio-poll vs rust-vmm
# event-manager, counted by callgrind (deterministic, unlike CPU time on a
# shared machine).
#
# Each dispatch mode of `bench --dispatch-only` runs in its own valgrind
# invocation; `--toggle-collect` limits counting to the per-mode loop
# function (`dispatch_loop_aio` / `dispatch_loop_em` / `dispatch_loop_nested`:
# eventfd write + one loop
# iteration, and everything they call), so set-up and teardown are excluded.
# Kernel work inside syscalls is not counted (user space only).
#
# Usage: aio-poll/examples/bench/callgrind.sh [EVENTS] [MODE...]
#   EVENTS  events per mode (default 50000)
#   MODE    em blocking weighted em-wait blocking-wait weighted-wait
#           nested-blocking nested-weighted (default: all)
# Env: CARGO_TARGET_DIR (cargo's default if unset), KEEP=1 keeps the
# callgrind.out files (for callgrind_annotate) in $OUT (default /tmp).
set -euo pipefail

events=${1:-50000}
shift || true
modes=("$@")
if [ ${#modes[@]} -eq 0 ]; then
    modes=(em blocking weighted em-wait blocking-wait weighted-wait nested-blocking nested-weighted)
fi

if ! command -v valgrind >/dev/null 2>&1; then
    echo "valgrind not found; installing it (apt-get)" >&2
    if [ "$(id -u)" -eq 0 ]; then
        apt-get install -y valgrind >&2
    else
        sudo apt-get install -y valgrind >&2
    fi
fi

root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
cargo build --release -p aio-poll --features event-manager --example bench >&2
target=${CARGO_TARGET_DIR:-$root/target}
bin=$target/release/examples/bench
out=${OUT:-/tmp}

declare -A ir
for m in "${modes[@]}"; do
    f=$out/callgrind.out.aio-poll.$m
    valgrind --tool=callgrind --callgrind-out-file="$f" \
        --toggle-collect='*dispatch_loop_*' \
        "$bin" --dispatch-only --dispatch-mode "$m" --events "$events" >/dev/null 2>"$f.log" || {
        echo "valgrind failed for mode $m, see $f.log" >&2
        exit 1
    }
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$f")
    if [ -z "$total" ]; then
        echo "no instruction total in $f" >&2
        exit 1
    fi
    ir[$m]=$total
    if [ "${KEEP:-0}" = 0 ]; then
        rm -f "$f" "$f.log"
    fi
done

baseline() {
    case $1 in
    em | blocking | weighted) echo em ;;
    *) echo em-wait ;;
    esac
}

echo "callgrind: user-space instructions per event, $events events per mode"
echo
echo "| dispatch mode | instructions/event | vs event-manager |"
echo "|---|---:|---:|"
for m in "${modes[@]}"; do
    b=$(baseline "$m")
    per=$(awk -v t="${ir[$m]}" -v n="$events" 'BEGIN { printf "%.1f", t / n }')
    if [ -n "${ir[$b]:-}" ]; then
        ratio=$(awk -v t="${ir[$m]}" -v b="${ir[$b]}" 'BEGIN { printf "%.2fx", t / b }')
    else
        ratio="-"
    fi
    echo "| $m | $per | $ratio (vs $b) |"
done

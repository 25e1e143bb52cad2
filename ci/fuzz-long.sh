#!/usr/bin/env bash
# Long fuzzing run (not part of CI): runs each cargo-fuzz target until it has
# executed FUZZ_RUNS inputs (default 10,000,000; libFuzzer -runs=, so it stops
# by count, not time), starting from the seed corpora and fuzz/corpus/<target>.
#
#   ci/fuzz-long.sh [-j 1|2] [target...]
#
# -j: how many targets run at the same time (1 or 2, default 1; each target is
# one libFuzzer process). Targets default to all of them, in the order given.
# FUZZ_TIMEOUT: seconds one input may take before libFuzzer reports a hang
# (default 60). A crash or hang fails the script after the other targets ran;
# its input is kept in fuzz/artifacts/<target>/ and must become a regression
# test in the owning crate. Prints executions and exec/s per target at the end.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

jobs=1
if [ "${1:-}" = -j ]; then
    jobs=${2:-}
    shift 2 || { echo "usage: $0 [-j 1|2] [target...]" >&2; exit 2; }
fi
case "$jobs" in 1 | 2) ;; *) echo "fuzz-long: -j must be 1 or 2" >&2; exit 2 ;; esac
runs=${FUZZ_RUNS:-10000000}
timeout=${FUZZ_TIMEOUT:-60}

all=$(cargo +nightly fuzz list)
targets=("$@")
if [ ${#targets[@]} = 0 ]; then read -ra targets <<<"$(echo $all)"; fi
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$all" || { echo "fuzz-long: no target '$t' (have: $(echo $all))" >&2; exit 2; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
FUZZ_SEED_DIR="$work/seeds" cargo test --quiet --locked >/dev/null
cargo +nightly fuzz build --release >/dev/null

# run TARGET: fuzz it to $runs executions; writes $work/<target>.{log,rc}.
run() {
    local t=$1 corpus="corpus/$1" seeds="$work/seeds-$1"
    mkdir -p "$corpus" "artifacts/$t" "$seeds"
    if [ -d "$work/seeds/$t" ]; then cp -r "$work/seeds/$t/." "$seeds/"; fi
    local start=$SECONDS rc=0
    cargo +nightly fuzz run --release "$t" "$corpus" "$seeds" -- \
        -runs="$runs" -timeout="$timeout" -print_final_stats=1 \
        >"$work/$t.log" 2>&1 || rc=$?
    echo "$rc $((SECONDS - start))" >"$work/$t.rc"
}

echo "fuzz-long: ${targets[*]} to $runs executions each, $jobs at a time"
running=()
for t in "${targets[@]}"; do
    if [ ${#running[@]} -ge "$jobs" ]; then
        wait "${running[0]}" || true
        running=("${running[@]:1}")
    fi
    run "$t" &
    running+=($!)
done
wait

failed=0
echo
echo "fuzz-long: executions per target"
printf '%-20s %12s %9s %8s  %s\n' target executions exec/s seconds result
for t in "${targets[@]}"; do
    read -r rc secs <"$work/$t.rc"
    log="$work/$t.log"
    done_runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -n1 | grep -Eo '[0-9]+' || true)
    if [ -z "$done_runs" ]; then
        # No final line (crash): the last status line's count.
        done_runs=$(grep -Eo '^#[0-9]+' "$log" | tail -n1 | tr -d '#' || echo '?')
    fi
    rate=$(grep -Eo 'average_exec_per_sec: +[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo '?')
    result=ok
    if [ "$rc" != 0 ]; then
        result="FAILED (rc $rc, input under fuzz/artifacts/$t/)"
        failed=1
        tail -n 40 "$log"
    fi
    printf '%-20s %12s %9s %8s  %s\n' "$t" "${done_runs:-?}" "$rate" "$secs" "$result"
done
exit "$failed"

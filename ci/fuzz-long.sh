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
#
# Sanitizer: FUZZ_SANITIZER (default none) for the long run, then the corpus
# the run left (every input that reached new coverage) is replayed once under
# AddressSanitizer (with leak detection). The long run is for depth (panics,
# broken invariants, hangs: what safe Rust can get wrong); ASan finds memory
# errors only in unsafe code, and costs 1.9-8.9x the executions per second here
# (most in the targets that start threads: shadow memory for every stack,
# LeakSanitizer scans on cross-thread allocations), so it checks the inputs
# worth checking instead of every mutation. `FUZZ_SANITIZER=address` runs the
# whole thing under ASan (and skips the replay). FUZZ_MAX_LEN: libFuzzer
# -max_len (default 4096, its own default for an empty corpus; given
# explicitly so that a grown corpus does not raise it).
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
sanitizer=${FUZZ_SANITIZER:-none}
max_len=${FUZZ_MAX_LEN:-4096}
case "$sanitizer" in none | address) ;; *) echo "fuzz-long: FUZZ_SANITIZER must be none or address" >&2; exit 2 ;; esac
[[ $max_len =~ ^[0-9]+$ ]] || { echo "fuzz-long: FUZZ_MAX_LEN must be a number" >&2; exit 2; }

all=$(cargo +nightly fuzz list)
targets=("$@")
if [ ${#targets[@]} = 0 ]; then read -ra targets <<<"$(echo $all)"; fi
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$all" || { echo "fuzz-long: no target '$t' (have: $(echo $all))" >&2; exit 2; }
done

# FUZZ_LOG_DIR: keep every target's libFuzzer log there (default: a
# temporary directory, removed at the end).
if [ -n "${FUZZ_LOG_DIR:-}" ]; then
    work=$FUZZ_LOG_DIR
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
FUZZ_SEED_DIR="$work/seeds" cargo test --quiet --locked >/dev/null
# The two builds live in separate target directories (the flags differ: one
# would rebuild the other's dependencies every time).
asan_target=target
long_target=target
if [ "$sanitizer" = none ]; then long_target=target/sanitizer-none; fi
cargo +nightly fuzz build --release --target-dir "$asan_target" >/dev/null
if [ "$sanitizer" = none ]; then
    cargo +nightly fuzz build --release -s none --target-dir "$long_target" >/dev/null
fi

# run TARGET: fuzz it to $runs executions; writes $work/<target>.{log,rc}.
run() {
    local t=$1 corpus="corpus/$1" seeds="$work/seeds-$1"
    mkdir -p "$corpus" "artifacts/$t" "$seeds"
    if [ -d "$work/seeds/$t" ]; then cp -r "$work/seeds/$t/." "$seeds/"; fi
    local start=$SECONDS rc=0
    cargo +nightly fuzz run --release -s "$sanitizer" --target-dir "$long_target" \
        "$t" "$corpus" "$seeds" -- \
        -runs="$runs" -timeout="$timeout" -max_len="$max_len" -print_final_stats=1 \
        >"$work/$t.log" 2>&1 || rc=$?
    local secs=$((SECONDS - start)) replay=-
    if [ "$rc" = 0 ] && [ "$sanitizer" = none ]; then
        # Every input the run kept, once, under ASan.
        replay="$(ls "$corpus" | wc -l) ok"
        cargo +nightly fuzz run --release --target-dir "$asan_target" "$t" "$corpus" -- \
            -runs=0 -timeout="$timeout" >"$work/$t.replay.log" 2>&1 || {
            rc=$?
            replay="FAILED"
        }
    fi
    echo "$rc $secs $replay" >"$work/$t.rc"
}

echo "fuzz-long: ${targets[*]} to $runs executions each, $jobs at a time, sanitizer $sanitizer"
for t in "${targets[@]}"; do
    # The next target starts when any running one ends.
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    run "$t" &
done
wait

failed=0
echo
echo "fuzz-long: executions per target"
printf '%-20s %12s %9s %8s %14s  %s\n' target executions exec/s seconds "ASan replay" result
for t in "${targets[@]}"; do
    read -r rc secs replay_n replay_ok <"$work/$t.rc"
    log="$work/$t.log"
    done_runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -n1 | grep -Eo '[0-9]+' || true)
    if [ -z "$done_runs" ]; then
        # No final line (crash): the last status line's count.
        done_runs=$(grep -Eo '^#[0-9]+' "$log" | tail -n1 | tr -d '#' || echo '?')
    fi
    rate=$(grep -Eo 'average_exec_per_sec: +[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo '?')
    result=ok
    replay="$replay_n${replay_ok:+ $replay_ok}"
    if [ "$replay_n" = FAILED ]; then
        result="FAILED under ASan (corpus replay; input under fuzz/artifacts/$t/)"
        failed=1
        tail -n 40 "$work/$t.replay.log"
    elif [ "$rc" != 0 ]; then
        result="FAILED (rc $rc, input under fuzz/artifacts/$t/)"
        failed=1
        tail -n 40 "$log"
    fi
    printf '%-20s %12s %9s %8s %14s  %s\n' "$t" "${done_runs:-?}" "$rate" "$secs" "$replay" "$result"
done
exit "$failed"

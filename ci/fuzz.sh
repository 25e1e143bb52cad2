#!/usr/bin/env bash
# Writes the seed corpora (the fuzz crate's unit tests encode the owning crates'
# canonical cases), builds every cargo-fuzz target, runs each for FUZZ_SECONDS
# (default 60), then replays the whole corpus once more. Prints executions per
# target. A crash fails the script; its input is kept in fuzz/artifacts/<target>/
# and must become a regression test in the owning crate.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${FUZZ_SECONDS:-60}
if [ "$secs" = 0 ]; then echo "fuzz: skipped (FUZZ_SECONDS=0)"; exit 0; fi

seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
FUZZ_SEED_DIR="$seeds" cargo test --quiet --locked >/dev/null

targets=$(cargo +nightly fuzz list)
echo "fuzz: targets: $(echo $targets)"
cargo +nightly fuzz build --release >/dev/null

summary=""
for t in $targets; do
    corpus="corpus/$t"
    mkdir -p "$corpus" "artifacts/$t"
    work=$(mktemp -d)
    if [ -d "$seeds/$t" ]; then cp -r "$seeds/$t/." "$work/"; fi
    log=$(mktemp)
    if ! cargo +nightly fuzz run --release "$t" "$corpus" "$work" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz: target $t FAILED (input saved under fuzz/artifacts/$t/)"
        exit 1
    fi
    runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -n1 | grep -Eo '[0-9]+' || echo '?')
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -n1 | grep -Eo '[0-9]+' || echo '?')
    # Replay the merged corpus once (regression check of everything found so far).
    cargo +nightly fuzz run --release "$t" "$corpus" -- -runs=0 >/dev/null 2>&1 \
        || { echo "fuzz: replay of the $t corpus FAILED"; exit 1; }
    summary+=$(printf '%-20s %12s execs in %3ss   edges %6s   corpus %5s inputs' \
        "$t" "$runs" "$secs" "$cov" "$(ls "$corpus" | wc -l)")$'\n'
    rm -rf "$work" "$log"
done
echo
echo "fuzz: executions per target"
printf '%s' "$summary"

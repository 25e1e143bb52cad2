#!/usr/bin/env bash
# Line coverage of the workspace's tests with cargo-llvm-cov. rustup's
# llvm-tools component is not reachable from this machine, so the LLVM tools
# come from Debian's llvm-19 (it reads Rust 1.95's profile format).
set -euo pipefail
cd "$(dirname "$0")/.."
export LLVM_COV=/usr/lib/llvm-19/bin/llvm-cov
export LLVM_PROFDATA=/usr/lib/llvm-19/bin/llvm-profdata
if [ "${COVERAGE:-1}" = 0 ]; then echo "coverage: skipped (COVERAGE=0)"; exit 0; fi
cargo llvm-cov --workspace --all-features --locked --summary-only \
    --ignore-filename-regex '(guest/|/tests/)' 2>&1 | tee target/coverage-summary.txt | tail -n 40
total=$(grep -E '^TOTAL' target/coverage-summary.txt | awk '{print $10}')
echo "coverage: workspace line coverage ${total:-unknown}"

#!/usr/bin/env bash
# Runs every check and test of the workspace. This is the README's test command
# and what `.ci/run` calls. It installs what it needs itself (ci/setup.sh).
#
# Environment:
#   FUZZ_SECONDS  seconds per fuzz target (default 60; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s  [%(%H:%M:%S)T]\n' "$*" -1; }

step "setup"
bash ci/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --locked

step "iothread-registry without its default (QEMU) feature"
cargo build -p iothread-registry --no-default-features --locked

step "cargo test"
cargo test --workspace --all-features --locked

step "vhost-user-blk export under a real Linux guest (QEMU TCG)"
bash ci/vhost-test.sh

step "cargo package (library crates)"
bash ci/package.sh

step "fuzz"
bash ci/fuzz.sh

step "coverage"
bash ci/coverage.sh

step "all checks passed"

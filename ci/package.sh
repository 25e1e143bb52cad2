#!/usr/bin/env bash
# Every library crate must package (and build from its package) on its own.
# `cargo package --workspace` resolves our path dependencies through a
# temporary local registry, exactly as crates.io would after publishing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo package --locked --allow-dirty -p aio-poll -p iothread-registry -p mshv-regpage

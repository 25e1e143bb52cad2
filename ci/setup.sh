#!/usr/bin/env bash
# Installs everything the test command needs on a fresh machine (idempotent).
# Debian packages (QEMU, LLVM 19, fio, fuse3), Python's qemu.qmp (brings qmp-shell), and cargo-fuzz.
set -euo pipefail

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
# qemu-storage-daemon (the image-locking tests and the vhost-user front-end tests
# run against it).
command -v qemu-storage-daemon >/dev/null || need_apt+=(qemu-system-common)
# Coverage: rustup's llvm-tools component cannot be fetched here; Debian's
# LLVM 19 reads the profiles of Rust 1.95 (LLVM 22) and is used instead.
[ -x /usr/lib/llvm-19/bin/llvm-profdata ] || need_apt+=(llvm-19)
# ci/bench-poll.sh measures the host disk with fio to choose the guest iodepth.
command -v fio >/dev/null || need_apt+=(fio)
# The power-cut durability tests mount a FUSE file system: as root the fuser
# crate calls mount(2) itself, otherwise it needs fusermount3.
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "ci/setup: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
    echo "ci/setup: pip install qemu.qmp"
    python3 -m pip install --quiet --disable-pip-version-check 'qemu.qmp>=0.0.3'
fi

if ! cargo llvm-cov --version >/dev/null 2>&1; then
    echo "ci/setup: cargo install cargo-llvm-cov"
    cargo install --quiet --locked cargo-llvm-cov
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "ci/setup: cargo install cargo-fuzz"
    cargo install --quiet --locked cargo-fuzz
fi

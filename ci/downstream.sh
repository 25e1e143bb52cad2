#!/usr/bin/env bash
# Downstream consumer check: builds what a VMM importing our library crates from
# crates.io would build, from the `.crate` files `cargo package` produces — never from
# the workspace sources.
#
#  1. `cargo package` the library crates (ci/package.sh verifies them; here --no-verify).
#  2. Unpack each `.crate` into ci/downstream/packages/NAME/ (a workspace of its own,
#     outside the main one; the packages are its members, patched in for each other).
#  3. Every example each package's examples/ dir or Cargo.toml declares must be in the
#     package (an example the workspace has but the package lost = a missed file).
#  4. Build and test ci/downstream (the adoption patterns, written as a consumer would).
#  5. Build every example of every package on its own, with only the features its
#     `required-features` names (a feature the workspace happens to enable does not
#     count), then run it (exit 0 required) unless listed in BUILD_ONLY below.
#
# Usage: bash ci/downstream.sh [--update-lock]
#   --update-lock  re-derive ci/downstream/Cargo.lock from the workspace's Cargo.lock
#                  (same versions; needed when a packaged crate gains a dependency).
# Environment: CARGO_TARGET_DIR is honoured (the packages are looked up in its package/
#   dir and the consumer builds share it); DOWNSTREAM_RUN_TIMEOUT seconds per example
#   run (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
ds=$root/ci/downstream
crates=(aio-poll iothread-registry mshv-regpage)
# Examples that are only built, not run: CRATE/EXAMPLE, with the reason.
declare -A BUILD_ONLY=(
    ["aio-poll/bench"]="a benchmark (25-90 s in release); timing runs are not CI checks"
)
timeout_s=${DOWNSTREAM_RUN_TIMEOUT:-300}

update_lock=0
case "${1:-}" in
    --update-lock) update_lock=1 ;;
    "") ;;
    *) echo "usage: $0 [--update-lock]" >&2; exit 2 ;;
esac

step() { printf '\n--> downstream: %s\n' "$*"; }
fail() { printf '\ndownstream check FAILED: %s\n' "$*" >&2; exit 1; }

# Reads `cargo metadata` JSON on stdin and prints one line per member package of
# interest: NAME VERSION, then one `example NAME FEATURES` line per example target
# (FEATURES comma-separated, "-" for none).
metadata_examples() {
    python3 -c '
import json, sys
wanted = set(sys.argv[1:])
meta = json.load(sys.stdin)
for p in sorted(meta["packages"], key=lambda p: p["name"]):
    if p["name"] not in wanted:
        continue
    print("package", p["name"], p["version"])
    for t in sorted(p["targets"], key=lambda t: t["name"]):
        if "example" in t["kind"]:
            feats = ",".join(t.get("required-features") or []) or "-"
            print("example", p["name"], t["name"], feats)
' "$@"
}

root_meta=$(cargo metadata --locked --format-version 1 --no-deps)
target_dir=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' \
    <<<"$root_meta")
root_list=$(metadata_examples "${crates[@]}" <<<"$root_meta")
# The consumer builds share the workspace's target dir (same registry crates).
export CARGO_TARGET_DIR=$target_dir

step "cargo package ${crates[*]} (into $target_dir/package)"
pargs=()
for c in "${crates[@]}"; do pargs+=(-p "$c"); done
cargo package --locked --allow-dirty --no-verify "${pargs[@]}"

step "unpack the .crate files into ci/downstream/packages/"
rm -rf "$ds/packages"
mkdir -p "$ds/packages"
while read -r kind name version; do
    [ "$kind" = package ] || continue
    file=$target_dir/package/$name-$version.crate
    [ -f "$file" ] || fail "$file was not produced by cargo package"
    # --touch: fresh mtimes, so cargo never reuses a build of an older package.
    tar --touch -xzf "$file" -C "$ds/packages"
    mv "$ds/packages/$name-$version" "$ds/packages/$name"
    echo "    $name $version"
done <<<"$root_list"

cd "$ds"
if [ "$update_lock" = 1 ]; then
    step "re-derive ci/downstream/Cargo.lock from the workspace's Cargo.lock"
    cp "$root/Cargo.lock" Cargo.lock
    cargo update --workspace
fi
# A full (resolving) metadata call checks the lock; the listing needs no dependencies.
cargo metadata --locked --format-version 1 >/dev/null ||
    fail "ci/downstream/Cargo.lock is out of date: run 'bash ci/downstream.sh --update-lock' and commit it"
ds_meta=$(cargo metadata --locked --format-version 1 --no-deps)
pkg_list=$(metadata_examples "${crates[@]}" <<<"$ds_meta")

step "every example of the workspace crates is in its package"
missing=$(comm -23 <(grep '^example' <<<"$root_list" | awk '{print $2 "/" $3}' | sort) \
    <(grep '^example' <<<"$pkg_list" | awk '{print $2 "/" $3}' | sort))
[ -z "$missing" ] ||
    fail "examples missing from the packages (package.include/exclude?): $(echo $missing)"
grep '^example' <<<"$pkg_list" | awk '{print "    " $2 "/" $3 " (required-features: " $4 ")"}'

step "build and test the consumer crate (ci/downstream) against the packages"
cargo fmt -p downstream-check --check || fail "ci/downstream is not formatted (cargo fmt)"
cargo clippy --locked --quiet -p downstream-check --all-targets -- -D warnings ||
    fail "the consumer crate has clippy findings"
cargo test --locked || fail "the consumer crate does not build or pass its tests against the packages"

step "build and run every packaged example with its own required-features only"
ran=0
built=0
while read -r kind crate example feats; do
    [ "$kind" = example ] || continue
    fargs=()
    [ "$feats" = - ] || fargs=(--features "$feats")
    echo "    build $crate/$example ${fargs[*]}"
    cargo build --locked --quiet -p "$crate" --example "$example" "${fargs[@]}" ||
        fail "example $crate/$example does not build from the package (features: $feats)"
    built=$((built + 1))
    if [ -n "${BUILD_ONLY[$crate/$example]:-}" ]; then
        echo "    (not run: ${BUILD_ONLY[$crate/$example]})"
        continue
    fi
    echo "    run   $crate/$example"
    timeout "$timeout_s" cargo run --locked --quiet -p "$crate" --example "$example" \
        "${fargs[@]}" </dev/null >"$CARGO_TARGET_DIR/downstream-$crate-$example.log" 2>&1 || {
        tail -n 30 "$CARGO_TARGET_DIR/downstream-$crate-$example.log" >&2
        fail "example $crate/$example failed when run from the package"
    }
    ran=$((ran + 1))
done <<<"$pkg_list"

step "ok: ${#crates[@]} packages, consumer crate built and tested, $built examples built, $ran run"

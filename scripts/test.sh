#!/usr/bin/env bash
# The project's checks, as CI runs them: setup, format, lints, build, tests, libtorch isolation.
#
#   scripts/test.sh
#
# Installs what is missing first (scripts/setup.sh). The build goes to $CARGO_TARGET_DIR
# (default ~/.cache/mentor/target), reused across clones and runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

eval "$("$ROOT/scripts/setup.sh" --print-env)"
step() { echo "[test] $*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings denied)"
cargo clippy --release --workspace --all-targets --quiet -- -D warnings

step "libtorch isolation: coordinator, protocol, storage, collective and CLI build without tch"
# Answers 0 (links libtorch), 1 (does not) or 2 (cargo tree failed: nothing was checked).
links_libtorch() {
  local tree
  tree="$(cargo tree -p "$1" -e normal,build --prefix none)" || return 2
  grep -Eq '^(tch|torch-sys) ' <<<"$tree"
}
isolated() {
  local code=0
  links_libtorch "$1" || code=$?
  case "$code" in
    0) echo "error: $1 depends on libtorch (tch / torch-sys)" >&2; exit 1 ;;
    2) echo "error: cargo tree -p $1 failed: the isolation check checked nothing" >&2; exit 1 ;;
  esac
}
# The check itself must see libtorch where it is, or it proves nothing.
code=0
links_libtorch mentor-worker || code=$?
[ "$code" -eq 0 ] || { echo "error: the isolation check does not see tch in mentor-worker" >&2; exit 1; }
for crate in mentor-coordinator mentor-proto mentor-plan mentor-data mentor-labels mentor-collective mentor-telemetry mentor-cli; do
  isolated "$crate"
done

step "build the binaries the end-to-end tests start"
cargo build --release --bins --quiet

step "cargo test"
cargo test --release --workspace --quiet

step "all checks passed"

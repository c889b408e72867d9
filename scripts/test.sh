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

step "libtorch isolation: coordinator, protocol, storage and CLI build without tch"
links_libtorch() {
  local tree
  tree="$(cargo tree -p "$1" -e normal,build --prefix none)"
  grep -Eq '^(tch|torch-sys) ' <<<"$tree"
}
# The check itself must see libtorch where it is, or it proves nothing.
links_libtorch mentor-worker || { echo "error: the isolation check does not see tch in mentor-worker" >&2; exit 1; }
for crate in mentor-coordinator mentor-proto mentor-plan mentor-data mentor-labels mentor-cli; do
  if links_libtorch "$crate"; then
    echo "error: $crate depends on libtorch (tch / torch-sys)" >&2
    exit 1
  fi
done

step "build the binaries the end-to-end tests start"
cargo build --release --bins --quiet

step "cargo test"
cargo test --release --workspace --quiet

step "all checks passed"

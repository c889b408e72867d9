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
for crate in mentor-coordinator mentor-proto mentor-plan mentor-data mentor-labels mentor-cli; do
  if cargo tree --release -p "$crate" -e normal,build --prefix none | grep -Eq '^(tch|torch-sys) '; then
    echo "error: $crate depends on libtorch (tch / torch-sys)" >&2
    exit 1
  fi
done

step "build the binaries the end-to-end tests start"
cargo build --release --bins --quiet

step "cargo test"
cargo test --release --workspace --quiet

step "all checks passed"

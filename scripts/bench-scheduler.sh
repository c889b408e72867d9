#!/usr/bin/env bash
# The coordinator's labeling throughput at tens of thousands of shards: labeling tasks handed
# out and taken back a second with labeling's changes saved in groups (what the coordinator
# does) against a save of state.json at every change (the reference), in the same run, on
# Fashion-MNIST's 59,900 unlabeled images cut into shards of --shard-size (default 2: 29,950
# shards, a state.json of some 12 MB). The gRPC layer and the workers' inference are left
# out: this measures the scheduler and its saves.
#
#   scripts/bench-scheduler.sh [--shard-size 2] [--tasks 5000] [--reference-tasks 300]
#                              [--workers 8] [--data DIR]
#
# The ratio above 1.0 is how many times more tasks a second grouped saves allow.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${MENTOR_BIN:-}" ]; then
  eval "$("$ROOT/scripts/setup.sh" --print-env)"
  MENTOR_BIN="$CARGO_TARGET_DIR/release"
fi
[ "$MENTOR_BIN" = "${CARGO_TARGET_DIR:-}/release" ] && (cd "$ROOT" && cargo build --release --quiet --bin bench-scheduler)
exec "$MENTOR_BIN/bench-scheduler" "$@"

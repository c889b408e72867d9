#!/usr/bin/env bash
# Ring all-reduce (this project's TCP ring) against PyTorch's gloo all_reduce, 2 and 4 processes
# on loopback, 1 MB to 256 MB, measured in the same run. Prints algbw and busbw (nccl-tests
# definitions: busbw = algbw * 2(W-1)/W) and the busbw ratio ring / gloo.
#
#   scripts/bench-allreduce.sh [--worlds 2,4] [--sizes-mb 1,4,16,64,256] [--iterations 10]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
worlds="2,4"
sizes="1,4,16,64,256"
iterations=10
while [ $# -gt 0 ]; do
  case "$1" in
    --worlds) worlds="$2"; shift 2 ;;
    --sizes-mb) sizes="$2"; shift 2 ;;
    --iterations) iterations="$2"; shift 2 ;;
    *) echo "bench-allreduce.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
# MENTOR_BIN (a folder with the built binaries) and PYTHON skip the setup, as on the GPU machine
# (scripts/gpu-check.sh); the binaries are built first when MENTOR_BIN is the release build
# ($CARGO_TARGET_DIR/release, what `setup.sh --print-env` sets), so none runs stale.
if [ -z "${MENTOR_BIN:-}" ]; then
  eval "$("$ROOT/scripts/setup.sh" --print-env)"
  MENTOR_BIN="$CARGO_TARGET_DIR/release"
fi
PYTHON="${PYTHON:-$(command -v python3 || echo python3)}"
python3() { command "$PYTHON" "$@"; }
[ "$MENTOR_BIN" = "${CARGO_TARGET_DIR:-}/release" ] && (cd "$ROOT" && cargo build --release --quiet --bin ring-bench)
results="$(mktemp)"
# The ranks are stopped on any exit (Ctrl-C, a rank that failed under set -e): a rank left
# behind would wait for its peers until its timeout.
pids=()
trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -f "$results"' EXIT
trap 'exit 143' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for world in ${worlds//,/ }; do
  # A port the system just gave out, and the ones above it for the other ranks.
  base="$(free_port)"
  [ "$base" -lt 65000 ] || base=$((base - 1000))
  pids=()
  for rank in $(seq 0 $((world - 1))); do
    "$MENTOR_BIN/ring-bench" --rank "$rank" --world-size "$world" --base-port "$base" \
      --sizes-mb "$sizes" --iterations "$iterations" >>"$results" &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  python3 "$ROOT/benches/allreduce_gloo.py" --world-size "$world" --port "$(free_port)" \
    --sizes-mb "$sizes" --iterations "$iterations" | grep '^{' >>"$results"
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {(r["impl"], r["world_size"], r["bytes"]): r for r in rows}
print(f"{'W':>2} {'size':>8} {'ring algbw':>11} {'ring busbw':>11} {'gloo algbw':>11} {'gloo busbw':>11} {'busbw ratio':>12}  (GB/s)")
for (impl, world, size) in sorted(k for k in by if k[0] == "mentor-ring"):
    ring, gloo = by[(impl, world, size)], by.get(("gloo", world, size))
    if not gloo:
        continue
    print(f"{world:>2} {size/2**20:>6.0f}MB {ring['algbw_gbps']:>11.3f} {ring['busbw_gbps']:>11.3f} "
          f"{gloo['algbw_gbps']:>11.3f} {gloo['busbw_gbps']:>11.3f} {ring['busbw_gbps']/gloo['busbw_gbps']:>12.2f}")
PY

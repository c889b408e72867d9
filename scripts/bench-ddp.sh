#!/usr/bin/env bash
# Data-parallel training throughput on Fashion-MNIST: this project's workers' training path
# over the TCP ring against PyTorch DDP (gloo), same model, global batch and data, 1 thread per
# process, in the same run. Prints img/s for 1 and 2 processes and the ratio mentor / PyTorch,
# against PyTorch in its default layout and in channels-last (the layout the workers use on the
# CPU).
#
#   scripts/bench-ddp.sh [--batch 256] [--steps 200] [--data DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
batch=256
steps=200
data=/usr/share/datasets/fashion-mnist
while [ $# -gt 0 ]; do
  case "$1" in
    --batch) batch="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    *) echo "bench-ddp.sh: unknown argument $1" >&2; exit 2 ;;
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
[ "$MENTOR_BIN" = "${CARGO_TARGET_DIR:-}/release" ] && (cd "$ROOT" && cargo build --release --quiet --bin bench-ddp)
results="$(mktemp)"
# The ranks are stopped on any exit (Ctrl-C, a rank that failed under set -e): a rank left
# behind would wait for its peers until its timeout.
pids=()
trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -f "$results"' EXIT
trap 'exit 143' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# The first of N consecutive ports that are free now, below the kernel's ephemeral range (where
# the outgoing connections of other processes, tests run beside this one, take theirs).
free_ports() {
  python3 - "$1" <<'PY'
import random, socket, sys
n = int(sys.argv[1])
for _ in range(200):
    base = random.randrange(20000, 32000 - n)
    sockets = []
    try:
        for port in range(base, base + n):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        for s in sockets:
            s.close()
    print(base)
    sys.exit(0)
sys.exit("no free ports")
PY
}

for world in 1 2; do
  base="$(free_ports "$world")"
  pids=()
  for rank in $(seq 0 $((world - 1))); do
    "$MENTOR_BIN/bench-ddp" --rank "$rank" --world-size "$world" --base-port "$base" \
      --batch "$batch" --steps "$steps" --data "$data" >>"$results" &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  for layout in "" --channels-last; do
    python3 "$ROOT/benches/ddp_train.py" --world-size "$world" --port "$(free_port)" \
      --batch "$batch" --steps "$steps" --data "$data" $layout | grep '^{' >>"$results"
  done
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {(r["impl"], r["world_size"]): r for r in rows}
print(f"{'processes':>9} {'mentor img/s':>13} {'pytorch img/s':>14} {'ratio':>6} "
      f"{'pytorch channels-last img/s':>28} {'ratio':>6}")
for world in (1, 2):
    ours = by.get(("mentor", world))
    theirs = by.get(("pytorch", world))
    last = by.get(("pytorch-channels-last", world))
    if ours and theirs and last:
        mine = ours["images_per_second"]
        print(f"{world:>9} {mine:>13.0f} {theirs['images_per_second']:>14.0f} "
              f"{mine / theirs['images_per_second']:>6.2f} "
              f"{last['images_per_second']:>28.0f} {mine / last['images_per_second']:>6.2f}")
PY

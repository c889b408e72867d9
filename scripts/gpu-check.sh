#!/usr/bin/env bash
# Checks the GPU paths on a machine with one NVIDIA GPU (see ../shared/GPU.md).
#
#   scripts/gpu-check.sh --prepare   # here: build, copy binaries and data into .gpu/ (ignored by git)
#   scripts/gpu-check.sh --run       # there: every check and benchmark in one go, table last
#   scripts/gpu-check.sh --mpl       # there: deploy/plans/fashion-mnist-mpl-gpu.toml, seed 0, on cuda:0
#   scripts/gpu-check.sh --results   # there: the four-method table on cuda:0 (SEEDS, default 0,1,2)
#
# --run needs no Rust toolchain: it uses .gpu/bin and the machine's own torch (python3 with
# torch 2.11.0). It runs a Noisy Student round whose training tasks form a world-size-1 NCCL
# group on cuda:0 (the project loads libnccl.so.2 itself), then the model throughput benchmark
# against PyTorch on the GPU, the pseudo-labelling benchmark on the GPU, and the all-reduce,
# data-parallel and Meta Pseudo Labels step benchmarks on its CPU cores. Details go to $OUT (or
# .gpu/out).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPU_DIR="$ROOT/.gpu"
mode="${1:---run}"

if [ "$mode" = "--prepare" ]; then
  eval "$("$ROOT/scripts/setup.sh" --print-env)"
  (cd "$ROOT" && cargo build --release --quiet --bins)
  rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/bin" "$GPU_DIR/data"
  for binary in coordinator worker mentor bench-models bench-ddp bench-label bench-mpl ring-bench; do
    cp "$CARGO_TARGET_DIR/release/$binary" "$GPU_DIR/bin/"
    strip "$GPU_DIR/bin/$binary"
  done
  cp /usr/share/datasets/fashion-mnist/*.gz "$GPU_DIR/data/"
  grep -qx '/.gpu/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$ROOT/.git/info/exclude"
  du -sh "$GPU_DIR" >&2
  echo "[gpu-check] prepared $GPU_DIR; run: scripts/gpu-check.sh --run (carry .gpu)" >&2
  exit 0
fi
case "$mode" in --run|--mpl|--results) ;; *) echo "usage: gpu-check.sh --prepare | --run | --mpl | --results" >&2; exit 2 ;; esac

OUT="${OUT:-$GPU_DIR/out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python3)}"
[ -x /opt/torch/.venv/bin/python3 ] && PYTHON=/opt/torch/.venv/bin/python3
TORCH_LIB="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
# Only libtorch: NCCL is found by the project (next to the loaded libtorch), no symlink, no path.
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN="$GPU_DIR/bin"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

if [ "$mode" = "--results" ]; then
  # One worker on cuda:0, the GPU schedule of Meta Pseudo Labels; the other plans as on CPU.
  exec "$PYTHON" "$ROOT/benches/results_fashion_mnist.py" --seeds "${SEEDS:-0,1,2}" --workers 1 \
    --device cuda:0 --bin-dir "$BIN" --data "$GPU_DIR/data" --reuse \
    --mpl-plan "$ROOT/deploy/plans/fashion-mnist-mpl-gpu.toml" --out "$OUT/results"
fi

if [ "$mode" = "--mpl" ]; then
  # The GPU schedule of Meta Pseudo Labels: one worker on cuda:0 through local-cluster.sh.
  plan="$OUT/mpl-gpu.toml"
  sed -e "s#/usr/share/datasets/fashion-mnist#$GPU_DIR/data#" "$ROOT/deploy/plans/fashion-mnist-mpl-gpu.toml" >"$plan"
  timeout "${MPL_TIMEOUT:-480}" "$ROOT/scripts/local-cluster.sh" --plan "$plan" --workers 1 --device cuda:0 \
    --bin-dir "$BIN" --state-dir "$OUT/mpl" >"$OUT/mpl.txt" 2>&1 || true
  echo "=== Meta Pseudo Labels, GPU schedule, seed 0 ==="
  grep -h 'meta pseudo labels evaluation' "$OUT"/mpl/logs/worker-*.log | sed 's/.*evaluation //' || true
  sed -n '/=== final status/,$p' "$OUT/mpl.txt"
  exit 0
fi

# 1. A Noisy Student round on cuda:0 whose training tasks form an NCCL group of one.
plan="$OUT/gpu-plan.toml"
sed -e "s#/usr/share/datasets/fashion-mnist#$GPU_DIR/data#" -e 's/min_workers = 2/min_workers = 1\ncollective = "nccl"/' \
  -e 's/^rounds = 2/rounds = 1/' "$ROOT/deploy/plans/tiny.toml" >"$plan"
state="$OUT/run"
rm -rf "$state"
"$BIN/coordinator" --plan "$plan" --listen 127.0.0.1:0 --state-dir "$state" >"$OUT/coordinator.log" 2>&1 &
coordinator=$!
trap 'kill $coordinator 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -s "$state/coordinator.addr" ] && break; sleep 0.1; done
address="$(cat "$state/coordinator.addr")"
timeout 300 "$BIN/worker" --coordinator "$address" --device cuda:0 >"$OUT/worker.log" 2>&1 || true
"$BIN/mentor" status --coordinator "$address" --json >"$OUT/status.json" || true
nccl_run="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"])' "$OUT/status.json" 2>/dev/null || echo unknown)"
nccl_groups="$(grep -c 'data-parallel group formed' "$OUT/worker.log" || true)"
nccl_ok="no"
[ "$nccl_run" = "succeeded" ] && grep -q 'every rank joined.*Nccl' "$OUT/worker.log" && nccl_ok="yes"

# 2. Model throughput against PyTorch on the same GPU, same run.
"$BIN/bench-models" --device cuda --batch 128 --image-size 32 --iterations 20 >"$OUT/bench-models.jsonl" 2>"$OUT/bench-models.err" || true
models="wrn-28-2,bit-r50x1"
"$PYTHON" -c 'import torchvision' 2>/dev/null && models="wrn-28-2,resnet18,bit-r50x1,efficientnet-b0"
"$PYTHON" "$ROOT/benches/models.py" --device cuda --batch 128 --image-size 32 --iterations 20 --models "$models" \
  >>"$OUT/bench-models.jsonl" 2>>"$OUT/bench-models.err" || true

# 3. Pseudo-labelling on the GPU: the label service against a bare forward and PyTorch.
MENTOR_BIN="$BIN" PYTHON="$PYTHON" "$ROOT/scripts/bench-label.sh" --device cuda --examples 16384 \
  --batch-size 1024 --data "$GPU_DIR/data" >"$OUT/bench-label.txt" 2>&1 || true

# 4. The CPU collective benchmarks on this machine's cores (ring against gloo, DDP training).
MENTOR_BIN="$BIN" PYTHON="$PYTHON" "$ROOT/scripts/bench-allreduce.sh" >"$OUT/bench-allreduce.txt" 2>&1 || true
MENTOR_BIN="$BIN" PYTHON="$PYTHON" "$ROOT/scripts/bench-ddp.sh" --data "$GPU_DIR/data" >"$OUT/bench-ddp.txt" 2>&1 || true
sed "s#^dir = .*#dir = \"$GPU_DIR/data\"#" "$ROOT/deploy/plans/fashion-mnist-mpl.toml" >"$OUT/bench-mpl-plan.toml"
MENTOR_BIN="$BIN" PYTHON="$PYTHON" "$ROOT/scripts/bench-mpl.sh" --plan "$OUT/bench-mpl-plan.toml" >"$OUT/bench-mpl.txt" 2>&1 || true

echo
echo "=== gpu-check ($(head -1 "$OUT/gpu.txt")) ==="
echo "NCCL world-size-1 Noisy Student round: run $nccl_run, NCCL groups formed: $nccl_groups, ok: $nccl_ok"
"$PYTHON" - "$OUT/bench-models.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {(r["impl"], r["model"], r["mode"]): r for r in rows}
print(f"{'model':<16} {'mode':<10} {'mentor img/s':>13} {'pytorch img/s':>14} {'ratio':>6}")
for (impl, model, mode), ours in sorted(by.items()):
    theirs = by.get(("pytorch", model, mode))
    if impl == "mentor" and theirs:
        print(f"{model:<16} {mode:<10} {ours['images_per_second']:>13.0f} {theirs['images_per_second']:>14.0f} "
              f"{ours['images_per_second'] / theirs['images_per_second']:>6.2f}")
PY
echo "--- pseudo-labelling (GPU) ---"; tail -n 7 "$OUT/bench-label.txt"
echo "--- TCP ring against gloo (CPU cores) ---"; tail -n 11 "$OUT/bench-allreduce.txt"
echo "--- DDP training, CPU processes ---"; tail -n 3 "$OUT/bench-ddp.txt"
echo "--- Meta Pseudo Labels step, one CPU process ---"; tail -n 5 "$OUT/bench-mpl.txt"

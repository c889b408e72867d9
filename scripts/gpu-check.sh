#!/usr/bin/env bash
# Checks the GPU paths on a machine with one NVIDIA GPU (see ../shared/GPU.md).
#
#   scripts/gpu-check.sh --prepare   # here: build; pack binaries and data into .gpu/ (ignored by git)
#   scripts/gpu-check.sh --run       # there: every check and benchmark in one go, table last
#   scripts/gpu-check.sh --mpl       # there: Meta Pseudo Labels seeds side by side on cuda:0
#   scripts/gpu-check.sh --mpl-step  # there: step 4 of --run alone (the MPL step against PyTorch)
#   scripts/gpu-check.sh --results   # there: the four-method table on cuda:0 (SEEDS, default 0,1,2;
#                                    # METHODS and MPL_PLAN as results-fashion-mnist.sh's --methods
#                                    # and --mpl-plan, MPL_PLAN defaulting to the GPU schedule;
#                                    # RESULTS_STATE=DIR to go on over several calls)
#
# Every mode but --prepare needs no Rust toolchain: it unpacks .gpu/bin.tar.xz (the binaries,
# xz-compressed so that .gpu stays under the 64 MiB a device call carries) and uses the
# machine's own torch (python3 with torch 2.11.0). Details go to $OUT (or .gpu/out).
#
# --run: a Noisy Student round whose training tasks form a world-size-1 NCCL group on cuda:0
# (the project loads libnccl.so.2 itself), the model throughput benchmark against PyTorch on the
# GPU, the pseudo-labelling and Meta Pseudo Labels step benchmarks on the GPU, and the
# all-reduce, data-parallel and Meta Pseudo Labels step benchmarks on its CPU cores.
#
# --mpl: one local cluster (1 worker) per seed of SEEDS (default 0), all at once on the one GPU,
# every seed on the labeled subset drawn with SPLIT_SEED (default 0, `data.split_seed`),
# under MPL_PLAN (default deploy/plans/fashion-mnist-mpl-gpu.toml) with `steps` set to STEPS
# (default: the plan's). STEPS=auto first times a 400-step run of every seed side by side and
# takes the longest of LENGTHS (default 40000 30000 20000 15000 10000 5000 2000) that ends
# before MPL_TIMEOUT seconds (default 480) from the start. Runs still going at MPL_TIMEOUT are
# stopped; the evaluations they reached are printed. DEVICE (default cuda:0) runs it elsewhere.
# MPL_STATE=DIR keeps the runs in DIR (default: a fresh temporary folder) and a later --mpl with the
# same DIR and SEEDS resumes them where they stopped (the joint training saves itself every
# 1,000 steps): on a device machine, a path git ignores and the call does not carry (e.g.
# runs/gpu-mpl) survives between calls while the machine stays warm, so a seed longer than
# one call's limit spans two calls. Each seed's plan, output, logs and checkpoints come back as
# $OUT/mpl/seedN.tar.gz either way.
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
  tar -C "$GPU_DIR" -cJf "$GPU_DIR/bin.tar.xz" bin
  rm -rf "$GPU_DIR/bin"
  cp /usr/share/datasets/fashion-mnist/*.gz "$GPU_DIR/data/"
  du -sh "$GPU_DIR" >&2
  echo "[gpu-check] prepared $GPU_DIR; run: scripts/gpu-check.sh --run (carry .gpu)" >&2
  exit 0
fi
case "$mode" in --run|--mpl|--mpl-step|--results) ;; *) echo "usage: gpu-check.sh --prepare | --run | --mpl | --mpl-step | --results" >&2; exit 2 ;; esac

OUT="${OUT:-$GPU_DIR/out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python3 || echo python3)}"
[ -x /opt/torch/.venv/bin/python3 ] && PYTHON=/opt/torch/.venv/bin/python3
# Unpacked outside .gpu, which must stay small enough to carry.
[ -f "$GPU_DIR/bin.tar.xz" ] || { echo "gpu-check.sh: no $GPU_DIR/bin.tar.xz: run --prepare first" >&2; exit 2; }
unpacked="$(mktemp -d)"
# Process groups of the local clusters started with setsid (Ctrl-C and timeout do not reach
# them), and the --run coordinator: stopped on any exit, before their directories go.
cluster_pids=""
coordinator=""
worker=""
cleanup() {
  local pid
  for pid in $cluster_pids; do kill -- -"$pid" 2>/dev/null || true; done
  # `timeout` passes the signal on to the worker it runs.
  [ -z "$worker" ] || kill "$worker" 2>/dev/null || true
  [ -z "$coordinator" ] || kill "$coordinator" 2>/dev/null || true
  if [ -n "$cluster_pids" ]; then sleep 3; fi
  rm -rf "$unpacked"
}
trap cleanup EXIT
trap 'echo "[gpu-check] interrupted: stopping the runs" >&2; exit 143' INT TERM
"$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$GPU_DIR/bin.tar.xz" "$unpacked"
BIN="$unpacked/bin"
TORCH_LIB="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
# Only libtorch: NCCL is found by the project (next to the loaded libtorch), no symlink, no path.
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DEVICE="${DEVICE:-cuda:0}"
# on_this_data PLAN: PLAN with its data set read from the carried copy in .gpu/data.
on_this_data() { sed "s#^dir = .*#dir = \"$GPU_DIR/data\"#" "$1"; }
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU ($DEVICE)") | tee "$OUT/gpu.txt"

# mpl_step: the Meta Pseudo Labels step on the GPU (the GPU plan's batch: mu 7) against PyTorch's.
mpl_step() {
  on_this_data "$ROOT/deploy/plans/fashion-mnist-mpl-gpu.toml" >"$OUT/bench-mpl-gpu-plan.toml"
  MENTOR_BIN="$BIN" PYTHON="$PYTHON" "$ROOT/scripts/bench-mpl.sh" --plan "$OUT/bench-mpl-gpu-plan.toml" --device cuda \
    --steps 200 --warmup 20 >"$OUT/bench-mpl-gpu.txt" 2>&1 || true
}
if [ "$mode" = "--mpl-step" ]; then
  mpl_step
  echo "--- Meta Pseudo Labels step, GPU ---"; tail -n 5 "$OUT/bench-mpl-gpu.txt"
  exit 0
fi

if [ "$mode" = "--results" ]; then
  # One worker on cuda:0, the GPU schedule of Meta Pseudo Labels; the other plans as on CPU.
  # RESULTS_STATE=DIR keeps the runs in DIR (as MPL_STATE for --mpl: a path that survives
  # between calls while the device machine stays warm), so that a table longer than one
  # call's limit is finished by the same call again (--reuse resumes each run where it
  # stopped); results.json and the runs' plans and status files come back under
  # $OUT/results either way.
  results="$(realpath -m "${RESULTS_STATE:-$OUT/results}")"
  code=0
  "$PYTHON" "$ROOT/benches/results_fashion_mnist.py" --seeds "${SEEDS:-0,1,2}" --workers 1 \
    --device "$DEVICE" --bin-dir "$BIN" --data "$GPU_DIR/data" --reuse \
    ${METHODS:+--methods "$METHODS"} --split-seed "${SPLIT_SEED:-0}" \
    --mpl-plan "${MPL_PLAN:-$ROOT/deploy/plans/fashion-mnist-mpl-gpu.toml}" --out "$results" || code=$?
  if [ "$results" != "$(realpath -m "$OUT/results")" ]; then
    mkdir -p "$OUT/results"
    (cd "$results" && find . -maxdepth 2 \( -name '*.json' -o -name '*.toml' \) \
      ! -path './*/pseudo-labels/*' -exec cp --parents {} "$OUT/results/" \;) || true
  fi
  exit "$code"
fi

if [ "$mode" = "--mpl" ]; then
  started=$(date +%s)
  deadline=$(( started + ${MPL_TIMEOUT:-480} ))
  seeds="$(echo "${SEEDS:-0}" | tr ',' ' ')"
  # Without MPL_STATE the runs live beside the unpacked binaries and go with them.
  work="$(realpath -m "${MPL_STATE:-$unpacked/mpl}")"
  resuming=0
  if [ -n "${MPL_STATE:-}" ] && [ -d "$work" ]; then
    resuming=1
    for seed in $seeds; do
      [ -f "$work/seed$seed.toml" ] || { echo "[gpu-check] $work holds no run of seed $seed: remove it or change SEEDS" >&2; exit 2; }
    done
    echo "=== resuming the runs in $work (seeds $seeds) ==="
  else
    rm -rf "$work"  # an existing state directory would resume an old run
    mkdir -p "$work"
  fi
  # plan SEED STEPS FILE: MPL_PLAN on this machine's data at SEED on the SPLIT_SEED subset (and
  # STEPS, unless empty).
  plan() {
    # One worker a seed: a plan that waits for more would never start.
    on_this_data "${MPL_PLAN:-$ROOT/deploy/plans/fashion-mnist-mpl-gpu.toml}" |
      sed -e "s/^seed = .*/seed = $1/" -e "s/^min_workers = .*/min_workers = 1/" \
        -e "/^split_seed = /d" -e "s/^\(labeled_per_class = [0-9]*\).*/\1\nsplit_seed = ${SPLIT_SEED:-0}/" >"$3"
    [ -z "$2" ] || sed -i "s/^steps = [0-9]*/steps = $2/" "$3"
  }
  # side_by_side PREFIX: one local cluster per seed, all at once; waits for them or the deadline.
  side_by_side() {
    local pids="" seed alive
    for seed in $seeds; do
      setsid "$ROOT/scripts/local-cluster.sh" --plan "$work/$1$seed.toml" --workers 1 --device "$DEVICE" \
        --threads 4 --bin-dir "$BIN" --state-dir "$work/$1$seed" >"$work/$1$seed.txt" 2>&1 </dev/null &
      pids="$pids $!"
      cluster_pids="$cluster_pids $!"
    done
    while :; do
      alive=0
      for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ "$alive" = 1 ] || break
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "[gpu-check] MPL_TIMEOUT reached: stopping the runs" >&2
        for pid in $pids; do kill -- -"$pid" 2>/dev/null || true; done
        sleep 3
        break
      fi
      sleep 5
    done
  }
  steps="${STEPS:-}"
  if [ "$resuming" = 0 ] && [ "$steps" = "auto" ]; then
    # 400 steps of every seed side by side; the slowest pace between steps 100 and 400.
    for seed in $seeds; do
      plan "$seed" 400 "$work/pace$seed.toml"
      sed -i 's/^eval_every = .*/eval_every = 400/; s/finetune = { steps = [0-9]*/finetune = { steps = 20/' "$work/pace$seed.toml"
    done
    side_by_side pace
    pace="$("$PYTHON" - "$work"/pace*/logs/worker-1.log <<'PY'
import datetime, re, sys
slowest = 0.0
for path in sys.argv[1:]:
    at = {}
    for line in open(path):
        m = re.match(r"(\S+)Z .*meta pseudo labels step=(\d+) total", line)
        if m:
            at[int(m.group(2))] = datetime.datetime.fromisoformat(m.group(1)).timestamp()
    if 100 in at and 400 in at:
        slowest = max(slowest, (at[400] - at[100]) / 300)
print(slowest)
PY
)" || pace=0
    if [ "$pace" = 0 ] || [ "$pace" = 0.0 ]; then
      echo "[gpu-check] the 400-step timing runs failed:" >&2
      for seed in $seeds; do tail -n 20 "$work/pace$seed.txt" >&2 || true; done
      exit 1
    fi
    # Joint training at that pace plus 8% for evaluations and saves, and a minute for the rest.
    left=$(( deadline - $(date +%s) - 60 ))
    steps=""
    for length in ${LENGTHS:-40000 30000 20000 15000 10000 5000 2000}; do
      if "$PYTHON" -c "import sys; sys.exit(0 if 0 < $pace and $length * $pace * 1.08 < $left else 1)"; then
        steps=$length
        break
      fi
    done
    [ -n "$steps" ] || { echo "[gpu-check] ${pace} s a step: no length in LENGTHS ends within ${left} s" >&2; exit 1; }
    echo "=== pace: $pace s a step with seeds $seeds side by side; $steps steps fit in ${left} s ==="
  fi
  if [ "$resuming" = 0 ]; then
    for seed in $seeds; do plan "$seed" "$steps" "$work/seed$seed.toml"; done
  fi
  side_by_side seed
  for seed in $seeds; do
    echo "=== Meta Pseudo Labels, $(grep -m1 '^steps' "$work/seed$seed.toml"), seed $seed ==="
    grep -h 'meta pseudo labels resumes' "$work/seed$seed"/logs/worker-*.log | sed 's/.*INFO //' | sort -u || true
    grep -h 'meta pseudo labels evaluation' "$work/seed$seed"/logs/worker-*.log | sed 's/.*evaluation //' | sort -u -t= -k2,2n || true
    grep -A1 'round  teacher acc' "$work/seed$seed.txt" | tail -n 2 || true
  done
  # One archive a seed comes back with $OUT (a device call returns at most 8 files, 2 folders
  # down): its plan, output, state, logs and checkpoints (the resume checkpoint and the trained
  # models, about 14 MB for the cnn plans), so that a run the call stopped goes on elsewhere
  # (with its plan's data.dir pointed at that machine's copy of the data).
  mkdir -p "$OUT/mpl"
  for seed in $seeds; do
    (cd "$work" && tar -czf "$OUT/mpl/seed$seed.tar.gz" "seed$seed.toml" "seed$seed.txt" \
      "seed$seed/state.json" "seed$seed/logs" "seed$seed/checkpoints" 2>/dev/null) || true
  done
  exit 0
fi

# 1. A Noisy Student round on cuda:0 whose training tasks form an NCCL group of one.
plan="$OUT/gpu-plan.toml"
sed -e "s#/usr/share/datasets/fashion-mnist#$GPU_DIR/data#" -e 's/min_workers = 2/min_workers = 1\ncollective = "nccl"/' \
  -e 's/^rounds = 2/rounds = 1/' -e '/^width_growth_per_round/d' "$ROOT/deploy/plans/tiny.toml" >"$plan"
state="$OUT/run"
rm -rf "$state"
"$BIN/coordinator" --plan "$plan" --listen 127.0.0.1:0 --state-dir "$state" >"$OUT/coordinator.log" 2>&1 &
coordinator=$!
for _ in $(seq 1 600); do [ -s "$state/coordinator.addr" ] && break; sleep 0.1; done
if [ ! -s "$state/coordinator.addr" ]; then
  echo "[gpu-check] the coordinator did not start in 60 s; its log:" >&2
  tail -n 20 "$OUT/coordinator.log" >&2 || true
  exit 1
fi
address="$(cat "$state/coordinator.addr")"
# In the background, so that an interrupt reaches the trap at once and cleanup stops it.
timeout 300 "$BIN/worker" --coordinator "$address" --device cuda:0 >"$OUT/worker.log" 2>&1 &
worker=$!
wait "$worker" || true
worker=""
"$BIN/mentor" status --coordinator "$address" --json >"$OUT/status.json" || true
nccl_run="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"])' "$OUT/status.json" 2>/dev/null || echo unknown)"
nccl_groups="$(grep -c 'data-parallel group formed' "$OUT/worker.log" || true)"
nccl_ok="no"
[ "$nccl_run" = "succeeded" ] && grep -q 'every rank joined.*Nccl' "$OUT/worker.log" && nccl_ok="yes"
# The worker told the coordinator its GPU's PCI bus id (cudaDeviceGetPCIBusId).
gpu_id="$("$PYTHON" -c 'import json,sys; print(",".join(w.get("gpu") or "" for w in json.load(open(sys.argv[1])).get("workers", [])))' "$OUT/status.json" 2>/dev/null || true)"
grep -q "PCI bus id is unknown" "$OUT/worker.log" && gpu_id="unknown ($(grep -m1 'PCI bus id is unknown' "$OUT/worker.log"))"

# 2. Model throughput against PyTorch on the same GPU, same run.
"$BIN/bench-models" --device cuda --batch 128 --image-size 32 --iterations 20 >"$OUT/bench-models.jsonl" 2>"$OUT/bench-models.err" || true
models="wrn-28-2,bit-r50x1"
"$PYTHON" -c 'import torchvision' 2>/dev/null && models="wrn-28-2,resnet18,bit-r50x1,efficientnet-b0"
"$PYTHON" "$ROOT/benches/models.py" --device cuda --batch 128 --image-size 32 --iterations 20 --models "$models" \
  >>"$OUT/bench-models.jsonl" 2>>"$OUT/bench-models.err" || true

# 3. Pseudo-labelling on the GPU: the label service against a bare forward and PyTorch.
MENTOR_BIN="$BIN" PYTHON="$PYTHON" "$ROOT/scripts/bench-label.sh" --device cuda --examples 16384 \
  --batch-size 1024 --data "$GPU_DIR/data" >"$OUT/bench-label.txt" 2>&1 || true

# 4. The Meta Pseudo Labels step on the GPU (the GPU plan's batch: mu 7) against PyTorch's.
mpl_step

# 5. The CPU collective benchmarks on this machine's cores (ring against gloo, DDP training).
MENTOR_BIN="$BIN" PYTHON="$PYTHON" "$ROOT/scripts/bench-allreduce.sh" >"$OUT/bench-allreduce.txt" 2>&1 || true
MENTOR_BIN="$BIN" PYTHON="$PYTHON" "$ROOT/scripts/bench-ddp.sh" --data "$GPU_DIR/data" >"$OUT/bench-ddp.txt" 2>&1 || true
on_this_data "$ROOT/deploy/plans/fashion-mnist-mpl.toml" >"$OUT/bench-mpl-plan.toml"
MENTOR_BIN="$BIN" PYTHON="$PYTHON" "$ROOT/scripts/bench-mpl.sh" --plan "$OUT/bench-mpl-plan.toml" >"$OUT/bench-mpl.txt" 2>&1 || true

echo
echo "=== gpu-check ($(head -1 "$OUT/gpu.txt")) ==="
echo "NCCL world-size-1 Noisy Student round: run $nccl_run, NCCL groups formed: $nccl_groups, ok: $nccl_ok"
echo "the worker's GPU (PCI bus id, for the coordinator's one-worker-a-GPU check): ${gpu_id:-not told}"
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
echo "--- Meta Pseudo Labels step, GPU ---"; tail -n 5 "$OUT/bench-mpl-gpu.txt"
echo "--- Meta Pseudo Labels step, one CPU process ---"; tail -n 5 "$OUT/bench-mpl.txt"

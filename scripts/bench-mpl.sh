#!/usr/bin/env bash
# The Meta Pseudo Labels step of the workers against the same step in PyTorch, in the same run:
# `bench-mpl` (the workers' `mpl_step` and EMA, and the making of their batches) prints the
# plan's settings, and `benches/mpl_step.py` runs them in PyTorch, in its default layout and in
# channels-last (the layout the workers use on the CPU). One process, --threads libtorch threads,
# on --device (cpu, or cuda / cuda:N: the models and batches on the GPU, on both sides).
#
#   scripts/bench-mpl.sh [--plan deploy/plans/fashion-mnist-mpl.toml] [--steps 100]
#                        [--warmup 10] [--threads 1] [--device cpu]
#
# Prints seconds per step for the step (forward, backward and update of teacher and student,
# the student's EMA) and for the batches (sampling, flips and shifts, RandAugment), and the
# ratios PyTorch / mentor (above 1.0: we are faster).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
plan="$ROOT/deploy/plans/fashion-mnist-mpl.toml"
steps=100
warmup=10
threads=1
device=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --plan) plan="${2:?--plan needs a file}"; shift 2 ;;
    --steps) steps="${2:?--steps needs a number}"; shift 2 ;;
    --warmup) warmup="${2:?--warmup needs a number}"; shift 2 ;;
    --threads) threads="${2:?--threads needs a number}"; shift 2 ;;
    --device) device="${2:?--device needs a value}"; shift 2 ;;
    *) echo "bench-mpl.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
# MENTOR_BIN (a folder with the built binaries) and PYTHON skip the setup, as on the GPU machine
# (scripts/gpu-check.sh); the binaries are built first when MENTOR_BIN is the release build
# ($CARGO_TARGET_DIR/release, what `setup.sh --print-env` sets), so none runs stale.
if [ -z "${MENTOR_BIN:-}" ]; then
  eval "$("$ROOT/scripts/setup.sh" --print-env)"
  MENTOR_BIN="$CARGO_TARGET_DIR/release"
fi
[ "$MENTOR_BIN" = "${CARGO_TARGET_DIR:-}/release" ] && (cd "$ROOT" && cargo build --release --quiet --bin bench-mpl)
PYTHON="${PYTHON:-$(command -v python3 || echo python3)}"
if ! "$PYTHON" -c "import torchvision" 2>/dev/null; then
  echo "[bench] installing torchvision 0.26.0 (matches torch 2.11.0)" >&2
  "$PYTHON" -m pip install -q --disable-pip-version-check "torchvision==0.26.0" >&2
fi
common=(--steps "$steps" --warmup "$warmup" --threads "$threads" --device "$device")

echo "[bench] mentor: $plan, $steps steps after $warmup, $threads thread(s), $device" >&2
ours="$("$MENTOR_BIN/bench-mpl" --plan "$plan" "${common[@]}" | grep '^{')"
settings="$("$PYTHON" -c 'import json, sys; print(json.dumps(json.loads(sys.argv[1])["settings"]))' "$ours")"
echo "[bench] PyTorch, default layout and channels-last" >&2
theirs="$("$PYTHON" "$ROOT/benches/mpl_step.py" --settings "$settings" "${common[@]}" | grep '^{')"
last="$("$PYTHON" "$ROOT/benches/mpl_step.py" --settings "$settings" "${common[@]}" --channels-last | grep '^{')"

"$PYTHON" - "$ours" "$theirs" "$last" <<'PY'
import json, sys
ours, theirs, last = (json.loads(a) for a in sys.argv[1:])
s = ours["settings"]
print(f"MPL step: labeled batch {s['batch_size']}, unlabeled {s['batch_size'] * s['mu']} (x2 views), "
      f"{ours['threads']} thread(s), {ours['steps']} steps, {ours['device']}")
print(f"{'':<28} {'mentor':>9} {'pytorch':>9} {'ratio':>6} {'pytorch channels-last':>22} {'ratio':>6}")
for label, key in (("step (s)", "step_seconds"), ("batch (s)", "batch_seconds"), ("step + batch (s)", None)):
    value = lambda r: r["step_seconds"] + r["batch_seconds"] if key is None else r[key]
    print(f"{label:<28} {value(ours):>9.4f} {value(theirs):>9.4f} {value(theirs) / value(ours):>6.2f}"
          f" {value(last):>22.4f} {value(last) / value(ours):>6.2f}")
PY

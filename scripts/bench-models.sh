#!/usr/bin/env bash
# Training and inference throughput of WRN-28-2, ResNet-18, BiT-R50x1 and EfficientNet-B0:
# this project's models (tch) against the same architectures in PyTorch (torchvision where it
# has them, benches/models.py otherwise), same input size, batch and device, in the same run.
#
#   scripts/bench-models.sh [--device cpu|cuda] [--batch N] [--image-size N] [--channels N]
#                           [--classes N] [--warmup N] [--iterations N]
#                           [--models a,b,...] [--threads N]
#
# Prints a table with img/s and the ratio mentor / PyTorch (above 1.0: we are faster); on the
# CPU also against PyTorch in channels-last, the layout this project's models use there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$("$ROOT/scripts/setup.sh" --print-env)"
if ! python3 -c "import torchvision" 2>/dev/null; then
  echo "[bench] installing torchvision 0.26.0 (matches torch 2.11.0)" >&2
  pip install -q --disable-pip-version-check "torchvision==0.26.0" >&2
fi
(cd "$ROOT" && cargo build --release --quiet --bin bench-models)

results="$(mktemp)"
trap 'rm -f "$results"' EXIT
"$CARGO_TARGET_DIR/release/bench-models" "$@" >>"$results"
python3 "$ROOT/benches/models.py" "$@" | grep '^{' >>"$results"
# On the CPU the project's models run channels-last: measure PyTorch in that layout as well.
case " $* " in
  *cuda*) ;;
  *) python3 "$ROOT/benches/models.py" "$@" --channels-last | grep '^{' >>"$results" ;;
esac

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
by = {(r["impl"], r["model"], r["mode"]): r for r in rows}
models = []
for r in rows:
    if r["model"] not in models:
        models.append(r["model"])
print(f"{'model':<16} {'mode':<10} {'params':>11} {'mentor img/s':>13} {'pytorch img/s':>14} {'ratio':>6}"
      f" {'pytorch channels-last':>22} {'ratio':>6}")
for model in models:
    for mode in ("train", "inference"):
        ours, theirs = by.get(("mentor", model, mode)), by.get(("pytorch", model, mode))
        if not ours or not theirs:
            continue
        ratio = ours["images_per_second"] / theirs["images_per_second"]
        params = ours["params"] if ours["params"] == theirs.get("params", ours["params"]) else f"{ours['params']}!={theirs['params']}"
        line = f"{model:<16} {mode:<10} {params:>11} {ours['images_per_second']:>13.1f} {theirs['images_per_second']:>14.1f} {ratio:>6.2f}"
        last = by.get(("pytorch-channels-last", model, mode))
        if last:
            line += f" {last['images_per_second']:>22.1f} {ours['images_per_second'] / last['images_per_second']:>6.2f}"
        print(line)
PY

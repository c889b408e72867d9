#!/usr/bin/env bash
# Pseudo-labelling throughput: the label service (decode pipeline + inference + shard commit)
# against (1) a bare in-process forward of the same model on the same images already decoded,
# and (2) PyTorch in Python (DataLoader with workers + inference + numpy top-k writing), on the
# same PNG images of Fashion-MNIST, the same model (WRN-28-2) and batch, in the same run. Also
# prints the bytes per example of the soft labels and the student's read throughput of them.
#
#   scripts/bench-label.sh [--examples N] [--batch-size N] [--threads N] [--device cpu|cuda]
#                          [--data DIR]
#
# Ratios above 1.0 mean mentor is faster; the goals are >= 0.9 against the bare forward and
# > 1.0 against PyTorch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXAMPLES=4096
BATCH=256
THREADS=0
DEVICE=cpu
DATA=/usr/share/datasets/fashion-mnist
while [[ $# -gt 0 ]]; do
  case "$1" in
    --examples) EXAMPLES="$2"; shift 2 ;;
    --batch-size) BATCH="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
# MENTOR_BIN (a folder with the built binaries) and PYTHON skip the setup, as on the GPU machine
# (scripts/gpu-check.sh); the binaries are built first when MENTOR_BIN is the release build
# ($CARGO_TARGET_DIR/release, what `setup.sh --print-env` sets), so none runs stale.
if [ -z "${MENTOR_BIN:-}" ]; then
  eval "$("$ROOT/scripts/setup.sh" --print-env)"
  MENTOR_BIN="$CARGO_TARGET_DIR/release"
  python3 -c "import PIL" 2>/dev/null || pip install -q --disable-pip-version-check pillow >&2
fi
[ "$MENTOR_BIN" = "${CARGO_TARGET_DIR:-}/release" ] && (cd "$ROOT" && cargo build --release --quiet --bin bench-label)
PYTHON="${PYTHON:-$(command -v python3 || echo python3)}"
python3() { command "$PYTHON" "$@"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "[bench] writing $EXAMPLES Fashion-MNIST training images as PNG files" >&2
python3 - "$work/images" "$EXAMPLES" "$DATA" <<'PY'
import gzip, os, sys
import numpy as np
from PIL import Image
out, count, data = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(out)
with gzip.open(os.path.join(data, "train-images-idx3-ubyte.gz")) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
for i in range(count):
    Image.fromarray(images[i]).save(os.path.join(out, f"{i:07d}.png"))
PY

results="$work/results.jsonl"
echo "[bench] mentor: bare forward, label service, student read" >&2
(cd "$ROOT" && "$MENTOR_BIN/bench-label" --images "$work/images" --data "$DATA" \
  --device "$DEVICE" --batch-size "$BATCH" --threads "$THREADS") >>"$results"
echo "[bench] PyTorch: DataLoader + inference + numpy" >&2
python3 "$ROOT/benches/label_pytorch.py" --images "$work/images" --batch-size "$BATCH" \
  --device "$DEVICE" --threads "$THREADS" >>"$results"

python3 - "$results" <<'PY'
import json, sys
rows = {r["impl"]: r for r in (json.loads(l) for l in open(sys.argv[1]) if l.startswith("{"))}
m, p = rows["mentor"], rows["pytorch"]
print(f"images: {m['examples']}, model WRN-28-2, {m['device']}, batch {m['batch_size']}, top-k {m['top_k']}")
print(f"{'':<36} {'img/s':>10} {'ratio':>7}")
print(f"{'bare forward (decoded, no I/O)':<36} {m['bare_forward_images_per_second']:>10.1f}")
print(f"{'mentor label service':<36} {m['service_images_per_second']:>10.1f} {m['service_images_per_second'] / m['bare_forward_images_per_second']:>7.2f}  (vs bare forward, goal >= 0.9)")
print(f"{'PyTorch DataLoader + numpy':<36} {p['service_images_per_second']:>10.1f} {m['service_images_per_second'] / p['service_images_per_second']:>7.2f}  (mentor / PyTorch, goal > 1.0)")
print(f"soft labels: {m['bytes_per_example']:.1f} bytes/example (PyTorch npz: {p['bytes_per_example']:.1f})")
print(f"student read of pseudo labels: {m['student_read_examples_per_second']:,.0f} examples/s")
PY

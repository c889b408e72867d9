#!/usr/bin/env bash
# Fashion-MNIST with 1,000 labels over seeds: supervised-1k, Noisy Student, Meta Pseudo Labels,
# supervised on all labels, each a real run on this machine. See benches/results_fashion_mnist.py.
#
#   scripts/results-fashion-mnist.sh [--seeds 0,1,2] [--split-seed 0] [--workers 2] [--methods a,b,...] [--reuse]
#                                    [--mpl-plan PLAN] [--distill-plan PLAN] [--device cpu|cuda:N] [--bin-dir DIR]
#                                    [--data DIR] [--out DIR] [--quick]
# (--help lists what each does.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$("$ROOT/scripts/setup.sh" --print-env)"
exec python3 "$ROOT/benches/results_fashion_mnist.py" "$@"

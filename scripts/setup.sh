#!/usr/bin/env bash
# Installs what the project needs, idempotently, and prints the environment to use.
#
#   source <(scripts/setup.sh --print-env)    # or: eval "$(scripts/setup.sh --print-env)"
#
# - Debian packages: protobuf-compiler (protoc), dataset-fashion-mnist (the demo data);
# - torch 2.11.0 (the libtorch that tch 0.24 builds against) in a virtual environment under
#   $MENTOR_HOME (default ~/.cache/mentor), with numpy and safetensors for the Python one-liner,
#   PyYAML for the tests of deploy/kubernetes, Pillow for the labeling benchmark's images and
#   torchvision 0.26.0 for the benchmarks' PyTorch references;
# - a persistent CARGO_TARGET_DIR under $MENTOR_HOME, reused across clones;
# - the release build, when --build is given.
# Each step is skipped when already done. Progress goes to stderr.
set -euo pipefail

MENTOR_HOME="${MENTOR_HOME:-$HOME/.cache/mentor}"
VENV="$MENTOR_HOME/venv"
TORCH_VERSION="2.11.0"
# The torchvision of that torch: the benchmarks' PyTorch references (models, RandAugment).
TORCHVISION_VERSION="0.26.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

print_env=0
build=0
# Under --print-env a failed setup prints a command that fails, so that the caller's
# `eval "$(scripts/setup.sh --print-env)"` stops there (under `set -e`) instead of going on
# without torch or protoc: `eval ""` would succeed.
case " $* " in
  *" --print-env "*)
    trap 'code=$?; [ "$code" -eq 0 ] || printf "echo %q >&2; false\n" "[setup] failed (exit $code): see the messages above"' EXIT ;;
esac
for arg in "$@"; do
  case "$arg" in
    --print-env) print_env=1 ;;
    --build) build=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

say() { echo "[setup] $*" >&2; }

if ! command -v cargo >/dev/null; then
  say "cargo is not installed: install Rust (https://rustup.rs) with its rustfmt and clippy components"
  exit 1
fi
if ! command -v python3 >/dev/null; then
  say "python3 is not installed: install Python 3.11 or later (Debian: apt-get install python3 python3-venv)"
  exit 1
fi

sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
updated=0
apt_update() {
  [ "$updated" -eq 1 ] && return 0
  $sudo_cmd apt-get update -qq >&2 && updated=1
}

apt_missing=()
# protoc from anywhere will do (PROTOC names one, as prost-build reads it).
if [ -z "${PROTOC:-}" ] && ! command -v protoc >/dev/null; then
  apt_missing+=(protobuf-compiler)
fi
# The virtual environment needs ensurepip (Debian ships it apart, in python3-venv).
if [ ! -x "$VENV/bin/pip" ] && ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  apt_missing+=("python3-venv")
fi
fashion=/usr/share/datasets/fashion-mnist
have_fashion() {
  local name
  for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -e "$fashion/$name" ] || [ -e "$fashion/$name.gz" ] || return 1
  done
}
if ! have_fashion && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  # The demo data's package is in this project's package sources, not in every Debian's (asked
  # after an update where the package lists are empty, as in a fresh container).
  known() { apt-cache show dataset-fashion-mnist >/dev/null 2>&1; }
  if ! known && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' || true)" ]; then
    apt_update || true
  fi
  if known || ! command -v apt-cache >/dev/null; then
    apt_missing+=(dataset-fashion-mnist)
  else
    say "dataset-fashion-mnist is not in this machine's package sources: put the Fashion-MNIST IDX files in /usr/share/datasets/fashion-mnist by hand for the demo and the tests"
  fi
fi
if [ ${#apt_missing[@]} -gt 0 ] && ! command -v apt-get >/dev/null; then
  # Without apt: the tools are needed; the demo data only by the demo and the tests.
  needed=()
  for package in "${apt_missing[@]}"; do
    if [ "$package" = dataset-fashion-mnist ]; then
      say "no Fashion-MNIST in $fashion and no apt-get to install it: put its four IDX files there by hand for the demo and the tests"
    else
      needed+=("$package")
    fi
  done
  if [ ${#needed[@]} -gt 0 ]; then
    say "missing: ${needed[*]} (Debian's package names); this machine has no apt-get: install protoc (or set PROTOC) and python3's venv module by hand"
    exit 1
  fi
  apt_missing=()
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${apt_missing[*]}"
  apt_update || say "apt-get update failed, trying the install anyway"
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${apt_missing[@]}" >&2
fi

if ! "$VENV/bin/python" -c "import torch, torchvision, numpy, safetensors, yaml, PIL, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" >/dev/null 2>&1; then
  say "installing torch==$TORCH_VERSION into $VENV (a few GB, a few minutes the first time)"
  mkdir -p "$MENTOR_HOME"
  # A venv left without pip (a `python3 -m venv` that failed half-way) is made again.
  if [ ! -x "$VENV/bin/pip" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" || { say "python3 -m venv failed: install python3-venv"; exit 1; }
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" \
    "torchvision==$TORCHVISION_VERSION" numpy safetensors pyyaml pillow >&2
fi

TORCH_LIB="$("$VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export PATH="$VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MENTOR_HOME/target}"
# Absolute: the scripts build in the repository and run the binaries from elsewhere.
case "$CARGO_TARGET_DIR" in /*) ;; *) CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR" ;; esac
export PATH="$CARGO_TARGET_DIR/release:$PATH"

if [ "$build" -eq 1 ]; then
  say "building (release) into $CARGO_TARGET_DIR"
  (cd "$ROOT" && cargo build --release --bins --quiet >&2)
fi

if [ "$print_env" -eq 1 ]; then
  # %q: values with quotes, `$` or backquotes come back as they are under eval.
  printf 'export PATH=%q\n' "$PATH"
  echo "export LIBTORCH_USE_PYTORCH=1"
  printf 'export LD_LIBRARY_PATH=%q\n' "$LD_LIBRARY_PATH"
  printf 'export CARGO_TARGET_DIR=%q\n' "$CARGO_TARGET_DIR"
  printf 'export MENTOR_BIN=%q\n' "$CARGO_TARGET_DIR/release"
fi

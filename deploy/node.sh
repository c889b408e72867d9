#!/usr/bin/env bash
# Starts this machine's part of a run on a cluster: one worker per GPU (or N CPU workers), and
# the coordinator too on the machine that runs it. Slurm (deploy/slurm/mentor.sbatch) and
# Kubernetes (deploy/kubernetes/) run it on every node; it works the same started by hand.
#
#   deploy/node.sh --coordinator HOST:PORT [--plan PLAN --state-dir DIR] [--gpus N|all]
#                  [--workers N] [--device cpu|cuda] [--threads N] [--advertise-host HOST]
#                  [--connect-timeout-seconds S] [--metrics-port P] [--retry-failed]
#                  [--bin-dir DIR] [--dry-run]
#
# Options:
#   --coordinator HOST:PORT  where the run's coordinator listens (workers connect there)
#   --plan PLAN              run the coordinator on this machine too, listening on every interface
#                            at PORT (--exit-when-done: this script ends with the run, 0 if it
#                            succeeded, 1 if it failed); needs --state-dir
#   --state-dir DIR          the run directory, on a file system every node shares at this path
#   --metrics-port P         with --plan: the coordinator serves the run's status to Prometheus
#                            at http://<this node>:P/metrics (ignored, with a notice, without
#                            --plan: a job gives every node the same)
#   --gpus N|all             one worker per GPU, cuda:0 .. cuda:N-1 (N: refused on a machine that
#                            shows fewer; all: every GPU this process
#                            sees: CUDA_VISIBLE_DEVICES when set (Slurm sets it), else what
#                            nvidia-smi lists (in a container, the GPUs it was given), else
#                            NVIDIA_VISIBLE_DEVICES when it lists devices)
#   --workers N              N workers instead (the default device is then cpu); 0 starts none,
#                            for a node that runs the coordinator alone
#   --device cpu|cuda        cpu: --workers CPU workers; cuda: like --gpus (default: cuda when
#                            --gpus is given or a GPU is seen, else cpu)
#   --threads N              libtorch threads per worker (default: the cores this node gives the
#                            step, as nproc counts them, / workers, at least 1: workers that
#                            share a node do not oversubscribe its cores)
#   --advertise-host HOST    where other nodes reach this node's CPU workers for the TCP ring
#                            (default: this host's first address from `hostname -I`)
#   --connect-timeout-seconds S
#                            how long a worker waits for an unreachable coordinator before it
#                            gives up (default 60; longer where the coordinator may start late)
#   --retry-failed           with --plan: the run in --state-dir failed; go on from where it failed
#                            (the coordinator's --retry-failed), once the cause is dealt with;
#                            nothing on a node without --plan (a job gives every node the same)
#   --bin-dir DIR            the coordinator and worker binaries (default: $MENTOR_BIN, else PATH)
#   --dry-run                print the processes it would start, one per line, and exit
#
# Output: every process's lines on this script's stdout, prefixed with its name. Without
# --plan it ends when its workers have (they exit when the run is over). SIGTERM or Ctrl-C stops
# every process it started.
set -euo pipefail

coordinator=""
plan=""
state_dir=""
gpus=""
workers=""
device=""
threads=""
advertise=""
connect_timeout=""
metrics_port=""
bin_dir="${MENTOR_BIN:-}"
dry_run=0
retry=""

usage() { sed -n '2,41p' "$0"; }
fail() { echo "node.sh: $*" >&2; exit 2; }
# The value of option $1, which must be there.
value() { [ $# -ge 2 ] && [ -n "$2" ] || fail "$1 needs a value"; printf '%s' "$2"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) coordinator="$(value "$@")"; shift 2 ;;
    --plan) plan="$(value "$@")"; shift 2 ;;
    --state-dir) state_dir="$(value "$@")"; shift 2 ;;
    --gpus) gpus="$(value "$@")"; shift 2 ;;
    --workers) workers="$(value "$@")"; shift 2 ;;
    --device) device="$(value "$@")"; shift 2 ;;
    --threads) threads="$(value "$@")"; shift 2 ;;
    --advertise-host) advertise="$(value "$@")"; shift 2 ;;
    --connect-timeout-seconds) connect_timeout="$(value "$@")"; shift 2 ;;
    --metrics-port) metrics_port="$(value "$@")"; shift 2 ;;
    --bin-dir) bin_dir="$(value "$@")"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --retry-failed) retry=" --retry-failed"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; fail "unknown argument $1" ;;
  esac
done

[ -n "$coordinator" ] || { usage >&2; fail "--coordinator HOST:PORT is required"; }
coordinator="${coordinator#http://}"
port="${coordinator##*:}"
host="${coordinator%:*}"
case "$port" in ''|*[!0-9]*) fail "--coordinator $coordinator: expected HOST:PORT" ;; esac
[ -n "$host" ] && [ "$host" != "$coordinator" ] || fail "--coordinator $coordinator: expected HOST:PORT"
if [ -n "$plan" ]; then
  [ -f "$plan" ] || fail "plan file $plan not found"
  [ -n "$state_dir" ] || fail "--plan needs --state-dir, the run directory every node shares"
fi
[ -z "$gpus" ] || [ -z "$workers" ] || fail "give --gpus or --workers, not both"
[ -z "$device" ] || [ "$device" = cpu ] || [ "$device" = cuda ] || fail "--device takes cpu or cuda"

# GPUs this process sees: CUDA_VISIBLE_DEVICES (Slurm sets it), else nvidia-smi (in a container:
# the GPUs it was given), else NVIDIA_VISIBLE_DEVICES when it lists devices.
count_list() {
  local list="${1//[[:space:]]/}"
  case "$list" in ''|-1|NoDevFiles|all|none|void) echo 0 ;; *) echo "$list" | tr ',' '\n' | grep -c . ;; esac
}
visible_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    count_list "$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    count_list "${NVIDIA_VISIBLE_DEVICES:-}"
  fi
}

if [ -n "$gpus" ]; then
  [ "$device" != cpu ] || fail "--gpus starts GPU workers; use --workers N with --device cpu"
  device=cuda
  if [ "$gpus" = all ]; then
    workers="$(visible_gpus)"
    [ "$workers" -gt 0 ] || fail "--gpus all: this machine shows no GPU (nvidia-smi, CUDA_VISIBLE_DEVICES); use --workers N for CPU workers"
  else
    case "$gpus" in ''|*[!0-9]*) fail "--gpus takes a number or all" ;; esac
    workers="$gpus"
    # Fewer GPUs than asked for would fail the last workers at start; a machine that shows
    # none (no nvidia-smi, no CUDA_VISIBLE_DEVICES) is taken at its word.
    seen="$(visible_gpus)"
    if [ "$seen" -gt 0 ] && [ "$seen" -lt "$gpus" ]; then
      fail "--gpus $gpus: this machine shows $seen GPU(s) (nvidia-smi, CUDA_VISIBLE_DEVICES); use --gpus all or a smaller number"
    fi
  fi
elif [ -z "$workers" ]; then
  if [ "$device" != cpu ] && [ "$(visible_gpus)" -gt 0 ]; then
    device=cuda
    workers="$(visible_gpus)"
  elif [ "$device" = cuda ]; then
    fail "--device cuda: this machine shows no GPU (nvidia-smi, CUDA_VISIBLE_DEVICES); use --device cpu"
  else
    device=cpu
    workers=1
  fi
else
  case "$workers" in ''|*[!0-9]*) fail "--workers takes a number" ;; esac
  [ -n "$device" ] || device=cpu
  if [ "$device" = cuda ] && [ "$workers" -gt 0 ]; then
    # As with --gpus N: a machine that shows none is taken at its word.
    seen="$(visible_gpus)"
    [ "$seen" -eq 0 ] || [ "$seen" -ge "$workers" ] || fail "--workers $workers --device cuda: this machine shows $seen GPU(s); use --gpus all or fewer workers"
  fi
fi
[ "$workers" -gt 0 ] || [ -n "$plan" ] || fail "no worker and no coordinator to start: give --workers N, --gpus or --plan"

case "$threads" in ''|[1-9]|[1-9][0-9]|[1-9][0-9][0-9]) ;; *) fail "--threads takes a positive number" ;; esac
case "$metrics_port" in ''|*[!0-9]*) [ -z "$metrics_port" ] || fail "--metrics-port takes a port number" ;; esac
# The coordinator's, like --retry-failed: a node without --plan ignores it (a Slurm job gives
# every node the same options).
if [ -n "$metrics_port" ] && [ -z "$plan" ]; then
  echo "[node] --metrics-port is the coordinator's: ignored on this node, which runs no coordinator (no --plan)" >&2
  metrics_port=""
fi
case "$connect_timeout" in ''|*[!0-9]*) [ -z "$connect_timeout" ] || fail "--connect-timeout-seconds takes a number of seconds" ;; esac
if [ -z "$threads" ]; then
  threads=$(( $(nproc) / (workers > 0 ? workers : 1) ))
  [ "$threads" -ge 1 ] || threads=1
fi
if [ -z "$advertise" ]; then
  # `hostname -I` is not everywhere (busybox, inetutils, minimal images): fall back to loopback.
  advertise="$( (hostname -I 2>/dev/null || true) | awk '{print $1}')"
  if [ -z "$advertise" ]; then
    advertise=127.0.0.1
    echo "[node] warning: no address from \`hostname -I\`; workers advertise 127.0.0.1, which other machines cannot reach: give --advertise-host on a multi-node CPU run" >&2
  fi
fi

binary() {
  if [ -n "$bin_dir" ]; then
    [ -x "$bin_dir/$1" ] || fail "--bin-dir $bin_dir has no $1"
    echo "$bin_dir/$1"
  else
    command -v "$1" >/dev/null || fail "no $1 binary on PATH: give --bin-dir or set MENTOR_BIN"
    command -v "$1"
  fi
}

# Each command line quoted for the shell (what --dry-run prints and `start` runs).
q() { printf '%q' "$1"; }
commands=()
names=()
if [ -n "$plan" ]; then
  coordinator_bin="$(binary coordinator)"
  metrics=""
  [ -z "$metrics_port" ] || metrics=" --metrics-listen 0.0.0.0:$metrics_port"
  commands+=("$(q "$coordinator_bin") --plan $(q "$plan") --listen 0.0.0.0:$port --state-dir $(q "$state_dir") --exit-when-done$metrics$retry")
  names+=(coordinator)
fi
if [ "$workers" -gt 0 ]; then
  worker_bin="$(binary worker)"
  worker_common="--coordinator $(q "$host:$port")"
  [ -z "$connect_timeout" ] || worker_common+=" --connect-timeout-seconds $connect_timeout"
fi
for i in $(seq 0 $((workers - 1))); do
  if [ "$device" = cuda ]; then
    commands+=("$(q "$worker_bin") $worker_common --device cuda:$i --threads $threads --advertise-host $(q "$advertise")")
  else
    commands+=("$(q "$worker_bin") $worker_common --device cpu --threads $threads --advertise-host $(q "$advertise")")
  fi
  names+=("worker-$i")
done

if [ "$dry_run" -eq 1 ]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'echo "[node] interrupted, stopping every process" >&2; exit 130' INT
trap 'echo "[node] terminated, stopping every process" >&2; exit 143' TERM

start() {
  local name="$1" command="$2"
  # Each line prefixed with the process's name; the process is the pipeline's first member,
  # so its pid (not the prefixer's) is what is waited for and stopped.
  eval "exec $command" > >(sed -u "s/^/[$name] /") 2>&1 &
  pids+=("$!")
  echo "[node] started $name: $command" >&2
}

index=0
coordinator_pid=""
if [ -n "$plan" ]; then
  start coordinator "${commands[0]}"
  coordinator_pid="${pids[0]}"
  index=1
fi
worker_pids=()
while [ "$index" -lt "${#commands[@]}" ]; do
  start "${names[$index]}" "${commands[$index]}"
  worker_pids+=("${pids[-1]}")
  index=$((index + 1))
done

if [ -n "$coordinator_pid" ]; then
  # The coordinator ends with the run (--exit-when-done) and says how it went.
  code=0
  wait "$coordinator_pid" || code=$?
  echo "[node] the coordinator exited with status $code" >&2
  if [ "$code" -eq 0 ]; then
    # The run is over and the workers are told so at their next call: give them a moment to
    # exit on their own; the EXIT trap stops whatever is left.
    for _ in $(seq 1 20); do
      alive=0
      for pid in ${worker_pids[@]+"${worker_pids[@]}"}; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ "$alive" -eq 1 ] || break
      sleep 0.5
    done
  fi
  # A coordinator that failed (a refused plan, a directory in use) leaves no run to wait for:
  # the workers are stopped at once instead of retrying their connection until they give up.
  exit "$code"
fi
code=0
for pid in "${worker_pids[@]}"; do
  wait "$pid" || code=$?
done
echo "[node] every worker exited (last non-zero status: $code)" >&2
exit "$code"

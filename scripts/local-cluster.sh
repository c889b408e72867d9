#!/usr/bin/env bash
# Runs a whole plan on this machine: one coordinator and N workers, with live progress.
#
#   scripts/local-cluster.sh --plan deploy/plans/fashion-mnist-noisy-student.toml [--workers N]
#
# Options:
#   --plan PLAN        the plan to run (required)
#   --workers N        worker processes to start (default 2)
#   --device DEVICE    device of the workers: cpu (default), cuda:N (every worker on that GPU:
#                      one worker, or a plan whose collective is not NCCL) or cuda (worker i
#                      on cuda:i-1, one GPU each)
#   --threads N        libtorch threads per worker (default: cores / workers, at least 1, so
#                      that workers training together as data-parallel ranks do not oversubscribe)
#   --state-dir DIR    run directory (default runs/<plan file name>-<date>); an existing one resumes
#                      (logs are appended to)
#   --redo-finetune    finetune the student of the Meta Pseudo Labels run in --state-dir again,
#                      under a plan that differs from the run's in [mpl.finetune] only (the joint
#                      teacher-student training is kept); needs --state-dir
#   --retry-failed     go on with the failed run in --state-dir from the phase it failed in, once
#                      the cause is dealt with (its unfinished tasks get their retries again;
#                      what it finished is kept); needs --state-dir
#   --listen ADDR      coordinator address (default 127.0.0.1:0, a free port)
#   --bin-dir DIR      use the coordinator, worker and mentor binaries in DIR instead of building
#                      them (no setup either when their libraries already resolve)
#
# Installs what is missing first (scripts/setup.sh), builds, then prints progress while the run
# goes, the final status (text and JSON) at the end, and exits non-zero if the run failed.
# Every process it started is stopped on exit, Ctrl-C included. Logs: <state-dir>/logs/.
# COORDINATOR_START_SECONDS (default 600): how long a coordinator still checking the data and
# the soft-label store before it serves (writes coordinator.addr) is waited for.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
plan=""
workers=2
device="cpu"
threads=""
state_dir=""
listen="127.0.0.1:0"
bin_dir=""
reopen=()

usage() { sed -n '2,30p' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --plan) plan="${2:?--plan needs a file}"; shift 2 ;;
    --workers) workers="${2:?--workers needs a number}"; shift 2 ;;
    --device) device="${2:?--device needs a value}"; shift 2 ;;
    --threads) threads="${2:?--threads needs a number}"; shift 2 ;;
    --state-dir) state_dir="${2:?--state-dir needs a directory}"; shift 2 ;;
    --listen) listen="${2:?--listen needs an address}"; shift 2 ;;
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    --redo-finetune|--retry-failed)
      [ ${#reopen[@]} -eq 0 ] || { echo "local-cluster.sh: --redo-finetune and --retry-failed go alone" >&2; exit 2; }
      reopen=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "local-cluster.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$plan" ] || { echo "local-cluster.sh: --plan is required" >&2; usage >&2; exit 2; }
if [ ${#reopen[@]} -gt 0 ] && [ -z "$state_dir" ]; then
  echo "local-cluster.sh: ${reopen[0]} needs the --state-dir of the run" >&2
  exit 2
fi
[ -f "$plan" ] || { echo "local-cluster.sh: plan file $plan not found" >&2; exit 2; }
case "$workers" in ''|*[!0-9]*) echo "local-cluster.sh: --workers must be a positive number, not $workers" >&2; exit 2 ;; esac
workers=$((10#$workers))
[ "$workers" -gt 0 ] || { echo "local-cluster.sh: --workers must be a positive number" >&2; exit 2; }
case "$threads" in *[!0-9]*|0*) echo "local-cluster.sh: --threads must be a positive number, not $threads" >&2; exit 2 ;; esac
start_limit="${COORDINATOR_START_SECONDS:-600}"
case "$start_limit" in
  ''|*[!0-9]*|0) echo "local-cluster.sh: COORDINATOR_START_SECONDS must be a positive number of seconds, not $start_limit" >&2; exit 2 ;;
esac
case "$device" in
  cpu|cuda|cuda:[0-9]|cuda:[0-9][0-9]) ;;
  *) echo "local-cluster.sh: --device must be cpu, cuda or cuda:N, not $device" >&2; exit 2 ;;
esac
if [ -z "$threads" ]; then
  threads=$(( $(nproc) / workers ))
  [ "$threads" -ge 1 ] || threads=1
fi

if [ -n "$bin_dir" ]; then
  for binary in coordinator worker mentor; do
    [ -x "$bin_dir/$binary" ] || { echo "local-cluster.sh: --bin-dir $bin_dir has no $binary" >&2; exit 2; }
  done
  BIN="$(cd "$bin_dir" && pwd)"
  # Prebuilt binaries need setup only when their libraries (libtorch) do not resolve as it is.
  # (Read whole first: `grep -q` leaving early could make ldd fail under pipefail.)
  if ldd "$BIN/worker" 2>&1 | grep -c "not found" >/dev/null; then
    eval "$("$ROOT/scripts/setup.sh" --print-env)"
  fi
else
  eval "$("$ROOT/scripts/setup.sh" --print-env)"
  echo "[local-cluster] building (quick when already built)" >&2
  (cd "$ROOT" && cargo build --release --bins --quiet)
  BIN="$CARGO_TARGET_DIR/release"
fi

# What the run will do, checked as the run will check it: a refused plan stops here, naming
# the field or file; with --state-dir, a run recorded there is checked as the coordinator will
# reopen it (another plan's run is refused here). (Binaries from before `mentor plan`, its
# --state-dir or its --redo-finetune and --retry-failed, through --bin-dir, answer 2: skipped.)
plan_check=0
"$BIN/mentor" plan "$plan" ${state_dir:+--state-dir "$state_dir"} ${reopen[@]+"${reopen[@]}"} >&2 || plan_check=$?
if [ "$plan_check" -eq 1 ]; then
  exit 2
fi
# What the workers must be for this plan: enough of them to start, one GPU each under NCCL.
if [ "$plan_check" -eq 0 ]; then
  resolved="$("$BIN/mentor" plan "$plan" --resolved ${state_dir:+--state-dir "$state_dir"} ${reopen[@]+"${reopen[@]}"} 2>/dev/null || true)"
  workers_value() {
    awk -v key="$1" '/^\[/ { table = $0 } table == "[workers]" && $1 == key { gsub(/"/, "", $3); print $3 }' <<<"$resolved"
  }
  min_workers="$(workers_value min_workers)"
  if [ -n "$min_workers" ] && [ "$workers" -lt "$min_workers" ]; then
    echo "local-cluster.sh: the plan starts when workers.min_workers = $min_workers workers have registered; --workers $workers would wait for ever (pass --workers $min_workers, or lower min_workers in $plan)" >&2
    exit 2
  fi
  collective="$(workers_value collective)"
  world_size="$(workers_value world_size)"
  if [ "${world_size:-0}" -gt "$workers" ]; then
    echo "local-cluster.sh: the plan trains in groups of workers.world_size = $world_size workers; --workers $workers would wait for ever (pass --workers $world_size, or lower world_size in $plan)" >&2
    exit 2
  fi
  case "$device:$collective" in
    cuda:[0-9]*:auto|cuda:[0-9]*:nccl)
      # A group of one rank needs no NCCL (workers labeling side by side on one GPU are fine).
      if [ "$workers" -gt 1 ] && [ "${world_size:-0}" != 1 ]; then
        echo "local-cluster.sh: $workers workers on the one GPU $device cannot form an NCCL group (one rank per GPU): pass --workers 1, or --device cuda to give each worker its own GPU" >&2
        exit 2
      fi ;;
  esac
  # The GPUs this process sees: CUDA_VISIBLE_DEVICES's list when set, else nvidia-smi's.
  gpus=""
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    gpus="$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c '[^[:space:]]' || true)"
  elif command -v nvidia-smi >/dev/null; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
  fi
  if [ "$device" = cuda ] && [ -n "$gpus" ] && [ "$workers" -gt "$gpus" ]; then
    echo "local-cluster.sh: --device cuda gives each worker its own GPU; this process sees $gpus (CUDA_VISIBLE_DEVICES, nvidia-smi) for $workers workers" >&2
    exit 2
  fi
fi

if [ -z "$state_dir" ]; then
  state_dir="$ROOT/runs/$(basename "$plan" .toml)-$(date +%Y%m%d-%H%M%S)"
fi
# A run directory held by a live coordinator is left alone (its address file included).
if [ -f "$state_dir/coordinator.lock" ] && command -v flock >/dev/null \
  && ! flock -n -s "$state_dir/coordinator.lock" true; then
  echo "local-cluster.sh: $state_dir is in use by another coordinator ($(cat "$state_dir/coordinator.lock" 2>/dev/null)); stop it first, or use another --state-dir" >&2
  exit 2
fi
mkdir -p "$state_dir/logs"
rm -f "$state_dir/coordinator.addr"

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'echo "[local-cluster] interrupted, stopping every process" >&2; exit 130' INT
trap 'echo "[local-cluster] terminated, stopping every process" >&2; exit 143' TERM

# The run's status ("running", "succeeded", ...) from `mentor status ARGS`' first line, or
# "unknown" (no Python needed: a --bin-dir machine may have none).
status_of() {
  local line
  line="$("$BIN/mentor" status "$@" 2>/dev/null | head -n 1 || true)"
  line="$(sed -n 's/.*  status: \([a-z]*\)  .*/\1/p' <<<"$line")"
  echo "${line:-unknown}"
}

started=$(date +%s)
coordinator_log="$state_dir/logs/coordinator.log"
# Logs of a resumed run are appended to; each start is marked.
mark_restart() {
  if [ -s "$1" ]; then
    echo "===== local-cluster.sh started again at $(date -u +%Y-%m-%dT%H:%M:%SZ) =====" >>"$1"
  fi
}
mark_restart "$coordinator_log"
for i in $(seq 1 "$workers"); do mark_restart "$state_dir/logs/worker-$i.log"; done
log_offset=$(stat -c %s "$coordinator_log" 2>/dev/null || echo 0)
"$BIN/coordinator" --plan "$plan" --listen "$listen" --state-dir "$state_dir" \
  ${reopen[@]+"${reopen[@]}"} >>"$coordinator_log" 2>&1 &
coordinator_pid=$!
pids+=("$coordinator_pid")

# The coordinator checks the data and the soft-label store before it serves (a large image
# folder on a network file system, an object store far away): it is waited for while it lives,
# with a word every 30 s, up to COORDINATOR_START_SECONDS (default 600).
waited=0
while [ ! -s "$state_dir/coordinator.addr" ]; do
  if ! kill -0 "$coordinator_pid" 2>/dev/null; then
    echo "[local-cluster] the coordinator stopped:" >&2
    tail -c +"$((log_offset + 1))" "$coordinator_log" >&2
    exit 1
  fi
  if [ "$waited" -ge $((start_limit * 10)) ]; then
    echo "[local-cluster] the coordinator did not start listening within ${start_limit}s (COORDINATOR_START_SECONDS); its log so far:" >&2
    tail -c +"$((log_offset + 1))" "$coordinator_log" | tail -n 20 >&2
    exit 1
  fi
  if [ "$waited" -gt 0 ] && [ $((waited % 300)) -eq 0 ]; then
    echo "[local-cluster] the coordinator is still starting ($((waited / 10))s; see $coordinator_log)" >&2
  fi
  sleep 0.1
  waited=$((waited + 1))
done
address="$(cat "$state_dir/coordinator.addr")"
echo "[local-cluster] coordinator at $address, run directory $state_dir" >&2
# Quoted for the shell (%q), so that the line can be copied whatever the paths hold.
echo "[local-cluster] from another shell: $(printf '%q status --state-dir %q --watch' "$BIN/mentor" "$state_dir")" >&2

worker_pids=()
for i in $(seq 1 "$workers"); do
  worker_device="$device"
  [ "$device" != cuda ] || worker_device="cuda:$((i - 1))"
  "$BIN/worker" --coordinator "$address" --device "$worker_device" --threads "$threads" \
    >>"$state_dir/logs/worker-$i.log" 2>&1 &
  worker_pids+=("$!")
  pids+=("$!")
done
echo "[local-cluster] started $workers worker(s); logs in $state_dir/logs" >&2

"$BIN/mentor" status --coordinator "$address" --watch --interval 5 &
watch_pid=$!
pids+=("$watch_pid")
failure=""
rewatched=0
watch_started=$(date +%s)
while true; do
  if ! kill -0 "$watch_pid" 2>/dev/null; then
    watch_code=0
    wait "$watch_pid" 2>/dev/null || watch_code=$?
    if ! kill -0 "$coordinator_pid" 2>/dev/null && [ "$watch_code" -ne 0 ] && [ "$watch_code" -ne 1 ]; then
      failure="the coordinator stopped unexpectedly (see $state_dir/logs/coordinator.log)"
      break
    fi
    # 2: a status query failed (a loaded machine, a slow answer). While the coordinator lives
    # the run goes on: watch again rather than stop it (in place of the watcher that ended, so
    # that the exit trap never signals a pid that may be another process's by then).
    # A watcher that answered for a minute ends a streak of failed queries.
    [ $(( $(date +%s) - watch_started )) -lt 60 ] || rewatched=0
    if [ "$watch_code" -eq 2 ] && [ "$rewatched" -lt 30 ]; then
      rewatched=$((rewatched + 1))
      watch_started=$(date +%s)
      sleep 2
      "$BIN/mentor" status --coordinator "$address" --watch --interval 5 &
      for i in "${!pids[@]}"; do [ "${pids[$i]}" != "$watch_pid" ] || pids[$i]=$!; done
      watch_pid=$!
      continue
    fi
    [ "$watch_code" -ne 2 ] || failure="the coordinator did not answer status queries $rewatched times in a row (see $state_dir/logs/coordinator.log)"
    break
  fi
  sleep 1
  if ! kill -0 "$coordinator_pid" 2>/dev/null; then
    failure="the coordinator stopped unexpectedly (see $state_dir/logs/coordinator.log)"
    break
  fi
  alive=0
  for pid in "${worker_pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=$((alive + 1)); done
  # Workers that exited before the run could start (a GPU that is not there, a data set it
  # cannot read) leave it waiting for workers.min_workers for ever.
  if [ "$alive" -gt 0 ] && [ -n "${min_workers:-}" ] && [ "$alive" -lt "$min_workers" ] &&
    "$BIN/mentor" status --coordinator "$address" 2>/dev/null | grep -q '^waiting for workers: '; then
    failure="$((workers - alive)) worker(s) exited before the run could start; the $alive left are fewer than workers.min_workers = $min_workers (see $state_dir/logs/worker-*.log)"
    break
  fi
  if [ "$alive" -eq 0 ]; then
    # Workers exit when the run is over; the watcher may not have polled since. A query that
    # fails (a loaded machine) is asked again, then of the run directory.
    run_status=unknown
    for attempt in 1 2 3 4; do
      if [ "$attempt" -lt 4 ]; then
        source_args=(--coordinator "$address")
      else
        source_args=(--state-dir "$state_dir")
      fi
      run_status="$(status_of "${source_args[@]}")"
      # The run directory's answer counts only when it says the run ended.
      if [ "$attempt" -eq 4 ] && [ "$run_status" != succeeded ] && [ "$run_status" != failed ]; then
        run_status=unknown
      fi
      [ "$run_status" = unknown ] || break
      sleep 2
    done
    if [ "$run_status" != "running" ] && [ "$run_status" != "unknown" ]; then
      kill "$watch_pid" 2>/dev/null || true
      wait "$watch_pid" 2>/dev/null || true
      break
    fi
    failure="every worker stopped before the run ended (see $state_dir/logs/worker-*.log)"
    break
  fi
done

if [ -n "$failure" ]; then
  echo "[local-cluster] $failure" >&2
  tail -n 5 "$state_dir"/logs/*.log >&2 || true
  exit 1
fi

echo
echo "=== final status ($(( $(date +%s) - started )) s wall time) ==="
# mentor status exits 1 on a failed run: the final status is printed and saved all the same.
# Asked by run directory: its coordinator answers, or, were it gone, the state it saved.
"$BIN/mentor" status --state-dir "$state_dir" || true
"$BIN/mentor" status --state-dir "$state_dir" --json | tee "$state_dir/status.json" || true
status="$(status_of --state-dir "$state_dir")"
# Where the soft labels went: the plan's pseudo_labels.storage, else the run directory.
labels="$(python3 -c '
import sys, tomllib
plan = tomllib.load(open(sys.argv[1], "rb"))
if plan.get("method") != "meta-pseudo-labels":
    print(plan.get("pseudo_labels", {}).get("storage") or sys.argv[2])
' "$plan" "$state_dir/pseudo-labels" 2>/dev/null || true)"
echo "[local-cluster] run $status; checkpoints in $state_dir/checkpoints${labels:+, soft labels in $labels}" >&2
if [ "$status" = "failed" ]; then
  echo "[local-cluster] once the cause is dealt with, the same command with --retry-failed (in place of --redo-finetune, if it had one) --state-dir $(printf %q "$state_dir") goes on from where the run failed" >&2
fi
[ "$status" = "succeeded" ]

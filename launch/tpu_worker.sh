#!/usr/bin/env bash
# jclip on one Cloud TPU VM worker. launch/tpu.py runs it on every worker (gcloud ... ssh --worker=all).
#
#   tpu_worker.sh start  --run-name RUN [--coordinator-port P] [--env K=V]... -- JCLIP_MAIN_ARGS...
#   tpu_worker.sh exec   (the same arguments: what `start` runs detached, in the foreground)
#   tpu_worker.sh stop   --run-name RUN [--timeout SECONDS]
#   tpu_worker.sh status --run-name RUN
#   tpu_worker.sh logs   --run-name RUN [--lines N]
#   tpu_worker.sh id     (this worker's index)
#
# `exec` activates the venv, exports JAX_PLATFORMS=tpu and JCLIP_DISTRIBUTED=on, stops the processes that hold
# the TPU and removes the libtpu lockfile, runs `python -m jclip.main`, forwards SIGTERM to it and waits for it
# (the preemption save), then records how it ended. Files of a run, in $JCLIP_LOGS_DIR/RUN:
#   worker-ID.log   output of every attempt          state  starting | running | finished rc=0 | failed rc=N
#   pid             python's PID                            | signalled rc=N (SIGTERM, stop, or killed)
#   status.json     how jclip.main ended (--status_file)     | preempted rc=0 (jclip saved after a SIGTERM)
#   wrapper.pid     this script's PID                stop-requested  written by `stop`
# Environment (defaults): JCLIP_SRC (~/jclip), JCLIP_VENV (~/jclip-venv), JCLIP_LOGS_DIR (~/jclip-logs),
# JCLIP_TPU_DEVICE_GLOB ("/dev/accel* /dev/vfio/[0-9]*": space-separated patterns of the TPU's device files),
# JCLIP_TPU_LOCKFILE (/tmp/libtpu_lockfile), JCLIP_TPU_KILL_GRACE (10: seconds from SIGTERM to SIGKILL).
set -euo pipefail

SRC=${JCLIP_SRC:-$HOME/jclip}
VENV=${JCLIP_VENV:-$HOME/jclip-venv}
LOGS=${JCLIP_LOGS_DIR:-$HOME/jclip-logs}
DEVICE_GLOB=${JCLIP_TPU_DEVICE_GLOB:-/dev/accel* /dev/vfio/[0-9]*}
LOCKFILE=${JCLIP_TPU_LOCKFILE:-/tmp/libtpu_lockfile}
KILL_GRACE=${JCLIP_TPU_KILL_GRACE:-10}
SELF=$(readlink -f "${BASH_SOURCE[0]}")

RUN="" PORT="" TIMEOUT=300 LINES=50 DIR="" CHILD="" SIGNALLED=0
ENVS=() ARGS=()

die() {
  echo "tpu_worker.sh: $*" >&2
  exit 2
}

parse() {
  while [ $# -gt 0 ]; do
    case $1 in
      --run-name) RUN=${2?"$1 needs a value"}; shift 2 ;;
      --coordinator-port) PORT=${2?"$1 needs a value"}; shift 2 ;;
      --env) ENVS+=("${2?"$1 needs a value"}"); shift 2 ;;
      --timeout) TIMEOUT=${2?"$1 needs a value"}; shift 2 ;;
      --lines) LINES=${2?"$1 needs a value"}; shift 2 ;;
      --) shift; ARGS=("$@"); break ;;
      *) die "unknown argument: $1" ;;
    esac
  done
  [[ $RUN =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-name must be letters, digits, dots, dashes or underscores"
  local pair
  for pair in "${ENVS[@]}"; do
    [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got: $pair"
  done
  DIR=$LOGS/$RUN
}

worker_id() {
  if [ -n "${TPU_WORKER_ID:-}" ]; then
    echo "$TPU_WORKER_ID"
    return
  fi
  local id
  id=$(curl -sf -m 2 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null) || id=""
  echo "${id:-$(hostname)}"
}

write_state() {
  printf '%s\n' "$1" >"$DIR/state.tmp"
  mv -f "$DIR/state.tmp" "$DIR/state"
}

# True while the process exists and is not a zombie.
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

parent_of() {
  local stat parent
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  read -r _ parent _ <<<"$stat"
  echo "$parent"
}

# Waits up to $1 seconds for the other PIDs to exit; false if one is still there.
wait_exit() {
  local deadline=$((SECONDS + $1)) pid
  shift
  while :; do
    for pid in "$@"; do
      if alive "$pid"; then break; fi
      pid=""
    done
    [ -n "$pid" ] || return 0
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

wrapper_pid() {
  local pid
  pid=$(cat "$DIR/wrapper.pid" 2>/dev/null) || return 1
  case $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) in
    *tpu_worker.sh*) echo "$pid" ;;
    *) return 1 ;;
  esac
}

# PIDs of the processes with a file descriptor open on a device file matching JCLIP_TPU_DEVICE_GLOB.
device_holders() {
  local patterns pattern tests=()
  read -r -a patterns <<<"$DEVICE_GLOB"
  for pattern in "${patterns[@]}"; do
    if [ ${#tests[@]} -gt 0 ]; then tests+=(-o); fi
    tests+=(-lname "$pattern")
  done
  [ ${#tests[@]} -gt 0 ] || return 0
  { find /proc/[0-9]*/fd -mindepth 1 -maxdepth 1 \( "${tests[@]}" \) -printf '%h\n' 2>/dev/null || true; } |
    cut -d/ -f3 | sort -u | { grep -vx "$$" || true; }
}

free_tpu() {
  local pids
  mapfile -t pids < <(device_holders)
  if [ ${#pids[@]} -gt 0 ]; then
    echo "jclip-worker: stopping the processes that hold the TPU: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! wait_exit "$KILL_GRACE" "${pids[@]}"; then
      kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
  fi
  if [ -e "$LOCKFILE" ]; then
    rm -f "$LOCKFILE" && echo "jclip-worker: removed $LOCKFILE"
  fi
}

forward_term() {
  SIGNALLED=1
  echo "jclip-worker: SIGTERM: forwarding it to python ($CHILD) and waiting"
  kill -TERM "$CHILD" 2>/dev/null || true
}

on_exit() {
  local rc=$1
  if [ -z "$CHILD" ]; then
    write_state "failed rc=$rc"
  fi
}

cmd_exec() {
  parse "$@"
  mkdir -p "$DIR"
  echo "$$" >"$DIR/wrapper.pid"
  rm -f "$DIR/pid" "$DIR/stop-requested"
  write_state running
  trap 'on_exit $?' EXIT
  echo "=== jclip-worker $(worker_id) on $(hostname), run $RUN, $(date -u +%Y-%m-%dT%H:%M:%SZ) ==="
  set +u
  # shellcheck source=/dev/null
  source "$VENV/bin/activate"
  set -u
  export JAX_PLATFORMS=tpu JCLIP_DISTRIBUTED=on JCLIP_STATUS_FILE="$DIR/status.json"
  rm -f "$JCLIP_STATUS_FILE"
  if [ -n "$PORT" ]; then export JAX_COORDINATOR_PORT=$PORT; fi
  local pair
  for pair in "${ENVS[@]}"; do export "${pair?}"; done
  free_tpu
  cd "$SRC"
  trap forward_term TERM
  "$VENV/bin/python" -m jclip.main "${ARGS[@]}" &
  CHILD=$!
  echo "$CHILD" >"$DIR/pid"
  # `wait` returns early when a trapped signal arrives: wait again until python is gone, then read its status.
  wait "$CHILD" || true
  while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD" || true; done
  local rc=0
  wait "$CHILD" || rc=$?
  trap - EXIT
  if [ "$SIGNALLED" = 1 ] || [ -e "$DIR/stop-requested" ] || [ "$rc" -gt 128 ]; then
    write_state "signalled rc=$rc"
  elif [ "$rc" -eq 0 ] && grep -q '"state": "preempted"' "$JCLIP_STATUS_FILE" 2>/dev/null; then
    write_state "preempted rc=0"  # saved and stopped early (a SIGTERM straight to python): resume it
  elif [ "$rc" -eq 0 ]; then
    write_state "finished rc=0"
  else
    write_state "failed rc=$rc"
  fi
  echo "=== jclip-worker: python exited with status $rc: $(cat "$DIR/state") ==="
  exit "$rc"
}

cmd_start() {
  parse "$@"
  mkdir -p "$DIR"
  local old log
  if old=$(wrapper_pid); then
    echo "jclip-worker $(worker_id): run $RUN is still running here (pid $old): stop it first" >&2
    exit 1
  fi
  log=$DIR/worker-$(worker_id).log
  write_state starting
  setsid nohup bash "$SELF" exec "$@" >>"$log" 2>&1 </dev/null &
  echo "$!" >"$DIR/wrapper.pid"
  echo "jclip-run: worker $(worker_id) on $(hostname) started run $RUN; log: $log"
}

cmd_stop() {
  parse "$@"
  local pid wrapper
  pid=$(cat "$DIR/pid" 2>/dev/null) || pid=""
  # Only the python started by this run's wrapper: a stale pid file must not aim at someone else's process.
  if ! wrapper=$(wrapper_pid) || [ -z "$pid" ] || [ "$(parent_of "$pid")" != "$wrapper" ]; then
    echo "jclip-stop: worker $(worker_id): run $RUN is not running"
    return 0
  fi
  touch "$DIR/stop-requested"
  kill -TERM "$pid" 2>/dev/null || true
  if wait_exit "$TIMEOUT" "$pid"; then
    echo "jclip-stop: worker $(worker_id): python ($pid) exited after SIGTERM"
  else
    kill -KILL "$pid" 2>/dev/null || true
    echo "jclip-stop: worker $(worker_id): python ($pid) still there after ${TIMEOUT}s: SIGKILL"
  fi
  wait_exit 10 "$wrapper" || true
}

cmd_status() {
  parse "$@"
  local state=none
  if [ -r "$DIR/state" ]; then state=$(cat "$DIR/state"); fi
  case $state in
    starting | running) wrapper_pid >/dev/null || state="lost (was $state)" ;;
  esac
  echo "jclip-state: worker=$(worker_id) host=$(hostname) run=$RUN state=$state"
}

cmd_logs() {
  parse "$@"
  local log found=0
  for log in "$DIR"/worker-*.log; do
    [ -e "$log" ] || continue
    found=1
    echo "==> $(hostname): $log <=="
    tail -n "$LINES" "$log"
  done
  if [ "$found" = 0 ]; then echo "jclip-logs: no log of run $RUN on $(hostname)"; fi
}

mode=${1:-}
if [ $# -gt 0 ]; then shift; fi
case $mode in
  start | exec | stop | status | logs) "cmd_$mode" "$@" ;;
  id) worker_id ;;
  *) sed -n '2,9p' "$SELF" >&2; exit 2 ;;
esac

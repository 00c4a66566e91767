#!/usr/bin/env bash
# A multi-host run on this one machine: N CPU processes of balcap_jax.main joined through a
# coordinator on 127.0.0.1 (gloo collectives), each with D fake CPU devices, one global mesh of
# N x D devices. For trying multi-host code and configs without a cluster.
#   bash launch/local_multiprocess.sh [--processes N] [--devices-per-process D] [--config CFG]
#        [--logdir DIR] [--port P] [--dry-run] [-- main args...]
# Defaults: N=2, D=1, configs/tiny.py, logs/local, a free port; the interpreter is $BALCAP_PYTHON,
# else .venv/bin/python, else python3. Process i gets JAX_PLATFORMS=cpu,
# XLA_FLAGS=--xla_force_host_platform_device_count=D, BALCAP_COORDINATOR=127.0.0.1:PORT,
# BALCAP_NUM_PROCESSES=N, BALCAP_PROCESS_ID=i and writes DIR/proc<i>.log. The script waits for
# all, prints each exit code, and exits 1 if any failed; when one fails (or on Ctrl-C) the others
# are stopped (SIGTERM, SIGKILL 20 s later). --dry-run prints each process's command after "+ ",
# quoted to be pasted, and starts nothing. Everything after -- goes to balcap_jax.main, e.g.
#   bash launch/local_multiprocess.sh --processes 2 --devices-per-process 2 -- \
#     --config.mesh.fsdp=4 --config.workdir=/tmp/mp --config.data.num_eval=0

set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=launch/common.sh
source launch/common.sh

processes=2 devices=1 config=configs/tiny.py logdir=logs/local port="" dry_run=0 grace=20
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; extra=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
  esac
  [ $# -ge 2 ] || die "$1 needs a value"
  case "$1" in
    --processes) processes=$2 ;;
    --devices-per-process) devices=$2 ;;
    --config) config=$2 ;;
    --logdir) logdir=$2 ;;
    --port) port=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || die "--processes takes a positive number, got '$processes'"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process takes a positive number," \
  "got '$devices'"

sys_py=$(venv_python)
py=${BALCAP_PYTHON:-$sys_py}
if [ -z "$port" ]; then   # a port free now (the coordinator, process 0, binds it a moment later)
  port=$("$sys_py" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "--port takes a number, got '$port'"
# the device count is this script's: drop one from the caller's XLA_FLAGS
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[^[:space:]]*//g;
                   s/[[:space:]]+/ /g; s/^ //; s/ $//' <<< "${XLA_FLAGS-}")
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"

# the command of process $1, in cmd
cmd=()
set_cmd() {
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "BALCAP_COORDINATOR=127.0.0.1:$port"
       "BALCAP_NUM_PROCESSES=$processes" "BALCAP_PROCESS_ID=$1"
       "$py" -m balcap_jax.main "--config=$config" ${extra[@]+"${extra[@]}"})
}

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < processes; i++)); do
    set_cmd "$i"
    print_cmd "${cmd[@]}"
    printf ' > %q 2>&1 &\n' "$logdir/proc$i.log"
  done
  exit 0
fi

mkdir -p "$logdir"
pids=() codes=()
stop_all() {   # SIGTERM to the processes still running, SIGKILL to those left after $grace s
  local pid t left
  for pid in ${pids[@]+"${pids[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < grace; t++)); do
    left=0
    for pid in ${pids[@]+"${pids[@]}"}; do ! kill -0 "$pid" 2>/dev/null || left=1; done
    [ "$left" = 1 ] || return 0
    sleep 1
  done
  for pid in ${pids[@]+"${pids[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "[local_multiprocess] interrupted: stopping the processes" >&2; stop_all; exit 130' \
  INT TERM

echo "[local_multiprocess] $processes processes x $devices CPU devices," \
     "coordinator 127.0.0.1:$port, logs in $logdir/proc<i>.log"
for ((i = 0; i < processes; i++)); do
  set_cmd "$i"
  "${cmd[@]}" > "$logdir/proc$i.log" 2>&1 &
  pids+=("$!")
  codes+=("")
done

# wait for all; the first failure stops the others
running=$processes failed=""
while [ "$running" -gt 0 ]; do
  for ((i = 0; i < processes; i++)); do
    [ -z "${codes[$i]}" ] || continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    codes[i]=$rc
    running=$((running - 1))
    if [ "$rc" != 0 ] && [ -z "$failed" ]; then
      failed=$i
      echo "[local_multiprocess] process $i exited with $rc: stopping the others" >&2
      stop_all
    fi
  done
  [ "$running" = 0 ] || sleep 1
done
trap - INT TERM

for ((i = 0; i < processes; i++)); do
  echo "[local_multiprocess] process $i: exit ${codes[$i]} ($logdir/proc$i.log)"
done
if [ -n "$failed" ]; then
  echo "[local_multiprocess] the end of process $failed's log:" >&2
  tail -n 30 "$logdir/proc$failed.log" >&2
  exit 1
fi

#!/usr/bin/env bash
# A multi-node GPU run under SLURM: one process per node that sees all of the node's GPUs.
#   bash launch/slurm_gpu.sh [submit|launch] --nodes N --gpus-per-node G [options] [-- main args]
# submit (the default outside a SLURM job): sbatch a job of N nodes x 1 task x G GPUs whose batch
#   step runs `launch`; the job's own output goes to LOGDIR/slurm-<jobid>.out.
# launch (the default inside one, e.g. under salloc): srun one task per node; every task runs
#   .venv/bin/python -m balcap_jax.main --config=CONFIG [main args] (python3 without a .venv)
#   with BALCAP_COORDINATOR=<first node of $SLURM_JOB_NODELIST>:PORT,
#   BALCAP_NUM_PROCESSES=$SLURM_NTASKS, BALCAP_PROCESS_ID=$SLURM_PROCID and
#   JAX_LOCAL_DEVICE_IDS=0..G-1 (under SLURM, JAX would otherwise give each process only the GPU
#   of its local rank); task i's output goes to LOGDIR/job<jobid>-proc<i>-<node>.log.
# Options: --nodes (default: the job's node count, else 2), --gpus-per-node (default: the job's,
#   else 8), --partition, --time, --account, --job-name (default balcap), --config (default
#   configs/qwen.py), --port (default 12355), --logdir (default logs/slurm), --nodelist a,b (for
#   dry runs outside SLURM; without it node0 .. node<N-1>), --dry-run (print the sbatch / srun
#   command after "+ " and each task's environment and command after "+ [node]", quoted to be
#   pasted; run nothing).
# Everything after -- goes to balcap_jax.main. The checkout (with its .venv: install the GPU jax
#   with `.venv/bin/pip install -c launch/constraints.txt "jax[cuda12]==<pin>" -e .`) and
#   --config.workdir must be on a filesystem every node shares. sbatch also reads SBATCH_*
#   environment variables (SBATCH_QOS, SBATCH_EXCLUSIVE, ...) for what has no option here.
#   bash launch/slurm_gpu.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \
#     -- --config.workdir=/shared/runs/a

set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# shellcheck source=launch/common.sh
source launch/common.sh

# the environment and command of task $1 of $2, coordinator $3 (one word each)
task_cmd=()
set_task_cmd() {
  local devices
  devices=$(seq -s, 0 $((gpus - 1)))
  task_cmd=(env "BALCAP_COORDINATOR=$3" "BALCAP_NUM_PROCESSES=$2" "BALCAP_PROCESS_ID=$1"
            "JAX_LOCAL_DEVICE_IDS=$devices" "$(venv_python)" -m balcap_jax.main "--config=$config"
            ${extra[@]+"${extra[@]}"})
}

sub=""
case "${1-}" in
  submit|launch|task) sub=$1; shift ;;
  help) usage; exit 0 ;;
esac
if [ -z "$sub" ]; then
  if [ -n "${SLURM_JOB_ID-}" ]; then sub=launch; else sub=submit; fi
fi

nodes="" gpus="" partition="" time_limit="" account="" job_name=balcap config=configs/qwen.py
port=12355 logdir=logs/slurm nodelist="" coordinator="" dry_run=0
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
    --nodes) nodes=$2 ;;
    --gpus-per-node) gpus=$2 ;;
    --partition) partition=$2 ;;
    --time) time_limit=$2 ;;
    --account) account=$2 ;;
    --job-name) job_name=$2 ;;
    --config) config=$2 ;;
    --port) port=$2 ;;
    --logdir) logdir=$2 ;;
    --nodelist) nodelist=$2 ;;
    --coordinator) coordinator=$2 ;;     # (task: set by launch)
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done
nodes=${nodes:-${SLURM_JOB_NUM_NODES:-2}}
gpus=${gpus:-${SLURM_GPUS_ON_NODE:-8}}
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes takes a positive number, got '$nodes'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node takes a positive number, got '$gpus'"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port takes a number, got '$port'"
case "$logdir" in /*) ;; *) logdir=$root/$logdir ;; esac

# the options that reproduce this run in the next stage (the job's batch step, then each task)
stage_args() {
  local a=(--nodes "$nodes" --gpus-per-node "$gpus" --config "$config" --port "$port"
           --logdir "$logdir")
  printf '%s\0' "${a[@]}" "$@" -- ${extra[@]+"${extra[@]}"}
}

# the job's nodes, one a line: scontrol's expansion of the node list in a job (or of --nodelist
# where scontrol exists), else --nodelist split at commas, else node0 .. node<N-1>
node_names() {
  local list=${nodelist:-${SLURM_JOB_NODELIST-}}
  if [ -n "$list" ] && command -v scontrol >/dev/null; then
    scontrol show hostnames "$list"
  elif [ -n "$list" ]; then
    tr ',' '\n' <<< "$list"
  else
    local i
    for ((i = 0; i < nodes; i++)); do echo "node$i"; done
  fi
}

# launch's srun, and under --dry-run each task's environment and command
do_launch() {
  local names=() stage=() line i
  while IFS= read -r line; do names+=("$line"); done < <(node_names)
  [ "${#names[@]}" -ge "$nodes" ] || die "$nodes nodes asked for, the node list has ${#names[@]}"
  local coord="${names[0]}:$port"
  while IFS= read -r -d '' line; do stage+=("$line"); done < <(stage_args --coordinator "$coord")
  run_cmd mkdir -p "$logdir"
  run_cmd srun "--nodes=$nodes" "--ntasks=$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "--output=$logdir/job%j-proc%t-%N.log" bash "$root/launch/slurm_gpu.sh" task "${stage[@]}"
  if [ "$dry_run" = 1 ]; then
    for ((i = 0; i < nodes; i++)); do
      set_task_cmd "$i" "$nodes" "$coord"
      printf '+ [%s]' "${names[$i]}"
      printf ' %q' "${task_cmd[@]}"
      printf '\n'
    done
  fi
}

case "$sub" in
  submit)
    stage=()
    while IFS= read -r -d '' line; do stage+=("$line"); done < <(stage_args)
    opts=("--job-name=$job_name" "--nodes=$nodes" --ntasks-per-node=1 "--gpus-per-node=$gpus"
          "--output=$logdir/slurm-%j.out" "--chdir=$root")
    [ -z "$partition" ] || opts+=("--partition=$partition")
    [ -z "$time_limit" ] || opts+=("--time=$time_limit")
    [ -z "$account" ] || opts+=("--account=$account")
    wrap="bash $(printf '%q' "$root/launch/slurm_gpu.sh") launch"
    for a in "${stage[@]}"; do wrap+=" $(printf '%q' "$a")"; done
    run_cmd mkdir -p "$logdir"
    run_cmd sbatch "${opts[@]}" "--wrap=$wrap"
    if [ "$dry_run" = 1 ]; then
      echo "# in the job, launch runs:"
      do_launch
    fi
    ;;
  launch)
    if [ "$dry_run" = 0 ] && [ -z "${SLURM_JOB_ID-}" ]; then
      die "launch runs inside a SLURM job (sbatch or salloc); outside one use submit, or --dry-run"
    fi
    do_launch
    ;;
  task)
    [ -n "$coordinator" ] || die "task is started by launch (it needs --coordinator)"
    set_task_cmd "${SLURM_PROCID:?task runs under srun}" "${SLURM_NTASKS:?}" "$coordinator"
    if [ "$dry_run" = 1 ]; then
      run_cmd "${task_cmd[@]}"
      exit 0
    fi
    echo "[slurm_gpu] $(hostname): process $SLURM_PROCID of $SLURM_NTASKS," \
         "coordinator $coordinator" >&2
    exec "${task_cmd[@]}"
    ;;
esac

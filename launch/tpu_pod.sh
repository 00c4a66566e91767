#!/usr/bin/env bash
# A Cloud TPU pod slice (several TPU VM hosts) with gcloud's tpu-vm commands: every host runs the
# same checkout and the same command; JAX finds the other hosts itself (BALCAP_DISTRIBUTED=1).
#   bash launch/tpu_pod.sh SUBCOMMAND --name NAME --zone ZONE [options] [-- main args...]
# Subcommands, in the order of a run:
#   create   gcloud compute tpus tpu-vm create NAME --accelerator-type=TYPE --version=VERSION
#   install  on every worker: clone (or fetch) --repo at --ref into ~/DIR, make DIR/.venv (Python
#            --python, fetched by uv), pip install "jax[tpu]==<jax pin of launch/constraints.txt>"
#            and then -e . under launch/constraints.txt (the ref's pins must agree with this one's)
#   run      on every worker, in the background: BALCAP_DISTRIBUTED=1 nohup .venv/bin/python -m
#            balcap_jax.main --config=CONFIG [main args] > DIR/logs/worker-$(hostname).log
#   logs     follow one worker's log (--worker N, default 0; Ctrl-C leaves, the run goes on)
#   stop     SIGTERM on every worker (the run checkpoints after its step; --force: SIGKILL)
#   delete   gcloud compute tpus tpu-vm delete NAME
# Options: --name, --zone, --project, --type (default v5litepod-16: 16 chips on 4 hosts; v4-32
#   is 4 hosts too), --version (TPU software version; default from --type: v4 and older
#   tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e),
#   --spot, --repo URL, --ref REF (branch, tag or commit; default main), --dir DIR (default
#   balcap_jax, under each worker's home), --python (default 3.11), --config (default
#   configs/qwen.py), --worker N, --lines N (logs), --force (stop), --dry-run (print each command,
#   one a line after "+ ", quoted to be pasted; run nothing).
# Everything after -- goes to balcap_jax.main. Every host writes under --config.workdir (orbax
#   writes each host's checkpoint shards; process 0 the metrics): give a gs:// URL (or a
#   directory all workers share, e.g. a Filestore mount). A pod run, end to end:
#   bash launch/tpu_pod.sh create  --name pod --zone us-central2-b --type v4-32
#   bash launch/tpu_pod.sh install --name pod --zone us-central2-b --repo https://host/b.git
#   bash launch/tpu_pod.sh run     --name pod --zone us-central2-b -- --config.workdir=gs://bucket/runs/a
#   bash launch/tpu_pod.sh logs    --name pod --zone us-central2-b --worker 0
#   bash launch/tpu_pod.sh delete  --name pod --zone us-central2-b

set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=launch/common.sh
source launch/common.sh

# the words, each quoted for the worker's bash, joined by spaces
quote_words() {
  local out="" w
  for w in "$@"; do
    out+=" $(printf '%q' "$w")"
  done
  printf '%s' "${out# }"
}

[ $# -ge 1 ] || { usage; exit 2; }
sub=$1
shift
case "$sub" in
  create|install|run|logs|stop|delete) ;;
  -h|--help|help) usage; exit 0 ;;
  *) die "unknown subcommand '$sub' (create, install, run, logs, stop, delete)" ;;
esac

name="" zone="" project="" type=v5litepod-16 version="" spot=0 repo="" ref=main dir=balcap_jax
python=3.11 config=configs/qwen.py worker=0 lines=200 force=0 dry_run=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; extra=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -h|--help) usage; exit 0 ;;
    --spot) spot=1; shift; continue ;;
    --force) force=1; shift; continue ;;
    --dry-run) dry_run=1; shift; continue ;;
  esac
  [ $# -ge 2 ] || die "$1 needs a value"
  case "$1" in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --project) project=$2 ;;
    --type) type=$2 ;;
    --version) version=$2 ;;
    --repo) repo=$2 ;;
    --ref) ref=$2 ;;
    --dir) dir=$2 ;;
    --python) python=$2 ;;
    --config) config=$2 ;;
    --worker) worker=$2 ;;
    --lines) lines=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done

[ -n "$name" ] || die "--name is required"
[ -n "$zone" ] || die "--zone is required"
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker takes a worker index (0, 1, ...), got '$worker'"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines takes a number, got '$lines'"
if [ -z "$version" ]; then
  case "$type" in
    v2-*|v3-*|v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "no default --version for --type $type: give one" ;;
  esac
fi

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[ -z "$project" ] || where+=("--project=$project")
qdir=$(printf '%q' "$dir")

case "$sub" in
  create)
    flags=("--accelerator-type=$type" "--version=$version")
    [ "$spot" = 0 ] || flags+=(--spot)
    run_cmd "${tpu[@]}" create "$name" "${where[@]}" "${flags[@]}"
    ;;

  install)
    [ -n "$repo" ] || die "install needs --repo URL (a git URL every worker can clone)"
    jax_pin=$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' launch/constraints.txt)
    [ -n "$jax_pin" ] || die "no jax==VERSION line in launch/constraints.txt"
    qrepo=$(printf '%q' "$repo")
    remote="set -euo pipefail; "
    remote+="if [ -d $qdir/.git ]; then git -C $qdir remote set-url origin $qrepo; "
    remote+="else git clone $qrepo $qdir; fi; cd $qdir; "
    remote+="git fetch origin $(printf '%q' "$ref"); git checkout --force --detach FETCH_HEAD; "
    # uv brings the Python jax needs (the TPU images ship an older one)
    remote+="if [ ! -x .venv/bin/python ]; then "
    remote+="command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || "
    remote+="curl -LsSf https://astral.sh/uv/install.sh | sh; "
    remote+="PATH=~/.local/bin:\$PATH uv venv --seed --python $(printf '%q' "$python") .venv; fi; "
    remote+=".venv/bin/python -m pip install -q --upgrade pip; "
    remote+=".venv/bin/python -m pip install -q -c launch/constraints.txt "
    remote+="$(printf '%q' "jax[tpu]==$jax_pin") "
    remote+="-f https://storage.googleapis.com/jax-releases/libtpu_releases.html; "
    remote+=".venv/bin/python -m pip install -q -c launch/constraints.txt -e . gcsfs; "
    remote+="echo \"\$(hostname): \$(git rev-parse --short HEAD), jax \$(.venv/bin/python -c "
    remote+="'import jax; print(jax.__version__)')\""
    run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$remote"
    ;;

  run)
    case " ${extra[*]-} " in
      *" --config.workdir="*) ;;
      *) echo "tpu_pod.sh: no --config.workdir=... after --: every host writes under the" \
              "config's workdir, which must be one directory all workers share" >&2 ;;
    esac
    main_cmd=$(quote_words .venv/bin/python -m balcap_jax.main "--config=$config" \
      ${extra[@]+"${extra[@]}"})
    remote="cd $qdir || exit 1; mkdir -p logs; "
    remote+="if [ -f logs/run.pid ] && kill -0 \"\$(cat logs/run.pid)\" 2>/dev/null; then "
    remote+="echo \"\$(hostname): a run is going (pid \$(cat logs/run.pid)): stop it first\" >&2; "
    remote+="exit 1; fi; "
    remote+="BALCAP_DISTRIBUTED=1 nohup $main_cmd > logs/worker-\$(hostname).log 2>&1 "
    remote+="< /dev/null & echo \$! > logs/run.pid; "
    remote+="echo \"\$(hostname): started pid \$!, log $qdir/logs/worker-\$(hostname).log\""
    run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$remote"
    ;;

  logs)
    run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" "--worker=$worker" \
      "--command=tail -n $lines -F $qdir/logs/worker-*.log"
    ;;

  stop)
    signal=TERM
    [ "$force" = 0 ] || signal=KILL
    # the bracket keeps pkill from matching the shell that runs this very command
    remote="pkill -$signal -f '[b]alcap_jax[.]main' && echo \"\$(hostname): sent SIG$signal\" "
    remote+="|| echo \"\$(hostname): no run\""
    run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$remote"
    ;;

  delete)
    run_cmd "${tpu[@]}" delete "$name" "${where[@]}" --quiet
    ;;
esac

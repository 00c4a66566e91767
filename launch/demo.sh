#!/usr/bin/env bash
# The README's first command: set up .venv (if missing) and run the ShapesWorld demo: a tiny
# Qwen2.5-VL warm-started on imperfect captions, then BalCapRL, then the supervised control.
#   bash launch/demo.sh [--config.seed=1 --config.workdir=workdir/shapes1 ...]
# Writes workdir/shapes/summary.json (before / after / sft_control) and curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[demo.sh] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.balcap_installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ launch/constraints.txt -nt "$stamp" ]; then
  echo "[demo.sh] installing balcap_jax[test] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c launch/constraints.txt -e '.[test]'
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false JAX_PLATFORMS=cpu
exec .venv/bin/python -m balcap_jax.shapes_demo --config=configs/shapes.py "$@"

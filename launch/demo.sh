#!/usr/bin/env bash
# Set up .venv (if needed) and run the ShapesWorld demo: a tiny Qwen2.5-VL warm-started on
# imperfect captions, then BalCapRL, then the supervised control of equal wall time.
#   bash launch/demo.sh [--config.seed=1 --config.workdir=workdir/shapes1 ...]
# Writes workdir/shapes/summary.json (before / after / sft_control) and curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false JAX_PLATFORMS=cpu
exec .venv/bin/python -m balcap_jax.shapes_demo --config=configs/shapes.py "$@"

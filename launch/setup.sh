#!/usr/bin/env bash
# Create .venv (if missing) and install balcap_jax[test] under the pinned constraints.
# Re-installs only when setup.cfg or the constraints changed.   bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.balcap_installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ launch/constraints.txt -nt "$stamp" ]; then
  echo "[setup] installing balcap_jax[test] into .venv (first time: about two minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c launch/constraints.txt -e '.[test]'
  touch "$stamp"
fi

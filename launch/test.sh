#!/usr/bin/env bash
# Set up .venv (if missing) and run the test suite. This is the README's test command.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[test.sh] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.balcap_installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ launch/constraints.txt -nt "$stamp" ]; then
  echo "[test.sh] installing balcap_jax[test] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c launch/constraints.txt -e '.[test]'
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m pytest --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test.sh] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"

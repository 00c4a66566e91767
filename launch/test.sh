#!/usr/bin/env bash
# Set up .venv (if needed), lint, and run the test suite. This is the README's test command.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the linter first: a new violation fails the run (rules and line length in pyproject.toml)
.venv/bin/ruff check balcap_jax tests benchmarks configs
set +e
# two workers (pytest-xdist): compiling is mostly single-threaded, so one process left a core
# idle a third of the time; whole modules per worker, so module fixtures are built once
.venv/bin/python -m pytest -n 2 --dist loadfile --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test.sh] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"

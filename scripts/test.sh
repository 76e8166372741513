#!/usr/bin/env bash
# The README's test command: make .venv if needed, install nanosweep with its test tools, run ruff and pytest.
# torch==2.13.0 is installed first so that pip keeps it (a CPU build where one is provided, like CI).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k sweep`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[dev,postgres,server,search,ray]"  # a no-op when nothing changed
export MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest "$@"

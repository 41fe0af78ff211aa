#!/usr/bin/env bash
# The test command: sets everything up, then lint, format check and the whole test suite.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k wire -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "==> ruff check" >&2
.venv/bin/ruff check .
echo "==> ruff format --check" >&2
.venv/bin/ruff format --check .
echo "==> mypy" >&2
.venv/bin/mypy dfm_stream
echo "==> pytest" >&2
exec .venv/bin/python -m pytest "$@"

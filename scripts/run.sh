#!/usr/bin/env bash
# The main job: sets up .venv, then runs the live demo (embedded Redis, two synthetic cameras,
# reader and worker processes, metrics, a terminal view). Arguments go to `dfm-stream demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dfm-stream demo "$@"

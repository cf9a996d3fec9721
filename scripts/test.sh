#!/usr/bin/env bash
# Run the test suite against real PostgreSQL + PgQ and Redis; sets up first,
# then the code-health gate (ruff, mypy; settings in pyproject.toml).
# Extra arguments go to pytest (e.g. -k lost_position, or -m soak).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "code health: ruff check, mypy"
.venv/bin/ruff check --quiet
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"

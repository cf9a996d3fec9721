#!/usr/bin/env bash
# Run the test suite against real PostgreSQL + PgQ and Redis; sets up first,
# then the code-health gate (ruff and mypy, settings in pyproject.toml; the
# alert rules through promtool).
# Extra arguments go to pytest (e.g. -k lost_position, or -m soak).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "code health: ruff check, mypy, promtool"
.venv/bin/ruff check --quiet
.venv/bin/mypy
promtool check rules deploy/prometheus/qmover-rules.yml
(cd deploy/prometheus && promtool test rules qmover-rules.test.yml)
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Run the test suite against real PostgreSQL + PgQ and Redis; sets up first.
# Extra arguments go to pytest (e.g. -k lost_position, or -m soak).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

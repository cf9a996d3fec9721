#!/usr/bin/env bash
# The demo: create two databases, produce events, move them, show the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m qmover_lab.demo "$@"

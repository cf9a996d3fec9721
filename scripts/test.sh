#!/usr/bin/env bash
# Run the test suite against real PostgreSQL + PgQ and Redis; sets up first,
# then the code-health gate (ruff and mypy, settings in pyproject.toml; the
# alert rules through promtool), then pytest on the newest Celery, then the
# Celery layer's tests (-m celery_release) on each earlier Celery minor
# release in scripts/celery-releases.txt.
# Extra arguments go to pytest instead, once, on the newest Celery (e.g.
# -k lost_position, or -m soak); QMOVER_CELERY=5.4 with them runs that release.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "code health: ruff check, mypy, promtool"
.venv/bin/ruff check --quiet
.venv/bin/mypy
promtool check rules deploy/prometheus/qmover-rules.yml
(cd deploy/prometheus && promtool test rules qmover-rules.test.yml)
# The tests crash processes and servers, never the machine, so the test server
# need not flush to disk; where the disk is slow, flushes were half the suite's
# time.  fsync goes off for the run (a reload, not a restart) and back after.
server_setting() { psql -h 127.0.0.1 -U postgres -d postgres -qAt -c "$1" -c "select pg_reload_conf()" >/dev/null; }
server_setting "alter system set fsync = off"
trap 'server_setting "alter system reset fsync"' EXIT
if [ "$#" -gt 0 ]; then
    .venv/bin/python -m pytest "$@"
    exit
fi
.venv/bin/python -m pytest
while read -r minor _ <&3; do
    case "$minor" in ''|'#'*) continue ;; esac
    echo "the Celery layer on Celery $minor"
    QMOVER_CELERY="$minor" .venv/bin/python -m pytest -q -m celery_release
done 3< scripts/celery-releases.txt

#!/usr/bin/env bash
# Run the test suite against real PostgreSQL + PgQ and Redis; sets up first,
# then the code-health gate (ruff and mypy, settings in pyproject.toml; the
# alert rules through promtool), then two test runs side by side: the whole
# suite on the newest Celery, and the Celery layer's tests (-m celery_release)
# on each earlier Celery minor release in scripts/celery-releases.txt, one
# release after another.  Each test keeps to databases, a Redis database and a
# RabbitMQ vhost of its own, so the two runs share the servers safely.  The
# promptness tests (-m alone: moves within two sweep intervals under a steady
# load) run last, by themselves: beside the other run, the worker's moves fall
# behind the sweeps they are counted in.
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
earlier_releases() {
    local minor failed=0
    while read -r minor _ <&3; do
        case "$minor" in ''|'#'*) continue ;; esac
        echo "the Celery layer on Celery $minor"
        QMOVER_CELERY="$minor" .venv/bin/python -m pytest -q -m celery_release || failed=1
    done 3< scripts/celery-releases.txt
    return "$failed"
}
# PgQ's roles belong to the server and are made by its first `create extension
# pgq`; made here, before two runs could race to make them.
psql -h 127.0.0.1 -U postgres -d postgres -qAt -c "set client_min_messages = warning" \
    -c "drop database if exists qmover_tests_pgq_roles" \
    -c "create database qmover_tests_pgq_roles" \
    -c "\\c qmover_tests_pgq_roles" -c "create extension pgq" \
    -c "\\c postgres" -c "drop database qmover_tests_pgq_roles" >/dev/null
matrix_log="$(mktemp -d)/earlier-releases.log"
echo "the Celery layer on the earlier releases runs beside the suite; its output follows the suite's"
earlier_releases >"$matrix_log" 2>&1 &
matrix=$!
status=0
.venv/bin/python -m pytest -m "not alone" || status=$?
wait "$matrix" || status=$?
cat "$matrix_log"
echo "the promptness tests, alone on the machine (-m alone)"
.venv/bin/python -m pytest -q -m alone || status=$?
exit "$status"

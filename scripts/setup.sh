#!/usr/bin/env bash
# Make this machine ready for qmover: PgQ installed, PostgreSQL, Redis and
# RabbitMQ running, .venv holding qmover with its test tools.  Safe to run again;
# each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_VERSION="${PG_VERSION:-15}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
[ -x "/usr/lib/postgresql/$PG_VERSION/bin/postgres" ] || missing+=("postgresql-$PG_VERSION")
[ -f "/usr/share/postgresql/$PG_VERSION/extension/pgq.control" ] || missing+=("postgresql-$PG_VERSION-pgq3")
command -v redis-server >/dev/null || missing+=("redis-server")
command -v rabbitmq-server >/dev/null || missing+=("rabbitmq-server")  # the RabbitMQ broker tests
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Tools the tests start themselves, installed without letting a package
# start its own service (prometheus's would listen on every address):
# promtool checks the shipped alert rules and the server runs in one test, on
# loopback; pgbouncer runs in the pooler tests; iptables cuts links between
# the network namespaces of the across-hosts tests.
services=()
command -v promtool >/dev/null || services+=("prometheus")
[ -x /usr/sbin/pgbouncer ] || services+=("pgbouncer")
command -v iptables >/dev/null || services+=("iptables")
if [ "${#services[@]}" -gt 0 ]; then
    echo "setup: installing ${services[*]} (not started)"
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$guard" >/dev/null
        $SUDO chmod +x "$guard"
    fi
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${services[@]}" >/dev/null
    [ -z "$guard" ] || $SUDO rm -f "$guard"
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "setup: starting PostgreSQL $PG_VERSION"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main start
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
# The live fan-in tests put 30 partition databases, their movers (beat and two
# worker processes: 1 + 2 connections to each) and the load generator on this
# one server, more than a stock max_connections (100) admits; in a deployment
# each partition's server sees only its own share.
if [ "$(psql -h 127.0.0.1 -U postgres -d postgres -Atc 'show max_connections')" -lt 300 ]; then
    echo "setup: raising PostgreSQL's max_connections to 300 for the fan-in tests (restarts it)"
    psql -h 127.0.0.1 -U postgres -d postgres -qc "alter system set max_connections = 300"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main restart
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "setup: starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.2; done
fi

if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    echo "setup: starting RabbitMQ"
    $SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
    $SUDO timeout 120 rabbitmqctl await_startup >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.qmover-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing qmover into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$want" > "$stamp"
fi

# The earlier Celery releases, one venv each (scripts/celery-releases.txt says
# which and why), with the Celery set-ups the tests run (pools, redbeat).
while read -r minor release_pins <&3; do
    case "$minor" in ''|'#'*) continue ;; esac
    venv=".venv-celery-$minor"
    release_want="$(printf '%s\n' "$want" $release_pins | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$venv/.qmover-installed" 2>/dev/null)" != "$release_want" ]; then
        echo "setup: installing qmover with $release_pins into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
        # shellcheck disable=SC2086  # the pins are words
        "$venv/bin/python" -m pip install -q $release_pins -e '.[setups]'
        echo "$release_want" > "$venv/.qmover-installed"
    fi
done 3< scripts/celery-releases.txt

# The across-hosts tests (tests/test_hosts.py) play hosts with network
# namespaces; where this machine cannot make one, they skip and say why.
reason="$(.venv/bin/python -c 'from qmover_lab.hosts import cannot_make_hosts; print(cannot_make_hosts() or "")')"
[ -z "$reason" ] || echo "setup: $reason: the across-hosts tests will skip"

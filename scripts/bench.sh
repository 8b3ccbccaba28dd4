#!/usr/bin/env bash
# `make bench`: benchmark one gateway process (uvicorn, granian, daphne) against a fast fake upstream
# with PostgreSQL, Redis, auth, limits, budgets and the usage ledger on. See docs/benchmark.md.
# Uses its own database (chittycan_bench) and Redis db 8 / prefix ccbench, so it never touches the
# test suite's data. Extra arguments go to `python -m bench.run` (e.g. --servers uvicorn --duration 3).
set -euo pipefail
cd "$(dirname "$0")/.."

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}
REDIS_PORT=${REDIS_PORT:-6379}
BENCH_DB=${BENCH_DB:-chittycan_bench}
export BENCH_DATABASE_URL=${BENCH_DATABASE_URL:-postgres://$PGUSER@$PGHOST:$PGPORT/$BENCH_DB}
export BENCH_REDIS_URL=${BENCH_REDIS_URL:-redis://$REDIS_HOST:$REDIS_PORT/8}
export BENCH_REDIS_PREFIX=${BENCH_REDIS_PREFIX:-ccbench}
PY=${BENCH_PYTHON:-.venv/bin/python}

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null || (echo > "/dev/tcp/$PGHOST/$PGPORT") 2>/dev/null; }
redis_up() { [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]; }

if ! pg_up; then
  echo "bench.sh: PostgreSQL is not answering on $PGHOST:$PGPORT; trying to start it"
  if command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql >/dev/null 2>&1; then
    for v in $(ls /etc/postgresql); do pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>/dev/null || true; done
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 0.5; done
  pg_up || { echo "bench.sh: PostgreSQL is missing or will not start (install postgresql)"; exit 2; }
fi
if ! redis_up; then
  echo "bench.sh: Redis is not answering on $REDIS_HOST:$REDIS_PORT; trying to start it"
  if command -v redis-server >/dev/null 2>&1; then
    mkdir -p /tmp/chittycan-redis
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir /tmp/chittycan-redis --logfile /tmp/chittycan-redis/redis.log || true
  fi
  for _ in $(seq 1 30); do redis_up && break; sleep 0.5; done
  redis_up || { echo "bench.sh: Redis is missing or will not start (install redis-server)"; exit 2; }
fi

# The benchmark's own database: created once, migrated every run (a no-op when current).
"$PY" - <<EOF
import psycopg
url = "$BENCH_DATABASE_URL"
admin = url.rsplit("/", 1)[0] + "/postgres"
name = url.rsplit("/", 1)[1].split("?")[0]
with psycopg.connect(admin, autocommit=True) as conn:
    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
        conn.execute(f'CREATE DATABASE "{name}"')
        print(f"bench.sh: created database {name}")
EOF
DATABASE_URL=$BENCH_DATABASE_URL REDIS_URL=$BENCH_REDIS_URL CHITTYCAN_REDIS_PREFIX=$BENCH_REDIS_PREFIX \
  "$PY" manage.py migrate --no-input -v 0

echo "bench.sh: load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
exec "$PY" -m bench.run "$@"

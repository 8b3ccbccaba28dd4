#!/usr/bin/env bash
# `make test`: make sure PostgreSQL and Redis are up (start them if installed but down), then run
# the whole suite against them. Say clearly what is missing if they cannot be had.
set -uo pipefail
cd "$(dirname "$0")/.."

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}
REDIS_PORT=${REDIS_PORT:-6379}

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null || (echo > "/dev/tcp/$PGHOST/$PGPORT") 2>/dev/null; }
redis_up() { [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]; }

if ! pg_up; then
  echo "test.sh: PostgreSQL is not answering on $PGHOST:$PGPORT; trying to start it"
  if command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql >/dev/null 2>&1; then
    for v in $(ls /etc/postgresql); do pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>/dev/null || true; done
  elif command -v pg_ctl >/dev/null 2>&1 && [ -n "${PGDATA:-}" ]; then
    pg_ctl -D "$PGDATA" -l "${PGDATA}/server.log" start || true
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 0.5; done
  pg_up || { echo "test.sh: PostgreSQL is missing or will not start (install postgresql, or set DATABASE_URL to a server)"; exit 2; }
fi

if ! redis_up; then
  echo "test.sh: Redis is not answering on $REDIS_HOST:$REDIS_PORT; trying to start it"
  if command -v redis-server >/dev/null 2>&1; then
    mkdir -p /tmp/chittycan-redis
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir /tmp/chittycan-redis --logfile /tmp/chittycan-redis/redis.log || true
  fi
  for _ in $(seq 1 30); do redis_up && break; sleep 0.5; done
  redis_up || { echo "test.sh: Redis is missing or will not start (install redis-server, or set REDIS_URL)"; exit 2; }
fi

export DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@$PGHOST:$PGPORT/chittycan}
export REDIS_URL=${TEST_REDIS_URL:-redis://$REDIS_HOST:$REDIS_PORT/9}
export CHITTYCAN_REDIS_PREFIX=${CHITTYCAN_REDIS_PREFIX:-cctest}
export CHITTYCAN_USAGE_FLUSH_INTERVAL=0.02
export CHITTYCAN_VAR_DIR=${CHITTYCAN_VAR_DIR:-$(mktemp -d /tmp/chittycan-test.XXXXXX)}
export PYTHONDONTWRITEBYTECODE=1

.venv/bin/pytest "$@"
status=$?
if [ $status -eq 5 ]; then
  echo "test.sh: pytest collected no tests"; exit 1
fi
exit $status

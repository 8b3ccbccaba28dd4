#!/usr/bin/env bash
# `make bench`: one gateway process with PostgreSQL, Redis, auth, limits, budgets and the usage ledger
# on, side by side with the same load sent straight to a fast fake upstream and through a minimal
# aiohttp pass-through proxy (the ceiling); with --baseline REF (`make bench BASELINE=REF`) also the
# gateway at that git ref, from a temporary worktree. See docs/benchmark.md.
# Uses its own databases (chittycan_bench, chittycan_bench_baseline) and Redis db 8 / prefixes ccbench
# and ccbench_base, so it never touches the test suite's data. Extra arguments go to
# `python -m bench.run` (e.g. --quick, --rounds 5, --servers uvicorn,granian).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/services.sh
ensure_services bench.sh || exit 2
PGUSER=${PGUSER:-postgres}
BENCH_DB=${BENCH_DB:-chittycan_bench}
export BENCH_DATABASE_URL=${BENCH_DATABASE_URL:-postgres://$PGUSER@$PGHOST:$PGPORT/$BENCH_DB}
export BENCH_REDIS_URL=${BENCH_REDIS_URL:-redis://$REDIS_HOST:$REDIS_PORT/8}
export BENCH_REDIS_PREFIX=${BENCH_REDIS_PREFIX:-ccbench}
PY=${BENCH_PYTHON:-.venv/bin/python}
# The gateway runs in prod mode, which refuses the public development SECRET_KEY.
export SECRET_KEY=${SECRET_KEY:-chittycan-bench-secret-not-for-production-5d2b8e4a1c}

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

#!/usr/bin/env bash
# `make test`: make sure PostgreSQL and Redis are up (start them if installed but down), then run
# the whole suite against them. Say clearly what is missing if they cannot be had.
set -uo pipefail
cd "$(dirname "$0")/.."

source scripts/services.sh
ensure_services test.sh || exit 2

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

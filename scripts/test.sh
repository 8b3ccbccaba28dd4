#!/usr/bin/env bash
# `make test`: make sure PostgreSQL and Redis are up (start them if installed but down), then run
# the whole suite against them. Say clearly what is missing if they cannot be had.
set -uo pipefail
cd "$(dirname "$0")/.."

# The import rules are part of the suite (CI runs this): the layer contracts (pyproject.toml
# [tool.importlinter]) and ruff, whose PLC0415 refuses an import hidden in a function.
.venv/bin/ruff check --quiet . || { echo "test.sh: ruff found problems (see above)"; exit 1; }
.venv/bin/lint-imports --no-cache > /tmp/chittycan-import-contracts.log 2>&1 || {
  cat /tmp/chittycan-import-contracts.log; echo "test.sh: an import contract is broken (see above)"; exit 1; }
grep -E "^Contracts:" /tmp/chittycan-import-contracts.log

source scripts/services.sh
ensure_services test.sh || exit 2
[[ " $* " == *"not browser"* ]] || ensure_browser test.sh || exit 2  # chromium, for tests/browser

export DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@$PGHOST:$PGPORT/chittycan}
export REDIS_URL=${TEST_REDIS_URL:-redis://$REDIS_HOST:$REDIS_PORT/9}
export CHITTYCAN_REDIS_PREFIX=${CHITTYCAN_REDIS_PREFIX:-cctest}
export CHITTYCAN_USAGE_FLUSH_INTERVAL=0.02
# Outside dev mode the gateway refuses the public development SECRET_KEY (core/preflight.py).
export SECRET_KEY=${SECRET_KEY:-chittycan-test-suite-secret-not-for-production-9f3a7c1e}
export CHITTYCAN_VAR_DIR=${CHITTYCAN_VAR_DIR:-$(mktemp -d /tmp/chittycan-test.XXXXXX)}
export PYTHONDONTWRITEBYTECODE=1

.venv/bin/pytest "$@"
status=$?
if [ $status -eq 5 ]; then
  echo "test.sh: pytest collected no tests"; exit 1
fi
exit $status

#!/bin/sh
# Container entrypoint: optional one-off set-up, then the command (default `can serve`).
#   CHITTYCAN_MIGRATE=1          apply database migrations first (one container only, or the
#                                embedded SQLite of a dev-mode CI service)
#   CHITTYCAN_BOOTSTRAP_KEY=...  make sure this chitty_ key exists (for CI; see docker/bootstrap.py)
set -eu
if [ "${CHITTYCAN_MIGRATE:-0}" = "1" ]; then
  can migrate --no-input -v 0
fi
if [ -n "${CHITTYCAN_BOOTSTRAP_KEY:-}" ]; then
  python /app/docker/bootstrap.py ensure
fi
exec "$@"

#!/usr/bin/env bash
# The suite drives /v1/responses with both openai SDK generations: 3.x is in the virtualenv, the
# pinned 2.x lives in its own folder and runs in a subprocess (tests/sdk_legacy/drive_responses.py).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.venv/openai-legacy
version=2.54.0
if [ -f "$target/.version" ] && [ "$(cat "$target/.version")" = "$version" ]; then
  exit 0
fi
rm -rf "$target"
.venv/bin/pip install -q --target "$target" "openai==$version"
echo "$version" > "$target/.version"

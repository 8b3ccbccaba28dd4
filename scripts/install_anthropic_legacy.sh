#!/usr/bin/env bash
# The suite drives /v1/messages with both anthropic SDK generations: 2.x is in the virtualenv,
# the pinned 0.x lives in its own folder and runs in a subprocess (tests/sdk_legacy/).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.venv/anthropic-legacy
version=0.69.0
if [ -f "$target/.version" ] && [ "$(cat "$target/.version")" = "$version" ]; then
  exit 0
fi
rm -rf "$target"
.venv/bin/pip install -q --target "$target" "anthropic==$version"
echo "$version" > "$target/.version"

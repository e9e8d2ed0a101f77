#!/usr/bin/env bash
# Refresh requirements.lock: the runtime dependencies of pyproject.toml (and theirs), resolved for
# the image's Python (3.11 on Linux) to exact versions, each with the sha256 of every file PyPI
# serves for it, so `pip install --require-hashes -r requirements.lock` installs exactly these
# bytes. Without arguments a pin moves only where pyproject.toml no longer allows it; `make lock`
# passes --upgrade (every pin to the newest allowed release). Review the diff, then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${UV:-.venv/bin/uv}" pip compile pyproject.toml \
  --generate-hashes \
  --python-version 3.11 \
  --python-platform linux \
  --custom-compile-command "make lock" \
  --quiet \
  --output-file requirements.lock \
  "$@"

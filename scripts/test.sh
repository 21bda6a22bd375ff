#!/usr/bin/env bash
# Set up everything the tests need (venv, packages, redis-server) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ALTO_NEED_REDIS=1 ./scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"

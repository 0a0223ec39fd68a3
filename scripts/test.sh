#!/usr/bin/env bash
# Quick start: set up .venv if needed, then run the whole test suite (slow tests included).
# The tests use the machine's PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Quick start: set up .venv if needed, then run the service on the embedded default
# (SQLite, a server-less broker, a Celery worker beside the API, bundled SmolLM2-135M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/selflm serve "$@"

#!/usr/bin/env bash
# Lint: ruff's rules, ruff's formatting and mypy (strict; the checked packages are `files` in
# pyproject.toml: core app worker migrations selflm tests bench studies). .ci/run runs this
# before the tests; pre-commit runs the same three tools on each commit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy

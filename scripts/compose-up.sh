#!/usr/bin/env bash
# `docker compose up -d` for the whole stack, on machines with or without an image registry:
#   1. .env with random secrets if missing (scripts/compose-env.sh),
#   2. the compose files (scripts/compose-prepare.sh: registry images or Debian stand-ins),
#   3. build the selflm image, `up -d` (extra arguments go to it), wait for every healthcheck.
# COMPOSE_FILE in the environment or .env (e.g. with docker-compose.gpu.yml) is respected.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/compose-lib.sh
source scripts/compose-lib.sh

bash scripts/compose-env.sh >/dev/null
if [ -z "${COMPOSE_FILE:-}" ] && ! grep -q '^COMPOSE_FILE=' .env; then
  COMPOSE_FILE=$(bash scripts/compose-prepare.sh)
  export COMPOSE_FILE
fi
compose build
start=$SECONDS
compose up -d "$@"
mapfile -t ids < <(compose ps -a -q)
wait_healthy "${SELFLM_HEALTH_TIMEOUT_S:-600}" "${ids[@]}"
echo "compose-up: every service healthy $((SECONDS - start)) s after up" >&2
compose ps

#!/usr/bin/env bash
# Decide how the stack's images are made and print the compose files to use (COMPOSE_FILE).
#
# With an image registry: docker-compose.yml as it is (python:3.11-slim, postgres:16, redis:7).
# Without one (SELFLM_OFFLINE=1, or auto: the images are neither here nor pullable): build the
# Debian stand-ins (scripts/compose-offline-images.sh), copy the CPU torch wheel from
# SELFLM_TORCH_WHEELS (default /opt/wheels) into docker/wheels/, and add
# docker-compose.offline.yml.
set -euo pipefail
cd "$(dirname "$0")/.."

files=docker-compose.yml
offline=${SELFLM_OFFLINE:-auto}
if [ "$offline" = auto ]; then
  offline=0
  for image in python:3.11-slim postgres:16 redis:7; do
    if ! docker image inspect "$image" >/dev/null 2>&1 \
      && ! timeout 60 docker pull -q "$image" >/dev/null 2>&1; then
      echo "compose-prepare: cannot pull $image: using the Debian stand-ins" >&2
      offline=1
      break
    fi
  done
fi

if [ "$offline" = 1 ]; then
  bash scripts/compose-offline-images.sh
  if ! ls docker/wheels/torch-*.whl >/dev/null 2>&1; then
    wheels=${SELFLM_TORCH_WHEELS:-/opt/wheels}
    wheel=$(ls "$wheels"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort | tail -1 || true)
    [ -n "$wheel" ] || {
      echo "compose-prepare: no CPU torch wheel (cp311) in $wheels; put one in docker/wheels/" >&2
      exit 1
    }
    cp "$wheel" docker/wheels/
  fi
  files=$files:docker-compose.offline.yml
fi
echo "$files"

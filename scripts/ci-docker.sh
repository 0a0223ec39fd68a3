#!/usr/bin/env bash
# CI: the compose stack for real (tests/docker, marker `docker`). Installs Debian's docker.io
# and docker-compose and starts dockerd when they are missing; when the engine cannot start it
# says why and the docker tests are skipped with that reason. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

log=${SELFLM_DOCKERD_LOG:-/tmp/selflm-dockerd.log}
problem=""
started_dockerd=0
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null \
  || ! command -v debootstrap >/dev/null; then
  echo "ci-docker: installing docker.io docker-compose debootstrap" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    docker.io docker-compose debootstrap >/dev/null 2>&1 \
    || { as_root apt-get update -q >/dev/null 2>&1 && as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q docker.io docker-compose debootstrap >/dev/null 2>&1; } \
    || problem="apt-get could not install docker.io / docker-compose"
fi

if [ -z "$problem" ] && ! docker info >/dev/null 2>&1; then
  echo "ci-docker: starting dockerd (log: $log)" >&2
  as_root sh -c "nohup dockerd >'$log' 2>&1 & echo \$! >/tmp/selflm-dockerd.pid" \
    || problem="cannot run dockerd"
  started_dockerd=1
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    problem="dockerd did not start: $(tail -n 3 "$log" 2>/dev/null | tr '\n' ' ')"
  fi
fi

if [ -n "$problem" ]; then
  echo "ci-docker: THE DOCKER ENGINE CANNOT START HERE: $problem" >&2
  echo "ci-docker: the docker tests are skipped with that reason" >&2
  export SELFLM_DOCKER_UNAVAILABLE="$problem"
else
  echo "ci-docker: $(docker version --format 'engine {{.Server.Version}}') ready" >&2
fi

# Keep the test image (and so the build cache) for the next run; the stand-in base images
# stay cached as well.
export SELFLM_DOCKER_KEEP_IMAGE=${SELFLM_DOCKER_KEEP_IMAGE:-1}
bash scripts/setup.sh
start=$SECONDS
rc=0
.venv/bin/python -m pytest -q -m docker tests/docker -p no:cacheprovider -s "$@" || rc=$?
echo "ci-docker: docker tests took $((SECONDS - start)) s" >&2
if [ "$started_dockerd" = 1 ] && [ -s /tmp/selflm-dockerd.pid ]; then
  # Stop the engine this script started (images and the build cache stay on disk).
  pid=$(cat /tmp/selflm-dockerd.pid)
  as_root kill "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
fi
exit "$rc"

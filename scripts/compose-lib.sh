# Sourced by scripts/compose-*.sh: the Compose CLI and a health wait.

# `docker compose` (v2 plugin) when present, else Debian's `docker-compose` (v1).
compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose "$@"
  else
    docker-compose "$@"
  fi
}

# wait_healthy TIMEOUT_S CONTAINER_ID...: every container with a healthcheck is healthy and
# every one without (the one-shot migrate) has exited 0. Fails fast on unhealthy / non-zero.
wait_healthy() {
  local deadline=$((SECONDS + $1)) id state health code pending
  shift
  while :; do
    pending=0
    for id in "$@"; do
      read -r state health code < <(docker inspect -f \
        '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}' "$id")
      case "$health:$state" in
        healthy:running) ;;
        none:exited) [ "$code" = 0 ] || { echo "container $id exited $code" >&2; return 1; } ;;
        unhealthy:*) echo "container $id is unhealthy" >&2; return 1 ;;
        *:exited | *:dead) echo "container $id $state ($code)" >&2; return 1 ;;
        *) pending=1 ;;
      esac
    done
    [ "$pending" = 0 ] && return 0
    [ "$SECONDS" -lt "$deadline" ] || { echo "containers not healthy after the timeout" >&2; return 1; }
    sleep 2
  done
}

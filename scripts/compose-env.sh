#!/usr/bin/env bash
# Write a compose `.env` (or the file given as $1) from .env.example, with a random
# POSTGRES_PASSWORD and SELFLM_API_KEYS, unless it exists already. Prints the file's path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=${1:-$root/.env}

if [ -e "$target" ]; then
  echo "$target"
  exit 0
fi
secret() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
sed -e "s/^POSTGRES_PASSWORD=change-me$/POSTGRES_PASSWORD=$(secret)/" \
    -e "s/^SELFLM_API_KEYS=change-me$/SELFLM_API_KEYS=$(secret)/" \
    "$root/.env.example" >"$target.tmp"
mv "$target.tmp" "$target"
echo "compose-env: wrote $target with a random POSTGRES_PASSWORD and SELFLM_API_KEYS" >&2
echo "$target"

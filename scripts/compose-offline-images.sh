#!/usr/bin/env bash
# Build stand-in base images for a machine that cannot reach an image registry.
#
#   selflm-offline/debian:bookworm   debootstrap --variant=minbase root, `docker import`ed
#   selflm-offline/python:3.11       Debian's python3 (3.11) + venv; used as BASE_IMAGE
#   selflm-offline/postgres:15       Debian's PostgreSQL 15, entrypoint like postgres:16's
#   selflm-offline/redis:7           Debian's redis-server 7
#
# docker-compose.offline.yml swaps them in for python:3.11-slim, postgres:16 and redis:7.
# Cached: the root file system is kept as a tarball and the images are only rebuilt when
# missing (the Debian package installs are docker build layers, cached as usual).
# Containers reach the Debian and PyPI registries; when this machine's egress re-signs TLS
# with its own CA (/usr/local/share/ca-certificates/*.crt), that CA goes into the images.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${SELFLM_OFFLINE_CACHE:-/var/cache/selflm-offline}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOTFS_TAR=$CACHE/bookworm-minbase.tar
BASE=selflm-offline/debian:bookworm

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have_image "$BASE"; then
  if [ ! -s "$ROOTFS_TAR" ]; then
    command -v debootstrap >/dev/null || { echo "compose-offline-images: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    mkdir -p "$CACHE"
    root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    echo "compose-offline-images: debootstrap bookworm into $root (about 80 s)" >&2
    debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; rm -rf "$root"; exit 1; }
    # Slim the root like the registry's debian images: no apt lists, caches or docs.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
      "$root"/usr/share/doc/* "$root"/usr/share/man/*
    tar -C "$root" -cf "$ROOTFS_TAR.tmp" . && mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$root"
  fi
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    "$ROOTFS_TAR" "$BASE" >/dev/null
fi

# The stand-ins' build context: their Dockerfiles plus this machine's extra CA certificates.
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp -r docker/offline/. "$ctx/"
mkdir -p "$ctx/ca"
cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true

for name in python:3.11 postgres:15 redis:7; do
  tag=selflm-offline/$name
  if [ "${SELFLM_OFFLINE_REBUILD:-0}" = 1 ] || ! have_image "$tag"; then
    echo "compose-offline-images: building $tag" >&2
    docker build -q -t "$tag" -f "$ctx/${name%%:*}.Dockerfile" "$ctx" >/dev/null
  fi
done
echo "compose-offline-images: ready: $BASE selflm-offline/{python:3.11,postgres:15,redis:7}" >&2

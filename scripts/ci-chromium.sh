#!/usr/bin/env bash
# Headless Chromium for the dashboard tests (tests/dashboard): Debian's `chromium` package,
# installed only when missing (CI images run as root; elsewhere sudo is used when present).
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
chromium --version

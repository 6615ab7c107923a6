#!/usr/bin/env bash
# The browser the playground test drives: Debian's chromium at /usr/bin/chromium. Installs it when
# missing (apt-get, as root or through sudo); where apt's chromium is only a snap stub (Ubuntu), uses
# Playwright's own build instead (`playwright install --with-deps chromium`, a download).
set -euo pipefail
if [ -x /usr/bin/chromium ] && /usr/bin/chromium --version >/dev/null 2>&1; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if grep -qi '^ID=debian' /etc/os-release 2>/dev/null; then
  echo "+ installing Debian's chromium for the playground's browser test"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  /usr/bin/chromium --version
else
  echo "+ installing Playwright's chromium for the playground's browser test"
  python -m playwright install --with-deps chromium
fi

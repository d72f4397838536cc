#!/usr/bin/env bash
# The console's browser test (tests/ui/test_console.py) drives Debian's chromium and chromium-driver:
# install them when either is missing (as root with apt-get, e.g. on a fresh CI machine).
set -euo pipefail
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing chromium and chromium-driver (the console's browser test)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
  echo "ensure-chromium: /usr/bin/chromium or /usr/bin/chromedriver is missing: install Debian's chromium and chromium-driver" >&2
  exit 1
fi

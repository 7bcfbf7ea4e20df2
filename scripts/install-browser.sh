#!/usr/bin/env bash
# Chromium and its WebDriver from the OS packages, for the page test (tests/test_serve_page.py).
# Idempotent: does nothing when they are installed; installs them with apt-get when root.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-browser: Chromium is missing; install the chromium and chromium-driver" \
         "packages (as root: apt-get install chromium chromium-driver) for the page test" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null

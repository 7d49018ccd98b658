#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser test (test_operations.py drives it
# with Playwright, which must not download a browser of its own).  Idempotent: it
# returns at once when chromium is already installed.  Needs root (CI runs as root).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "chromium is not installed and installing it needs root: the browser test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fonts-dejavu-core: readable text in the screenshots on a machine without fonts.
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version 2>/dev/null

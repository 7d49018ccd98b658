#!/usr/bin/env bash
# Debian packages some tests drive: chromium for the dashboard's browser test
# (test_operations.py drives it with Playwright, which must not download a
# browser of its own), and pgbouncer for the worker behind a transaction pooler
# (test_postgres_reliability.py).  Idempotent: it installs only what is missing,
# and returns at once when nothing is.  Needs root (CI runs as root).
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-dejavu-core)  # fonts: readable text in the screenshots
[ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "not installed, and installing needs root: ${missing[*]}; the tests that need them will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the packaged pgbouncer service; the tests run their own on ports of their own.
if command -v systemctl >/dev/null && systemctl is-active -q pgbouncer 2>/dev/null; then
    systemctl stop pgbouncer && systemctl disable -q pgbouncer
fi

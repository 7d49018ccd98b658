#!/usr/bin/env bash
# Installs clients/node's better-sqlite3 12.x for test_reliability's Node
# scenario, unless it is there and loads (npm compiles it: there is no prebuilt
# binary to download here, a minute or two of one core).  `make test` starts
# this in the background first, so the compile overlaps the venv, the checks
# and the system packages; the test's fixture runs it again, and the lock makes
# that run wait for the first one, never start a second npm.
set -uo pipefail
cd "$(dirname "$0")/../clients/node"
command -v node > /dev/null && command -v npm > /dev/null || exit 0
exec flock .install.lock sh -c '
    node -e "require(\"better-sqlite3\");
             process.exit(require(\"better-sqlite3/package.json\").version.startsWith(\"12.\") ? 0 : 1)" 2> /dev/null ||
    npm ci --no-audit --no-fund --loglevel=error'

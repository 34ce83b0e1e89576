#!/usr/bin/env bash
# Installs what `make test` needs and a fresh machine lacks. Each step is
# skipped when its program is already there, so a second run costs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Nothing outside Go is needed yet; later suites add their packages here.
exit 0

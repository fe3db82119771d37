#!/usr/bin/env bash
# Set up, then run the whole test suite against a real Mosquitto started by the fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

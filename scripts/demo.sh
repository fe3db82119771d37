#!/usr/bin/env bash
# The main job: set up, then run the fleet demo (broker, cloud trainer, edge devices adapting on shifting data, baselines).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/eclm demo "$@"

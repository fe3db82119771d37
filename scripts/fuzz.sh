#!/usr/bin/env bash
# The dedicated fuzz run: every parser and handler that reads from the network or disk gets
# ECLM_FUZZ_CASES cases (10,000 by default; the regular suite runs 200), then a table per
# parser (cases, rejections by error type, crashes, hangs, slowest case) on the terminal
# and as JSON in ECLM_FUZZ_REPORT. Extra arguments go to pytest (-k decode, -x...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export ECLM_FUZZ_CASES="${ECLM_FUZZ_CASES:-10000}"
export ECLM_FUZZ_REPORT="${ECLM_FUZZ_REPORT:-runs/fuzz/report.json}"
echo "[fuzz] $ECLM_FUZZ_CASES cases per parser; report: $ECLM_FUZZ_REPORT"
exec .venv/bin/python -m pytest tests/fuzz -p no:cacheprovider --hypothesis-show-statistics "$@"

#!/usr/bin/env bash
# The edge side on every CPython a board's OS ships: 3.10 (JetPack 6), 3.11 (Raspberry Pi
# OS bookworm), 3.12 (Ubuntu 24.04), 3.13 (Debian trixie). For each one found through
# pyenv (`pyenv root`/versions/X.Y.*) or as pythonX.Y on PATH:
#   1. a fresh venv installs this checkout's wheel with the `edge` extra (no torch) and
#      runs the edge unit tests (tests/edge_runtime, tests/device_profiles) in it;
#   2. tests/test_python_matrix.py builds a bundle with --python X.Y, installs it by its
#      own install.sh with that Python, and its agent reaches `active` against the cloud
#      (the cloud side in this checkout's venv, Python 3.11, and a real Mosquitto).
# A Python that is not here is reported as skipped. CI runs step 2 for 3.10 only.
#
# usage: scripts/python-matrix.sh [X.Y ...]      (default: 3.10 3.11 3.12 3.13)
#   MATRIX_DIR=...    where the venvs go (default: ${TMPDIR:-/tmp}/eclm-python-matrix)
#   CLOUD_PYTHON=...  the cloud side's interpreter (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSIONS=${*:-3.10 3.11 3.12 3.13}
WORK=${MATRIX_DIR:-${TMPDIR:-/tmp}/eclm-python-matrix}
CLOUD_PYTHON=${CLOUD_PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$WORK"

find_python() {
    local root found
    for root in "$(pyenv root 2>/dev/null || true)" "${PYENV_ROOT:-}" "$HOME/.pyenv"; do
        [ -n "$root" ] || continue
        found=$(ls -d "$root"/versions/"$1".*/bin/python"$1" 2>/dev/null | sort -V | tail -n 1)
        if [ -n "$found" ]; then
            echo "$found"
            return 0
        fi
    done
    command -v "python$1"
}

say() { printf 'python-matrix: %s\n' "$*"; }

rm -rf "$WORK/wheel"
wheel=$(PYTHONPATH=$ROOT "$CLOUD_PYTHON" -c \
    "import sys; from pathlib import Path; from eclm.bundle import build_wheel; print(build_wheel(Path(sys.argv[1])))" \
    "$WORK/wheel")
say "built $wheel"

declare -A result
found=()
for version in $VERSIONS; do
    if ! python=$(find_python "$version"); then
        result[$version]="skipped: no CPython $version here (pyenv install $version)"
        say "$version: ${result[$version]}"
        continue
    fi
    found+=("$version")
    venv=$WORK/py$version
    rm -rf "$venv"
    "$python" -m venv "$venv"
    say "$version: $("$venv/bin/python" -V) in $venv"
    if ! "$venv/bin/python" -m pip install -q "$wheel[edge]" pytest hypothesis >"$venv.pip.log" 2>&1; then
        result[$version]="FAILED: pip install of the edge extra (see $venv.pip.log)"
        continue
    fi
    # pytest, not python -m pytest: the checkout stays off sys.path, so the tests import
    # the installed wheel.
    if (env -u PYTHONPATH "$venv/bin/pytest" -q -p no:cacheprovider \
        tests/edge_runtime tests/device_profiles | tee "$venv.unit.log" | tail -n 1); then
        result[$version]="unit: $(tail -n 1 "$venv.unit.log" | tr -d '=')"
    else
        result[$version]="FAILED unit: $(tail -n 1 "$venv.unit.log" | tr -d '=') (see $venv.unit.log)"
    fi
done

status=0
if [ ${#found[@]} -gt 0 ]; then
    say "end to end for ${found[*]}"
    log=$WORK/end-to-end.log
    if ! ECLM_PYTHONS="${found[*]}" PYTHONPATH=$ROOT "$CLOUD_PYTHON" -m pytest -q -rA -s \
        -p no:cacheprovider tests/test_python_matrix.py >"$log" 2>&1; then
        status=1
    fi
    for version in "${found[@]}"; do
        line=$(grep -E "^(PASSED|FAILED|SKIPPED|ERROR).*\[$version\]" "$log" | head -n 1 || true)
        took=$(grep -oE "Python $version: bundle [0-9.]+ s, install.sh [0-9.]+ s" "$log" | head -n 1 || true)
        result[$version]="${result[$version]}; end to end: ${line%% *} (${took#Python $version: })"
    done
    say "end-to-end log: $log"
fi

say "summary"
for version in $VERSIONS; do
    printf '  %-5s %s\n' "$version" "${result[$version]}"
    case ${result[$version]} in *FAILED* | *ERROR*) status=1 ;; esac
done
exit $status

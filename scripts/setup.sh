#!/usr/bin/env bash
# Sets up this checkout: Mosquitto from the system packages (when we may install them),
# a virtual environment in .venv, and the project with every role's extras.
# Safe to run again: it skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${ECLM_EXTRAS:-dev}"
venv="${ECLM_VENV:-.venv}"
# What apt and pip print goes here (appended, one header per run); the terminal gets one
# line per step, and the end of this log if a step fails.
log="$venv/setup.log"
mkdir -p "$venv"
echo "== scripts/setup.sh $(date -u +%FT%TZ)" >>"$log"

if ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
  sudo=""
  [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && sudo="sudo -n"
  if command -v apt-get >/dev/null && { [[ $(id -u) -eq 0 ]] || [[ -n $sudo ]]; }; then
    echo "[setup] installing Mosquitto from the system packages"
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq mosquitto mosquitto-clients; } >>"$log" 2>&1 \
      || echo "[setup] Mosquitto could not be installed (log: $log); the embedded amqtt broker will be used"
  else
    echo "[setup] Mosquitto is not installed and apt-get is not usable; the embedded amqtt broker will be used"
  fi
fi

# PostgreSQL: the service's state database beyond SQLite; the tests start their own server.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && command -v apt-get >/dev/null \
  && [[ $(id -u) -eq 0 ]]; then
  echo "[setup] installing PostgreSQL from the system packages (tests of the PostgreSQL state)"
  { apt-get install -y -qq postgresql || { apt-get update -qq && apt-get install -y -qq postgresql; }; } \
    >>"$log" 2>&1 || echo "[setup] PostgreSQL could not be installed (log: $log); its tests will be skipped"
fi

# Chromium and its WebDriver: the dashboard's browser test (skipped with a reason without them).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]]; then
  echo "[setup] installing chromium and chromium-driver from the system packages (dashboard test)"
  { apt-get install -y -qq chromium chromium-driver || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }; } \
    >>"$log" 2>&1 || echo "[setup] chromium could not be installed (log: $log); the browser test will be skipped"
fi

if [[ ! -x $venv/bin/python ]]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv" >>"$log" 2>&1 || { echo "[setup] python3 -m venv failed:" >&2; tail -n 30 "$log" >&2; exit 1; }
fi
stamp="$venv/.eclm-installed-$extras"
# The editable install knows the top-level packages it was made with: a new one reinstalls.
want=$({ cat pyproject.toml; ls -d -- */__init__.py; } | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "[setup] installing Python packages (extras: $extras); the first run takes a few minutes (log: $log)"
  pip_install() {
    "$venv/bin/python" -m pip install -q "$@" >>"$log" 2>&1 || {
      echo "[setup] pip install $* failed; the end of $log:" >&2
      tail -n 30 "$log" >&2
      exit 1
    }
  }
  pip_install --upgrade pip
  # torch first and pinned: an open range would pull a multi-GB CUDA build.
  pip_install "torch==2.13.0"
  pip_install -e ".[$extras]"
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $venv/bin/eclm"

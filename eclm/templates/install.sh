#!/bin/sh
# Installs the eclm edge agent of device {{DEVICE_ID}} (profile {{PROFILE}}, {{ARCH}}) from
# this bundle: a fresh venv with the pinned packages and the eclm-fleet wheel, the config
# and credentials (owner-only), and the systemd unit eclm-edge.service, enabled and started.
#
# The packages are pinned for CPython {{PYTHON}} (the board's OS image's, or --python when
# the bundle was built): PYTHON defaults to python{{PYTHON}}, else python3, and must be {{PYTHON}}.
#
# usage: [PREFIX=/opt/eclm] [PYTHON=python{{PYTHON}}] [SERVICE_USER=eclm] sh install.sh [options]
#   --no-systemd      do not install the unit (default: install it when systemd runs)
#   --systemd         install the unit (needs root)
#   --ignore-arch     install although this machine is not {{ARCH}}
#   --ignore-python   install although PYTHON is not {{PYTHON}} (pip may find no wheels)
#   -h, --help        this text
# Installing again replaces the venv, config and unit and keeps the store (what the
# agent downloaded and accepted).
set -eu
umask 022

PREFIX=${PREFIX:-/opt/eclm}
if [ -z "${PYTHON:-}" ]; then
    if command -v python{{PYTHON}} >/dev/null 2>&1; then PYTHON=python{{PYTHON}}; else PYTHON=python3; fi
fi
SYSTEMD=auto
CHECK_ARCH=yes
CHECK_PYTHON=yes
for arg in "$@"; do
    case $arg in
    --no-systemd) SYSTEMD=no ;;
    --systemd) SYSTEMD=yes ;;
    --ignore-arch) CHECK_ARCH=no ;;
    --ignore-python) CHECK_PYTHON=no ;;
    -h | --help)
        sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "install.sh: unknown argument $arg (see --help)" >&2
        exit 2
        ;;
    esac
done

say() { printf 'eclm install: %s\n' "$*"; }
die() {
    printf 'eclm install: %s\n' "$*" >&2
    exit 1
}

case $PREFIX in
/*) ;;
*) die "PREFIX must be an absolute path, got $PREFIX" ;;
esac
case $PREFIX in
*[!A-Za-z0-9_./-]*) die "PREFIX may hold only letters, digits and _ . / - (got $PREFIX)" ;;
esac
cd "$(dirname "$0")"

# 1. The bundle is whole and meant for this machine.
if command -v sha256sum >/dev/null 2>&1; then
    sha256sum --quiet -c SHA256SUMS || die "the bundle is damaged (SHA256SUMS does not match)"
fi
machine=$(uname -m)
if [ "$CHECK_ARCH" = yes ] && [ "$machine" != "{{ARCH}}" ]; then
    die "this bundle is for {{ARCH}}, this machine is $machine (build one with --arch $machine, or pass --ignore-arch)"
fi
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) ||
    die "cannot run $PYTHON (install python{{PYTHON}}, or set PYTHON=...)"
if [ "$CHECK_PYTHON" = yes ] && [ "$have" != "{{PYTHON}}" ]; then
    die "this bundle's packages are pinned for Python {{PYTHON}}, $PYTHON is $have (set PYTHON=python{{PYTHON}}, build one with --python $have, or pass --ignore-python)"
fi
if [ "$SYSTEMD" = auto ]; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        SYSTEMD=yes
    else
        SYSTEMD=no
    fi
fi
if [ "$SYSTEMD" = yes ]; then
    [ "$(id -u)" = 0 ] || die "installing the systemd unit needs root (or pass --no-systemd)"
    SERVICE_USER=${SERVICE_USER:-eclm}
    if systemctl is-active --quiet eclm-edge.service; then
        systemctl stop eclm-edge.service
        say "stopped the running eclm-edge.service"
    fi
else
    SERVICE_USER=${SERVICE_USER:-$(id -un)}
fi

# 2. A fresh venv: the pinned packages, then this project's wheel.
venv=$PREFIX/venv
rm -rf "$venv"
mkdir -p "$PREFIX"
"$PYTHON" -m venv "$venv" || die "cannot create a venv (Debian: apt-get install python3-venv)"
say "created $venv ($("$venv/bin/python" -V))"
pip="$venv/bin/python -m pip --disable-pip-version-check"
$pip install --prefer-binary -r requirements.txt
if [ -s requirements-nodeps.txt ]; then
    $pip install --prefer-binary --no-deps -r requirements-nodeps.txt
fi
$pip install --no-deps --no-index wheels/*.whl
"$venv/bin/python" -c "from edge_runtime.backends import get_backend; get_backend('{{BACKEND}}')" ||
    die "the {{BACKEND}} backend does not load in $venv"
say "installed $($pip list 2>/dev/null | tail -n +3 | wc -l) packages; the {{BACKEND}} backend loads"

# 3. Config and credentials, readable by the service's user only.
if [ "$SYSTEMD" = yes ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$PREFIX/var" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
    say "created the system user $SERVICE_USER"
fi
fill() { sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@USER@|$SERVICE_USER|g" -e "s|@STORE@|$store|g" "$1"; }
store=$(sed -n 's/^ECLM_STORE=//p' etc/edge.env | sed "s|@PREFIX@|$PREFIX|g")
mkdir -p "$PREFIX/bin" "$PREFIX/lib/systemd/system" "$(dirname "$store")"
umask 077
mkdir -p "$PREFIX/etc" "$store"
for name in edge.env credentials.env ca.pem signing.pub profile.toml; do
    fill "etc/$name" >"$PREFIX/etc/$name"
    chmod 0600 "$PREFIX/etc/$name"
done
fill bin/run.sh >"$PREFIX/bin/run.sh"
chmod 0755 "$PREFIX/bin/run.sh"
unit=$PREFIX/lib/systemd/system/eclm-edge.service
fill systemd/eclm-edge.service >"$unit"
chmod 0644 "$unit"
if [ "$(id -u)" = 0 ]; then
    chown -R "$SERVICE_USER": "$PREFIX/etc" "$store"
fi
say "config in $PREFIX/etc (mode 0600, owner $SERVICE_USER); store $store"

# 4. The systemd unit.
if [ "$SYSTEMD" = yes ]; then
    cp "$unit" /etc/systemd/system/eclm-edge.service
    systemctl daemon-reload
    systemctl enable --now eclm-edge.service
    say "installed, enabled and started /etc/systemd/system/eclm-edge.service"
    say "follow it with: journalctl -u eclm-edge -f"
else
    say "no systemd unit installed; $unit is what it would run:"
    say "  ExecStart=$PREFIX/bin/run.sh with $PREFIX/etc/edge.env and credentials.env in its environment"
fi
say "done: device {{DEVICE_ID}} (profile {{PROFILE}}) connects to {{BROKER}}"

#!/usr/bin/env bash
# The arm64 check: an aarch64 board's bundle installed and serving, on an x86-64 machine.
#
# On Debian bookworm x86-64, as root, with Debian's package mirror and PyPI reachable:
#   1. installs debootstrap, qemu-user-static and binfmt-support from Debian when missing,
#      and registers qemu-aarch64 with binfmt_misc;
#   2. builds a Debian bookworm arm64 root with debootstrap (python3, python3-venv,
#      ca-certificates), or reuses the one in the cache;
#   3. runs scripts/arm64_check.py: trains and exports the model on the host (cached),
#      starts Mosquitto with TLS on the host, builds `eclm edge bundle --profile rpi4`,
#      installs it inside the root with the bundle's own install.sh (chroot, pip from
#      PyPI), starts the agent there as its systemd unit would, has the cloud sign and
#      assign the board's sub-model, and waits until the board reports `active` with the
#      accuracy on held-out data that the same modules give on the host.
# Prints a summary and one JSON line; exits 0 if the board converged, 1 if not.
# Not a speed measurement (qemu user-mode emulates every instruction); not real silicon.
#
# usage: sudo scripts/arm64-check.sh [options] [-- driver options]
#   --cache DIR         where the root, the model and the run live (default /var/cache/eclm-arm64)
#   --rebuild-root      build the arm64 root again even if the cache has one
#   --mirror URL        Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   -h, --help          this text; `-- --help` lists the driver's options (--profile,
#                       --latency-slack, --litert-delegates, --tolerance, --timeout)
set -euo pipefail

CACHE=/var/cache/eclm-arm64
MIRROR=http://deb.debian.org/debian
REBUILD=no
DRIVER=()
while [ $# -gt 0 ]; do
    case $1 in
    --cache) CACHE=$2; shift 2 ;;
    --rebuild-root) REBUILD=yes; shift ;;
    --mirror) MIRROR=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; DRIVER=("$@"); break ;;
    *) echo "arm64-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
HERE=$(pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
say() { printf 'arm64-check: %s\n' "$*"; }
die() { printf 'arm64-check: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"
[ "$(uname -m)" = x86_64 ] || say "this host is $(uname -m), not x86_64: qemu may not be needed"
[ -x "$PY" ] || die "no project venv at $PY (scripts/setup.sh, or set PYTHON=)"
if [ ${#DRIVER[@]} -gt 0 ] && [[ " ${DRIVER[*]} " == *" --help "* ]]; then
    exec env PYTHONPATH="$HERE" "$PY" scripts/arm64_check.py --root x --cache x --help
fi

# 1. The tools, from Debian's packages.
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
[ -e /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} from Debian"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 with binfmt_misc"
fi

# 2. The arm64 root, built once per cache.
ROOT=$CACHE/root
mkdir -p "$CACHE"
if [ "$REBUILD" = yes ] || [ ! -e "$ROOT/.eclm-root-ready" ]; then
    for point in proc dev sys; do mountpoint -q "$ROOT/$point" 2>/dev/null && umount -l "$ROOT/$point"; done
    rm -rf "$ROOT"
    say "debootstrap: Debian bookworm arm64 into $ROOT (a few minutes)"
    started=$(date +%s)
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,procps \
        bookworm "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
        die "debootstrap failed: see $CACHE/debootstrap.log"
    touch "$ROOT/.eclm-root-ready"
    say "root built in $(($(date +%s) - started)) s"
else
    say "reusing the arm64 root in $ROOT (--rebuild-root to build it again)"
fi
chroot "$ROOT" /bin/true 2>/dev/null || die "cannot run the arm64 root's binaries (binfmt/qemu)"
say "root: $(chroot "$ROOT" /usr/bin/python3 -c 'import platform; print(platform.machine(), "Python", platform.python_version())'), $(chroot "$ROOT" ldd --version | head -1)"

# 3. The check itself.
exec env PYTHONPATH="$HERE" "$PY" scripts/arm64_check.py --root "$ROOT" --cache "$CACHE" "${DRIVER[@]}"

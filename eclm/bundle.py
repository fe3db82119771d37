"""``eclm edge bundle``: one archive that puts the edge agent onto a board.

Built on the operator's machine. The archive (``eclm-edge-<device-id>/``) holds::

    install.sh                 fresh venv, packages, config, systemd unit (see --help)
    requirements.txt           the board's packages, pinned for its CPU, Python and glibc
    requirements-nodeps.txt    ExecuTorch boards only: executorch, installed with --no-deps
    wheels/eclm_fleet-*.whl    this project, built from the checkout
    etc/edge.env               device id, profile, broker URL, store, labels
    etc/credentials.env        the device's broker password (0600)
    etc/ca.pem, signing.pub    the broker's CA and the cloud's manifest key
    etc/profile.toml           the board profile the agent runs with
    bin/run.sh                 what eclm-edge.service starts
    systemd/eclm-edge.service  Type=notify, WatchdogSec=, Restart=on-failure
    SHA256SUMS                 checked by install.sh

``@PREFIX@``, ``@USER@`` and ``@STORE@`` stay in the files; install.sh fills them in.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from broker.access import Access
from device_profiles import DeviceProfile
from eclm.errors import BundleError
from eclm.pins import NO_DEPS, Target, arch_pinned, pin_from_index, pin_here
from eclm_common.errors import UsageError
from eclm_common.exit_codes import ExitCode

TEMPLATES = Path(__file__).parent / "templates"
ROOT = Path(__file__).resolve().parents[1]  # the checkout, when run from one
DISTRIBUTION = "eclm-fleet"
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./@-]+$")  # install.sh substitutes it with sed

# What PyPI offers each board, checked with `pip install --dry-run --only-binary=:all:
# --platform ... --python-version 3.10|3.11|3.12|3.13` for ai-edge-litert 2.3.0, numpy
# 2.4.6 (2.2.6 on 3.10), psutil 7.2.2, cryptography 50.0.2, cffi 2.1.1, safetensors 0.8.0,
# ml_dtypes 0.6.0, protobuf 7.36.2, torch 2.13.0 and executorch 1.5.1 (the rest are pure
# Python).
WHEEL_NOTES = {
    "aarch64": [
        "PyPI has cp310-cp313 manylinux aarch64 wheels of each compiled package here (checked",
        "for ai-edge-litert 2.3.0 and 2.1.6, numpy, cryptography 50.0.2, torch 2.13.0,",
        "executorch 1.5.1 and the others); they need glibc >= 2.28 (Raspberry Pi OS bookworm",
        "has 2.36). ai-edge-litert is pinned to 2.1.6, the version proven on aarch64 here.",
    ],
    "armv7l": [
        "PyPI has no armv7l wheels of ai-edge-litert 2.3.0 or numpy 2.4.6 (checked): on a",
        "32-bit OS pip builds from source or fails. Flash a 64-bit OS and bundle for aarch64.",
    ],
    "x86_64": [
        "PyPI has manylinux x86_64 wheels of each compiled package here. Its torch for",
        "x86_64 Linux is the CUDA build (GBs of nvidia packages): a board without a GPU",
        "wants PyTorch's CPU build of the same version.",
    ],
}


@dataclass(frozen=True)
class BundleSpec:
    """What goes into one device's bundle."""

    device_id: str
    profile: str  # a shipped profile's name or a .toml path
    access_dir: Path
    trust_key: Path
    broker: str | None = None  # default: mqtts://<first name in server.pem>:8883
    arch: str | None = None  # default: the profile's
    python: str | None = None  # the board's CPython X.Y; default: the profile's OS image's
    labels: tuple[str, ...] = ()
    store: str | None = None  # on the board; default @PREFIX@/var/<device-id>
    wheel: Path | None = None  # default: built from the checkout


@dataclass(frozen=True)
class Bundle:
    """A written archive and what it holds: (path inside, mode, size)."""

    path: Path
    members: tuple[tuple[str, int, int], ...]
    added_user: bool  # the device's broker user was created for this bundle


def build_bundle(spec: BundleSpec, out: Path) -> Bundle:
    """Write the archive for ``spec`` to ``out`` (mode 0600: it holds a password)."""
    import eclm_wire as wire
    from device_profiles import load_profile

    wire.check_device_id(spec.device_id)
    wire.check_labels(spec.labels)
    profile = load_profile(spec.profile)
    arch = spec.arch or profile.arch
    python = board_python(spec.python, profile)
    store = spec.store or f"@PREFIX@/var/{spec.device_id}"
    if not _SAFE_PATH.match(store):
        raise UsageError(f"--store {store!r}: only letters, digits and _ . / @ - please")
    if not spec.trust_key.is_file():
        raise UsageError(f"--trust-key {spec.trust_key}: no such file (eclm cloud keys init)")
    access = Access(spec.access_dir).check()
    broker = device_broker_url(spec.broker or default_broker(access), spec.device_id)
    backend = profile.backends[0]
    values = {
        "DEVICE_ID": spec.device_id,
        "PROFILE": profile.name,
        "ARCH": arch,
        "BACKEND": backend,
        "BROKER": broker,
        "PYTHON": python,
    }
    with tempfile.TemporaryDirectory(prefix="eclm-bundle-") as tmp:
        wheel = spec.wheel or build_wheel(Path(tmp) / "wheel")
        main, nodeps = requirements(wheel, profile, arch, python=python)
        password, added = _device_password(access, spec.device_id)  # last: it writes
        files = {
            "install.sh": (_render("install.sh", values), 0o755),
            "bin/run.sh": (_render("run.sh", values), 0o755),
            "systemd/eclm-edge.service": (_render("eclm-edge.service", values), 0o644),
            f"wheels/{wheel.name}": (wheel.read_bytes(), 0o644),
            "etc/edge.env": (_edge_env(spec, profile, arch, broker, store).encode(), 0o644),
            "etc/credentials.env": (f"ECLM_BROKER_PASSWORD={password}\n".encode(), 0o600),
            "etc/ca.pem": (access.tls.cafile.read_bytes(), 0o644),
            "etc/signing.pub": (spec.trust_key.read_bytes(), 0o644),
            "etc/profile.toml": (_profile_text(spec.profile), 0o644),
        }
        files["requirements.txt"] = (main.encode(), 0o644)
        if nodeps:
            files["requirements-nodeps.txt"] = (nodeps.encode(), 0o644)
        files["SHA256SUMS"] = (_sha256sums(files), 0o644)
        members = _write_archive(out, f"eclm-edge-{spec.device_id}", files)
    return Bundle(out, members, added)


def board_python(asked: str | None, profile: DeviceProfile) -> str:
    """The CPython X.Y the bundle is for: ``--python``, else the profile's OS image's."""
    from device_profiles.profile import PYTHONS

    python = asked or profile.os.python
    if python not in PYTHONS:
        raise UsageError(f"--python {python}: the edge side runs on {', '.join(PYTHONS)}")
    return python


def _device_password(access: Access, device_id: str) -> tuple[str, bool]:
    try:
        return access.password(device_id), False
    except ValueError:
        return access.add_user(device_id), True


def default_broker(access: Access) -> str:
    """``mqtts://NAME:8883`` for the first name the broker's certificate is valid for:
    the board must reach the broker by a name the certificate holds."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(access.tls.certfile.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    first = [str(n.value) for n in names][0]
    return f"mqtts://{f'[{first}]' if ':' in first else first}:8883"


def device_broker_url(url: str, device_id: str) -> str:
    """``url`` with the device as its user and no password (that travels in
    credentials.env); ValueError if it names a password or another user."""
    from urllib.parse import urlsplit

    from eclm_wire.mqtt import BrokerAddress

    address = BrokerAddress.parse(url)  # ValueError if it is not an MQTT URL
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.password:
        raise UsageError("--broker: leave the password out; the bundle brings the device's")
    if parts.username and parts.username != device_id:
        raise UsageError(
            f"--broker: the user must be the device ({device_id}), not {parts.username}"
        )
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{'mqtts' if address.tls else 'mqtt'}://{device_id}@{host}:{address.port}"


def build_wheel(dest: Path) -> Path:
    """A wheel of this project built from a copy of the checkout (so no build/ or
    egg-info lands in it), offline: ``pip wheel --no-deps --no-build-isolation``."""
    from device_profiles import toml

    if not (ROOT / "pyproject.toml").is_file():
        raise UsageError(f"{ROOT} is not a checkout of eclm-fleet: pass --wheel")
    project = toml.loads((ROOT / "pyproject.toml").read_text())
    src = dest / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", project["project"].get("readme", "README.md")):
        shutil.copy2(ROOT / name, src / name)
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        shutil.copytree(
            ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run([*cmd, "-w", str(dest), str(src)], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise BundleError(f"building the wheel failed:\n{done.stderr[-2000:]}")
    return wheels[0]


def requirements(
    wheel: Path, profile: DeviceProfile, arch: str, *, python: str | None = None
) -> tuple[str, str | None]:
    """requirements.txt for the board (the ``edge`` extra the wheel declares, and
    ``edge-executorch`` when the profile prefers ExecuTorch, each package and what it
    needs pinned for the board's CPython ``python``, default this interpreter's) and
    requirements-nodeps.txt (executorch), or None."""
    from packaging.requirements import Requirement

    extras = ["edge"] + (["edge-executorch"] if profile.backends[0] == "executorch" else [])
    target = Target(arch, python or "{}.{}".format(*sys.version_info[:2]), profile.os.glibc_version)
    env = target.markers()
    roots = []  # (requirement, the extra that asks for it)
    for line in _wheel_requires(wheel):
        req = Requirement(line)
        wanted = [e for e in extras if req.marker and req.marker.evaluate({**env, "extra": e})]
        base = req.marker is None or req.marker.evaluate({**env, "extra": ""})
        if req.name != DISTRIBUTION and (wanted or base):
            roots.append((req, DISTRIBUTION if base else f"{DISTRIBUTION}[{wanted[0]}]"))
    pins = pin_here(roots, env) if target.is_here else pin_from_index(roots, target)
    pins = arch_pinned(pins, arch)
    how = (
        f"the versions of the venv it was built from (Python {platform.python_version()})"
        if target.is_here
        else f"the newest wheels for CPython {target.python}, manylinux glibc <= "
        f"{profile.os.glibc}, no newer than the venv it was built from"
    )
    head = [
        f"# eclm edge bundle: packages for profile {profile.name} ({profile.title}), {arch},",
        f"# Python {target.python} ({profile.os.image}: Python {profile.os.python}, glibc "
        f"{profile.os.glibc}).",
        f"# Backends in the profile's order: {', '.join(profile.backends)}; packages for "
        f"{'executorch and litert' if len(extras) > 1 else 'litert'}.",
        f"# Pinned to {how}.",
        *(f"# {line}" for line in WHEEL_NOTES[arch]),
    ]
    main = [line for name, line in pins if name not in NO_DEPS]
    nodeps = [line for name, line in pins if name in NO_DEPS]
    text = "\n".join(head + main) + "\n"
    if not nodeps:
        return text, None
    note = "# Installed after requirements.txt (torch first), without dependencies (DESIGN.md 6)."
    return text, "\n".join([note, *nodeps]) + "\n"


def _wheel_requires(wheel: Path) -> list[str]:
    import zipfile
    from email.parser import HeaderParser

    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(zf.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def _render(template: str, values: dict[str, str]) -> bytes:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text.encode()


def _edge_env(spec: BundleSpec, profile: DeviceProfile, arch: str, broker: str, store: str) -> str:
    built = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return (
        f"# The eclm edge agent of device {spec.device_id}: read by eclm-edge.service\n"
        f"# (EnvironmentFile=) and bin/run.sh. Built {built} for profile {profile.name}\n"
        f"# ({profile.title}, {arch}). The password is in credentials.env.\n"
        f"ECLM_DEVICE_ID={spec.device_id}\n"
        f"ECLM_PROFILE=@PREFIX@/etc/profile.toml\n"
        f"ECLM_BROKER={broker}\n"
        f"ECLM_CAFILE=@PREFIX@/etc/ca.pem\n"
        f"ECLM_TRUST_KEY=@PREFIX@/etc/signing.pub\n"
        f"ECLM_STORE={store}\n"
        f'ECLM_LABELS="{" ".join(spec.labels)}"\n'
        "# Optional: ECLM_EVAL_DATA=<.npz with x, y> reports accuracy on held-out data;\n"
        "# ECLM_LITERT_DELEGATES=none runs LiteRT without XNNPACK (default: checked, then\n"
        "# used); ECLM_LATENCY_SLACK=<x> holds the health check to x times the budget.\n"
    )


def _profile_text(name_or_path: str) -> bytes:
    from device_profiles.profile import profile_path

    return profile_path(name_or_path).read_bytes()  # the file load_profile read


def _sha256sums(files: dict[str, tuple[bytes, int]]) -> bytes:
    lines = [f"{hashlib.sha256(data).hexdigest()}  {name}" for name, (data, _) in files.items()]
    return ("\n".join(sorted(lines, key=lambda line: line[66:])) + "\n").encode()


def _write_archive(out: Path, top: str, files: dict[str, tuple[bytes, int]]):
    """A tar.gz of ``files`` under ``top/``, owned by root, written atomically, mode 0600."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    now = int(time.time())
    with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
        tar.addfile(_info(top, 0, 0o755, now, tarfile.DIRTYPE))
        for directory in sorted({str(Path(n).parent) for n in files} - {"."}):
            tar.addfile(_info(f"{top}/{directory}", 0, 0o755, now, tarfile.DIRTYPE))
        for name, (data, mode) in sorted(files.items()):
            tar.addfile(_info(f"{top}/{name}", len(data), mode, now), io.BytesIO(data))
    os.replace(tmp, out)
    return tuple((name, mode, len(data)) for name, (data, mode) in sorted(files.items()))


def _info(name: str, size: int, mode: int, mtime: int, kind: bytes = tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, mode, mtime, kind
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


# --- the command --------------------------------------------------------------------------


def add_parser(edge_cmds: argparse._SubParsersAction) -> None:
    """``eclm edge bundle``, next to ``edge run`` and ``edge status``."""
    from device_profiles.profile import ARCHES

    bundle = edge_cmds.add_parser(
        "bundle",
        help="write one archive that installs the agent on a board (packages, config, "
        "credentials, systemd unit)",
        description="Build the archive a board is flashed with. On the board: tar xzf "
        "ARCHIVE && sudo sh eclm-edge-ID/install.sh (see install.sh --help).",
    )
    bundle.add_argument("--profile", required=True, help="board profile name or .toml path")
    bundle.add_argument("--device-id", required=True, help="the board's id (its broker user)")
    bundle.add_argument(
        "--broker",
        help="the broker as the board reaches it, mqtts://host:port "
        "(default: the first name in the access directory's server.pem, port 8883)",
    )
    bundle.add_argument(
        "--access",
        type=Path,
        default=Path(".eclm/access"),
        help="broker access directory (eclm broker access init); the device's user is "
        "added if missing (default: %(default)s)",
    )
    bundle.add_argument(
        "--trust-key",
        type=Path,
        default=Path("runs/keys/signing.pub"),
        help="the cloud's manifest public key (default: %(default)s)",
    )
    bundle.add_argument(
        "--arch", choices=ARCHES, help="the board's CPU (default: the profile's; uname -m)"
    )
    bundle.add_argument(
        "--python",
        metavar="X.Y",
        help="the board's CPython; requirements are pinned for it and install.sh wants it "
        "(default: the Python of the profile's OS image)",
    )
    bundle.add_argument(
        "--label",
        action="append",
        default=[],
        dest="labels",
        metavar="KEY=VALUE",
        help="a label rollouts can pick this device by; repeatable",
    )
    bundle.add_argument(
        "--store", help="artifact store on the board (default: PREFIX/var/<device-id>)"
    )
    bundle.add_argument("--wheel", type=Path, help="ship this eclm-fleet wheel (default: build)")
    bundle.add_argument("--out", type=Path, help="default: ./eclm-edge-<device-id>.tar.gz")
    bundle.set_defaults(func=_bundle)


def _bundle(args: argparse.Namespace) -> int:
    spec = BundleSpec(
        device_id=args.device_id,
        profile=args.profile,
        access_dir=args.access,
        trust_key=args.trust_key,
        broker=args.broker,
        arch=args.arch,
        python=args.python,
        labels=tuple(args.labels),
        store=args.store,
        wheel=args.wheel,
    )
    out = args.out or Path(f"eclm-edge-{args.device_id}.tar.gz")
    result = build_bundle(spec, out)
    size = result.path.stat().st_size
    print(f"wrote {result.path} ({size / 1e6:.1f} MB, mode 0600: it holds a broker password)")
    for name, mode, length in result.members:
        print(f"  {mode:04o} {length:>10,}  eclm-edge-{spec.device_id}/{name}")
    if result.added_user:
        print(
            f"added the broker user {spec.device_id} to {spec.access_dir / 'passwd'}: "
            "reload the broker (kill -HUP) before the board connects"
        )
    print(f"on the board: tar xzf {out.name} && sudo sh eclm-edge-{spec.device_id}/install.sh")
    return ExitCode.OK

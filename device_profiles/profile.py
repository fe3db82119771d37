"""Device profiles: what a board class has and what the model may use of it."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_profiles import toml
from device_profiles.errors import ProfileError

log = logging.getLogger(__name__)

BOARDS_DIR = Path(__file__).parent / "boards"
# Directories of a site's own board profiles (os.pathsep between them), searched by name
# before the shipped ones: the cloud resolves a device's reported profile name through it.
PROFILE_PATH_ENV = "ECLM_PROFILE_PATH"
KNOWN_BACKENDS = ("executorch", "litert")
ARCHES = ("aarch64", "armv7l", "x86_64")
# The CPython versions the edge side runs on (scripts/python-matrix.sh tests each).
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
GLIBC_FLOOR = (2, 17)  # manylinux2014, the oldest wheels PyPI's packages here still ship


@dataclass(frozen=True)
class Budget:
    """What the sub-model may use on the board: memory in MB (programs and activations)
    and the time an application would give one inference at batch 1."""

    model_memory_mb: float
    latency_ms: float

    @property
    def model_memory_kb(self) -> float:
        """The memory budget in KB, the unit module costs and the wire's module sets use."""
        return self.model_memory_mb * 1024


@dataclass(frozen=True)
class OsImage:
    """The OS image the profile was written for: what a bundle installs onto."""

    image: str  # e.g. "Raspberry Pi OS (64-bit) bookworm (Debian 12)"
    python: str  # its CPython, "3.11": the bundle's packages are pinned for it
    glibc: str  # its glibc, "2.36": the newest manylinux wheels it can load

    @property
    def glibc_version(self) -> tuple[int, int]:
        major, minor = self.glibc.split(".")
        return int(major), int(minor)


@dataclass(frozen=True)
class DeviceProfile:
    """One board class, validated from its TOML file."""

    name: str
    title: str
    arch: str
    ram_mb: int
    cores: int
    backends: tuple[str, ...]
    speed_factor: float
    has_battery: bool
    budget: Budget
    os: OsImage


def _fits_float(value: int | float) -> bool:
    """A finite float: TOML allows ``inf`` and ``nan`` and integers of any length."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


# field -> (type, check, what the check wants)
_POSITIVE = (lambda v: v > 0, "must be > 0")
_POSITIVE_NUMBER = (lambda v: v > 0 and _fits_float(v), "must be > 0 and a finite number")
_TOP: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "name": (str, lambda v: bool(v.strip()), "must not be empty"),
    "title": (str, lambda v: bool(v.strip()), "must not be empty"),
    "arch": (str, lambda v: v in ARCHES, f"must be one of {ARCHES}"),
    "ram_mb": (int, *_POSITIVE),
    "cores": (int, *_POSITIVE),
    "backends": (
        list,
        lambda v: bool(v) and all(b in KNOWN_BACKENDS for b in v) and len(set(v)) == len(v),
        f"must be a non-empty list of distinct names from {KNOWN_BACKENDS}",
    ),
    "speed_factor": ((int, float), *_POSITIVE_NUMBER),
    "has_battery": (bool, lambda v: True, ""),
}
_BUDGET: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "model_memory_mb": ((int, float), *_POSITIVE_NUMBER),
    "latency_ms": ((int, float), *_POSITIVE_NUMBER),
}


def _glibc_ok(value: str) -> bool:
    found = re.fullmatch(r"2\.(\d{1,3})", value)
    return bool(found) and (2, int(found.group(1))) >= GLIBC_FLOOR


_OS: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "image": (str, lambda v: bool(v.strip()), "must not be empty"),
    "python": (str, lambda v: v in PYTHONS, f"must be one of {PYTHONS}"),
    "glibc": (
        str,
        _glibc_ok,
        f"must be a glibc version 2.N, at least {'.'.join(map(str, GLIBC_FLOOR))}",
    ),
}
_TABLES = {"budget": _BUDGET, "os": _OS}


def _check(source: str, table: dict[str, Any], spec: dict, prefix: str = "") -> None:
    for key in table:
        if key not in spec and (prefix or key not in _TABLES):
            raise ProfileError(source, "unknown field", field=prefix + key)
    for key, (kind, ok, want) in spec.items():
        if key not in table:
            raise ProfileError(source, "missing", field=prefix + key)
        value = table[key]
        # bool is an int in Python; a TOML `true` must not pass as a number.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ProfileError(
                source,
                f"expected {_kind_name(kind)}, got {type(value).__name__}",
                field=prefix + key,
            )
        if not ok(value):
            raise ProfileError(source, f"{want} (got {value!r})", field=prefix + key)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def parse_profile(text: str, *, source: str = "<profile>") -> DeviceProfile:
    """Validate TOML text into a DeviceProfile; raise ProfileError naming the field."""
    try:
        data = toml.loads(text)
    except (ValueError, RecursionError) as exc:
        # TOMLDecodeError; tomllib also raises ValueError for an integer beyond Python's
        # 4,300-digit limit and RecursionError for arrays or tables nested thousands deep
        raise ProfileError(source, f"not valid TOML: {exc}") from exc
    _check(source, data, _TOP)
    for name, spec in _TABLES.items():
        if not isinstance(data.get(name), dict):
            raise ProfileError(source, f"missing table [{name}]", field=name)
        if name == "budget":
            data[name] = _legacy_budget(source, data[name])
        _check(source, data[name], spec, prefix=f"{name}.")
    budget, image = data["budget"], data["os"]
    return DeviceProfile(
        name=data["name"],
        title=data["title"],
        arch=data["arch"],
        ram_mb=data["ram_mb"],
        cores=data["cores"],
        backends=tuple(data["backends"]),
        speed_factor=float(data["speed_factor"]),
        has_battery=data["has_battery"],
        budget=Budget(float(budget["model_memory_mb"]), float(budget["latency_ms"])),
        os=OsImage(image["image"], image["python"], image["glibc"]),
    )


_warned: set[str] = set()


def _legacy_budget(source: str, table: dict[str, Any]) -> dict[str, Any]:
    """``[budget]`` with a profile's old ``model_memory_kb`` read as ``model_memory_mb``.

    Profiles written before budgets were in MB keep loading (a site's own boards, say):
    the value converts exactly and a warning, once per file, names the new key."""
    if "model_memory_kb" not in table:
        return table
    if "model_memory_mb" in table:
        raise ProfileError(
            source,
            "give model_memory_mb only (model_memory_kb is its old name)",
            field="budget.model_memory_kb",
        )
    kb = table["model_memory_kb"]
    if not isinstance(kb, int) or isinstance(kb, bool) or kb <= 0 or not _fits_float(kb):
        raise ProfileError(
            source,
            f"must be an int > 0 that fits a float (got {kb!r}); prefer model_memory_mb",
            field="budget.model_memory_kb",
        )
    if source not in _warned:
        _warned.add(source)
        log.warning(
            "%s: budget.model_memory_kb is deprecated; read as model_memory_mb = %g",
            source,
            kb / 1024,
        )
    converted = {k: v for k, v in table.items() if k != "model_memory_kb"}
    return {"model_memory_mb": kb / 1024, **converted}


def _search_dirs() -> list[Path]:
    extra = os.environ.get(PROFILE_PATH_ENV, "")
    return [Path(d) for d in extra.split(os.pathsep) if d] + [BOARDS_DIR]


def profile_path(name_or_path: str | Path) -> Path:
    """The file of a profile named ``rpi4`` (the directories of ``$ECLM_PROFILE_PATH``,
    then the shipped boards), or the ``.toml`` path given."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        return path
    found = [d / f"{name_or_path}.toml" for d in _search_dirs()]
    path = next((f for f in found if f.is_file()), None)
    if path is None:
        raise ProfileError(
            str(name_or_path), f"no such profile; known: {', '.join(profile_names())}"
        )
    return path


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a profile by name (see :func:`profile_path`) or any profile file by path."""
    path = profile_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(str(path), f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(str(path), f"not UTF-8 text (byte {exc.start})") from exc
    return parse_profile(text, source=str(path))


def profile_names() -> list[str]:
    """Names of the profiles shipped with the package and those on ``$ECLM_PROFILE_PATH``."""
    return sorted({p.stem for d in _search_dirs() for p in d.glob("*.toml")})


def list_profiles() -> list[DeviceProfile]:
    """Every shipped profile, validated."""
    return [load_profile(name) for name in profile_names()]

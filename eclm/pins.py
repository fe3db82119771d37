"""Pinning a bundle's packages for the board: its CPU, its CPython and its glibc.

Two ways, one result (``name -> "Name==version  # why"``):

- ``pin_here``: the board runs this interpreter's Python version, so each package is
  pinned to the version installed in this venv (offline; what the tests here ran).
- ``pin_from_index``: another Python (a Jetson's 3.10, Ubuntu 24.04's 3.12). pip picks,
  for that Python and the board's manylinux tags, the newest wheel no newer than this
  venv's version (so a package this venv has moves only as far as the board's Python
  needs: numpy 2.3+ dropped 3.10). pip evaluates dependency markers against the running
  interpreter, not the target, so it is asked for one level at a time (``--no-deps``)
  and the markers are evaluated here, for the board.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from eclm.errors import BundleError

NO_DEPS = {"executorch"}  # DESIGN.md section 6: installed after torch, without its deps
# Versions a CPU gets whatever this venv has: what is proven to run there. ai-edge-litert
# 2.3.0 dies (SIGSEGV) creating interpreters for fully connected programs on aarch64 under
# qemu 7.2, with or without default delegates; 2.1.6 runs every part, XNNPACK included
# (DESIGN.md section 6; scripts/arm64-check.sh). Its dependencies are 2.3.0's less
# ml_dtypes, so the pins found for the others still fit.
ARCH_PINS = {
    "aarch64": {
        "ai-edge-litert": (
            "2.1.6",
            "2.3.0 crashes under qemu aarch64; 2.1.6 runs here (scripts/arm64-check.sh)",
        )
    }
}
_MAX_ROUNDS = 12  # dependency levels; the edge extras have 4


@dataclass(frozen=True)
class Target:
    """The board as pip sees it: CPU, CPython X.Y and the glibc of its OS image."""

    arch: str
    python: str  # "3.10"
    glibc: tuple[int, int] = (2, 17)

    @property
    def is_here(self) -> bool:
        """This interpreter's Python version: the venv's own versions fit the board."""
        return self.python == "{}.{}".format(*sys.version_info[:2])

    def markers(self) -> dict[str, str]:
        """Marker values of a Linux board of this CPU running this Python."""
        here = self.is_here
        return {
            "platform_machine": self.arch,
            "platform_system": "Linux",
            "sys_platform": "linux",
            "os_name": "posix",
            "platform_python_implementation": "CPython",
            "implementation_name": "cpython",
            "python_version": self.python,
            # a profile names X.Y; X.Y.0 is the oldest the board may have
            "python_full_version": platform.python_version() if here else f"{self.python}.0",
        }

    def platforms(self) -> list[str]:
        """pip ``--platform`` tags: every manylinux glibc level the board can load."""
        major, top = self.glibc
        tags = [f"manylinux_{major}_{minor}_{self.arch}" for minor in range(top, 16, -1)]
        tags.append(f"manylinux2014_{self.arch}")
        if self.arch == "x86_64":
            tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
        return tags


def pin_here(roots, env: dict[str, str]) -> list[tuple[str, str]]:
    """(name, requirement line) for ``roots`` and everything they need on the board,
    each ``==`` the version installed here (its public part: no ``+cpu``)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins: dict[str, str] = {}
    todo = list(roots)
    while todo:
        req, why = todo.pop(0)
        name = canonicalize_name(req.name)
        if name in pins:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:  # needed there, not here: pip picks the version
            pins[name] = f"{req.name}{req.specifier}  # {why}; not installed here"
            continue
        version = Version(dist.version).public
        if not req.specifier.contains(version, prereleases=True):
            raise BundleError(f"{why} needs {req}, this venv has {dist.version}")
        local = f"; this venv has {dist.version}" if dist.version != version else ""
        pins[name] = f"{dist.metadata['Name']}=={version}  # {why}{local}"
        if name in NO_DEPS:
            continue
        for line in dist.requires or []:
            dep = Requirement(line)
            if _wanted(dep, env, req.extras):
                todo.append((dep, f"via {dist.metadata['Name']}"))
    return sorted(pins.items())


@dataclass(frozen=True)
class _Found:
    name: str  # as the index spells it
    version: str
    requires: tuple[str, ...]


def pin_from_index(roots, target: Target) -> list[tuple[str, str]]:
    """(name, requirement line) for ``roots`` and what they need, pinned for ``target``
    by asking pip (the configured index) level by level; ValueError if a package has no
    wheel for the board or the levels do not settle."""
    found: dict[str, _Found] = {}
    env = target.markers()
    for _ in range(_MAX_ROUNDS):
        wanted = _walk(roots, found, env)
        todo = {
            name: want
            for name, want in wanted.items()
            if name not in found or not want[0].specifier.contains(found[name].version, True)
        }
        if not todo:
            return sorted(_lines(wanted, found, target))
        found.update(_ask_pip(todo, target))
    raise BundleError(f"pinning for Python {target.python} did not settle in {_MAX_ROUNDS} levels")


def _wanted(dep, env: dict[str, str], extras) -> bool:
    if dep.marker is None:
        return True
    return any(dep.marker.evaluate({**env, "extra": e}) for e in ["", *sorted(extras)])


def _walk(roots, found: dict[str, _Found], env: dict[str, str]):
    """``name -> (requirement with every specifier and extra asked for, why)`` of what
    ``roots`` need through the packages found so far."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted: dict[str, tuple[Requirement, str]] = {}
    todo = list(roots)
    while todo:
        req, why = todo.pop(0)
        name = canonicalize_name(req.name)
        if name in wanted:
            known, first_why = wanted[name]
            merged = Requirement(str(known))
            merged.specifier &= req.specifier
            merged.extras |= req.extras
            if merged.specifier == known.specifier and merged.extras == known.extras:
                continue
            req, why = merged, first_why
        else:
            req = Requirement(str(req))
            req.marker = None
        wanted[name] = (req, why)
        if name in found and name not in NO_DEPS:
            for line in found[name].requires:
                dep = Requirement(line)
                if _wanted(dep, env, req.extras):
                    todo.append((dep, f"via {found[name].name}"))
    return wanted


def _ask_pip(todo, target: Target) -> dict[str, _Found]:
    """What pip would install for ``target`` of each requirement, without dependencies;
    capped at this venv's version while that cap leaves a wheel for the board."""
    capped = {name: _cap(req) for name, (req, _) in todo.items()}
    while True:
        asked = [str(capped[name] or req) for name, (req, _) in todo.items()]
        done, report = _pip_report(asked, target)
        if done.returncode == 0:
            return {_canonical(f.name): f for f in report}
        missing = set(re.findall(r"No matching distribution found for (\S+)", done.stderr))
        names = {_canonical(re.split(r"[<>=!~;\[ ]", m, maxsplit=1)[0]) for m in missing}
        uncapped = {n for n in names if capped.get(n) is not None}
        if not uncapped:
            raise BundleError(
                f"pip finds no wheels for Python {target.python} on {target.arch} "
                f"(glibc {'.'.join(map(str, target.glibc))}):\n{done.stderr[-2000:]}"
            )
        for name in uncapped:  # no wheel as old as this venv's: take the index's newest
            capped[name] = None


def _cap(req):
    """``req`` narrowed to versions no newer than this venv's, or None when this venv
    lacks the package."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        here = Version(distribution(req.name).version).public
    except PackageNotFoundError:
        return None
    narrowed = Requirement(str(req))
    narrowed.specifier &= f"<={here}"
    return narrowed


def _pip_report(asked: list[str], target: Target):
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
    cmd += ["--no-deps", "--quiet", "--only-binary=:all:", "--python-version", target.python]
    cmd += ["--implementation", "cp", *(f"--platform={tag}" for tag in target.platforms())]
    with tempfile.TemporaryDirectory(prefix="eclm-pins-") as tmp:
        report = Path(tmp) / "report.json"
        cmd += ["--target", str(Path(tmp) / "target"), "--report", str(report), *asked]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return done, []
        items = json.loads(report.read_text())["install"]
    return done, [
        _Found(
            i["metadata"]["name"],
            i["metadata"]["version"],
            tuple(i["metadata"].get("requires_dist") or ()),
        )
        for i in items
    ]


def _lines(wanted, found: dict[str, _Found], target: Target):
    from importlib.metadata import PackageNotFoundError, version

    for name, (_, why) in wanted.items():
        f = found[name]
        try:
            here = version(f.name)
        except PackageNotFoundError:
            here = None
        note = "" if here == f.version else f"; this venv has {here or 'none'}"
        yield name, f"{f.name}=={f.version}  # {why}{note}"


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def arch_pinned(pins: list[tuple[str, str]], arch: str) -> list[tuple[str, str]]:
    """``pins`` with the versions ``ARCH_PINS`` fixes for ``arch`` put in."""
    fixed = ARCH_PINS.get(arch, {})
    out = []
    for name, line in pins:
        if name in fixed:
            version, why = fixed[name]
            line = f"{line.split('==')[0]}=={version}  # {why}"
        out.append((name, line))
    return out

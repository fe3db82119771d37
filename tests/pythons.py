"""Finding the CPython interpreters this machine carries (pyenv's, or pythonX.Y)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path


def find_python(version: str) -> str | None:
    """An interpreter of CPython ``version``: pyenv's (``pyenv root``), else pythonX.Y."""
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    if shutil.which("pyenv"):
        done = subprocess.run(["pyenv", "root"], capture_output=True, text=True)
        roots.insert(0, done.stdout.strip())
    for root in filter(None, roots):
        found = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"))
        if found:
            return found[-1]
    return shutil.which(f"python{version}")

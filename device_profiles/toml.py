"""The TOML reader for this Python: the standard library's ``tomllib`` from 3.11, the
``tomli`` package (the same code, published separately) on 3.10, where the edge side
also runs (NVIDIA JetPack 6 is Ubuntu 22.04 with Python 3.10)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from tomllib import TOMLDecodeError, loads
else:  # pragma: no cover - exercised by scripts/python-matrix.sh on 3.10
    from tomli import TOMLDecodeError, loads

__all__ = ["TOMLDecodeError", "loads"]

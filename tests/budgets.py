"""Board profiles with the budget a test needs, written as TOML files the test owns: the
shipped boards' budgets are real boards' (hundreds of MB), far above the digits model, so
a test that needs memory to bind gives its own board rather than relying on them."""

from __future__ import annotations

import re
from pathlib import Path

from device_profiles.profile import BOARDS_DIR


def board_file(
    directory: Path,
    name: str,
    *,
    base: str = "rpi-zero-2w",
    memory_mb: float | None = None,
    latency_ms: float | None = None,
) -> Path:
    """``directory/name.toml``: the shipped ``base`` board renamed ``name``, with the
    budget given (the base's where None). Loadable by path, or by name on
    ``$ECLM_PROFILE_PATH``."""
    text = (BOARDS_DIR / f"{base}.toml").read_text()
    text = re.sub(r'(?m)^name = ".*"$', f'name = "{name}"', text)
    if memory_mb is not None:
        text = re.sub(r"(?m)^model_memory_mb = .*$", f"model_memory_mb = {memory_mb!r}", text)
    if latency_ms is not None:
        text = re.sub(r"(?m)^latency_ms = .*$", f"latency_ms = {float(latency_ms)!r}", text)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


# One module per layer of the digits model fits (stem, routers and head 51 KB, a module
# 81 KB with its activations: 214 KB), a second module in any layer does not (295 KB).
ONE_MODULE_PER_LAYER_MB = 0.25

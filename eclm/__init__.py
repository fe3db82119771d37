"""The ``eclm`` command: one entry point that dispatches to each role's CLI."""

from eclm.cli import main

__all__ = ["main"]

"""Errors of the device profile loader.

ProfileError(ValueError)   a profile file that is missing, unreadable or invalid
"""

from __future__ import annotations


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the field."""

    def __init__(self, source: str, reason: str, *, field: str | None = None) -> None:
        where = f"{source}: field {field!r}" if field else source
        super().__init__(f"{where}: {reason}")
        self.source = source
        self.field = field
        self.reason = reason

"""Errors of the research harness.

LabError
└── SettingsError    a scenario or experiment setting that cannot be run (names it)
"""

from __future__ import annotations


class LabError(Exception):
    """Base of every error the harness raises on purpose."""


class SettingsError(LabError, ValueError):
    """A scenario or experiment setting that cannot be run; the message names it."""

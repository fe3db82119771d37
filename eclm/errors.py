"""Errors of the ``eclm`` command's own work (bundles).

EclmError
└── BundleError      a board bundle that could not be built (wheel, pins, packages)
"""

from __future__ import annotations


class EclmError(Exception):
    """Base of every error the ``eclm`` package raises on purpose."""


class BundleError(EclmError):
    """A bundle that could not be built; the message says which step and why."""

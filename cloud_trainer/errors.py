"""Errors of the cloud trainer.

CloudError
├── ExportError      a module that could not be exported (names module and backend)
└── FleetError       a device that did not reach its desired state in time
"""

from __future__ import annotations


class CloudError(Exception):
    """Base of every error the cloud trainer raises on purpose."""


class ExportError(CloudError):
    """A module failed to export; nothing half-written is left behind."""

    def __init__(self, module: str, backend: str, reason: str) -> None:
        super().__init__(f"exporting {module} for {backend} failed: {reason}")
        self.module = module
        self.backend = backend


class FleetError(CloudError):
    """Devices did not reach the state asked of them."""

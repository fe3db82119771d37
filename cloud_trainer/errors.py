"""Errors of the cloud trainer.

CloudError
├── ExportError      a module that could not be exported (names module and backend)
├── FleetError       a device that did not reach its desired state in time
├── ConfigError      a service config file with an unknown key or a wrong type (names it)
├── StateError       the state database is locked, full, corrupt or unreachable
└── ServiceError     a service process that exited or did not get healthy (its log's end)
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


class ConfigError(CloudError, ValueError):
    """A config file the service cannot start with; the message names the key."""


class StateError(CloudError):
    """The state database failed; the message says how (locked, full, corrupt...)."""


class ServiceError(CloudError):
    """A service process started as a child exited or did not answer ``/healthz``."""

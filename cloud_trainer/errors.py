"""Errors of the cloud trainer.

CloudError
├── ExportError      a module that could not be exported (names module and backend)
├── FleetError       devices that did not reach their desired state in time
│   └── RolloutAborted   a rollout stopped by failures or an operator
├── ConfigError      a config, key or data file or a value the cloud cannot use (names it)
│   └── SelectionError   no module set fits a device's budget, or a bad label histogram
├── JobError         a training job (integration) whose processes failed
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


class RolloutAborted(FleetError):
    """A rollout was aborted; the devices it reached got their previous state."""


class ConfigError(CloudError, ValueError):
    """A config, key or data file, or a value, the cloud cannot use; the message names it."""


class SelectionError(ConfigError):
    """No module set fits the device's budget, or the label histogram is unusable."""


class StateError(CloudError):
    """The state database failed; the message says how (locked, full, corrupt...)."""


class JobError(CloudError):
    """A training job failed (a worker process raised or died); the message says which."""


class ServiceError(CloudError):
    """A service process started as a child exited or did not answer ``/healthz``."""

"""Errors of the edge runtime. Library errors are mapped to these at the boundary.

EdgeError
├── ProtocolError        a message that fails validation (names the field)
├── ArtifactError        a program file that is missing, truncated or does not match its hash
├── BackendError         a program that cannot be loaded or run
│   └── BackendUnavailable   the backend's package is not installed
└── BrokerUnreachable    the MQTT broker cannot be reached
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error the edge runtime raises on purpose."""


class ProtocolError(EdgeError, ValueError):
    """A message that fails validation. ``code`` is the short reason sent on ``events``."""

    def __init__(self, reason: str, *, field: str | None = None, code: str = "invalid") -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field
        self.code = code


class ArtifactError(EdgeError):
    """A program file that is missing, truncated or does not match its declared hash."""


class BackendError(EdgeError):
    """A program that a backend cannot load or run."""


class BackendUnavailable(BackendError):
    """The package a backend needs is not installed; the message says what to install."""


class BrokerUnreachable(EdgeError):
    """The MQTT broker refused or did not answer the connection."""

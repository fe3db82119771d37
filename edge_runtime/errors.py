"""Errors of the edge runtime. Library errors are mapped to these at the boundary.

EdgeError
├── ArtifactError        a program file that is missing, truncated or does not match its hash
│   ├── DamagedArtifact      a stored object whose bytes changed on disk (moved aside)
│   └── HashMismatch         a downloaded file whose chunks do not add up to its sha256
├── BackendError         a program that cannot be loaded or run
│   └── BackendUnavailable   the backend's package is not installed
├── ConfigError          a key, data file or setting the agent cannot use (names it)
│   └── DataError            a data set that is broken, empty, unreadable or mixed up
├── ContentError         a content server that cannot serve an artifact (MQTT takes over)
└── NotServing           asked to predict before any sub-model is active

The wire contract's errors (``ProtocolError``, ``BrokerUnreachable``) live in
:mod:`eclm_wire.errors`, shared with the cloud; they are re-exported here.
"""

from __future__ import annotations

from eclm_wire.errors import BrokerUnreachable, ProtocolError

__all__ = [
    "ArtifactError",
    "BackendError",
    "BackendUnavailable",
    "BrokerUnreachable",
    "ConfigError",
    "ContentError",
    "DamagedArtifact",
    "DataError",
    "EdgeError",
    "HashMismatch",
    "NotServing",
    "ProtocolError",
]


class EdgeError(Exception):
    """Base of every error the edge runtime raises on purpose."""


class ArtifactError(EdgeError):
    """A program file that is missing, truncated or does not match its declared hash."""


class DamagedArtifact(ArtifactError):
    """A stored object whose bytes no longer match its name; it was moved aside."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"artifact {sha256[:12]} is corrupt on disk (hash mismatch)")
        self.sha256 = sha256


class HashMismatch(ArtifactError):
    """A download whose chunks, all held, do not hash to the declared sha256."""


class BackendError(EdgeError):
    """A program that a backend cannot load or run."""


class BackendUnavailable(BackendError):
    """The package a backend needs is not installed; the message says what to install."""


class ConfigError(EdgeError, ValueError):
    """A key, data file or setting the agent cannot use; the message names it."""


class DataError(ConfigError):
    """A data set (image folder, CIFAR batches, .npz) that cannot be read as labelled
    samples; the message names the file and what is wrong with it."""


class ContentError(EdgeError):
    """A content server that refuses, lacks or keeps cutting an artifact; the message says
    which and why. The agent then fetches it over MQTT."""


class NotServing(EdgeError):
    """Asked to predict (or to read features) before any sub-model is active."""

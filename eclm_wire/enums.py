"""The wire's vocabularies, one definition each: the values are what travels.

Each is a ``str`` enum (``enum.StrEnum`` is 3.11+ and the edge runs on 3.10), so a member
compares equal to its value, encodes as it in JSON and prints as it.
"""

from __future__ import annotations

import enum


class _Words(str, enum.Enum):
    def __str__(self) -> str:
        return str(self.value)


class Phase(_Words):
    """Where a device is with its desired state (``reported.phase``)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    ACTIVE = "active"
    FAILED = "failed"


class RolloutStatus(_Words):
    """A staged rollout's state (``rollouts/{id}``, retained)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"


class EventCode(_Words):
    """Codes of what a device publishes on its ``events`` topic: why it refused a
    message (a :class:`~eclm_wire.errors.ProtocolError`'s ``code``), and what happened to
    its own work."""

    # refused messages
    INVALID = "invalid"  # a field that fails validation (the reason names it)
    MALFORMED = "malformed"  # not JSON, or a frame that does not parse
    TOO_LARGE = "too-large"
    VERSION = "version"  # a protocol version this device does not speak
    NOT_FINITE = "not-finite"
    CHUNK_HASH = "chunk-hash"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    WRONG_DEVICE = "wrong-device"
    WRONG_TARGET = "wrong-target"
    STALE_BASE = "stale-base"
    UNKNOWN_BASE = "unknown-base"
    NO_USABLE_ARTIFACT = "no-usable-artifact"
    # the device's own work
    ARTIFACT = "artifact"  # a message that named a bad chunk or artifact
    INTERNAL = "internal"  # a bug while handling a message; what was active keeps serving
    INSTALL_FAILED = "install-failed"
    SWAP_FAILED = "swap-failed"
    ARTIFACT_DAMAGED = "artifact-damaged"  # moved aside; fetched again
    TRANSFER_RETRY = "transfer-retry"  # a whole-file check failed; chunks dropped
    TRANSFER_FAILING = "transfer-failing"  # the retry budget is spent; retrying slowly
    EVENTS_SUPPRESSED = "events-suppressed"  # refusals over the bound, counted

"""Topic names and size limits of the wire contract, and the chunk framing.

Every topic sits under ``eclm/v1``; a device's topics are ``eclm/v1/devices/{id}/{kind}``.
An artifact broadcast to many devices at once travels on ``eclm/v1/artifacts/{sha256}/
chunks/{index}`` and ends with ``.../done`` (shared and content-addressed: devices read it,
only the cloud writes it). Artifact chunks travel as their sha256 followed by their bytes.
"""

from __future__ import annotations

import hashlib
import re

from eclm_wire.enums import EventCode
from eclm_wire.errors import ProtocolError

PROTOCOL_VERSION = 1
TOPIC_ROOT = "eclm/v1"
MAX_CONTROL_BYTES = 64 * 1024
MAX_TENSOR_BYTES = 4 * 1024 * 1024  # the safetensors part of an update or offer
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 128 * 1024
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
DEVICE_KINDS = (
    "desired",
    "reported",
    "status",
    "telemetry",
    "updates",
    "adapter",
    "fetch",
    "events",
    "infer",  # features for the cloud to finish (collaborative inference)
    "answer",  # the cloud's logits for them
)

SHORT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[A-Za-z0-9_.-]{0,64}$")
MAX_LABELS = 16


def check_labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    """``key=value`` labels a device carries (site, ring, owner...); ProtocolError if not."""
    if len(labels) > MAX_LABELS:
        raise ProtocolError(f"at most {MAX_LABELS} labels", field="labels")
    for label in labels:
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            raise ProtocolError(f"{str(label)[:80]!r} is not key=value", field="labels")
    return labels


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe inside a topic, else raise ProtocolError."""
    if not isinstance(device_id, str) or not SHORT_ID.fullmatch(device_id):
        raise ProtocolError(
            "must be 1-64 characters of letters, digits, '_', '.', '-'", field="device_id"
        )
    return device_id


def device_topic(device_id: str, kind: str) -> str:
    """``eclm/v1/devices/{device_id}/{kind}``."""
    if kind not in DEVICE_KINDS:
        raise ProtocolError(f"unknown device topic kind {kind!r}; known: {DEVICE_KINDS}")
    return f"{TOPIC_ROOT}/devices/{check_device_id(device_id)}/{kind}"


def chunk_topic(device_id: str, sha256: str, index: int | str = "+") -> str:
    """Where chunk ``index`` of artifact ``sha256`` travels to ``device_id``."""
    return f"{TOPIC_ROOT}/devices/{check_device_id(device_id)}/chunks/{sha256}/{index}"


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ProtocolError("must be 64 lowercase hex digits (sha256)", field="sha256")
    return sha256


def artifact_topic(sha256: str, index: int | str = "+") -> str:
    """Where chunk ``index`` of artifact ``sha256`` travels once to every device that
    asked for it together (``eclm/v1/artifacts/{sha256}/chunks/{index}``)."""
    return f"{TOPIC_ROOT}/artifacts/{_check_sha(sha256)}/chunks/{index}"


def artifact_done_topic(sha256: str) -> str:
    """Where the cloud says it sent every chunk of ``sha256`` on :func:`artifact_topic`."""
    return f"{TOPIC_ROOT}/artifacts/{_check_sha(sha256)}/done"


def artifact_subscription(sha256: str) -> str:
    """What a device listening for a broadcast of ``sha256`` subscribes to."""
    return f"{TOPIC_ROOT}/artifacts/{_check_sha(sha256)}/#"


def parse_artifact_topic(topic: str) -> tuple[str, int | None]:
    """``(sha256, chunk index)`` of a broadcast chunk, ``(sha256, None)`` of its done
    message; ProtocolError for anything else."""
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:3]) != f"{TOPIC_ROOT}/artifacts":
        raise ProtocolError(f"not an artifact topic: {topic[:200]!r}", field="topic")
    sha = _check_sha(parts[3])
    rest = parts[4:]
    if rest == ["done"]:
        return sha, None
    if len(rest) == 2 and rest[0] == "chunks":
        index = rest[1]
        if index.isascii() and index.isdigit() and len(index) <= 12 and str(int(index)) == index:
            return sha, int(index)  # one spelling per chunk: "7", never "007"
    raise ProtocolError(f"unexpected artifact topic {topic[:200]!r}", field="topic")


def pack_chunk(data: bytes) -> bytes:
    """A chunk on the wire: the sha256 of its bytes, then the bytes."""
    return hashlib.sha256(data).digest() + data


def unpack_chunk(payload: bytes) -> bytes:
    """The bytes of a chunk whose own hash matches; ProtocolError (``chunk-hash``) if not."""
    digest, data = payload[:32], payload[32:]
    if len(digest) < 32 or hashlib.sha256(data).digest() != digest:
        raise ProtocolError(
            f"chunk of {len(payload)} bytes does not match its hash", code=EventCode.CHUNK_HASH
        )
    return data


def rollout_topic(rollout_id: str) -> str:
    """``eclm/v1/rollouts/{rollout_id}`` (retained)."""
    return f"{TOPIC_ROOT}/rollouts/{check_device_id(rollout_id)}"


def rollout_abort_topic(rollout_id: str) -> str:
    """Where an operator asks the cloud to abort rollout ``rollout_id``."""
    return f"{rollout_topic(rollout_id)}/abort"


def all_devices_topic(kind: str) -> str:
    """A wildcard subscription to one kind of topic of every device."""
    if kind not in DEVICE_KINDS:
        raise ProtocolError(f"unknown device topic kind {kind!r}")
    return f"{TOPIC_ROOT}/devices/+/{kind}"


def parse_device_topic(topic: str) -> tuple[str, str, tuple[str, ...]]:
    """Split a device topic into ``(device_id, kind, rest)``; raise ProtocolError otherwise."""
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:3]) != f"{TOPIC_ROOT}/devices":
        raise ProtocolError(f"not a device topic: {topic[:200]!r}", field="topic")
    device_id, kind = check_device_id(parts[3]), parts[4]
    if kind not in DEVICE_KINDS and kind != "chunks":
        raise ProtocolError(f"unknown topic kind {kind[:40]!r}", field="topic")
    return device_id, kind, tuple(parts[5:])

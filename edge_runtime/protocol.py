"""The wire contract: topic names, message types, size limits and validation.

Control messages are JSON objects ``{"v": 1, "type": ..., <fields>}``. Every message is
checked field by field when it is built and when it is decoded; a bad one raises
:class:`ProtocolError` naming the field. Messages that carry tensors (adapter updates
and offers) are a 4-byte length, that JSON header, then the tensors as safetensors bytes.
Artifact chunks travel on their own topic as their sha256 followed by their bytes. The
cloud imports this module too, so both ends share one definition.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from edge_runtime.errors import ProtocolError

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
)
# safetensors: weights (where adapters start), not a program
FORMATS = ("pte", "tflite", "safetensors")
PHASES = ("idle", "downloading", "verifying", "installing", "active", "failed")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[A-Za-z0-9_.-]{0,64}$")
MAX_LABELS = 16
_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")
_NONCE = re.compile(r"^[0-9a-f]{16,64}$")
_PART = re.compile(r"^(stem|head|adapter|layer\d{1,3}\.(router|block\d{1,3}))$")


# --- topics -------------------------------------------------------------------------------


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
    if not isinstance(device_id, str) or not _ID.fullmatch(device_id):
        raise ProtocolError(
            "must be 1-64 characters of letters, digits, '_', '.', '-'", field="device_id"
        )
    return device_id


def device_topic(device_id: str, kind: str) -> str:
    """``eclm/v1/devices/{device_id}/{kind}``."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}; known: {DEVICE_KINDS}")
    return f"{TOPIC_ROOT}/devices/{check_device_id(device_id)}/{kind}"


def chunk_topic(device_id: str, sha256: str, index: int | str = "+") -> str:
    """Where chunk ``index`` of artifact ``sha256`` travels to ``device_id``."""
    return f"{TOPIC_ROOT}/devices/{check_device_id(device_id)}/chunks/{sha256}/{index}"


def pack_chunk(data: bytes) -> bytes:
    """A chunk on the wire: the sha256 of its bytes, then the bytes."""
    return hashlib.sha256(data).digest() + data


def unpack_chunk(payload: bytes) -> bytes:
    """The bytes of a chunk whose own hash matches; ProtocolError (``chunk-hash``) if not."""
    digest, data = payload[:32], payload[32:]
    if len(digest) < 32 or hashlib.sha256(data).digest() != digest:
        raise ProtocolError(
            f"chunk of {len(payload)} bytes does not match its hash", code="chunk-hash"
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
        raise ValueError(f"unknown device topic kind {kind!r}")
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


# --- messages -----------------------------------------------------------------------------


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_type_ok(v, inner) for v in value)
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # an integer beyond any float (JSON allows 4,300 digits)
            return False
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _out_of_range(value: Any) -> bool:
    """Whether ``value`` is a number no float holds (inf, nan, 10**400), or a list of
    numbers with one such."""
    if isinstance(value, tuple):
        return any(_out_of_range(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return not math.isfinite(value)
    except OverflowError:
        return True


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


class Message:
    """Base of the wire messages: type-checked frozen dataclasses with a JSON form."""

    type: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                if _out_of_range(value):  # 1e400 parses as inf: the type is right
                    raise ProtocolError("out of range: must be a finite number", field=f.name)
                raise ProtocolError(
                    f"expected {_hint_name(hints[f.name])}, got {type(value).__name__}",
                    field=f.name,
                )
        self.check()

    def check(self) -> None:
        """Value checks beyond types; subclasses raise ProtocolError naming the field."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v.to_dict() if isinstance(v, Message) else v for v in value]
            out[f.name] = value
        return out

    def encode(self) -> bytes:
        """The message as JSON bytes, with version and type."""
        body = {"v": PROTOCOL_VERSION, "type": self.type, **self.to_dict()}
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        if len(data) > MAX_CONTROL_BYTES:
            raise ProtocolError(
                f"message is {len(data)} bytes, limit {MAX_CONTROL_BYTES}", code="too-large"
            )
        return data

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "") -> Any:
        if not isinstance(data, dict):
            raise ProtocolError("expected a JSON object", field=where or None)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ProtocolError("unknown field", field=where + unknown[0][:40])
        kwargs = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                if f.default is not MISSING or f.default_factory is not MISSING:
                    continue
                raise ProtocolError("missing", field=where + f.name)
            value = data[f.name]
            if typing.get_origin(hints[f.name]) is tuple:
                if not isinstance(value, list):
                    raise ProtocolError("expected a list", field=where + f.name)
                inner = typing.get_args(hints[f.name])[0]
                if isinstance(inner, type) and issubclass(inner, Message):
                    value = [
                        inner.from_dict(v, where=f"{where}{f.name}[{i}].")
                        for i, v in enumerate(value)
                    ]
                value = tuple(value)
            kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except ProtocolError as exc:
            raise ProtocolError(exc.reason, field=where + (exc.field or "")) from None


class TensorMessage(Message):
    """A message with ``weights`` (safetensors bytes) sent after its JSON header."""

    weights: bytes

    def encode(self) -> bytes:
        body = {"v": PROTOCOL_VERSION, "type": self.type, **self.to_dict()}
        del body["weights"]
        header = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        if len(header) > MAX_CONTROL_BYTES:
            raise ProtocolError(
                f"header is {len(header)} bytes, limit {MAX_CONTROL_BYTES}", code="too-large"
            )
        return len(header).to_bytes(4, "big") + header + self.weights

    def tensors(self) -> bytes:
        return self.weights

    def _check_weights(self) -> None:
        if not 0 < len(self.weights) <= MAX_TENSOR_BYTES:
            raise ProtocolError(f"must be 1..{MAX_TENSOR_BYTES} bytes", field="weights")


M = TypeVar("M", bound=Message)


def decode(cls: type[M], payload: bytes | str) -> M:
    """Parse and validate one message of type ``cls``; raise ProtocolError."""
    if issubclass(cls, TensorMessage):
        if isinstance(payload, str) or len(payload) < 4:
            raise ProtocolError("expected a header length and a header", code="malformed")
        size = int.from_bytes(payload[:4], "big")
        if size > MAX_CONTROL_BYTES or len(payload) < 4 + size:
            raise ProtocolError(f"header length {size} does not fit", code="malformed")
        if len(payload) - 4 - size > MAX_TENSOR_BYTES:
            raise ProtocolError("tensors above the limit", field="weights", code="too-large")
        data = _header(cls, payload[4 : 4 + size])
        return _fits(cls.from_dict({**data, "weights": bytes(payload[4 + size :])}))
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError(
            f"message is {len(payload)} bytes, limit {MAX_CONTROL_BYTES}", code="too-large"
        )
    return _fits(cls.from_dict(_header(cls, payload)))


def _fits(message: M) -> M:
    """``message`` if it can be sent on as it is (stored, forwarded, signed): its encoding
    escapes every non-ASCII character, so a string of 4-byte characters that arrived in
    60 KB takes 180 KB again. ProtocolError (too-large) if it would not fit."""
    message.encode()
    return message


def _header(cls: type[Message], payload: bytes | str) -> dict:
    """The fields of a JSON message of type ``cls``, version and type checked."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError(
            f"message is {len(payload)} bytes, limit {MAX_CONTROL_BYTES}", code="too-large"
        )
    try:
        data = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}", code="malformed") from None
    except RecursionError:  # a few thousand brackets fit well inside the size limit
        raise ProtocolError("not JSON: nested too deeply", code="malformed") from None
    if not isinstance(data, dict):
        raise ProtocolError("expected a JSON object", code="malformed")
    version, kind = data.pop("v", None), data.pop("type", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported version {repr(version)[:40]}, expected {PROTOCOL_VERSION}",
            field="v",
            code="version",
        )
    if kind != cls.type:
        raise ProtocolError(f"expected type {cls.type!r}, got {str(kind)[:40]!r}", field="type")
    if "weights" in data:
        raise ProtocolError("unknown field", field="weights")
    return data


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _check_sha(value: str, name: str) -> None:
    if not _SHA256.fullmatch(value):
        raise ProtocolError("must be 64 lowercase hex digits (sha256)", field=name)


def _check_ts(value: float, name: str = "ts") -> None:
    if value < 0:
        raise ProtocolError("must be >= 0", field=name)


@dataclass(frozen=True)
class ArtifactRef(Message):
    """One program file, named by its sha256."""

    type: ClassVar[str] = "artifact"
    name: str
    sha256: str
    size: int
    format: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    part: str = ""  # which part of a modular sub-model; "" for a whole (fused) program

    def check(self) -> None:
        if not 0 < len(self.name) <= 128:
            raise ProtocolError("must be 1-128 characters", field="name")
        if self.part and not _PART.fullmatch(self.part):
            raise ProtocolError("must be stem, head, adapter or layerL.router|blockM", field="part")
        _check_sha(self.sha256, "sha256")
        if not 0 < self.size <= MAX_ARTIFACT_BYTES:
            raise ProtocolError(f"must be 1..{MAX_ARTIFACT_BYTES}", field="size")
        if self.format not in FORMATS:
            raise ProtocolError(f"must be one of {FORMATS}", field="format")
        if not 1024 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ProtocolError(f"must be 1024..{MAX_CHUNK_SIZE}", field="chunk_size")

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)


@dataclass(frozen=True)
class LayerModules(Message):
    """The modules one layer runs."""

    type: ClassVar[str] = "layer"
    modules: tuple[int, ...]

    def check(self) -> None:
        if not 1 <= len(self.modules) <= 64 or len(set(self.modules)) != len(self.modules):
            raise ProtocolError("must list 1-64 distinct modules", field="modules")
        if min(self.modules) < 0:
            raise ProtocolError("must be >= 0", field="modules")


@dataclass(frozen=True)
class ModuleSet(Message):
    """One sub-model the device may run, and the memory it takes."""

    type: ClassVar[str] = "module-set"
    layers: tuple[LayerModules, ...]
    memory_kb: float

    def check(self) -> None:
        if not 1 <= len(self.layers) <= 64:
            raise ProtocolError("must list 1-64 layers", field="layers")
        if self.memory_kb < 0:
            raise ProtocolError("must be >= 0", field="memory_kb")

    @property
    def selection(self) -> tuple[tuple[int, ...], ...]:
        return tuple(layer.modules for layer in self.layers)


@dataclass(frozen=True)
class DesiredState(Message):
    """What the cloud wants a device to run (retained on ``desired``)."""

    type: ClassVar[str] = "desired"
    device_id: str
    serial: int
    artifacts: tuple[ArtifactRef, ...]
    issued_at: float = field(default_factory=time.time)
    # With options, artifacts are the parts of a modular sub-model and the device picks
    # the largest option its resources allow; without, it runs one whole program.
    options: tuple[ModuleSet, ...] = ()
    target: str = ""  # the device profile it is meant for ("" = any, unsigned only)
    expires: float = 0.0  # unix time after which the device refuses it (0 = never)
    signature: str = ""  # ed25519 over the state with this field empty, hex

    def check(self) -> None:
        check_device_id(self.device_id)
        if self.serial < 0:
            raise ProtocolError("must be >= 0", field="serial")
        if not 1 <= len(self.artifacts) <= 256:
            raise ProtocolError("must list 1-256 artifacts", field="artifacts")
        _check_ts(self.issued_at, "issued_at")
        if len(self.options) > 16:
            raise ProtocolError("must list at most 16 module sets", field="options")
        if self.target and not _ID.fullmatch(self.target):
            raise ProtocolError("must be a profile name", field="target")
        if self.expires < 0:
            raise ProtocolError("must be >= 0", field="expires")
        if self.signature and not _SIGNATURE.fullmatch(self.signature):
            raise ProtocolError("must be 128 hex digits", field="signature")
        if self.options and not all(a.part for a in self.artifacts):
            raise ProtocolError(
                "every artifact of a modular sub-model needs its part", field="artifacts"
            )


@dataclass(frozen=True)
class ReportedState(Message):
    """What a device runs and how it is doing (retained on ``reported``)."""

    type: ClassVar[str] = "reported"
    device_id: str
    profile: str
    backends: tuple[str, ...]
    serial: int
    phase: str
    active: tuple[str, ...] = ()
    backend: str | None = None
    accuracy: float | None = None
    detail: str = ""
    labels: tuple[str, ...] = ()
    domain: str = ""  # the data domain the device sees now ("" before it serves)
    mix: tuple[float, ...] = ()  # the label mix of its latest labels (() before it has any)
    ts: float = field(default_factory=time.time)
    insecure: bool = False  # runs without a trust key: accepts unsigned desired states

    def check(self) -> None:
        check_device_id(self.device_id)
        check_labels(self.labels)
        if self.domain and not _ID.fullmatch(self.domain):
            raise ProtocolError("must be a short id", field="domain")
        if len(self.mix) > 1000 or any(not 0.0 <= p <= 1.0 for p in self.mix):
            raise ProtocolError("must be at most 1000 shares in [0, 1]", field="mix")
        if self.phase not in PHASES:
            raise ProtocolError(f"must be one of {PHASES}", field="phase")
        for sha in self.active:
            _check_sha(sha, "active")
        if self.accuracy is not None and not 0.0 <= self.accuracy <= 1.0:
            raise ProtocolError("must be in [0, 1]", field="accuracy")
        if len(self.detail) > 1000:
            raise ProtocolError("must be at most 1000 characters", field="detail")
        _check_ts(self.ts)


@dataclass(frozen=True)
class Status(Message):
    """Online by the device, offline by its last will (retained on ``status``)."""

    type: ClassVar[str] = "status"
    device_id: str
    online: bool
    ts: float = field(default_factory=time.time)

    def check(self) -> None:
        check_device_id(self.device_id)
        _check_ts(self.ts)


@dataclass(frozen=True)
class FetchRequest(Message):
    """A device asks for ``count`` chunks of one artifact from ``first_chunk`` on (0: all
    the rest). Devices ask for a few at a time, so a cut connection costs a few chunks."""

    type: ClassVar[str] = "fetch"
    device_id: str
    sha256: str
    first_chunk: int = 0
    count: int = 0

    def check(self) -> None:
        check_device_id(self.device_id)
        _check_sha(self.sha256, "sha256")
        if self.first_chunk < 0:
            raise ProtocolError("must be >= 0", field="first_chunk")
        if self.count < 0:
            raise ProtocolError("must be >= 0", field="count")


@dataclass(frozen=True)
class AdapterUpdate(TensorMessage):
    """A device's adapter after training on ``samples`` labelled samples of ``domain``
    and their label histogram; on ``updates``. ``nonce`` is fresh random hex per upload
    (the cloud refuses one it has seen: a replay; "" is no nonce, from older devices);
    ``epsilon`` is the differential privacy its device's uploads have spent (0: none)."""

    type: ClassVar[str] = "adapter-update"
    device_id: str
    domain: str
    base: str  # what the adapter sits on (the serial of the desired state it served)
    samples: int
    histogram: tuple[int, ...]
    weights: bytes
    ts: float = field(default_factory=time.time)
    nonce: str = ""
    epsilon: float = 0.0

    def check(self) -> None:
        check_device_id(self.device_id)
        if self.nonce and not _NONCE.fullmatch(self.nonce):
            raise ProtocolError("must be 16-64 lowercase hex digits", field="nonce")
        if self.epsilon < 0:
            raise ProtocolError("must be >= 0", field="epsilon")
        if not _ID.fullmatch(self.domain):
            raise ProtocolError("must be a short id", field="domain")
        if not _ID.fullmatch(self.base):
            raise ProtocolError("must be a short id", field="base")
        if not 0 < len(self.histogram) <= 1000 or any(n < 0 for n in self.histogram):
            raise ProtocolError("must be 1-1000 counts >= 0", field="histogram")
        if self.samples <= 0 or sum(self.histogram) != self.samples:
            raise ProtocolError("must be > 0 and the histogram's total", field="samples")
        self._check_weights()
        _check_ts(self.ts)


@dataclass(frozen=True)
class AdapterOffer(TensorMessage):
    """The cloud's aggregate of other devices' adapters for ``domain``, trained on
    ``samples`` labelled samples, for a device entering that domain; on ``adapter``,
    signed (header and tensors) like a desired state."""

    type: ClassVar[str] = "adapter-offer"
    device_id: str
    domain: str
    samples: int
    weights: bytes
    expires: float = 0.0
    signature: str = ""
    ts: float = field(default_factory=time.time)

    def check(self) -> None:
        check_device_id(self.device_id)
        if not _ID.fullmatch(self.domain):
            raise ProtocolError("must be a short id", field="domain")
        if self.samples <= 0:
            raise ProtocolError("must be > 0", field="samples")
        if self.signature and not _SIGNATURE.fullmatch(self.signature):
            raise ProtocolError("must be 128 hex digits (ed25519)", field="signature")
        self._check_weights()
        _check_ts(self.ts)


@dataclass(frozen=True)
class Event(Message):
    """Something a device or the cloud reports: a rejected message, a failed install."""

    type: ClassVar[str] = "event"
    device_id: str
    code: str
    reason: str
    topic: str = ""
    ts: float = field(default_factory=time.time)

    def check(self) -> None:
        check_device_id(self.device_id)
        if not 0 < len(self.code) <= 64:
            raise ProtocolError("must be 1-64 characters", field="code")
        if len(self.reason) > 2000 or len(self.topic) > 512:
            raise ProtocolError("too long", field="reason" if len(self.reason) > 2000 else "topic")
        _check_ts(self.ts)


ROLLOUT_STATES = ("running", "succeeded", "aborted")


@dataclass(frozen=True)
class RolloutState(Message):
    """Where a rollout stands (retained on ``rollouts/{rollout_id}``)."""

    type: ClassVar[str] = "rollout"
    rollout_id: str
    state: str
    wave: int  # 0 = canary
    devices: tuple[str, ...]  # every device the rollout targets
    updated: tuple[str, ...] = ()  # given the new state so far
    succeeded: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    reverted: tuple[str, ...] = ()
    reason: str = ""
    ts: float = field(default_factory=time.time)

    def check(self) -> None:
        check_device_id(self.rollout_id)
        if self.state not in ROLLOUT_STATES:
            raise ProtocolError(f"must be one of {ROLLOUT_STATES}", field="state")
        if self.wave < 0:
            raise ProtocolError("must be >= 0", field="wave")
        if len(self.devices) > 1000:
            raise ProtocolError("at most 1000 devices per rollout", field="devices")
        for name in ("devices", "updated", "succeeded", "failed", "reverted"):
            for device_id in getattr(self, name):
                check_device_id(device_id)
        if len(self.reason) > 2000:
            raise ProtocolError("too long", field="reason")
        _check_ts(self.ts)

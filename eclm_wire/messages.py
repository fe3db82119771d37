"""The wire's messages: desired and reported state, status, fetch requests, adapter
updates and offers, events and rollout states.

Control messages are JSON objects ``{"v": 1, "type": ..., <fields>}``, checked field by
field when built and when decoded (:mod:`eclm_wire.message`). Messages that carry tensors
(adapter updates and offers) are a 4-byte length, that JSON header, then the tensors as
safetensors bytes. Both ends import this module, so they share one definition.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import ClassVar

from eclm_wire.enums import Phase, RolloutStatus
from eclm_wire.errors import ProtocolError
from eclm_wire.message import Message, TensorMessage, _check_sha, _check_ts
from eclm_wire.topics import (
    DEFAULT_CHUNK_SIZE,
    MAX_ARTIFACT_BYTES,
    MAX_CHUNK_SIZE,
    SHORT_ID,
    check_device_id,
    check_labels,
)

# safetensors: weights (where adapters start), not a program
FORMATS = ("pte", "tflite", "safetensors")
PHASES = tuple(p.value for p in Phase)

_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")
_NONCE = re.compile(r"^[0-9a-f]{16,64}$")
_PART = re.compile(r"^(stem|head|adapter|layer\d{1,3}\.(router|shortcut|block\d{1,3}))$")
# What a modular layer may apply to its sum (the layout of a decomposed network).
ACTIVATIONS = ("none", "relu", "relu6")


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
    # How a sub-model's parts chain beyond their names: each layer's activation
    # after the sum, the pooling window from the last layer to the adapter's features, and
    # the layers with a shortcut program (the defaults are the digits model's).
    posts: tuple[str, ...] = ()
    pool: int = 2
    shortcuts: tuple[int, ...] = ()

    def check(self) -> None:
        if not 1 <= len(self.layers) <= 64:
            raise ProtocolError("must list 1-64 layers", field="layers")
        if self.memory_kb < 0:
            raise ProtocolError("must be >= 0", field="memory_kb")
        if len(self.posts) > 64 or any(post not in ACTIVATIONS for post in self.posts):
            raise ProtocolError(f"must list at most 64 of {ACTIVATIONS}", field="posts")
        if not 1 <= self.pool <= 64:
            raise ProtocolError("must be 1..64", field="pool")
        if len(set(self.shortcuts)) != len(self.shortcuts) or not all(
            0 <= layer < 64 for layer in self.shortcuts
        ):
            raise ProtocolError("must list distinct layers 0..63", field="shortcuts")

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
        if self.target and not SHORT_ID.fullmatch(self.target):
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
        if self.domain and not SHORT_ID.fullmatch(self.domain):
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
        if not SHORT_ID.fullmatch(self.domain):
            raise ProtocolError("must be a short id", field="domain")
        if not SHORT_ID.fullmatch(self.base):
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
        if not SHORT_ID.fullmatch(self.domain):
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


ROLLOUT_STATES = tuple(s.value for s in RolloutStatus)


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


def signed_bytes(message: DesiredState | AdapterOffer) -> bytes:
    """What the signature covers: the message's JSON with the signature left empty."""
    return replace(message, signature="").encode()

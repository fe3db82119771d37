"""Hypothesis strategies for the wire messages: valid instances built from the dataclass
fields, and payloads derived from them (random bytes, valid, byte-damaged, structurally
damaged, beyond the size limits, tensor frames whose header length lies)."""

from __future__ import annotations

import operator
import string

import numpy as np
from hypothesis import strategies as st
from mutations import _get, _paths, _set, dumps, mutate_bytes, mutate_json

import eclm_wire as wire
from eclm_wire.codec import tensor_bytes

HEX = "0123456789abcdef"
_ALNUM = string.ascii_letters + string.digits
_FIRST = st.sampled_from(_ALNUM)
# built, not from_regex: five times cheaper to draw, which 10,000 cases per parser notice
IDS = st.builds(operator.add, _FIRST, st.text(_ALNUM + "_.-", max_size=20)) | st.builds(
    operator.add, _FIRST, st.text(_ALNUM + "_.-", min_size=63, max_size=63)
)
SHAS = st.text(HEX, min_size=64, max_size=64)
SIGNATURES = st.text(HEX, min_size=128, max_size=128)
NONCES = st.integers(16, 64).flatmap(lambda n: st.text(HEX, min_size=n, max_size=n))
TIMES = st.floats(0, 4e9) | st.integers(0, 2**53)
TEXT = st.text(max_size=60)
LABELS = st.builds(
    "{}{}={}".format,
    _FIRST,
    st.text(_ALNUM + "_.-", max_size=31),
    st.text(_ALNUM + "_.-", max_size=64),
)
PARTS = st.sampled_from(["stem", "head", "adapter"]) | st.builds(
    "layer{}.{}".format, st.integers(0, 999), st.sampled_from(["router", "block0", "block12"])
)
LIKE = {"weight": np.zeros((3, 4), np.float32), "bias": np.zeros(3, np.float32)}


def adapter_weights(scale: float = 100) -> st.SearchStrategy[bytes]:
    """Safetensors bytes shaped like LIKE (finite, float16 on the wire), or any bytes."""
    finite = st.floats(-scale, scale, width=16)
    arrays = st.builds(
        lambda w, b: {"weight": np.array(w, np.float32).reshape(3, 4), "bias": np.array(b)},
        st.lists(finite, min_size=12, max_size=12),
        st.lists(finite, min_size=3, max_size=3),
    )
    return arrays.map(tensor_bytes) | st.binary(min_size=1, max_size=64)


def artifact_refs(parts: bool = False) -> st.SearchStrategy[wire.ArtifactRef]:
    return st.builds(
        wire.ArtifactRef,
        name=st.text(min_size=1, max_size=128),
        sha256=SHAS,
        size=st.integers(1, wire.MAX_ARTIFACT_BYTES),
        format=st.sampled_from(wire.FORMATS),
        chunk_size=st.integers(1024, wire.MAX_CHUNK_SIZE),
        part=PARTS if parts else st.just("") | PARTS,
    )


MODULE_SETS = st.builds(
    wire.ModuleSet,
    layers=st.lists(
        st.builds(
            wire.LayerModules,
            modules=st.lists(st.integers(0, 10**6), min_size=1, max_size=8, unique=True).map(tuple),
        ),
        min_size=1,
        max_size=6,
    ).map(tuple),
    memory_kb=st.floats(0, 1e9) | st.integers(0, 10**9),
)


@st.composite
def desired_states(draw, device_ids=IDS) -> wire.DesiredState:
    options = draw(st.lists(MODULE_SETS, max_size=3).map(tuple))
    refs = artifact_refs(parts=bool(options))
    return wire.DesiredState(
        device_id=draw(device_ids),
        serial=draw(st.integers(0, 2**63) | st.integers(0, 10**30)),
        artifacts=tuple(draw(st.lists(refs, min_size=1, max_size=4))),
        issued_at=draw(TIMES),
        options=options,
        target=draw(st.just("") | IDS),
        expires=draw(st.just(0.0) | TIMES),
        signature=draw(st.just("") | SIGNATURES),
    )


def reported_states(device_ids=IDS) -> st.SearchStrategy[wire.ReportedState]:
    return st.builds(
        wire.ReportedState,
        device_id=device_ids,
        profile=TEXT,
        backends=st.lists(TEXT, max_size=3).map(tuple),
        serial=st.integers(),
        phase=st.sampled_from(wire.PHASES),
        active=st.lists(SHAS, max_size=4).map(tuple),
        backend=st.none() | TEXT,
        accuracy=st.none() | st.floats(0, 1),
        detail=st.text(max_size=1000),
        labels=st.lists(LABELS, max_size=wire.MAX_LABELS).map(tuple),
        domain=st.just("") | IDS,
        mix=st.lists(st.floats(0, 1), max_size=20).map(tuple),
        ts=TIMES,
    )


def statuses(device_ids=IDS) -> st.SearchStrategy[wire.Status]:
    return st.builds(wire.Status, device_id=device_ids, online=st.booleans(), ts=TIMES)


def fetch_requests(device_ids=IDS, shas=SHAS) -> st.SearchStrategy[wire.FetchRequest]:
    return st.builds(
        wire.FetchRequest,
        device_id=device_ids,
        sha256=shas,
        first_chunk=st.integers(0, 2**40),
        count=st.integers(0, 2**40),
    )


def events(device_ids=IDS) -> st.SearchStrategy[wire.Event]:
    return st.builds(
        wire.Event,
        device_id=device_ids,
        code=st.text(min_size=1, max_size=64),
        reason=st.text(max_size=2000),
        topic=st.text(max_size=512),
        ts=TIMES,
    )


def rollout_states() -> st.SearchStrategy[wire.RolloutState]:
    ids = st.lists(IDS, max_size=8).map(tuple)
    return st.builds(
        wire.RolloutState,
        rollout_id=IDS,
        state=st.sampled_from(wire.ROLLOUT_STATES),
        wave=st.integers(0, 2**63),
        devices=ids,
        updated=ids,
        succeeded=ids,
        failed=ids,
        reverted=ids,
        reason=st.text(max_size=2000),
        ts=TIMES,
    )


@st.composite
def adapter_updates(
    draw, device_ids=IDS, histogram_size=(1, 20), scale: float = 100
) -> wire.AdapterUpdate:
    low, high = histogram_size
    histogram = draw(st.lists(st.integers(0, 10**6), min_size=low, max_size=high))
    if not any(histogram):
        histogram[0] = 1
    return wire.AdapterUpdate(
        device_id=draw(device_ids),
        domain=draw(IDS),
        base=draw(IDS),
        samples=sum(histogram),
        histogram=tuple(histogram),
        weights=draw(adapter_weights(scale)),
        ts=draw(TIMES),
        nonce=draw(st.just("") | NONCES),
        epsilon=draw(st.floats(0, 1e6) | st.integers(0, 100)),
    )


def adapter_offers(device_ids=IDS) -> st.SearchStrategy[wire.AdapterOffer]:
    return st.builds(
        wire.AdapterOffer,
        device_id=device_ids,
        domain=IDS,
        samples=st.integers(1, 2**40),
        weights=adapter_weights(),
        expires=st.just(0.0) | TIMES,
        signature=st.just("") | SIGNATURES,
        ts=TIMES,
    )


VALID = {
    wire.DesiredState: desired_states,
    wire.ReportedState: reported_states,
    wire.Status: statuses,
    wire.FetchRequest: fetch_requests,
    wire.Event: events,
    wire.RolloutState: rollout_states,
    wire.AdapterUpdate: adapter_updates,
    wire.AdapterOffer: adapter_offers,
}


def body(message: wire.Message) -> dict:
    """The JSON document of a message (for a tensor message: its header)."""
    data = {"v": wire.PROTOCOL_VERSION, "type": message.type, **message.to_dict()}
    data.pop("weights", None)
    return data


def frame(header: bytes, weights: bytes, *, length: int | None = None) -> bytes:
    """A tensor message: 4-byte header length (or a lie), header, tensors."""
    size = len(header) if length is None else length
    return size.to_bytes(4, "big") + header + weights


@st.composite
def _json_damaged(draw, messages) -> bytes:
    message = draw(messages)
    doc = draw(mutate_json(body(message)))
    text = dumps(doc, ensure_ascii=draw(st.booleans()), spaced=draw(st.booleans()))
    if isinstance(message, wire.TensorMessage):
        return frame(text, message.weights)
    return text


@st.composite
def _frame_damaged(draw, messages) -> bytes:
    """Tensor frames whose header length lies or whose tensors are empty or too large."""
    message = draw(messages)
    header = dumps(body(message))
    op = draw(st.sampled_from(["length", "empty", "huge", "at-limit", "no-header"]))
    if op == "length":
        lie = draw(st.integers(0, 2**32 - 1) | st.integers(len(header) - 8, len(header) + 8))
        return frame(header, message.weights, length=max(0, lie))
    if op == "empty":
        return frame(header, b"")
    if op == "huge":
        extra = draw(st.integers(1, 4096))
        return frame(header, b"\x00" * (wire.MAX_TENSOR_BYTES + extra))
    if op == "at-limit":
        return frame(
            header, message.weights + b"\x00" * (wire.MAX_TENSOR_BYTES - len(message.weights))
        )
    return draw(st.binary(max_size=3))


@st.composite
def _oversized(draw, messages) -> bytes:
    """A valid document grown to about MAX_CONTROL_BYTES: padded with spaces, given an
    unknown field, or with one of its strings (a text field or a name in a list) made of
    4-byte characters, which take 12 bytes each once escaped again."""
    message = draw(messages)
    doc = body(message)
    n = draw(st.integers(wire.MAX_CONTROL_BYTES - 200, wire.MAX_CONTROL_BYTES + 200))
    op = draw(st.sampled_from(["spaces", "field", "wide"]))
    strings = [p for p in _paths(doc) if isinstance(_get(doc, p), str) and p[0] != "type"]
    if op == "wide" and strings:
        path = draw(st.sampled_from(strings))
        room = max(0, n - len(dumps(doc, ensure_ascii=False))) // 4
        _set(doc, path, "\U0001f600" * room)
        text = dumps(doc, ensure_ascii=False)
    elif op == "spaces":
        text = dumps(doc) + b" " * max(0, n - len(dumps(doc)))
    else:
        text = dumps({**doc, "padding": "x" * n})
    return frame(text, message.weights) if isinstance(message, wire.TensorMessage) else text


def payloads(cls: type[wire.Message], messages=None, *, valid=1) -> st.SearchStrategy[bytes]:
    """Every kind of payload for messages of ``cls`` (or of the ``messages`` strategy);
    ``valid`` weighs the undamaged ones (handlers need some to get past their checks)."""
    messages = messages if messages is not None else VALID[cls]()
    encoded = messages.map(lambda m: m.encode())
    kinds = [
        st.binary(max_size=512),
        *[encoded] * valid,
        encoded.flatmap(mutate_bytes),
        _json_damaged(messages),
        _oversized(messages),
    ]
    if issubclass(cls, wire.TensorMessage):
        kinds.append(_frame_damaged(messages))
    return st.one_of(kinds)

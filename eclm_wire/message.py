"""The base of every wire message: a frozen dataclass checked field by field when it is
built and when it is decoded, with a JSON form; tensor messages carry safetensors bytes
after their JSON header. A bad message raises :class:`ProtocolError` naming the field.
"""

from __future__ import annotations

import functools
import json
import math
import re
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, ClassVar, TypeVar

from eclm_wire.enums import EventCode
from eclm_wire.errors import ProtocolError
from eclm_wire.topics import MAX_CONTROL_BYTES, MAX_TENSOR_BYTES, PROTOCOL_VERSION

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The field types of a message class. Resolving them parses the annotations' strings,
    which took more of a busy cloud's time than all else it does with a report: once."""
    return typing.get_type_hints(cls)


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


class Message:
    """Base of the wire messages: type-checked frozen dataclasses with a JSON form."""

    type: ClassVar[str]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
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
                f"message is {len(data)} bytes, limit {MAX_CONTROL_BYTES}", code=EventCode.TOO_LARGE
            )
        return data

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "") -> Any:
        if not isinstance(data, dict):
            raise ProtocolError("expected a JSON object", field=where or None)
        hints = _hints(cls)
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
                f"header is {len(header)} bytes, limit {MAX_CONTROL_BYTES}",
                code=EventCode.TOO_LARGE,
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
            raise ProtocolError("expected a header length and a header", code=EventCode.MALFORMED)
        size = int.from_bytes(payload[:4], "big")
        if size > MAX_CONTROL_BYTES or len(payload) < 4 + size:
            raise ProtocolError(f"header length {size} does not fit", code=EventCode.MALFORMED)
        if len(payload) - 4 - size > MAX_TENSOR_BYTES:
            raise ProtocolError(
                "tensors above the limit", field="weights", code=EventCode.TOO_LARGE
            )
        data = _header(cls, payload[4 : 4 + size])
        return _fits(cls.from_dict({**data, "weights": bytes(payload[4 + size :])}))
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError(
            f"message is {len(payload)} bytes, limit {MAX_CONTROL_BYTES}", code=EventCode.TOO_LARGE
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
            f"message is {len(payload)} bytes, limit {MAX_CONTROL_BYTES}", code=EventCode.TOO_LARGE
        )
    try:
        data = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}", code=EventCode.MALFORMED) from None
    except RecursionError:  # a few thousand brackets fit well inside the size limit
        raise ProtocolError("not JSON: nested too deeply", code=EventCode.MALFORMED) from None
    if not isinstance(data, dict):
        raise ProtocolError("expected a JSON object", code=EventCode.MALFORMED)
    version, kind = data.pop("v", None), data.pop("type", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported version {repr(version)[:40]}, expected {PROTOCOL_VERSION}",
            field="v",
            code=EventCode.VERSION,
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

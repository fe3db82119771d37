"""Tensors of collaborative inference on the wire: a device's boundary features up, the
cloud's logits down (``devices/{id}/infer`` and ``devices/{id}/answer``).

A frame is a short binary header and the zlib-compressed tensor::

    magic "ECLF" | version u8 | dtype u8 | split u8 | rank u8 | id length u8 | id (ASCII)
    | rank x dim u32 | scale f32 | zlib(tensor bytes, C order)

``int8`` frames carry ``round(x / scale)`` with one scale per tensor (``max|x| / 127``), a
quarter of float32's bytes before compression; ``float32`` frames (scale 1) carry the values
as they are (logits, or features when asked). Decoding checks every header field against
hard limits and inflates no more than the header announces, so a frame is either a valid
:class:`Frame` or a :class:`ProtocolError`.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from eclm_wire.enums import EventCode
from eclm_wire.errors import ProtocolError
from eclm_wire.topics import SHORT_ID

MAGIC = b"ECLF"
VERSION = 1
DTYPES = {1: "int8", 2: "float32"}
_CODES = {name: code for code, name in DTYPES.items()}
MAX_RANK = 4
MAX_DIM = 4096
MAX_ELEMENTS = 1 << 20  # 4 MB of float32: far above a batch of boundary features
MAX_FRAME_BYTES = 1 << 21  # what a frame may weigh on the wire (compressed)
_FIXED = struct.Struct(">4sBBBBB")


@dataclass(frozen=True)
class Frame:
    """One tensor with the request it belongs to and the layer boundary it was cut at."""

    request_id: str
    split: int
    tensor: np.ndarray  # float32, dequantised
    dtype: str = "float32"  # how it travelled


def encode(request_id: str, split: int, tensor: np.ndarray, *, dtype: str = "int8") -> bytes:
    """``tensor`` as a frame, int8 (one scale) or float32; ProtocolError if it cannot be one."""
    if not isinstance(request_id, str) or not SHORT_ID.fullmatch(request_id):
        raise ProtocolError("must be 1-64 characters of letters, digits, '_.-'", field="id")
    if dtype not in _CODES:
        raise ProtocolError(f"must be one of {sorted(_CODES)}", field="dtype")
    x = np.ascontiguousarray(tensor, np.float32)
    _check_shape(x.shape)
    if not 0 <= split <= 255:
        raise ProtocolError("must be 0..255", field="split")
    if not np.isfinite(x).all():
        raise ProtocolError("has non-finite values", field="tensor", code=EventCode.NOT_FINITE)
    if dtype == "int8":
        peak = float(np.abs(x).max()) if x.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        body = np.clip(np.rint(x / scale), -127, 127).astype(np.int8).tobytes()
    else:
        scale, body = 1.0, x.tobytes()
    rid = request_id.encode("ascii")
    header = _FIXED.pack(MAGIC, VERSION, _CODES[dtype], split, x.ndim, len(rid)) + rid
    header += struct.pack(f">{x.ndim}I", *x.shape) + struct.pack(">f", scale)
    frame = header + zlib.compress(body, 1)  # level 1: most of the gain, a fraction of the time
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(
            f"{len(frame)} bytes, limit {MAX_FRAME_BYTES}", code=EventCode.TOO_LARGE
        )
    return frame


def decode(payload: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """The frame in ``payload``; ProtocolError (with a code) for anything else."""
    if not isinstance(payload, bytes | bytearray):
        raise ProtocolError("a frame is bytes", code=EventCode.MALFORMED)
    if len(payload) > max_bytes:
        raise ProtocolError(
            f"frame is {len(payload)} bytes, limit {max_bytes}", code=EventCode.TOO_LARGE
        )
    payload = bytes(payload)
    if len(payload) < _FIXED.size:
        raise ProtocolError("shorter than a frame header", code=EventCode.MALFORMED)
    magic, version, code, split, rank, id_len = _FIXED.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError("not a tensor frame", field="magic", code=EventCode.MALFORMED)
    if version != VERSION:
        raise ProtocolError(f"unsupported version {version}", field="v", code=EventCode.VERSION)
    if code not in DTYPES:
        raise ProtocolError(f"unknown dtype code {code}", field="dtype")
    if not 1 <= rank <= MAX_RANK:
        raise ProtocolError(f"rank {rank}, expected 1..{MAX_RANK}", field="shape")
    at = _FIXED.size
    end = at + id_len + 4 * rank + 4
    if len(payload) < end:
        raise ProtocolError("header cut short", code=EventCode.MALFORMED)
    try:
        request_id = payload[at : at + id_len].decode("ascii")
    except UnicodeDecodeError:
        request_id = ""
    if not SHORT_ID.fullmatch(request_id):
        raise ProtocolError("not a valid request id", field="id")
    at += id_len
    shape = struct.unpack_from(f">{rank}I", payload, at)
    _check_shape(shape)
    (scale,) = struct.unpack_from(">f", payload, at + 4 * rank)
    if not (math.isfinite(scale) and scale > 0):
        raise ProtocolError(f"{scale} is not a finite positive scale", field="scale")
    dtype = DTYPES[code]
    tensor = _inflate(payload[end:], shape, dtype, scale)
    return Frame(request_id, split, tensor, dtype)


def _check_shape(shape: tuple[int, ...]) -> None:
    if not 1 <= len(shape) <= MAX_RANK or not all(1 <= d <= MAX_DIM for d in shape):
        raise ProtocolError(
            f"{tuple(shape)[:8]}: rank 1..{MAX_RANK}, dims 1..{MAX_DIM}", field="shape"
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise ProtocolError(
            f"{math.prod(shape)} elements, limit {MAX_ELEMENTS}",
            field="shape",
            code=EventCode.TOO_LARGE,
        )


def _inflate(body: bytes, shape: tuple[int, ...], dtype: str, scale: float) -> np.ndarray:
    """The tensor, inflating at most the bytes the shape calls for (no zip bomb)."""
    want = math.prod(shape) * (1 if dtype == "int8" else 4)
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(body, want)
        if not inflater.eof and inflater.unconsumed_tail:  # the stream's end, or more data
            data += inflater.decompress(inflater.unconsumed_tail, 1)
    except zlib.error as exc:
        raise ProtocolError(f"body does not inflate: {exc}", code=EventCode.MALFORMED) from None
    if len(data) != want or not inflater.eof or inflater.unused_data:
        raise ProtocolError(
            f"body is not {want} bytes of {dtype} {tuple(shape)}", code=EventCode.MALFORMED
        )
    if dtype == "int8":
        tensor = np.frombuffer(data, np.int8).reshape(shape).astype(np.float32)
        with np.errstate(over="ignore"):  # a scale near float32's top: refused below
            tensor *= np.float32(scale)
    else:
        tensor = np.frombuffer(data, np.float32).reshape(shape).copy()
    if not np.isfinite(tensor).all():
        raise ProtocolError("has non-finite values", field="tensor", code=EventCode.NOT_FINITE)
    return tensor

"""The tensor codec: adapter weights as they travel, safetensors float16, and the check
every received update passes (names, shapes, dtypes, finite values, size)."""

from __future__ import annotations

import numpy as np

from eclm_wire.enums import EventCode
from eclm_wire.errors import ProtocolError
from eclm_wire.topics import MAX_TENSOR_BYTES


def tensor_bytes(weights: dict[str, np.ndarray]) -> bytes:
    """Weights as they travel: safetensors, float16."""
    from safetensors.numpy import save

    return save({k: np.asarray(v, np.float16) for k, v in weights.items()})


def load_tensors(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of safetensors bytes up to ``MAX_TENSOR_BYTES``; ProtocolError (with a
    code) for more bytes or bytes numpy cannot load."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if len(data) > MAX_TENSOR_BYTES:
        raise ProtocolError(
            f"update is {len(data)} bytes, limit {MAX_TENSOR_BYTES}", code=EventCode.TOO_LARGE
        )
    try:
        return load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise ProtocolError(f"not a safetensors update: {exc}", code=EventCode.MALFORMED) from None
    except KeyError as exc:  # a dtype safetensors knows and numpy lacks (BF16, F8_E4M3...)
        raise ProtocolError(
            f"not a safetensors update: dtype {exc} unknown", code=EventCode.MALFORMED
        ) from None


def check_update(data: bytes, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of a safetensors update as float32, if they have exactly ``like``'s
    names and shapes, are float16 or float32 and all finite; ProtocolError (with a code)
    otherwise."""
    weights = load_tensors(data)
    if set(weights) != set(like):
        raise ProtocolError(
            f"expected tensors {sorted(like)}, got {sorted(weights)}", field="update"
        )
    for key, value in weights.items():
        if value.shape != like[key].shape or value.dtype not in (np.float16, np.float32):
            raise ProtocolError(
                f"expected float16/32 {like[key].shape}, got {value.dtype} {value.shape}",
                field=key,
            )
        if not np.isfinite(value).all():
            raise ProtocolError("has non-finite values", field=key, code=EventCode.NOT_FINITE)
    return {key: value.astype(np.float32) for key, value in weights.items()}

"""Ways to damage valid input: at the byte level (truncate, flip, insert, delete, repeat),
at the structure level (remove, add, retype fields; huge, negative and non-finite numbers;
deep nesting; strings and lists beyond the limits), and emitters of JSON and TOML that
can also write what their libraries refuse to (NaN, 5,000-digit numbers, 10,000 brackets).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from hypothesis import strategies as st

import eclm_wire as wire


class Raw:
    """Text put into an emitted document verbatim (what json.dumps cannot produce)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:30]!r}{'...' if len(self.text) > 30 else ''} of {len(self.text)})"


def _nest(depth: int, opener: str, closer: str, inner: str = "0") -> Raw:
    return Raw(opener * depth + inner + closer * depth)


RAW_VALUES = st.one_of(
    st.integers(1, 20_000).map(lambda d: _nest(d, "[", "]")),
    st.integers(1, 20_000).map(lambda d: _nest(d, '{"a":', "}")),
    st.integers(4_200, 6_000).map(lambda n: Raw("9" * n)),  # past Python's int digit limit
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0"]).map(Raw),
    st.sampled_from(['"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', "tru", "nul", "[1,]"]).map(Raw),
)

EDGE_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**31, 2**31 - 1, 2**53 + 1, 2**63, 2**64, -(2**63), 10**308, 10**309, 10**400]
    + [0.5, -0.0, 1e-300, 5e-324, 1.7976931348623157e308, -1e308]
)

EDGE_STRINGS = st.one_of(
    st.sampled_from(
        ["", " ", "\n", "a\n", "\na", "a\x00", "NaN", "inf", "-Infinity", "1e400", "0x10", "+"]
        + ["#", "/", "..", "a/b", "é", "\u202e", "\ud7ff", "\U0001f600", "ab" * 32 + "\n"]
    ),
    st.text(max_size=40),
    # strings at and beyond the size limits of control messages
    st.integers(wire.MAX_CONTROL_BYTES - 64, wire.MAX_CONTROL_BYTES + 64).map(lambda n: "x" * n),
    st.integers(1, 30_000).map(lambda n: "\U0001f600" * n),  # 4 bytes raw, 12 escaped
    st.integers(60, 4_000).map(lambda n: "a" * n),
)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    EDGE_NUMBERS,
    st.floats(),  # NaN and infinities included: emitted as bare NaN / Infinity
    EDGE_STRINGS,
)

JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

NASTY = st.one_of(
    JSON_VALUES,
    RAW_VALUES,
    st.integers(900, 20_000).map(lambda n: [0] * n),  # lists beyond the limits
    st.integers(1, 2_000).map(lambda n: ["dev-1"] * n),
    st.integers(1, 70).map(lambda d: _nested_list(d)),
)


def _nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# --- JSON -----------------------------------------------------------------------------------

_MARK = re.compile(r'"\\u0000RAW(\d+)\\u0000"')


def dumps(value: Any, *, ensure_ascii: bool = True, spaced: bool = False) -> bytes:
    """JSON bytes of ``value``; NaN and infinities as bare words, Raw values verbatim."""
    raws: list[str] = []

    def mark(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [mark(x) for x in v]
        return v

    separators = (", ", ": ") if spaced else (",", ":")
    # control characters are escaped either way, so the raw markers survive as \u0000
    text = json.dumps(mark(value), separators=separators, allow_nan=True, ensure_ascii=ensure_ascii)
    text = _MARK.sub(lambda m: raws[int(m.group(1))], text)
    return text.encode("utf-8", "surrogatepass")


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place inside a JSON value: tuples of keys and indexes."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:50]):
            out += _paths(v, (*prefix, i))
    return out


def _get(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def _set(root: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    _get(root, path[:-1])[path[-1]] = new
    return root


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _tweak(draw, old: Any) -> Any:
    """A value near ``old``: off by one, scaled, negated, retyped, stretched."""
    if isinstance(old, bool):
        return draw(st.sampled_from([not old, int(old), str(old).lower(), None]))
    if isinstance(old, int | float):
        try:
            as_float = float(old)
        except OverflowError:  # an integer beyond any float
            as_float = math.inf
        choices = [old + 1, old - 1, -old, old * 10**20, as_float, str(old), [old], None]
        choices += [math.nan, math.inf, -math.inf, Raw(f"{old}e400"), Raw(str(old) * 300)]
        return draw(st.sampled_from(choices))
    if isinstance(old, str):
        return draw(
            st.sampled_from(
                [old + "\n", old.upper(), old[:-1], old + old, old * 2000, old + "é", " " + old]
                + [old.encode().hex(), [old], {"s": old}, len(old), old.replace("-", "/")]
            )
        )
    if isinstance(old, list):
        return draw(
            st.sampled_from([[], old + old, old * 200, old[:-1], old[::-1], {"x": old}, old[:1]])
        )
    if isinstance(old, dict):
        return draw(st.sampled_from([[], {}, list(old.values()), [old], {"x": old}]))
    return draw(NASTY)


@st.composite
def mutate_json(draw, value: Any, *, max_ops: int = 3) -> Any:
    """``value`` (a JSON document) after 1..max_ops structural changes."""
    value = _copy(value)
    for _ in range(draw(st.integers(1, max_ops))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths))
        target = _get(value, path)
        op = draw(st.sampled_from(["remove", "add", "retype", "tweak", "nasty", "wrap"]))
        if op == "remove" and path:
            parent = _get(value, path[:-1])
            del parent[path[-1]]
        elif op == "add" and isinstance(target, dict | list):
            key = draw(
                st.sampled_from(["x", "v", "type", "weights", "signature", "__proto__"])
                | st.sampled_from(sorted(k for k in target if isinstance(target, dict)) or ["y"])
                | st.text(max_size=8)
            )
            new = draw(NASTY)
            if isinstance(target, dict):
                target[key] = new
            else:
                target.insert(draw(st.integers(0, len(target))), new)
        elif op == "tweak":
            value = _set(value, path, _tweak(draw, target))
        elif op == "wrap":
            value = _set(value, path, draw(st.sampled_from([[target], {"v": target}])))
        else:  # retype / nasty
            value = _set(value, path, draw(NASTY))
    return value


# --- bytes ----------------------------------------------------------------------------------

TOKENS = [b"[", b"]", b"{", b"}", b'"', b"\\", b",", b":", b"NaN", b"Infinity", b"1e400", b"-"]
TOKENS += [b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"9" * 30, b"\n", b"="]


@st.composite
def mutate_bytes(draw, data: bytes, *, max_ops: int = 3) -> bytes:
    """``data`` after 1..max_ops byte-level changes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "repeat", "token"]))
        at = draw(st.integers(0, len(out)))
        if op == "truncate":
            del out[at:]
        elif op == "flip" and out:
            i = min(at, len(out) - 1)
            out[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 64))]
        elif op == "repeat":
            end = min(len(out), at + draw(st.integers(1, 64)))
            out[at:at] = bytes(out[at:end]) * draw(st.integers(1, 2_000))
        else:
            out[at:at] = draw(st.sampled_from(TOKENS)) * draw(st.integers(1, 3))
    return bytes(out)


# --- TOML -----------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """One TOML value: NaN and infinities as nan/inf, Raw verbatim, tables inline."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return '""'  # TOML has no null; an empty string is the nearest wrong value
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes, plus DEL, which TOML wants escaped too)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_dumps(doc: dict) -> str:
    """A TOML document: scalars first, then one [table] per dict value."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"\n[{toml_key(k)}]")
            lines += [f"{toml_key(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"

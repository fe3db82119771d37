"""Every parser of what arrives from the network or lies on disk, fed malformed, truncated
and oversized input: each returns a valid object (messages re-encode to an equal one) or
raises its package's own error, within a deadline. ``ECLM_FUZZ_CASES`` sets the cases
per parser (200 here; scripts/fuzz.sh runs 10,000)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import random
import re
import tempfile
import typing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fuzzkit import FUZZ, NOWHERE, fresh_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from messages import IDS, LIKE, SHAS, TIMES, VALID, artifact_refs, desired_states, payloads
from mutations import EDGE_STRINGS, RAW_VALUES, Raw, dumps, mutate_bytes, mutate_json, toml_dumps

import eclm_wire as wire
from cloud_trainer.errors import ConfigError, StateError
from cloud_trainer.export.plan import Target
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.rollout import Rollout, RolloutPlan
from cloud_trainer.service.config import ServiceConfig, example, load_config
from device_profiles import DeviceProfile, ProfileError, load_profile
from device_profiles import toml as tomllib
from device_profiles.profile import ARCHES, BOARDS_DIR, KNOWN_BACKENDS, PYTHONS
from eclm_wire import features
from eclm_wire.codec import check_update
from eclm_wire.errors import ProtocolError
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore, sha256_bytes
from edge_runtime.errors import ArtifactError
from edge_runtime.trust import Gate, load_public_key

WIRE_CODES = {"malformed", "invalid", "version", "too-large", "chunk-hash", "not-finite"}
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="eclm-fuzz-") as root:
        yield Path(root)


def check_refusal(exc: ProtocolError) -> None:
    """A refusal says what is wrong in a bounded message, with a code an event can carry."""
    assert exc.code in WIRE_CODES, exc.code
    assert 0 < len(str(exc)) <= 1000, str(exc)[:200]


def check_documented_ids(message: wire.Message) -> None:
    """Accepted identifiers are exactly what the contract documents (no trailing newline)."""
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name in ("device_id", "rollout_id", "base") or (
            f.name in ("domain", "target") and value
        ):
            assert ID.fullmatch(value), (f.name, value)
        if f.name in ("sha256", "active"):
            for sha in value if isinstance(value, tuple) else (value,):
                assert HEX64.fullmatch(sha), (f.name, sha)
        if f.name in ("devices", "updated", "succeeded", "failed", "reverted"):
            assert all(ID.fullmatch(d) for d in value), (f.name, value)
        if f.name == "signature" and value:
            assert re.fullmatch(r"[0-9a-f]{128}", value), value
        if f.name == "artifacts":
            for ref in value:
                check_documented_ids(ref)


# --- messages -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_decode_gives_an_equal_message_or_a_protocol_error(fuzz, cls):
    rec = fuzz(f"decode {cls.__name__}", ProtocolError)

    @FUZZ
    @given(payload=payloads(cls))
    def case(payload):
        outcome = rec.call(wire.decode, cls, payload)
        if not outcome.accepted:
            check_refusal(outcome.error)
            return
        message = outcome.value
        assert type(message) is cls
        check_documented_ids(message)
        assert wire.decode(cls, message.encode()) == message

    case()
    rec.assert_both_outcomes()


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_every_valid_message_decodes_to_itself(cls):
    @settings(FUZZ, max_examples=min(FUZZ.max_examples, 1000))  # checks the generators only
    @given(message=VALID[cls]())
    def case(message):
        assert wire.decode(cls, message.encode()) == message

    case()


CHUNKS = st.binary(max_size=2048).map(wire.pack_chunk)


def test_unpack_chunk_gives_bytes_matching_their_hash_or_chunk_hash(fuzz):
    rec = fuzz("unpack_chunk", ProtocolError)

    @FUZZ
    @given(
        payload=st.one_of(
            st.binary(max_size=300),
            CHUNKS,
            CHUNKS.flatmap(mutate_bytes),
            st.integers(wire.MAX_CHUNK_SIZE - 8, wire.MAX_CHUNK_SIZE + 64).map(
                lambda n: wire.pack_chunk(b"\x01" * n)
            ),
        )
    )
    def case(payload):
        outcome = rec.call(wire.unpack_chunk, payload)
        if outcome.accepted:
            assert outcome.value == payload[32:]
            assert hashlib.sha256(outcome.value).digest() == payload[:32]
        else:
            assert outcome.error.code == "chunk-hash"

    case()
    rec.assert_both_outcomes()


@st.composite
def topics(draw) -> str:
    kind = draw(st.sampled_from([*wire.DEVICE_KINDS, "chunks"]))
    device = draw(IDS)
    if kind == "chunks":
        topic = wire.chunk_topic(device, draw(SHAS), draw(st.integers(0, 10**6)))
    else:
        topic = wire.device_topic(device, kind)
    if draw(st.booleans()):
        return topic
    parts = topic.split("/")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(parts)))
        op = draw(st.sampled_from(["replace", "delete", "insert", "join"]))
        if op == "replace" and at < len(parts):
            parts[at] = draw(EDGE_STRINGS | st.sampled_from(["+", "#", "", "chunks", "v2"]))
        elif op == "delete" and at < len(parts):
            del parts[at]
        elif op == "insert":
            parts.insert(at, draw(EDGE_STRINGS))
        else:
            parts = ["/".join(parts)]
    return "/".join(parts)


def test_parse_device_topic_splits_what_it_accepts_exactly(fuzz):
    rec = fuzz("parse_device_topic", ProtocolError)

    @FUZZ
    @given(topic=st.text(max_size=200) | topics())
    def case(topic):
        outcome = rec.call(wire.parse_device_topic, topic)
        if not outcome.accepted:
            assert outcome.error.field == "topic" or outcome.error.field == "device_id"
            return
        device_id, kind, rest = outcome.value
        assert ID.fullmatch(device_id), device_id
        assert kind in (*wire.DEVICE_KINDS, "chunks")
        assert "/".join([wire.TOPIC_ROOT, "devices", device_id, kind, *rest]) == topic

    case()
    rec.assert_both_outcomes()


@st.composite
def artifact_topics(draw) -> str:
    """Shared artifact topics, as they are or with a level replaced, dropped or added."""
    sha = draw(st.sampled_from(["ab" * 32, "AB" * 32, "ab" * 31, "g" * 64]))
    topic = draw(
        st.sampled_from([wire.artifact_topic("ab" * 32, 0), wire.artifact_done_topic("ab" * 32)])
    ).replace("ab" * 32, sha)
    parts = topic.split("/")
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(parts)))
        if at < len(parts) and draw(st.booleans()):
            parts[at] = draw(EDGE_STRINGS | st.sampled_from(["+", "#", "", "done", "chunks", "7"]))
        else:
            parts.insert(at, draw(EDGE_STRINGS))
    return "/".join(parts)


def test_parse_artifact_topic_takes_only_chunks_and_done_of_a_sha256(fuzz):
    rec = fuzz("parse_artifact_topic", ProtocolError)

    @FUZZ
    @given(topic=st.text(max_size=200) | artifact_topics())
    def case(topic):
        outcome = rec.call(wire.parse_artifact_topic, topic)
        if not outcome.accepted:
            assert outcome.error.field in ("topic", "sha256")
            return
        sha, index = outcome.value
        if index is None:
            assert topic == wire.artifact_done_topic(sha)
        else:
            assert topic == wire.artifact_topic(sha, index) and index >= 0

    case()
    rec.assert_both_outcomes()


# --- safetensors updates ----------------------------------------------------------------------

DTYPES = ["F16", "F32", "F64", "BF16", "F8_E4M3", "F8_E5M2", "I8", "U8", "I32", "I64", "U64"]
DTYPES += ["BOOL", "C64", "F4", "F6_E2M3", "E8M0", "f32", "", "F32 ", "float32"]


@st.composite
def tensors(draw) -> bytes:
    from safetensors.numpy import save

    out = {}
    for name, like in LIKE.items():
        dtype = draw(st.sampled_from([np.float16, np.float32]))
        values = draw(
            st.lists(
                st.floats(width=16) | st.floats(-1e3, 1e3, width=16),
                min_size=like.size,
                max_size=like.size,
            )
        )
        out[name] = np.array(values, dtype).reshape(like.shape)
    return save(out)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict | bytes, body: bytes, *, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else dumps(header)
    text += b" " * (-len(text) % 8)
    n = len(text) if length is None else length
    return n.to_bytes(8, "little") + text + body


@st.composite
def damaged_tensors(draw) -> bytes:
    header, body = _split(draw(tensors()))
    names = sorted(k for k in header if k != "__metadata__")
    op = draw(
        st.sampled_from(["dtype", "shape", "offsets", "json", "length", "body", "extra", "meta"])
    )
    name = draw(st.sampled_from(names))
    if op == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(DTYPES))
    elif op == "shape":
        header[name]["shape"] = draw(
            st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 3, 4, 2**63]), max_size=4)
        )
    elif op == "offsets":
        header[name]["data_offsets"] = draw(
            st.lists(st.integers(-1, 2**64 - 1) | st.integers(0, len(body) + 8), max_size=3)
        )
    elif op == "json":
        header = draw(mutate_json(header))
    elif op == "length":
        lie = draw(st.integers(0, 2**64 - 1) | st.integers(0, 400))
        return _join(header, body, length=lie)
    elif op == "body":
        body = draw(mutate_bytes(body) | st.integers(0, 2**20).map(lambda n: body + b"\x00" * n))
    elif op == "extra":
        header["extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
        body += b"\x00\x00\x80\x7f"  # +inf
    else:
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers())
        )
    return _join(header, body)


def test_check_update_gives_finite_float32_of_the_heads_shape_or_a_protocol_error(fuzz):
    from safetensors.numpy import load

    rec = fuzz("check_update (safetensors)", ProtocolError)

    @FUZZ
    @given(
        data=st.one_of(
            st.binary(max_size=256),
            st.binary(max_size=64).map(lambda b: len(b).to_bytes(8, "little") + b),
            tensors(),
            tensors().flatmap(mutate_bytes),
            damaged_tensors(),
            st.integers(1, 4096).map(lambda n: _join({}, b"\x00" * (4 * 1024 * 1024 + n))),
        )
    )
    def case(data):
        outcome = rec.call(check_update, data, LIKE)
        if not outcome.accepted:
            assert outcome.error.code in WIRE_CODES
            assert len(str(outcome.error)) <= 1000
            return
        weights = outcome.value
        assert set(weights) == set(LIKE)
        raw = load(data)
        for name, like in LIKE.items():
            assert weights[name].shape == like.shape and weights[name].dtype == np.float32
            assert np.isfinite(weights[name]).all()
            assert np.array_equal(weights[name], raw[name].astype(np.float32))  # nothing lost

    case()
    rec.assert_both_outcomes()


# --- the device's files -------------------------------------------------------------------


GOOD = wire.DesiredState(
    device_id="pi-1",
    serial=5,
    artifacts=(wire.ArtifactRef(name="m.tflite", sha256="ab" * 32, size=3000, format="tflite"),),
)


@st.composite
def trust_files(draw) -> bytes | None:
    record = {"serial": draw(st.integers(-5, 2**64) | st.integers()), "digest": draw(SHAS)}
    return draw(
        st.none()
        | st.just(dumps(record))
        | st.binary(max_size=128)
        | mutate_json(record).map(dumps)
        | st.just(dumps(record)).flatmap(mutate_bytes)
    )


def test_the_gate_reads_any_trust_file_and_never_goes_below_the_active_serial(fuzz, scratch):
    rec = fuzz("trust.json (Gate)", ())

    @FUZZ
    @given(content=trust_files(), floor=st.integers(-1, 100))
    def case(content, floor):
        path = fresh_dir(scratch) / "trust.json"
        if content is not None:
            path.write_bytes(content)
        gate = rec.call(Gate, None, path, "rpi4", floor=floor).value
        assert isinstance(gate.serial, int) and isinstance(gate.digest, str)
        assert gate.serial >= floor  # the state served is never replayed over
        try:  # strict UTF-8 like read_text(); json.loads(bytes) would let surrogates pass
            data = json.loads(content.decode("utf-8"))
            written = int(data["serial"]), data["digest"]
        except Exception:  # what the file says, if it says anything usable
            written = None
        if written and written[0] >= floor and isinstance(written[1], str):
            assert (gate.serial, gate.digest) == written  # a good file loses nothing
        elif (gate.serial, gate.digest) == (floor, ""):
            rec.refused("fell back to the active serial")
        assert gate.check(replace(GOOD, serial=gate.serial + 1)) is False
        if gate.serial >= 0:
            with pytest.raises(ProtocolError) as refused:
                gate.check(replace(GOOD, serial=gate.serial, issued_at=1.0))
            assert refused.value.code == "replayed"

    case()
    rec.assert_both_outcomes()


ARTIFACT = random.Random(0).randbytes(3584)  # 4 chunks of 1024, the last one short
ARTIFACT_REF = wire.ArtifactRef(
    name="a.tflite",
    sha256=sha256_bytes(ARTIFACT),
    size=len(ARTIFACT),
    format="tflite",
    chunk_size=1024,
)


def _chunk(i: int) -> bytes:
    return ARTIFACT[i * 1024 : (i + 1) * 1024]


def test_a_download_resumes_from_any_journal_keeping_only_chunks_that_match(fuzz, scratch):
    rec = fuzz("chunk journal (Download)", ArtifactError)

    @FUZZ
    @given(
        written=st.sets(st.integers(0, 3)),
        damage=st.sampled_from(["none", "journal", "part", "both"]),
        data=st.data(),
    )
    def case(written, damage, data):
        store = ArtifactStore(fresh_dir(scratch))
        download = store.download(ARTIFACT_REF)
        for i in sorted(written):
            download.add(i, _chunk(i))
        if damage in ("journal", "both") and download.journal.exists():
            junk = data.draw(
                mutate_bytes(download.journal.read_bytes())
                | st.sampled_from(["²:ab\n", "99999999999999999999:x\n", "-1:x\n", "1:\n"]).map(
                    str.encode
                )
                | st.binary(max_size=64)
            )
            download.journal.write_bytes(junk)
        if damage in ("part", "both") and download.part.exists():
            download.part.write_bytes(data.draw(mutate_bytes(download.part.read_bytes())))
        outcome = rec.call(store.download, ARTIFACT_REF)
        if not outcome.accepted:
            return
        resumed = outcome.value
        assert resumed.received <= written
        for i in resumed.received:  # nothing damaged is kept
            with open(resumed.part, "rb") as fh:
                fh.seek(i * 1024)
                assert fh.read(len(_chunk(i))) == _chunk(i)
        if damage == "none":
            assert resumed.received == written  # nothing intact is lost
        elif resumed.received != written:
            rec.refused("resumed without damaged chunks")
        for i in resumed.missing():
            resumed.add(i, _chunk(i))
        resumed.finish()
        assert store.read(ARTIFACT_REF.sha256) == ARTIFACT

    case()


def test_a_damaged_stored_artifact_is_refused_on_read(fuzz, scratch):
    rec = fuzz("artifact store read", ArtifactError)
    store = ArtifactStore(fresh_dir(scratch))

    @FUZZ
    @given(content=st.none() | st.just(ARTIFACT) | mutate_bytes(ARTIFACT))
    def case(content):
        path = store.path(ARTIFACT_REF.sha256)
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
        outcome = rec.call(store.read, ARTIFACT_REF.sha256)
        if outcome.accepted:
            assert outcome.value == ARTIFACT

    case()
    rec.assert_both_outcomes()


def _agent(store: Path) -> EdgeAgent:
    config = AgentConfig(
        device_id="pi-1",
        profile=load_profile("rpi4"),
        broker=NOWHERE,
        store_dir=store,
        backend="litert",  # the rpi4 profile would try ExecuTorch too, which imports torch
        insecure=True,
    )
    return EdgeAgent(config)


def test_an_agent_starts_from_any_active_and_trust_file(fuzz, scratch):
    rec = fuzz("active.json (EdgeAgent start)", ())

    @FUZZ
    @given(
        active=payloads(wire.DesiredState, desired_states(device_ids=st.just("pi-1"))),
        trust=trust_files(),
    )
    def case(active, trust):
        store = fresh_dir(scratch)
        (store / "active.json").write_bytes(active)
        if trust is not None:
            (store / "trust.json").write_bytes(trust)
        agent = rec.call(_agent, store).value
        try:
            saved = wire.decode(wire.DesiredState, active)
        except ProtocolError:
            saved = None
            rec.refused("unreadable active.json")
        assert agent.gate.floor == (saved.serial if saved else -1)
        assert agent.gate.serial >= agent.gate.floor
        agent._restore()  # its artifacts are not in the store: nothing to serve, no error
        assert agent.runner is None
        # A readable state whose parts are missing is fetched again (the self-healing store).
        assert agent.report.phase in (("idle", "downloading") if saved else ("idle",))

    case()
    rec.assert_both_outcomes()


@st.composite
def pem_files(draw, pem: bytes) -> bytes:
    lines = pem.splitlines()
    der = base64.b64decode(b"".join(lines[1:-1]))
    op = draw(st.sampled_from(["bytes", "der", "random"]))
    if op == "bytes":
        return draw(mutate_bytes(pem))
    if op == "der":
        body = base64.encodebytes(draw(mutate_bytes(der)))
        return lines[0] + b"\n" + body + lines[-1] + b"\n"
    return draw(st.binary(max_size=200))


def test_the_trust_key_file_is_an_ed25519_key_or_a_value_error(fuzz, scratch):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    rec = fuzz("trust key (PEM)", ValueError)
    pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    path = fresh_dir(scratch) / "signing.pub"

    @FUZZ
    @given(content=st.just(pem) | pem_files(pem))
    def case(content):
        path.write_bytes(content)
        outcome = rec.call(load_public_key, path)
        if outcome.accepted:
            assert isinstance(outcome.value, Ed25519PublicKey)
        else:
            assert str(path) in str(outcome.error)

    case()
    rec.assert_both_outcomes()


def test_the_signing_key_file_is_an_ed25519_key_or_a_value_error(fuzz, scratch):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    from cloud_trainer.fleet.keys import load_signing_key

    rec = fuzz("signing key (PEM)", ValueError)
    pem = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    path = fresh_dir(scratch) / "signing.key"

    @FUZZ
    @given(content=st.just(pem) | pem_files(pem))
    def case(content):
        path.write_bytes(content)
        path.chmod(0o600)
        outcome = rec.call(load_signing_key, path)
        if outcome.accepted:
            assert isinstance(outcome.value, Ed25519PrivateKey)
        else:
            assert str(path) in str(outcome.error)

    case()
    rec.assert_both_outcomes()


# --- profiles and config ------------------------------------------------------------------------

TOML_RAW = st.one_of(
    RAW_VALUES,
    st.integers(1, 5_000).map(lambda d: Raw("{a=" * d + "1" + "}" * d)),
    st.sampled_from(["nan", "-inf", "+inf", "0x7fffffffffffffffff", "1979-05-27T07:32:00Z"]).map(
        Raw
    ),
    st.sampled_from(['"""a', "'''", '"\\ud800"', "[1,,2]", "{a=1,}", "1__0", "tru"]).map(Raw),
)


def profile_docs() -> st.SearchStrategy[dict]:
    shipped = [tomllib.loads(p.read_text()) for p in sorted(BOARDS_DIR.glob("*.toml"))]
    built = st.fixed_dictionaries(
        {
            "name": IDS,
            "title": st.text(min_size=1, max_size=40).filter(str.strip),
            "arch": st.sampled_from(ARCHES),
            "ram_mb": st.integers(1, 2**40),
            "cores": st.integers(1, 256),
            "backends": st.sampled_from([["litert"], ["executorch"], ["litert", "executorch"]]),
            "speed_factor": st.floats(0.01, 100) | st.integers(1, 10),
            "has_battery": st.booleans(),
            "budget": st.fixed_dictionaries(
                {
                    "model_memory_mb": st.floats(1e-3, 1e6) | st.integers(1, 2**31),
                    "latency_ms": st.floats(0.1, 1e4),
                }
            )
            | st.fixed_dictionaries(  # the old key, still read (converted to MB)
                {"model_memory_kb": st.integers(1, 2**31), "latency_ms": st.floats(0.1, 1e4)}
            ),
            "os": st.fixed_dictionaries(
                {
                    "image": st.text(min_size=1, max_size=40).filter(str.strip),
                    "python": st.sampled_from(PYTHONS),
                    "glibc": st.integers(17, 60).map(lambda minor: f"2.{minor}"),
                }
            ),
        }
    )
    return st.sampled_from(shipped) | built


@st.composite
def toml_texts(draw, docs) -> bytes:
    doc = draw(docs)
    op = draw(st.sampled_from(["valid", "bytes", "structure", "raw", "random"]))
    if op == "valid":
        return toml_dumps(doc).encode()
    if op == "bytes":
        return draw(mutate_bytes(toml_dumps(doc).encode()))
    if op == "structure":
        damaged = draw(mutate_json(doc))
        return toml_dumps(damaged if isinstance(damaged, dict) else {"name": damaged}).encode()
    if op == "raw":
        key = draw(st.sampled_from(sorted(doc)))
        return (toml_dumps({k: v for k, v in doc.items() if k != key}) + f"{key} = ").encode() + (
            draw(TOML_RAW).text.encode()
        )
    return draw(st.binary(max_size=300))


def _profile_doc(p: DeviceProfile) -> dict:
    doc = dataclasses.asdict(p)
    doc["backends"] = list(p.backends)
    return doc


def test_a_profile_file_gives_a_valid_profile_or_a_profile_error(fuzz, scratch):
    rec = fuzz("load_profile (TOML)", ProfileError)
    path = fresh_dir(scratch) / "board.toml"

    @FUZZ
    @given(text=toml_texts(profile_docs()))
    def case(text):
        path.write_bytes(text)
        outcome = rec.call(load_profile, path)
        if not outcome.accepted:
            assert str(path) in str(outcome.error)
            return
        p = outcome.value
        assert p.name.strip() and p.title.strip() and p.arch in ARCHES
        assert p.ram_mb > 0 and p.cores > 0 and p.speed_factor > 0
        assert p.backends and set(p.backends) <= set(KNOWN_BACKENDS)
        assert len(set(p.backends)) == len(p.backends)
        assert p.budget.model_memory_mb > 0 and p.budget.latency_ms > 0
        assert p.os.image.strip() and p.os.python in PYTHONS and p.os.glibc_version >= (2, 17)
        path.write_text(toml_dumps(_profile_doc(p)))
        assert load_profile(path) == p

    case()
    rec.assert_both_outcomes()


def _typed(value, hint) -> bool:
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint) and all(
            _typed(getattr(value, f.name), typing.get_type_hints(hint)[f.name])
            for f in dataclasses.fields(hint)
        )
    if typing.get_origin(hint) is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_typed(v, inner) for v in value)
    if hint is float:
        return isinstance(value, float) and not math.isnan(value)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def test_a_config_file_gives_a_typed_config_or_a_config_error(fuzz, scratch):
    rec = fuzz("load_config (TOML)", ConfigError)
    path = fresh_dir(scratch) / "cloud.toml"
    base = tomllib.loads(example())

    @FUZZ
    @given(text=toml_texts(st.just(base)))
    def case(text):
        path.write_bytes(text)
        outcome = rec.call(load_config, path)
        if not outcome.accepted:
            assert str(path) in str(outcome.error)
            return
        config = outcome.value
        assert _typed(config, ServiceConfig)
        path.write_text(toml_dumps(dataclasses.asdict(config)))
        assert load_config(path) == config

    case()
    rec.assert_both_outcomes()


# --- the cloud's rollout journal ----------------------------------------------------------


@pytest.fixture(scope="module")
def idle_coordinator(scratch):
    return FleetCoordinator(NOWHERE, ArtifactStore(fresh_dir(scratch)), client_id="fuzz-rollouts")


@st.composite
def rollout_records(draw, coordinator) -> str:
    devices = draw(st.lists(IDS, min_size=1, max_size=4, unique=True))
    targets = {
        d: Target(
            tuple(draw(st.lists(artifact_refs(), min_size=1, max_size=2))),
            profile=draw(st.just("") | IDS),
        )
        for d in devices
    }
    waves = sorted(draw(st.lists(st.floats(0.01, 1), max_size=3))) + [1.0]
    plan = RolloutPlan(
        canary=draw(st.integers(1, 5)),
        waves=tuple(waves),
        max_failure_rate=draw(st.floats(0.01, 1)),
        min_reports=draw(st.integers(0, 5)),
        wave_timeout=draw(st.floats(0, 1e4)),
    )
    rollout = Rollout(coordinator, draw(IDS), targets, plan, settle=0)
    updated = tuple(d for d in devices if draw(st.booleans()))
    answered = [d for d in updated if draw(st.booleans())]
    rollout.state = replace(
        rollout.state,
        state=draw(st.sampled_from(wire.ROLLOUT_STATES)),
        wave=draw(st.integers(0, 4)),
        updated=updated,
        succeeded=tuple(answered[::2]),
        failed=tuple(answered[1::2]),
        ts=draw(TIMES),
    )
    rollout.serials = {d: draw(st.integers(0, 2**63)) for d in updated}
    rollout.previous = {d: draw(st.none() | desired_states(st.just(d))) for d in devices}
    record = rollout.record()
    op = draw(st.sampled_from(["valid", "structure", "bytes", "random"]))
    if op == "valid":
        return record
    if op == "structure":
        return dumps(draw(mutate_json(json.loads(record), max_ops=2))).decode("utf-8", "replace")
    if op == "bytes":
        return draw(mutate_bytes(record.encode())).decode("utf-8", "replace")
    return draw(st.text(max_size=200))


def test_a_rollout_record_restores_a_rollout_or_a_state_error(fuzz, idle_coordinator):
    rec = fuzz("Rollout.restore (record)", StateError)
    fc = idle_coordinator

    @FUZZ
    @given(record=rollout_records(fc))
    def case(record):
        outcome = rec.call(Rollout.restore, fc, record, settle=0)
        if not outcome.accepted:
            assert 0 < len(str(outcome.error)) <= 1200
            return
        rollout = outcome.value
        assert set(rollout.previous) == set(rollout.targets) == set(rollout.state.devices)
        assert set(rollout.state.updated) <= set(rollout.serials) <= set(rollout.targets)
        assert all(p is None or isinstance(p, wire.DesiredState) for p in rollout.previous.values())
        assert sum(map(len, rollout.plan.batches(list(rollout.targets)))) == len(rollout.targets)
        again = Rollout.restore(fc, rollout.record(), settle=0)
        assert again.record() == rollout.record()

    case()
    rec.assert_both_outcomes()


def test_rollout_states_read_every_sound_record_and_leave_damaged_ones_out(fuzz, idle_coordinator):
    from cloud_trainer.service.database import Database
    from cloud_trainer.service.state import CloudState

    rec = fuzz("CloudState.rollout_states (records)", ())
    state = CloudState(Database("sqlite://:memory:"))
    sound = Rollout(idle_coordinator, "sound", {"pi-1": Target(GOOD.artifacts)}, settle=0)
    state.save_rollout("sound", "running", sound.record())

    @FUZZ
    @given(record=rollout_records(idle_coordinator))
    def case(record):
        state.save_rollout("fuzzed", "running", record)
        states = rec.call(state.rollout_states).value
        assert states["sound"] == sound.state  # one damaged record loses no other
        try:
            expected = wire.RolloutState.from_dict(json.loads(record)["state"])
        except Exception:  # what the record says, if it says anything usable
            expected = None
        got = states.get("fuzzed")
        if expected is None or got is None:
            assert got == expected
        else:  # a record without ts gets the clock's at each reading
            assert replace(got, ts=0) == replace(expected, ts=0)
        if expected is None:
            rec.refused("damaged record left out")

    case()
    rec.assert_both_outcomes()


FRAMES = st.builds(
    lambda shape, dtype, seed: features.encode(
        "r-1",
        1,
        np.random.default_rng(seed).normal(size=shape).astype(np.float32),
        dtype=dtype,
    ),
    st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    st.sampled_from(["int8", "float32"]),
    st.integers(0, 1000),
)


def test_a_feature_frame_decodes_to_a_finite_tensor_or_a_protocol_error(fuzz):
    rec = fuzz("features.decode", ProtocolError)

    @FUZZ
    @given(payload=st.one_of(st.binary(max_size=300), FRAMES, FRAMES.flatmap(mutate_bytes)))
    def case(payload):
        outcome = rec.call(features.decode, payload)
        if not outcome.accepted:
            check_refusal(outcome.error)
            return
        frame = outcome.value
        assert ID.fullmatch(frame.request_id) and 0 <= frame.split <= 255
        assert frame.tensor.dtype == np.float32 and np.isfinite(frame.tensor).all()
        assert 1 <= frame.tensor.ndim <= features.MAX_RANK
        assert frame.tensor.size <= features.MAX_ELEMENTS

    case()
    rec.assert_both_outcomes()

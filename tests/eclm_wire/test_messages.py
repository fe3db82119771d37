import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eclm_wire as wire
from eclm_wire.errors import ProtocolError

SHA = "ab" * 32


def desired(**over):
    ref = wire.ArtifactRef(name="m.pte", sha256=SHA, size=5000, format="pte")
    return wire.DesiredState(**{"device_id": "dev-1", "serial": 7, "artifacts": (ref,), **over})


@pytest.mark.parametrize(
    "message",
    [
        desired(),
        wire.ReportedState(
            device_id="d",
            profile="rpi4",
            backends=("litert",),
            serial=1,
            phase="active",
            active=(SHA,),
            backend="litert",
            accuracy=0.97,
            labels=("ring=beta", "site=lab-2"),
        ),
        wire.Status(device_id="d", online=False),
        wire.FetchRequest(device_id="d", sha256=SHA, first_chunk=3, count=2),
        wire.Event(device_id="d", code="invalid", reason="x", topic="t"),
        wire.AdapterUpdate(
            device_id="d", domain="rotate", base="7", samples=3, histogram=(1, 2), weights=b"st"
        ),
        wire.AdapterOffer(device_id="d", domain="noise", samples=40, weights=b"\x00" * 9),
    ],
)
def test_every_message_round_trips(message):
    assert wire.decode(type(message), message.encode()) == message


@pytest.mark.parametrize(
    "labels",
    [
        ("ring",),
        ("=beta",),
        ("ring=beta gamma",),
        ("a/b=c",),
        (1,),
        tuple(f"k{i}=v" for i in range(17)),
    ],
)
def test_bad_labels_are_refused(labels):
    with pytest.raises(ProtocolError, match="labels"):
        wire.ReportedState(
            device_id="d",
            profile="rpi4",
            backends=("litert",),
            serial=1,
            phase="idle",
            labels=labels,
        ).check()


def test_topics_follow_the_contract():
    assert wire.device_topic("pi-1", "desired") == "eclm/v1/devices/pi-1/desired"
    assert wire.parse_device_topic(wire.chunk_topic("pi-1", SHA, 4)) == (
        "pi-1",
        "chunks",
        (SHA, "4"),
    )
    assert wire.rollout_topic("r1") == "eclm/v1/rollouts/r1"
    with pytest.raises(ProtocolError):
        wire.device_topic("a/b", "desired")
    with pytest.raises(ProtocolError):
        wire.device_topic("+", "desired")
    with pytest.raises(ProtocolError):
        wire.parse_device_topic("eclm/v1/devices/pi-1/nonsense")


def _mutate(path, value):
    body = json.loads(desired().encode())
    target = body
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("payload", "field", "code"),
    [
        (b"{not json", None, "malformed"),
        (b"[1, 2]", None, "malformed"),
        (b"\xff\xfe", None, "malformed"),
        (b'{"v": 1, "type": "desired", "serial": NaN}', None, "malformed"),
        (_mutate(["v"], 2), "v", "version"),
        (_mutate(["type"], "status"), "type", "invalid"),
        (_mutate(["serial"], "7"), "serial", "invalid"),
        (_mutate(["serial"], True), "serial", "invalid"),
        (_mutate(["serial"], -1), "serial", "invalid"),
        (_mutate(["device_id"], "a/b"), "device_id", "invalid"),
        (_mutate(["device_id"], KeyError), "device_id", "invalid"),
        (_mutate(["extra"], 1), "extra", "invalid"),
        (_mutate(["artifacts"], []), "artifacts", "invalid"),
        (_mutate(["artifacts"], {"a": 1}), "artifacts", "invalid"),
        (_mutate(["artifacts", 0, "sha256"], "XYZ"), "artifacts[0].sha256", "invalid"),
        (_mutate(["artifacts", 0, "size"], 0), "artifacts[0].size", "invalid"),
        (_mutate(["artifacts", 0, "format"], "onnx"), "artifacts[0].format", "invalid"),
        (_mutate(["artifacts", 0, "chunk_size"], 10**9), "artifacts[0].chunk_size", "invalid"),
        (b" " * (wire.MAX_CONTROL_BYTES + 1), None, "too-large"),
    ],
)
def test_malformed_messages_raise_one_error_naming_the_field(payload, field, code):
    with pytest.raises(ProtocolError) as info:
        wire.decode(wire.DesiredState, payload)

    assert info.value.code == code
    assert info.value.field == field
    if field:
        assert field in str(info.value)


def test_building_a_bad_message_fails_at_construction():
    with pytest.raises(ProtocolError, match="accuracy"):
        wire.ReportedState(
            device_id="d", profile="p", backends=(), serial=0, phase="active", accuracy=1.5
        )
    with pytest.raises(ProtocolError, match="phase"):
        wire.ReportedState(device_id="d", profile="p", backends=(), serial=0, phase="dancing")


def test_an_oversized_message_cannot_be_encoded():
    report = wire.ReportedState(
        device_id="d",
        profile="p" * (wire.MAX_CONTROL_BYTES + 1),
        backends=(),
        serial=0,
        phase="idle",
    )

    with pytest.raises(ProtocolError, match="limit"):
        report.encode()


@pytest.mark.parametrize("kind", [wire.DesiredState, wire.AdapterUpdate])
@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash_the_decoder(kind, payload):
    try:
        wire.decode(kind, payload)
    except ProtocolError as exc:
        assert exc.code in ("malformed", "invalid", "version", "too-large")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["device_id", "serial", "artifacts", "issued_at", "x"]), json_values
    )
)
def test_arbitrary_json_objects_are_rejected_or_valid(body):
    payload = json.dumps({"v": 1, "type": "desired", **body}).encode()
    try:
        message = wire.decode(wire.DesiredState, payload)
    except ProtocolError:
        return
    assert wire.decode(wire.DesiredState, message.encode()) == message


def offer_bytes(header: dict, weights: bytes = b"tensors") -> bytes:
    body = json.dumps({"v": 1, "type": "adapter-offer", **header}).encode()
    return len(body).to_bytes(4, "big") + body + weights


GOOD_OFFER = {"device_id": "d", "domain": "noise", "samples": 4}


@pytest.mark.parametrize(
    ("payload", "field", "code"),
    [
        (b"\x00\x00", None, "malformed"),
        ((10**6).to_bytes(4, "big") + b"{}", None, "malformed"),
        (offer_bytes(GOOD_OFFER)[:20], None, "malformed"),
        (offer_bytes({**GOOD_OFFER, "weights": "aGk="}), "weights", "invalid"),
        (offer_bytes(GOOD_OFFER, b""), "weights", "invalid"),
        (offer_bytes(GOOD_OFFER, b"x" * (wire.MAX_TENSOR_BYTES + 1)), "weights", "too-large"),
        (offer_bytes({**GOOD_OFFER, "samples": 0}), "samples", "invalid"),
    ],
)
def test_a_bad_tensor_message_names_what_is_wrong(payload, field, code):
    with pytest.raises(ProtocolError) as info:
        wire.decode(wire.AdapterOffer, payload)
    assert (info.value.field, info.value.code) == (field, code)
    assert wire.decode(wire.AdapterOffer, offer_bytes(GOOD_OFFER)).weights == b"tensors"


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" + "0" * 400])
def test_a_number_no_float_holds_is_refused_as_out_of_range(number):
    event = wire.Event(device_id="dev-1", code="c", reason="r").encode()
    body = json.dumps({**json.loads(event), "ts": 0}).encode()
    payload = body.replace(b'"ts": 0', b'"ts": ' + number.encode())

    with pytest.raises(ProtocolError, match="out of range") as info:
        wire.decode(wire.Event, payload)
    assert info.value.field == "ts" and "float, got float" not in str(info.value)

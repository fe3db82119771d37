"""The device agent's and the cloud coordinator's message handlers fed hostile (topic,
payload) messages directly: both are constructed but never connected (what they publish is
recorded), so no broker is needed. Every message is applied or refused; a refusal is
reported (an ``events`` message from the device, a counted rejection in the cloud) and
leaves the state the handler had untouched; nothing escapes the handler."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from fuzzkit import FUZZ, NOWHERE, fresh_dir
from hypothesis import given
from hypothesis import strategies as st
from messages import (
    IDS,
    LIKE,
    SHAS,
    TIMES,
    adapter_offers,
    adapter_updates,
    desired_states,
    events,
    fetch_requests,
    payloads,
    reported_states,
    statuses,
)
from mutations import EDGE_STRINGS, mutate_bytes

import eclm_wire as wire
from cloud_trainer.federation.aggregation import DomainAggregator
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.keys import sign
from device_profiles import load_profile
from eclm_wire.codec import tensor_bytes
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore, sha256_bytes
from edge_runtime.events import EventLimits

DEVICE, OTHER = "pi-1", "pi-2"
# What a device reports when it refuses a message that must change nothing.
REFUSALS = {"malformed", "invalid", "version", "too-large", "chunk-hash", "unsigned"}
REFUSALS |= {"bad-signature", "expired", "wrong-target", "replayed", "wrong-device", "artifact"}
BLOB = random.Random(1).randbytes(3000)  # the artifact the device is downloading: 3 chunks
BLOB_REF = wire.ArtifactRef(
    name="m.tflite", sha256=sha256_bytes(BLOB), size=len(BLOB), format="tflite", chunk_size=1024
)


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    """The cloud's signing key, and its public half as the device's trust key file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private = Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path_factory.mktemp("trust") / "signing.pub"
    path.write_bytes(pem)
    return private, path


@pytest.fixture(autouse=True)
def quiet():
    """Refusals log a warning each: thousands of them would only slow the run."""
    loggers = [logging.getLogger(n) for n in ("edge_runtime", "cloud_trainer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


class Sent:
    """Stands in for a client's ``publish``: records (topic, payload), acknowledges all."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, topic, payload=None, qos=0, retain=False, properties=None):
        self.messages.append((topic, payload))
        info = paho.MQTTMessageInfo(len(self.messages))
        info.rc = paho.MQTT_ERR_SUCCESS
        info._published = True
        return info


def message(topic: str, payload: bytes) -> paho.MQTTMessage:
    msg = paho.MQTTMessage(mid=1, topic=topic.encode())
    msg.payload, msg.qos = payload, 1
    return msg


def topic_for(kind: str, device: str, rest: tuple[str, ...] = ()) -> str:
    return "/".join([wire.TOPIC_ROOT, "devices", device, kind, *rest])


DEVICES = st.sampled_from([DEVICE, OTHER]) | IDS | EDGE_STRINGS


# --- the device -------------------------------------------------------------------------


class Device:
    """An agent with a signed desired state accepted and its artifact half downloaded."""

    def __init__(self, root: Path, key) -> None:
        private, public = key
        config = AgentConfig(
            device_id=DEVICE,
            profile=load_profile("rpi4"),
            broker=NOWHERE,
            store_dir=fresh_dir(root),
            backend="litert",
            trust_key=public,
            fetch_timeout=1e9,  # no re-requests in the middle of a case
            broadcast_wait=0,  # fetch on its own topic at once (the transfer under test)
            events=EventLimits(rate=1e6, burst=10**6),  # one event per refusal, unbounded
        )
        self.agent = EdgeAgent(config)
        self.sent = Sent()
        self.agent.client.publish = self.sent
        self.good = sign(
            wire.DesiredState(device_id=DEVICE, serial=5, artifacts=(BLOB_REF,), target="rpi4"),
            private,
        )
        self.deliver(topic_for("desired", DEVICE), self.good.encode())
        self.deliver(*chunk(0, BLOB[:1024]))
        assert self.agent.report.phase == "downloading" and not self.events()
        assert self.agent.keeper.transfer.current.received == {0}
        self.dirty = False

    def deliver(self, topic: str, payload: bytes) -> None:
        """What the agent's worker does with one message from its inbox."""
        self.agent._inbox.put((topic, payload))
        self.agent._inbox.put(None)
        self.agent._work()

    def events(self) -> list[wire.Event]:
        events_topic = wire.device_topic(DEVICE, "events")
        return [wire.decode(wire.Event, p) for t, p in self.sent.messages if t == events_topic]

    def state(self) -> tuple:
        a, f, g = self.agent, self.agent.keeper.transfer, self.agent.keeper.goal
        fetch = f and (g.desired, g.backend, tuple(g.refs), tuple(f.pending), f.current.ref)
        fetch = fetch and (*fetch, frozenset(f.current.received), tuple(f.asked), tuple(f.queue))
        trust = a.gate.state_path.read_bytes() if a.gate.state_path.exists() else None
        return (
            a.report,
            a.runner,
            a._applied_serial,
            fetch,
            a.gate.serial,
            a.gate.digest,
            trust,
            frozenset(a.store.names()),
            a.learner,
        )


def chunk(index: int | str, data: bytes, sha: str = BLOB_REF.sha256) -> tuple[str, bytes]:
    return wire.chunk_topic(DEVICE, sha, index), wire.pack_chunk(data)


def mostly(value, others) -> st.SearchStrategy:
    """``value`` four times in five, else one of ``others``."""
    return st.integers(0, 4).flatmap(lambda n: others if n == 0 else st.just(value))


@st.composite
def agent_desired(draw, private) -> wire.DesiredState:
    """Desired states mostly meant for this device (its id, its profile, not expired,
    signed), so that the gate's later checks are reached too."""
    m = draw(desired_states(device_ids=mostly(DEVICE, IDS)))
    expires = draw(mostly(0.0, st.just(4e9) | TIMES))
    m = replace(m, target=draw(mostly("rpi4", st.just("") | IDS)), expires=expires)
    if draw(st.booleans()):
        m = replace(m, serial=draw(st.integers(0, 10)))  # around the accepted serial 5
    if draw(st.booleans()):
        m = replace(m, artifacts=(BLOB_REF,), options=())
    return sign(m, private) if draw(st.integers(0, 3)) else m


@st.composite
def chunk_messages(draw) -> tuple[str, bytes]:
    index = draw(st.integers(0, 4))
    data = draw(
        st.sampled_from([BLOB[index * 1024 : (index + 1) * 1024], b""])
        | st.integers(0, 1100).map(lambda n: random.Random(n).randbytes(n))
        | st.sampled_from([952, 1024]).map(bytes)
    )
    name = draw(
        mostly(str(index), st.sampled_from(["²", "٣", "-1", "", "1.0", " 1", "0x1", "9" * 5000]))
    )
    sha = draw(mostly(BLOB_REF.sha256, SHAS | EDGE_STRINGS))
    topic, payload = wire.chunk_topic(DEVICE, sha, name), wire.pack_chunk(data)
    if draw(st.integers(0, 3)) == 0:
        payload = draw(mutate_bytes(payload))
    return topic, payload


@st.composite
def last_chunks(draw) -> list[tuple[str, bytes]]:
    """The rest of the download (chunks 1 and 2), right or with bytes of the right length
    that are not the artifact's: the whole-file check and the install come next."""
    out = []
    for i in (1, 2):
        right = BLOB[i * 1024 : (i + 1) * 1024]
        out.append(chunk(i, draw(mostly(right, st.just(right[::-1])))))
    return out


@st.composite
def device_messages(draw, private) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["desired", "adapter", "chunks", "other"]))
    if kind == "chunks":
        return draw(chunk_messages())
    device = draw(mostly(DEVICE, DEVICES))
    if kind == "desired":
        desired = agent_desired(private)
        return topic_for("desired", device), draw(payloads(wire.DesiredState, desired, valid=3))
    if kind == "adapter":
        offers = adapter_offers(mostly(DEVICE, IDS))
        offers = offers.flatmap(lambda m: st.sampled_from([m, sign(m, private)]))
        return topic_for("adapter", device), draw(payloads(wire.AdapterOffer, offers, valid=3))
    topic = draw(
        st.sampled_from([topic_for(k, device) for k in ("reported", "status", "events", "fetch")])
        | st.text(max_size=80)
    )
    return topic, draw(st.binary(max_size=200) | payloads(wire.Status, statuses()))


def _decodes(topic: str, payload: bytes) -> bool:
    """Whether a message is well-formed by the wire contract alone."""
    try:
        device, kind, rest = wire.parse_device_topic(topic)
        if kind == "desired":
            wire.decode(wire.DesiredState, payload)
        elif kind == "adapter":
            wire.decode(wire.AdapterOffer, payload)
        elif kind == "chunks":
            wire.unpack_chunk(payload)
        else:
            return False
    except wire.ProtocolError:
        return False
    return device == DEVICE


def test_the_agent_applies_or_refuses_every_message_and_reports_each_refusal(
    fuzz, tmp_path_factory, key
):
    rec = fuzz("EdgeAgent message handling", ())
    root = tmp_path_factory.mktemp("agents")
    device = [Device(root, key)]

    @FUZZ
    @given(batch=st.lists(device_messages(key[0]), min_size=1, max_size=3) | last_chunks())
    def case(batch):
        if device[0].dirty:
            device[0] = Device(root, key)
        d = device[0]
        for topic, payload in batch:
            before, sent = d.state(), len(d.sent.messages)
            rec.call(d.deliver, topic, payload)
            new = [
                wire.decode(wire.Event, p)
                for t, p in d.sent.messages[sent:]
                if t.endswith("/events")
            ]
            assert len(new) <= 1, [e.code for e in new]  # one report per message
            code = new[0].code if new else None
            assert code != "internal", new[0].reason  # the handler's own bug
            whole = code == "transfer-retry" and "does not match declared" in new[0].reason
            after = d.state()
            if code is None:
                assert _decodes(topic, payload)  # nothing malformed passes in silence
            elif code in REFUSALS and not whole:
                assert after == before, code  # a refused message changes nothing
            elif whole:
                # the last chunk arrived and the whole file is wrong: fetched again, later
                a = d.agent
                assert a.runner is None and a.report.phase == "downloading"
                assert a.keeper.transfer is not None and not a.store.has(BLOB_REF.sha256)
            elif code == "install-failed":  # the last chunk arrived: a program that won't load
                a = d.agent
                assert a.runner is None and a.report.phase == "failed" and a.keeper.goal is None
            else:
                # a signed state this device cannot run: refused, its serial remembered
                assert code == "no-usable-artifact", code
                assert after[:4] == before[:4] and after[7:] == before[7:]
            if code is not None:
                rec.refused(f"event[{code}]")
            else:
                rec.note(topic.split("/")[4] if topic.count("/") >= 4 else "?")
            d.dirty = d.dirty or after != before

    case()
    rec.assert_both_outcomes()


# --- the cloud --------------------------------------------------------------------------


class Cloud:
    """A coordinator holding a device's signed desired state, report, status and update."""

    def __init__(self, root: Path, private) -> None:
        self.fc = FleetCoordinator(
            NOWHERE,
            ArtifactStore(fresh_dir(root)),
            client_id="fuzz-cloud",
            signing_key=private,
            aggregator=DomainAggregator(LIKE),
        )
        self.sent = Sent()
        self.fc.client.publish = self.sent
        self.acks: list[tuple[int, int]] = []
        good = [
            (
                "desired",
                sign(wire.DesiredState(device_id=DEVICE, serial=5, artifacts=(BLOB_REF,)), private),
            ),
            (
                "reported",
                wire.ReportedState(
                    device_id=DEVICE,
                    profile="rpi4",
                    backends=("litert",),
                    serial=5,
                    phase="active",
                    domain="clean",
                ),
            ),
            ("status", wire.Status(device_id=DEVICE, online=True)),
            (
                "updates",
                wire.AdapterUpdate(
                    device_id=OTHER,
                    domain="clean",
                    base="5",
                    samples=3,
                    histogram=(1, 1, 1),
                    weights=tensor_bytes(LIKE),
                    nonce="ab" * 8,
                ),
            ),
        ]
        for kind, m in good:
            self.deliver(topic_for(kind, m.device_id), m.encode())
        assert not self.fc.rejected and self.fc.aggregator.accepted == 1
        self.dirty = False

    def deliver(self, topic: str, payload: bytes) -> None:
        self.fc._on_message(self, None, message(topic, payload))

    def ack(self, mid: int, qos: int) -> None:  # the paho client the callback is given
        self.acks.append((mid, qos))

    def state(self) -> tuple:
        fc, agg = self.fc, self.fc.aggregator
        latest = {dom: {dev: id(c) for dev, c in v.items()} for dom, v in agg._latest.items()}
        return (
            dict(fc.desired),
            dict(fc.reported),
            dict(fc.online),
            len(fc.events),
            frozenset(fc.abort_requests),
            agg.accepted,
            latest,
            fc._fetches.qsize(),
            fc.offers,
        )


KIND_OF = {
    "desired": (wire.DesiredState, desired_states),
    "reported": (wire.ReportedState, reported_states),
    "status": (wire.Status, statuses),
    "events": (wire.Event, events),
    "fetch": (wire.FetchRequest, fetch_requests),
}


@st.composite
def cloud_messages(draw, private) -> tuple[str, bytes]:
    kind = draw(st.sampled_from([*KIND_OF, "updates", "abort", "telemetry", "adapter", "other"]))
    device = draw(mostly(DEVICE, DEVICES))
    ids = mostly(device, IDS) if device in (DEVICE, OTHER) else IDS
    if kind == "abort":
        name = draw(IDS | EDGE_STRINGS)
        return f"{wire.TOPIC_ROOT}/rollouts/{name}/abort", draw(st.binary(max_size=20))
    if kind == "updates":
        updates = adapter_updates(ids, histogram_size=(3, 3), scale=10)  # LIKE has 3 classes
        return topic_for(kind, device), draw(payloads(wire.AdapterUpdate, updates, valid=3))
    if kind in KIND_OF:
        cls, strategy = KIND_OF[kind]
        messages = strategy(ids)
        if kind == "desired":
            messages = messages.flatmap(lambda m: st.sampled_from([m, sign(m, private)]))
        return topic_for(kind, device), draw(payloads(cls, messages, valid=3))
    if kind == "other":
        return draw(st.text(max_size=80)), draw(st.binary(max_size=64))
    return topic_for(kind, device), draw(st.binary(max_size=64))


def same(a: wire.Message, b: wire.Message) -> bool:
    """Equal but for the clock: a message without ``ts``/``issued_at`` gets the time it
    was decoded, so two decodings of it differ there."""
    clock = {f.name: 0 for f in fields(a) if f.default_factory is not MISSING}
    return replace(a, **clock) == replace(b, **clock)


@dataclass
class Expect:
    """What an applied message must have changed."""

    cloud: Cloud
    topic: str
    payload: bytes

    def check(self, before: tuple) -> None:
        fc = self.cloud.fc
        if self.topic.startswith(f"{wire.TOPIC_ROOT}/rollouts/"):
            assert self.topic.split("/")[3] in fc.abort_requests
            return
        device, kind, _ = wire.parse_device_topic(self.topic)
        if kind in KIND_OF:
            m = wire.decode(KIND_OF[kind][0], self.payload)  # it decodes, or it was refused
            assert m.device_id == device  # nobody speaks for another device
            seen = {
                "desired": lambda: same(fc.desired[device], m),
                "reported": lambda: same(fc.reported[device], m),
                "status": lambda: fc.online[device] == m.online,
                "events": lambda: same(fc.events[-1], m),
                "fetch": lambda: fc._fetches.qsize() == before[7] + 1,
            }[kind]
            assert seen()
        elif kind == "updates":
            update = wire.decode(wire.AdapterUpdate, self.payload)
            assert update.device_id == device and fc.aggregator.accepted == before[5] + 1
        else:
            assert self.cloud.state() == before  # a topic the cloud has no use for


def test_the_coordinator_applies_or_counts_every_message_and_keeps_state_on_refusal(
    fuzz, tmp_path_factory, key
):
    rec = fuzz("FleetCoordinator message handling", ())
    root = tmp_path_factory.mktemp("clouds")
    cloud = [Cloud(root, key[0])]

    @FUZZ
    @given(batch=st.lists(cloud_messages(key[0]), min_size=1, max_size=3))
    def case(batch):
        if cloud[0].dirty:
            cloud[0] = Cloud(root, key[0])
        c = cloud[0]
        for topic, payload in batch:
            before, counted, acks = c.state(), Counter(c.fc.rejected), len(c.acks)
            rec.call(c.deliver, topic, payload)
            assert len(c.acks) == acks + 1  # every message is acknowledged once, kept or not
            refused = Counter(c.fc.rejected) - counted
            assert sum(refused.values()) <= 1
            if refused:
                assert c.state() == before, refused  # a refused message changes nothing
                rec.refused(f"rejected[{next(iter(refused))}]")
            else:
                Expect(c, topic, payload).check(before)
                rec.note(topic.split("/")[4 if "/devices/" in topic else 2])
                c.dirty = c.dirty or c.state() != before

    case()
    rec.assert_both_outcomes()


def test_the_coordinator_keeps_the_latest_events_only(tmp_path, key):
    """A cloud that runs for months hears many events: it keeps the latest EVENTS_KEPT in
    memory (every one is logged)."""
    from cloud_trainer.fleet.coordinator import EVENTS_KEPT

    cloud = Cloud(tmp_path, key[0])
    for n in range(EVENTS_KEPT + 5):
        event = wire.Event(device_id=DEVICE, code="swap-failed", reason=f"#{n}")
        cloud.deliver(topic_for("events", DEVICE), event.encode())
    assert len(cloud.fc.events) == EVENTS_KEPT
    assert cloud.fc.events[0].reason == "#5" and cloud.fc.events[-1].reason == f"#{EVENTS_KEPT + 4}"


def test_status_and_events_naming_another_device_are_refused(tmp_path, key):
    cloud = Cloud(tmp_path, key[0])
    before = cloud.state()
    for kind, m in (
        ("status", wire.Status(device_id=OTHER, online=False)),
        ("events", wire.Event(device_id=OTHER, code="swap-failed", reason="not mine")),
    ):
        cloud.deliver(topic_for(kind, DEVICE), m.encode())
    assert cloud.state() == before and cloud.fc.rejected["invalid"] == 2

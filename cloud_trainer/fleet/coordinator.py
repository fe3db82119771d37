"""The cloud side of the wire: desired state out, artifact chunks on request, reports in."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

import numpy as np
import paho.mqtt.client as paho

import eclm_wire as wire
from cloud_trainer.errors import StateError
from cloud_trainer.export.plan import Target
from cloud_trainer.fleet.broadcast import Broadcaster, BroadcastPolicy
from cloud_trainer.fleet.keys import sign
from cloud_trainer.fleet.ratelimit import DropReason, RateLimiter
from eclm_wire import signed_bytes
from eclm_wire.codec import tensor_bytes
from eclm_wire.enums import EventCode
from eclm_wire.errors import ProtocolError
from eclm_wire.mqtt import BrokerAddress, connect, make_client, wait_published
from edge_runtime.artifacts import ArtifactStore

log = logging.getLogger(__name__)
EVENTS_KEPT = 1000  # device events kept in memory (a long-running cloud would pile them up)
DEFAULT_BROADCAST = BroadcastPolicy()
_FORMATS = {"litert": "tflite", "executorch": "pte"}  # what a backend asks for
FETCHES_QUEUED = 10_000  # chunk requests waiting for the sender; more are dropped, counted


class Aggregator(Protocol):
    """Where adapter updates go (:class:`DomainAggregator` in one process, the service's
    ledger in a database) and where warm starts come from."""

    def add(self, update: wire.AdapterUpdate, *, redelivered: bool = False) -> None: ...

    def aggregate(self, domain: str) -> tuple[dict[str, np.ndarray], int] | None: ...

    def samples_of(self, domain: str, device_id: str) -> int: ...


class FleetCoordinator:
    """Sets devices' desired state, serves their fetches and keeps their latest reports."""

    def __init__(
        self,
        address: BrokerAddress,
        store: ArtifactStore,
        *,
        client_id: str = "eclm-cloud",
        chunk_size: int = wire.DEFAULT_CHUNK_SIZE,
        signing_key=None,
        ttl: float = 7 * 24 * 3600,
        aggregator: Aggregator | None = None,
        offer_ratio: float = 4.0,
        serials: Callable[[], int] | None = None,
        shared_group: str = "",
        is_leader: Callable[[], bool] = lambda: True,
        limiter: RateLimiter | None = None,
        broadcast: BroadcastPolicy | None = DEFAULT_BROADCAST,
        source: str = "",
    ) -> None:
        """``signing_key`` (see :mod:`cloud_trainer.fleet.keys`) signs every desired state, which
        devices then refuse after ``ttl`` seconds; ``aggregator`` takes the devices' adapter
        updates (ignored without one). ``serials`` hands out desired-state serials (a
        service keeps them in its database); by default they grow with the clock.

        Several coordinators (service workers) may share the fleet: with ``shared_group``
        each update, fetch and event goes to one of them (a shared subscription), while
        every one sees all desired, reported and status messages; only the one for which
        ``is_leader()`` holds sends warm starts. ``limiter`` drops what a device sends over
        its limits before it is decoded (default: no limits); drops are in ``dropped``.

        Shared fetch requests are gathered and sent once per artifact on its shared topic
        (:mod:`~cloud_trainer.fleet.broadcast`; ``broadcast=None``: on each device's own
        topic, as plain requests are). ``source`` names a content server holding the
        artifacts at ``<source>/<sha256>`` in every desired state ("" = MQTT only)."""
        self.address = address
        self.signing_key = signing_key
        self.aggregator = aggregator
        self.offer_ratio = offer_ratio
        self.serials = serials
        self.shared_group = shared_group
        self.is_leader = is_leader
        self.limiter = limiter or RateLimiter({})
        self.ttl = ttl
        self.store = store
        self.chunk_size = chunk_size
        self.reported: dict[str, wire.ReportedState] = {}
        self.desired: dict[str, wire.DesiredState] = {}  # retained, as the broker holds it
        self.abort_requests: set[str] = set()  # rollout ids an operator asked to abort
        self.online: dict[str, bool] = {}
        self.events: deque[wire.Event] = deque(maxlen=EVENTS_KEPT)  # the latest; all are logged
        self.rejected: Counter[str] = Counter()
        self.offers = 0  # warm starts sent to devices entering a domain others adapted to
        # device messages done with (stored, refused or dropped), by kind: what an observer
        # compares with what devices sent to know the cloud has heard all of it
        self.handled: Counter[str] = Counter()
        # called with (previous, new) report on the MQTT thread: hand work off, do not block
        self.listeners: list[Callable[[wire.ReportedState | None, wire.ReportedState], None]] = []
        self._serial = int(time.time() * 1000)  # grows across restarts without stored state
        self._changed = threading.Condition()
        self._fetches: queue.Queue[wire.FetchRequest | None] = queue.Queue(FETCHES_QUEUED)
        self._sender = threading.Thread(target=self._send_loop, name="cloud-sender", daemon=True)
        self._unstored: list[paho.MQTTMessage] = []  # not acknowledged: the store failed
        self.store_error = ""  # why the last store write failed ("" once it works again)
        self.client = make_client(client_id, address, manual_ack=True)
        self.source = source
        self.broadcaster = (
            None
            if broadcast is None
            else Broadcaster(
                self.client.publish, store, chunk_size, broadcast, alone=self._send_whole
            )
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self) -> FleetCoordinator:
        connect(self.client, self.address)
        self.client.loop_start()
        self._sender.start()
        if self.broadcaster is not None:
            self.broadcaster.start()
        return self

    def stop(self) -> None:
        self._fetches.put(None)
        self._sender.join(timeout=10)
        if self.broadcaster is not None:
            self.broadcaster.stop()
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def dropped(self) -> Counter[tuple[str, str]]:
        """Messages dropped unread, by (kind, reason): over a device's limit, queue full."""
        return self.limiter.counts()

    def __enter__(self) -> FleetCoordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what the cloud asks ------------------------------------------------------------

    def add_artifact(self, name: str, data: bytes, fmt: str) -> wire.ArtifactRef:
        """Store a program and describe it for a desired state."""
        sha = self.store.put(data)
        return wire.ArtifactRef(
            name=name, sha256=sha, size=len(data), format=fmt, chunk_size=self.chunk_size
        )

    def assign(
        self,
        device_id: str,
        artifacts: list[wire.ArtifactRef],
        *,
        options: tuple[wire.ModuleSet, ...] = (),
        target: str = "",
    ) -> wire.DesiredState:
        """Publish a new desired state for ``device_id`` and its profile ``target``
        (retained, serial always newer, signed when the coordinator has a key)."""
        return self.assign_all({device_id: Target(tuple(artifacts), tuple(options), target)})[
            device_id
        ]

    def assign_all(
        self, targets: Mapping[str, Target], *, timeout: float = 5.0
    ) -> dict[str, wire.DesiredState]:
        """Publish the new desired state of every device in ``targets`` (as :meth:`assign`
        does, in order), then wait up to ``timeout`` seconds for the broker's
        acknowledgements of all of them together: a wave costs one round trip, not one
        per device."""
        sent = []
        for device_id, t in targets.items():
            desired = self._desired(device_id, t)
            topic = wire.device_topic(device_id, "desired")
            info = self.client.publish(topic, desired.encode(), qos=1, retain=True)
            sent.append((desired, info))
        deadline = time.monotonic() + timeout
        for desired, info in sent:
            if wait_published(info, max(0.0, deadline - time.monotonic())):
                log.info("desired state %d set for %s", desired.serial, desired.device_id)
            else:  # a broker restart, say: paho sends it once connected again
                log.warning(
                    "desired state %d for %s queued (broker away)",
                    desired.serial,
                    desired.device_id,
                )
        return {desired.device_id: desired for desired, _ in sent}

    def assign_wave(self, targets: Mapping[str, Target]) -> dict[str, wire.DesiredState]:
        """:meth:`assign_all` for devices that fetch together (a rollout wave, the new
        devices a service step found): each artifact's broadcast waits until every one of
        them that lacks it has asked (see :meth:`expect`), not for a quiet moment. No
        targets (most service steps): nothing to tell the broadcaster, nor to release."""
        if not targets:
            return {}
        self.expect({d: list(t.artifacts) for d, t in targets.items()})
        try:
            return self.assign_all(targets)
        finally:
            self.release()

    def _desired(self, device_id: str, target: Target) -> wire.DesiredState:
        """The next desired state of ``device_id`` (a new serial), signed if there is a key."""
        if self.serials is not None:
            serial = self.serials()
        else:
            serial = self._serial = max(self._serial + 1, int(time.time() * 1000))
        desired = wire.DesiredState(
            device_id=device_id,
            serial=serial,
            artifacts=tuple(target.artifacts),
            options=tuple(target.options),
            target=target.profile,
            expires=time.time() + self.ttl,
            source=self.source,
        )
        return desired if self.signing_key is None else sign(desired, self.signing_key)

    def expect(self, devices: dict[str, list[wire.ArtifactRef]]) -> None:
        """A wave is about to give ``devices`` these artifacts: a broadcast starts as soon
        as every device expected to ask for it has (see :meth:`Broadcaster.expect`). A
        device is expected to ask for what it lacks in the format its backend runs, as
        its last report says (every artifact if it never reported), and for an adapter
        head it lacks whatever it runs."""
        if self.broadcaster is None:
            return
        wanted: dict[str, set[str]] = {}
        for device_id, refs in devices.items():
            report = self.reported.get(device_id)
            fmt = _FORMATS.get(report.backend or "") if report else None
            if report and fmt is None:  # none yet: the first of its profile's offered
                offered = {r.format for r in refs}
                fmt = next((f for b in report.backends if (f := _FORMATS.get(b)) in offered), None)
            for ref in refs:
                program = ref.format in _FORMATS.values()
                if report and (
                    ref.sha256 in report.active or fmt and program and ref.format != fmt
                ):
                    continue
                wanted.setdefault(ref.sha256, set()).add(device_id)
        self.broadcaster.expect(wanted)

    def release(self) -> None:
        """The wave :meth:`expect` announced is assigned (see :meth:`Broadcaster.release`)."""
        if self.broadcaster is not None:
            self.broadcaster.release()

    def wait_until(self, predicate: Callable[[FleetCoordinator], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds after a report, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    # --- MQTT -----------------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the cloud connection: %s", reason_code)
            return
        share = f"$share/{self.shared_group}/" if self.shared_group else ""
        client.subscribe(
            [(wire.all_devices_topic(k), 1) for k in ("desired", "reported", "status")]
            + [(share + wire.all_devices_topic(k), 1) for k in ("fetch", "events", "updates")]
            + [(f"{wire.TOPIC_ROOT}/rollouts/+/abort", 1)]
        )

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        self.client.traffic.add("received", msg.topic, msg.payload)
        try:
            self._handle(msg)
        except StateError as exc:
            # Not acknowledged: the broker keeps it for this session, and the sender
            # thread retries the store until it works (or a restart redelivers it).
            log.error("could not store %s, will retry: %s", msg.topic[:200], exc)
            with self._changed:
                self.store_error = str(exc)
                self._unstored.append(msg)
            return
        self._count_handled(msg.topic)
        client.ack(msg.mid, msg.qos)

    def _count_handled(self, topic: str) -> None:
        try:
            kind = wire.parse_device_topic(topic)[1]
        except ProtocolError:
            kind = "other"
        with self._changed:
            self.handled[kind] += 1

    def _handle(self, msg: paho.MQTTMessage) -> None:
        try:
            if msg.topic.startswith(f"{wire.TOPIC_ROOT}/rollouts/"):
                rollout_id = msg.topic.split("/")[3]
                log.warning("abort requested for rollout %s", rollout_id)
                with self._changed:
                    self.abort_requests.add(wire.check_device_id(rollout_id))
                    self._changed.notify_all()
                return
            device_id, kind, _ = wire.parse_device_topic(msg.topic)
            if not self.limiter.allow(device_id, kind):
                return  # counted; acknowledged, so the broker does not keep it either
            if kind == "fetch":
                request = wire.decode(wire.FetchRequest, msg.payload)
                self._check_sender(request.device_id, device_id)
                if request.shared and self.broadcaster is not None:
                    self.broadcaster.want(request)
                    return
                if request.shared:  # no broadcasts here: the whole artifact, on its own topic
                    request = replace(request, shared=False, count=0)
                try:
                    self._fetches.put_nowait(request)
                except queue.Full:
                    self.limiter.count_drop(kind, DropReason.QUEUE_FULL)
                return
            with self._changed:
                if kind == "desired":
                    desired = wire.decode(wire.DesiredState, msg.payload)
                    self._check_sender(desired.device_id, device_id)
                    self._check_signed(desired)
                    self.desired[device_id] = desired
                elif kind == "reported":
                    report = wire.decode(wire.ReportedState, msg.payload)
                    self._check_sender(report.device_id, device_id)
                    before = self.reported.get(device_id)
                    self.reported[device_id] = report
                    if report.domain and (before is None or before.domain != report.domain):
                        if self.is_leader():
                            self._offer(device_id, report.domain)
                    for listener in self.listeners:
                        listener(before, report)
                elif kind == "status":
                    status = wire.decode(wire.Status, msg.payload)
                    self._check_sender(status.device_id, device_id)
                    self.online[device_id] = status.online
                elif kind == "events":
                    event = wire.decode(wire.Event, msg.payload)
                    self._check_sender(event.device_id, device_id)
                    self.events.append(event)
                    log.warning("event from %s: %s: %s", device_id, event.code, event.reason)
                elif kind == "updates" and self.aggregator is not None:
                    update = wire.decode(wire.AdapterUpdate, msg.payload)
                    self._check_sender(update.device_id, device_id)
                    # the broker's DUP flag: a copy of one this cloud never acknowledged
                    self.aggregator.add(update, redelivered=bool(msg.dup))
                self._changed.notify_all()
        except ProtocolError as exc:
            with self._changed:
                self.rejected[exc.code] += 1
                self._changed.notify_all()
            log.warning("rejected message on %s: %s", msg.topic[:200], exc)

    def _offer(self, device_id: str, domain: str) -> None:
        """Send the aggregate for ``domain`` to a device entering it, if it holds at least
        ``offer_ratio`` times the labels the device itself sent for that domain."""
        if self.aggregator is None:
            return
        aggregate = self.aggregator.aggregate(domain)
        own = self.aggregator.samples_of(domain, device_id)
        if aggregate is None or aggregate[1] < self.offer_ratio * own or aggregate[1] == own:
            return
        weights, samples = aggregate
        offer = wire.AdapterOffer(
            device_id=device_id,
            domain=domain,
            samples=samples,
            weights=tensor_bytes(weights),
            expires=time.time() + self.ttl,
        )
        if self.signing_key is not None:
            offer = sign(offer, self.signing_key)
        self.client.publish(wire.device_topic(device_id, "adapter"), offer.encode(), qos=1)
        self.offers += 1
        log.info("sent %s the %s adapter of %d samples", device_id, domain, samples)

    def _check_signed(self, desired: wire.DesiredState) -> None:
        """Only states this coordinator's key signed count as what a device had (a rollout
        re-signs them when it rolls back)."""
        if self.signing_key is None:
            return
        from cryptography.exceptions import InvalidSignature

        try:
            signature = bytes.fromhex(desired.signature)
            self.signing_key.public_key().verify(signature, signed_bytes(desired))
        except (ValueError, InvalidSignature):
            raise ProtocolError(
                "not signed by this cloud's key", code=EventCode.BAD_SIGNATURE
            ) from None

    @staticmethod
    def _check_sender(claimed: str, topic_device: str) -> None:
        if claimed != topic_device:
            raise ProtocolError(f"names {claimed} on {topic_device}'s topic", field="device_id")

    def _send_loop(self) -> None:
        while True:
            try:
                request = self._fetches.get(timeout=1.0)
            except queue.Empty:
                self._retry_unstored()
                continue
            if request is None:
                return
            try:
                self._send_chunks(request)
            except Exception:  # one place where sender bugs are caught and logged
                log.exception("sending %s to %s failed", request.sha256[:12], request.device_id)

    def _retry_unstored(self) -> None:
        with self._changed:
            waiting, self._unstored = self._unstored, []
        for i, msg in enumerate(waiting):
            try:
                self._handle(msg)
            except StateError as exc:
                with self._changed:
                    self._unstored = waiting[i:] + self._unstored
                    self.store_error = str(exc)
                return
            self._count_handled(msg.topic)
            self.client.ack(msg.mid, msg.qos)
        if waiting:
            log.warning("stored %d messages held back by a store failure", len(waiting))
            with self._changed:
                self.store_error = ""

    def _send_whole(self, device_id: str, sha: str, first: int) -> None:
        """Queue ``sha`` from chunk ``first`` on for one device, on its own topic."""
        request = wire.FetchRequest(device_id=device_id, sha256=sha, first_chunk=first)
        try:
            self._fetches.put_nowait(request)
        except queue.Full:
            self.limiter.count_drop("fetch", DropReason.QUEUE_FULL)

    def _send_chunks(self, request: wire.FetchRequest) -> None:
        if not self.store.has(request.sha256):
            log.warning("%s asked for unknown artifact %s", request.device_id, request.sha256[:12])
            return
        size, sha = self.chunk_size, request.sha256
        total = -(-self.store.path(sha).stat().st_size // size)
        last = total if request.count == 0 else min(total, request.first_chunk + request.count)
        for index in range(request.first_chunk, last):
            chunk = wire.pack_chunk(self.store.read_chunk(sha, index, size))
            self.client.publish(wire.chunk_topic(request.device_id, sha, index), chunk, qos=1)
        log.debug(
            "sent chunks %d..%d of %s to %s",
            request.first_chunk,
            last - 1,
            sha[:12],
            request.device_id,
        )

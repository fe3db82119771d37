"""The edge agent: MQTT loop, desired-state reconciliation, program install and serving.

paho's network thread only queues incoming messages; one worker thread handles them in
order, so a slow install never blocks the connection and state changes have one writer.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho

from device_profiles import DeviceProfile
from edge_runtime import protocol as wire
from edge_runtime.artifacts import ArtifactStore, Download, atomic_write
from edge_runtime.backends import FORMAT_OF, Backend, Program, get_backend
from edge_runtime.data import load_npz
from edge_runtime.errors import ArtifactError, BackendError, EdgeError, ProtocolError
from edge_runtime.mqtt import BrokerAddress, connect, make_client

log = logging.getLogger(__name__)


class AgentState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(frozen=True)
class AgentConfig:
    """How one device runs. ``backend`` forces a backend instead of the profile's order."""

    device_id: str
    profile: DeviceProfile
    broker: BrokerAddress
    store_dir: Path
    eval_data: Path | None = None
    backend: str | None = None
    fetch_timeout: float = 10.0

    def __post_init__(self) -> None:
        wire.check_device_id(self.device_id)


@dataclass(frozen=True)
class Active:
    """The program being served and where it came from."""

    ref: wire.ArtifactRef
    backend: str
    program: Program


class EdgeAgent:
    """One device's agent. ``run()`` blocks; ``start()`` runs it in the background."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.state = AgentState.NEW
        self.store = ArtifactStore(config.store_dir)
        self.active: Active | None = None
        self.eval_set = load_npz(config.eval_data) if config.eval_data else None
        self._report = wire.ReportedState(
            device_id=config.device_id,
            profile=config.profile.name,
            backends=config.profile.backends,
            serial=0,
            phase="idle",
        )
        self._applied_serial = -1
        self._download: tuple[wire.DesiredState, wire.ArtifactRef, str, Download] | None = None
        self._last_progress = 0.0
        self._backends: dict[str, Backend] = {}
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._worker: threading.Thread | None = None
        self.client = make_client(config.device_id, config.broker)
        offline = wire.Status(device_id=config.device_id, online=False).encode()
        self.client.will_set(self._topic("status"), offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> EdgeAgent:
        """Connect and handle messages in background threads; BrokerUnreachable if it can't."""
        if self.state is not AgentState.NEW:
            raise RuntimeError(f"cannot start an agent in state {self.state.value}")
        connect(self.client, self.config.broker)
        self.client.loop_start()
        self._worker = threading.Thread(
            target=self._work, name=f"agent-{self.config.device_id}", daemon=True
        )
        self._worker.start()
        self.state = AgentState.RUNNING
        return self

    def run(self) -> None:
        """Start, then block until :meth:`stop` is called (from a signal handler, say)."""
        self.start()
        self._stopped.wait()

    def stop(self) -> None:
        """Say offline, disconnect and stop the threads. Safe to call twice."""
        if self.state is not AgentState.RUNNING:
            self.state = AgentState.STOPPED
            self._stopped.set()
            return
        self.state = AgentState.STOPPED
        self._inbox.put(None)
        if self._worker:
            self._worker.join(timeout=10)
        offline = wire.Status(device_id=self.config.device_id, online=False).encode()
        self.client.publish(self._topic("status"), offline, qos=1, retain=True).wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()
        self._stopped.set()

    # --- serving ------------------------------------------------------------------------

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class scores for a batch, from the active program."""
        active = self.active
        if active is None:
            raise EdgeError("no program is active yet")
        return active.program.run(x)[0]

    # --- MQTT callbacks (network thread: queue only) --------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        client.subscribe(
            [(self._topic("desired"), 1), (wire.chunk_topic(self.config.device_id, "+", "+"), 1)]
        )
        online = wire.Status(device_id=self.config.device_id, online=True).encode()
        client.publish(self._topic("status"), online, qos=1, retain=True)
        client.publish(self._topic("reported"), self._report.encode(), qos=1, retain=True)
        log.info("%s connected to %s", self.config.device_id, self.config.broker)

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        self._inbox.put((msg.topic, msg.payload))

    # --- worker thread ------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                self._check_stall()
                continue
            if item is None:
                return
            try:
                self._handle(*item)
            except (ProtocolError, ArtifactError) as exc:
                self._reject(getattr(exc, "code", "artifact"), str(exc), item[0])
            except Exception:  # one place where handler bugs are caught and logged
                log.exception("handling a message on %s failed", item[0])
            self._check_stall()

    def _handle(self, topic: str, payload: bytes) -> None:
        device_id, kind, rest = wire.parse_device_topic(topic)
        if device_id != self.config.device_id:
            raise ProtocolError(f"message for device {device_id}", field="topic")
        if kind == "desired":
            self._on_desired(wire.decode(wire.DesiredState, payload))
        elif kind == "chunks" and len(rest) == 2 and rest[1].isdigit():
            self._on_chunk(rest[0], int(rest[1]), payload)
        else:
            raise ProtocolError(f"unexpected topic {topic[:200]!r}", field="topic")

    def _on_desired(self, desired: wire.DesiredState) -> None:
        if desired.device_id != self.config.device_id:
            raise ProtocolError("names another device", field="device_id", code="wrong-device")
        if desired.serial <= self._applied_serial or (
            self._download and desired.serial <= self._download[0].serial
        ):
            log.info(
                "desired serial %d is not newer than %d; ignored",
                desired.serial,
                self._applied_serial,
            )
            return
        backend, ref = self._choose(desired.artifacts)
        if self.store.has(ref.sha256):
            self._install(desired, ref, backend)
            return
        self._download = (desired, ref, backend, self.store.download(ref))
        self._set_report(
            phase="downloading",
            serial=desired.serial,
            detail=f"fetching {ref.name} ({ref.size} bytes)",
        )
        self._request_chunks(0)

    def _choose(self, artifacts: tuple[wire.ArtifactRef, ...]) -> tuple[str, wire.ArtifactRef]:
        order = (self.config.backend,) if self.config.backend else self.config.profile.backends
        for name in order:
            ref = next((a for a in artifacts if a.format == FORMAT_OF[name]), None)
            if ref is None:
                continue
            try:
                self._backends.setdefault(name, get_backend(name, threads=1))
            except BackendError as exc:
                log.warning("backend %s is unusable here: %s", name, exc)
                continue
            return name, ref
        formats = sorted({a.format for a in artifacts})
        raise ProtocolError(
            f"no artifact this device can run: offered {formats}, backends {list(order)}",
            field="artifacts",
            code="no-usable-artifact",
        )

    def _on_chunk(self, sha: str, index: int, data: bytes) -> None:
        if self._download is None or self._download[1].sha256 != sha:
            log.debug("chunk %d of %s arrived with no download for it", index, sha[:12])
            return
        desired, ref, backend, download = self._download
        download.add(index, data)
        self._last_progress = self.clock()
        if not download.complete:
            return
        self._set_report(phase="verifying", detail=f"verifying {ref.name}")
        self._download = None
        try:
            download.finish()
        except ArtifactError as exc:
            self._set_report(phase="failed", detail=str(exc))
            raise
        self._install(desired, ref, backend)

    def _install(self, desired: wire.DesiredState, ref: wire.ArtifactRef, backend: str) -> None:
        self._set_report(phase="installing", serial=desired.serial, detail=f"loading {ref.name}")
        try:
            program = self._backends[backend].load(self.store.read(ref.sha256))
            accuracy = self._evaluate(program)
        except (BackendError, ArtifactError) as exc:
            self._set_report(phase="failed", detail=f"{ref.name}: {exc}"[:1000])
            self._reject("install-failed", str(exc), self._topic("desired"))
            return
        self.active = Active(ref, backend, program)
        self._applied_serial = desired.serial
        self._set_report(
            phase="active",
            active=(ref.sha256,),
            backend=backend,
            accuracy=accuracy,
            detail=f"serving {ref.name}",
        )
        log.info(
            "%s serves %s on %s (accuracy %s)",
            self.config.device_id,
            ref.name,
            backend,
            "n/a" if accuracy is None else f"{accuracy:.4f}",
        )

    def _evaluate(self, program: Program) -> float | None:
        """Smoke-test the program; with an eval set, return its accuracy on it."""
        if self.eval_set is None:
            shape = tuple(1 if d == -1 else d for d in program.inputs[0].shape)
            scores = program.run(np.zeros(shape, dtype=program.inputs[0].dtype))[0]
            if not np.isfinite(scores).all():
                raise BackendError("smoke inference gave non-finite outputs")
            return None
        x, y = self.eval_set
        scores = program.run(x)[0]
        if not np.isfinite(scores).all():
            raise BackendError("inference on the evaluation set gave non-finite outputs")
        return float((scores.argmax(axis=1) == y).mean())

    def _check_stall(self) -> None:
        if self._download and self.clock() - self._last_progress > self.config.fetch_timeout:
            missing = self._download[3].missing()
            log.warning(
                "download of %s stalled; asking again from chunk %d",
                self._download[1].name,
                missing[0],
            )
            self._request_chunks(missing[0])

    def _request_chunks(self, first: int) -> None:
        assert self._download is not None
        request = wire.FetchRequest(
            device_id=self.config.device_id, sha256=self._download[1].sha256, first_chunk=first
        )
        self.client.publish(self._topic("fetch"), request.encode(), qos=1)
        self._last_progress = self.clock()

    # --- reporting ----------------------------------------------------------------------

    def _set_report(self, **changes) -> None:
        self._report = replace(self._report, ts=time.time(), **changes)
        payload = self._report.encode()
        self.client.publish(self._topic("reported"), payload, qos=1, retain=True)
        try:  # for `eclm edge status`; a full disk must not stop the agent
            atomic_write(self.store.root / "reported.json", payload)
        except OSError as exc:
            log.warning("cannot save the reported state: %s", exc)

    def _reject(self, code: str, reason: str, topic: str) -> None:
        log.warning("%s rejected a message on %s: %s", self.config.device_id, topic, reason)
        event = wire.Event(
            device_id=self.config.device_id, code=code[:64], reason=reason[:2000], topic=topic[:512]
        )
        self.client.publish(self._topic("events"), event.encode(), qos=1)

    def _topic(self, kind: str) -> str:
        return wire.device_topic(self.config.device_id, kind)

    @property
    def report(self) -> wire.ReportedState:
        """The state last reported."""
        return self._report

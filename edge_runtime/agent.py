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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import paho.mqtt.client as paho

from device_profiles import DeviceProfile
from edge_runtime import protocol as wire
from edge_runtime.adapter import check_head
from edge_runtime.artifacts import ArtifactStore, Download, atomic_write
from edge_runtime.backends import FORMAT_OF, Backend, get_backend
from edge_runtime.data import load_npz
from edge_runtime.errors import ArtifactError, BackendError, EdgeError, ProtocolError
from edge_runtime.learning import Learner, LearnerConfig
from edge_runtime.monitor import PsutilSource, ResourceSource
from edge_runtime.mqtt import BrokerAddress, connect, make_client, wait_published
from edge_runtime.runner import ModularRunner, ProgramRunner, Runner
from edge_runtime.trust import Gate, load_public_key
from edge_runtime.watchdog import Notifier

log = logging.getLogger(__name__)


class Network(Protocol):
    """Runs the network side of MQTT clients in place of paho's thread per client (a
    fleet simulator runs hundreds of agents on one)."""

    def add(self, client: paho.Client) -> None: ...

    def remove(self, client: paho.Client) -> None: ...


def _chunk_index(name: str) -> bool:
    """Whether a topic level is a chunk index: str.isdigit() also passes '²' and '٣',
    which int() refuses, and int() refuses 5,000 digits."""
    return name.isascii() and name.isdigit() and len(name) <= 12


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
    fetch_window: int = 2  # chunks asked for and not yet arrived: what a cut can cost
    policy_interval: float = 5.0  # seconds between resource readings
    trust_key: Path | None = None  # the cloud's public key; None accepts unsigned states
    labels: tuple[str, ...] = ()  # key=value, for rollouts to pick devices by
    learning: LearnerConfig = LearnerConfig()  # the adapter heads trained on the device

    def __post_init__(self) -> None:
        wire.check_device_id(self.device_id)
        wire.check_labels(self.labels)
        if self.fetch_window < 1:
            raise ValueError(f"fetch_window: must be >= 1, got {self.fetch_window}")


@dataclass
class _Fetch:
    """The artifacts of one desired state still to download, one at a time."""

    desired: wire.DesiredState
    backend: str
    refs: list[wire.ArtifactRef]
    pending: list[wire.ArtifactRef]
    current: Download
    asked: list[int] = field(default_factory=list)  # chunks of ``current`` on their way
    queue: list[int] = field(default_factory=list)  # chunks of ``current`` not asked for


class EdgeAgent:
    """One device's agent. ``run()`` blocks; ``start()`` runs it in the background."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        resources: ResourceSource | None = None,
        backends: Callable[[str], Backend] | None = None,
        network: Network | None = None,
    ):
        """``backends(name)`` builds the backend ``name`` (default: its own, one thread);
        ``network`` runs the client's network side (default: paho's own thread)."""
        self.config = config
        self.clock = clock
        self.resources = resources or PsutilSource()
        self.state = AgentState.NEW
        self.store = ArtifactStore(config.store_dir)
        if config.trust_key is None:
            log.warning("no trust key: accepting unsigned desired states (development only)")
        saved = self._saved_active()
        self.gate = Gate(
            load_public_key(config.trust_key) if config.trust_key else None,
            self.store.root / "trust.json",
            config.profile.name,
            floor=saved.serial if saved else -1,
        )
        self.runner: Runner | None = None
        self.eval_set = load_npz(config.eval_data) if config.eval_data else None
        self._report = wire.ReportedState(
            device_id=config.device_id,
            profile=config.profile.name,
            backends=config.profile.backends,
            labels=config.labels,
            serial=0,
            phase="idle",
        )
        self._report_lock = threading.Lock()
        self._applied_serial = -1
        self._active_shas: set[str] = set()
        self.duplicate_chunks = 0  # chunks that arrived again (after a cut, say)
        self.learner: Learner | None = None  # with a modular sub-model that brings a head
        self.uploads = 0
        self.warm_starts = 0
        self.offers_received = 0
        self.budget_violations = 0  # readings after which the sub-model stayed too large
        self.swaps = 0  # module sets switched to on a resource reading
        self._fetch: _Fetch | None = None
        self._last_progress = 0.0
        self._last_tick = 0.0
        self._backends: dict[str, Backend] = {}
        self._make_backend = backends or (lambda name: get_backend(name, threads=1))
        self._network = network
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._worker: threading.Thread | None = None
        self.client = make_client(config.device_id, config.broker)
        offline = wire.Status(device_id=config.device_id, online=False).encode()
        self.client.will_set(self._topic("status"), offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.notifier = Notifier.from_env()  # systemd Type=notify and WatchdogSec=

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> EdgeAgent:
        """Connect and handle messages in background threads; BrokerUnreachable if it can't."""
        if self.state is not AgentState.NEW:
            raise RuntimeError(f"cannot start an agent in state {self.state.value}")
        connect(self.client, self.config.broker)
        if self._network is None:
            self.client.loop_start()
        else:
            self._network.add(self.client)
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
        self.notifier.stopping()
        self._inbox.put(None)
        if self._worker:
            self._worker.join(timeout=10)
        offline = wire.Status(device_id=self.config.device_id, online=False).encode()
        # acknowledged before disconnecting: after a clean disconnect no last will is sent
        sent = self.client.publish(self._topic("status"), offline, qos=1, retain=True)
        if not wait_published(sent, 10):  # the broker sends the last will when it notices
            log.warning("%s: offline status not acknowledged", self.config.device_id)
        self.client.disconnect()
        if self._network is None:
            self.client.loop_stop()
        else:
            self._network.remove(self.client)
        self._stopped.set()

    # --- serving ------------------------------------------------------------------------

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class scores for a batch, from what is active."""
        runner = self.runner
        if runner is None:
            raise EdgeError("no program is active yet")
        return runner.predict(x)

    def enter(self, domain: str) -> None:
        """The input now comes from ``domain`` (the context: camera, site, sensor mode).
        Entering another domain uploads what the device learned in the one it leaves and
        tells the cloud, which may send a warm start; a device that knows its context is
        about to change calls this before the first sample of it arrives."""
        learner = self.learner
        if self.runner is None or learner is None:
            return
        left = learner.enter(domain)
        if left is not None:
            self._upload(left)
        if self._report.domain != domain:
            self._set_report(domain=domain)

    def infer(self, x: np.ndarray, domain: str) -> np.ndarray:
        """Class scores for a batch seen in ``domain`` (see :meth:`enter`), through that
        domain's adapter when the device adapts."""
        runner = self.runner
        if runner is None:
            raise EdgeError("no program is active yet")
        self.enter(domain)
        learner = self.learner
        if learner is None:
            return runner.predict(x)
        return learner.logits(runner.features(x))

    def learn(self, x: np.ndarray, y: np.ndarray) -> None:
        """Train the current domain's adapter on labelled samples (after predicting them);
        uploads on schedule and reports a label mix that moved."""
        runner, learner = self.runner, self.learner
        if runner is None or learner is None:
            return
        features = runner.features(x) if len(y) else np.zeros((0, 1), np.float32)
        if learner.learn(features, y):
            self._upload(learner.domain)
        mix = learner.mix_shifted()
        if mix is not None:
            self._set_report(mix=tuple(round(float(p), 4) for p in mix))

    def _upload(self, domain: str) -> None:
        update = self.learner.update(domain, self.config.device_id, str(self._applied_serial))
        self.client.publish(self._topic("updates"), update.encode(), qos=1)
        self.uploads += 1
        log.info("uploaded the %s adapter (%d samples)", domain, update.samples)

    def tick(self) -> bool:
        """Read the resources and let the sub-model follow them; True if it changed."""
        runner = self.runner
        if runner is None:
            return False
        self._last_tick = self.clock()
        try:
            changed = runner.tick(self.resources.read())
        except (BackendError, ArtifactError) as exc:  # the previous set keeps serving
            self._reject("swap-failed", str(exc), self._topic("reported"))
            return False
        finally:
            if runner.over_budget:
                self.budget_violations += 1
        if changed:
            self.swaps += 1
            self._set_report(active=runner.active, detail=runner.detail)
        return changed

    # --- MQTT callbacks (network thread: queue only) --------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        client.subscribe(
            [
                (self._topic("desired"), 1),
                (self._topic("adapter"), 1),
                (wire.chunk_topic(self.config.device_id, "+", "+"), 1),
            ]
        )
        online = wire.Status(device_id=self.config.device_id, online=True).encode()
        client.publish(self._topic("status"), online, qos=1, retain=True)
        client.publish(self._topic("reported"), self._report.encode(), qos=1, retain=True)
        log.info("%s connected to %s", self.config.device_id, self.config.broker)
        self.notifier.ready(f"connected to {self.config.broker}")

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        self.client.traffic.add("received", msg.topic, msg.payload)
        self._inbox.put((msg.topic, msg.payload))

    # --- worker thread ------------------------------------------------------------------

    def _work(self) -> None:
        self._restore()
        while True:
            try:
                item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                self._idle()
                continue
            if item is None:
                return
            try:
                self._handle(*item)
            except (ProtocolError, ArtifactError) as exc:
                self._reject(getattr(exc, "code", "artifact"), str(exc), item[0])
            except Exception as exc:  # one place where handler bugs are caught and reported
                log.exception("handling a message on %s failed", item[0])
                self._fetch = None  # what was active keeps serving
                self._set_report(phase="failed", detail=f"internal error: {exc!r}"[:1000])
                self._reject("internal", repr(exc), item[0])
            self._idle()

    def _idle(self) -> None:
        self.notifier.ping()  # the worker loop turns: systemd's watchdog need not restart us
        self._check_stall()
        if self.clock() - self._last_tick >= self.config.policy_interval:
            self.tick()

    def _handle(self, topic: str, payload: bytes) -> None:
        device_id, kind, rest = wire.parse_device_topic(topic)
        if device_id != self.config.device_id:
            raise ProtocolError(f"message for device {device_id}", field="topic")
        if kind == "desired":
            self._on_desired(wire.decode(wire.DesiredState, payload))
        elif kind == "adapter":
            self._on_offer(wire.decode(wire.AdapterOffer, payload))
        elif kind == "chunks" and len(rest) == 2 and _chunk_index(rest[1]):
            self._on_chunk(rest[0], int(rest[1]), wire.unpack_chunk(payload))
        else:
            raise ProtocolError(f"unexpected topic {topic[:200]!r}", field="topic")

    def _on_desired(self, desired: wire.DesiredState) -> None:
        if desired.device_id != self.config.device_id:
            raise ProtocolError("names another device", field="device_id", code="wrong-device")
        again = self.gate.check(desired)  # ProtocolError: refused, what runs keeps running
        if again and desired.serial in (
            self._applied_serial,
            self._fetch.desired.serial if self._fetch else None,
        ):
            log.info("desired serial %d is applied or on its way; ignored", desired.serial)
            return
        if not again:
            self.gate.accept(desired)
        backend, refs = self._choose(desired)
        missing = [r for r in refs if not self.store.has(r.sha256)]
        if not missing:
            self._fetch = None
            self._install(desired, refs, backend)
            return
        self._fetch = _Fetch(desired, backend, refs, missing[1:], self.store.download(missing[0]))
        self._set_report(
            phase="downloading",
            serial=desired.serial,
            detail=f"fetching {len(missing)} artifacts ({sum(r.size for r in missing)} bytes)",
        )
        self._continue_fetch()

    def _on_offer(self, offer: wire.AdapterOffer) -> None:
        self.offers_received += 1
        if offer.device_id != self.config.device_id:
            raise ProtocolError("names another device", field="device_id", code="wrong-device")
        self.gate.check_offer(offer)
        if self.learner is None:
            log.info("adapter offer for %s ignored: this device does not adapt", offer.domain)
        else:
            self.learner.warm_start(offer.domain, offer.tensors(), offer.samples)
            self.warm_starts += 1
            log.info("warm start for %s (the fleet's %d samples)", offer.domain, offer.samples)

    def _choose(self, desired: wire.DesiredState) -> tuple[str, list[wire.ArtifactRef]]:
        """The first backend of the profile's order that can run what is offered, and the
        artifacts it needs: one whole program, or every part of a modular sub-model."""
        order = (self.config.backend,) if self.config.backend else self.config.profile.backends
        for name in order:
            refs = [a for a in desired.artifacts if a.format == FORMAT_OF[name]]
            if not refs:
                continue
            try:
                if name not in self._backends:
                    self._backends[name] = self._make_backend(name)
            except BackendError as exc:
                log.warning("backend %s is unusable here: %s", name, exc)
                continue
            if not desired.options:
                return name, refs[:1]
            return name, refs + [a for a in desired.artifacts if a.format == "safetensors"]
        formats = sorted({a.format for a in desired.artifacts})
        raise ProtocolError(
            f"no artifact this device can run: offered {formats}, backends {list(order)}",
            field="artifacts",
            code="no-usable-artifact",
        )

    def _on_chunk(self, sha: str, index: int, data: bytes) -> None:
        fetch = self._fetch
        if fetch is None or fetch.current.ref.sha256 != sha:
            log.debug("chunk %d of %s arrived with no download for it", index, sha[:12])
            return
        if not fetch.current.add(index, data):
            self.duplicate_chunks += 1
        self._last_progress = self.clock()
        if index in fetch.asked:
            fetch.asked.remove(index)
        self._continue_fetch()

    def _continue_fetch(self) -> None:
        """Keep ``fetch_window`` chunks of the current download on their way (a resumed
        download asks only for the chunks it lacks); when it has them all, verify it and go
        on to the next artifact, then install."""
        fetch = self._fetch
        assert fetch is not None
        while fetch.current.complete:
            self._set_report(phase="verifying", detail=f"verifying {fetch.current.ref.name}")
            try:
                fetch.current.finish()
            except ArtifactError as exc:
                self._fetch = None
                self._set_report(phase="failed", detail=str(exc)[:1000])
                raise
            if not fetch.pending:
                self._fetch = None
                self._install(fetch.desired, fetch.refs, fetch.backend)
                return
            fetch.current = self.store.download(fetch.pending.pop(0))
            fetch.asked, fetch.queue = [], []
            self._set_report(phase="downloading", detail=f"fetching {fetch.current.ref.name}")
        if not fetch.asked and not fetch.queue:
            fetch.queue = fetch.current.missing()
        while len(fetch.asked) < self.config.fetch_window and fetch.queue:
            index = fetch.queue.pop(0)
            if index not in fetch.current.received:
                self._request_chunk(index)
                fetch.asked.append(index)

    def _install(
        self, desired: wire.DesiredState, refs: list[wire.ArtifactRef], backend: str
    ) -> None:
        self._set_report(
            phase="installing", serial=desired.serial, detail=f"loading {len(refs)} programs"
        )
        try:
            if desired.options:
                runner: Runner = ModularRunner(
                    backend,
                    self._backends[backend],
                    self.store,
                    refs,
                    desired.options,
                    self.config.profile.budget,
                    self.resources.read(),
                )
            else:
                runner = ProgramRunner(
                    backend, self._backends[backend], refs[0], self.store.read(refs[0].sha256)
                )
            accuracy, latency = self._health_check(runner)
        except (BackendError, ArtifactError, ProtocolError) as exc:
            self._set_report(phase="failed", detail=str(exc)[:1000])
            self._reject("install-failed", str(exc), self._topic("desired"))
            return
        try:
            self._adapt_on(runner, refs)
        except (ProtocolError, ArtifactError, BackendError) as exc:
            runner.close()
            self._set_report(phase="failed", detail=f"adapter: {exc}"[:1000])
            self._reject("install-failed", str(exc), self._topic("desired"))
            return
        previous, self.runner = self.runner, runner
        if previous is not None:
            previous.close()
        self._applied_serial = desired.serial
        self._last_tick = self.clock()
        try:  # what to serve after a restart, whatever the retained desired state says
            atomic_write(self._active_path, desired.encode())
        except OSError as exc:
            log.warning("cannot save the active state: %s", exc)
        else:  # keep this set and the one before it (a rollback needs no download)
            shas = {r.sha256 for r in refs}
            removed = self.store.prune(shas | self._active_shas)
            self._active_shas = shas
            if removed:
                log.info("removed %d artifacts no longer needed", len(removed))
        self._set_report(
            phase="active",
            active=runner.active,
            backend=backend,
            accuracy=accuracy,
            detail=f"{runner.detail}; {latency:.1f} ms per sample",
        )
        log.info(
            "%s %s on %s (accuracy %s, %.1f ms per sample)",
            self.config.device_id,
            runner.detail,
            backend,
            "n/a" if accuracy is None else f"{accuracy:.4f}",
            latency,
        )

    def _adapt_on(self, runner: Runner, refs: list[wire.ArtifactRef]) -> None:
        """Start (or rebase) the learner on the head the desired state brings, if its
        shape fits the sub-model's features."""
        head = next((r for r in refs if r.part == "adapter" and r.format == "safetensors"), None)
        if head is None:
            return
        like = self.learner.base if self.learner else None
        features = runner.features(runner.one_sample()).shape[1]
        base = check_head(self.store.read(head.sha256), features, like)
        if self.learner is None:
            self.learner = Learner(base, self.config.learning)
        else:
            self.learner.rebase(base)

    @property
    def _active_path(self) -> Path:
        return self.store.root / "active.json"

    def _saved_active(self) -> wire.DesiredState | None:
        """The last state that passed its health check, as saved on disk."""
        try:
            return wire.decode(wire.DesiredState, self._active_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ProtocolError) as exc:
            log.error("cannot read the active state from %s: %s", self._active_path, exc)
            return None

    def _restore(self) -> None:
        """Serve the last state that passed its health check, before any new one arrives:
        a restart (even in the middle of an update) comes back to a working set."""
        desired = self._saved_active()
        if desired is None:
            return
        try:
            backend, refs = self._choose(desired)
            if all(self.store.has(r.sha256) for r in refs):
                log.info("restoring serial %d from %s", desired.serial, self._active_path)
                # Nothing held is pruned yet: what arrived for the next state stays.
                self._active_shas = self.store.names()
                self._install(desired, refs, backend)
        except (ProtocolError, ArtifactError, BackendError) as exc:
            log.error("cannot restore serial %d: %s", desired.serial, exc)

    def _health_check(self, runner: Runner) -> tuple[float | None, float]:
        """Accuracy on the eval set (None without one) and single-sample latency; a runner
        with non-finite outputs or over the profile's latency budget is closed and refused."""
        try:
            accuracy, latency = runner.evaluate(self.eval_set), runner.latency_ms()
            budget = self.config.profile.budget.latency_ms
            if latency > budget:
                raise BackendError(
                    f"health check: {latency:.1f} ms per sample, budget {budget:g} ms"
                )
        except Exception:
            runner.close()
            raise
        return accuracy, latency

    def _check_stall(self) -> None:
        fetch = self._fetch
        if fetch and self.clock() - self._last_progress > self.config.fetch_timeout:
            log.warning(
                "download of %s stalled; asking again for chunks %s",
                fetch.current.ref.name,
                fetch.asked,
            )
            for index in fetch.asked:
                self._request_chunk(index)
            self._last_progress = self.clock()

    def _request_chunk(self, index: int) -> None:
        assert self._fetch is not None
        request = wire.FetchRequest(
            device_id=self.config.device_id,
            sha256=self._fetch.current.ref.sha256,
            first_chunk=index,
            count=1,
        )
        self.client.publish(self._topic("fetch"), request.encode(), qos=1)
        self._last_progress = self.clock()

    # --- reporting ----------------------------------------------------------------------

    def _set_report(self, **changes) -> None:
        with self._report_lock:  # the worker and the serving thread both report, in order
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

"""The edge agent: MQTT loop, desired-state reconciliation, program install and serving.

paho's network thread only queues incoming messages; one worker thread handles them in
order, so a slow install never blocks the connection and state changes have one writer.
The agent wires its parts together: the :class:`~edge_runtime.reconcile.Keeper` brings the
store to a goal through a :class:`~edge_runtime.download.Transfer`, the
:class:`~edge_runtime.installer.Installer` turns the goal into a health-checked runner and
remembers it, the :class:`~edge_runtime.reporting.Reporter` says what the device does, and
:class:`~edge_runtime.stats.AgentStats` counts it.

The store heals itself: an object is used only after its sha256 was checked (every object
at start, a desired state's objects when it arrives, each program as it is loaded); a
damaged one is moved aside, reported and fetched again while the last good set serves.
"""

from __future__ import annotations

import enum
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import paho.mqtt.client as paho

import eclm_wire as wire
from eclm_wire import EventCode, Phase
from eclm_wire.errors import ProtocolError
from eclm_wire.mqtt import connect, make_client, wait_published
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import Backend, get_backend
from edge_runtime.config import AgentConfig  # imported from here too, as before
from edge_runtime.datasets import load_eval_set
from edge_runtime.errors import ArtifactError, BackendError, DamagedArtifact, NotServing
from edge_runtime.installer import Installed, Installer
from edge_runtime.learning import Learner
from edge_runtime.monitor import PsutilSource, Reading, ResourceSource
from edge_runtime.offload import offloader
from edge_runtime.reconcile import Goal, Keeper
from edge_runtime.reporting import Reporter
from edge_runtime.runner import Runner
from edge_runtime.stats import AgentStats
from edge_runtime.trust import Gate, load_public_key
from edge_runtime.watchdog import Notifier

log = logging.getLogger(__name__)
_ARTIFACTS = f"{wire.TOPIC_ROOT}/artifacts/"


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
        self.runner: Runner | None = None
        self.eval_set = load_eval_set(config.eval_data) if config.eval_data else None
        self.installer = Installer(
            self.store,
            config.profile,
            self.resources,
            backends or (lambda name: get_backend(name, **config.backend_options(name))),
            backend=config.backend,
            eval_set=self.eval_set,
        )
        saved = self.installer.saved()
        self.gate = Gate(
            load_public_key(config.trust_key) if config.trust_key else None,
            self.store.root / "trust.json",
            config.profile.name,
            floor=saved[0].serial if saved else -1,
        )
        self.stats = AgentStats()
        self.client = make_client(config.device_id, config.broker)
        self.voice = Reporter.idle(config, self.client, self.store.root / "reported.json", clock)
        self.keeper = Keeper(
            self.store,
            self.voice,
            install=self._install,
            request=self._request_chunk,
            clock=clock,
            window=config.fetch_window,
            timeout=config.fetch_timeout,
            retry=config.retry,
            scrub_interval=config.scrub_interval,
            stats=self.stats,
            listen=self._listen,
            ask_shared=self._ask_shared,
            broadcast_wait=config.broadcast_wait,
            content=config.content,
        )
        self._applied_serial = -1
        self.learner: Learner | None = None  # with a modular sub-model that brings a head
        self._last_tick = 0.0
        self._last_health = -math.inf
        self._reading: Reading | None = None  # the latest the policy saw
        self._network = network
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._worker: threading.Thread | None = None
        offline = wire.Status(device_id=config.device_id, online=False).encode()
        self.client.will_set(self._topic("status"), offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.offload = offloader(self.client, config)  # None unless the policy offloads
        self.notifier = Notifier.from_env()  # systemd Type=notify and WatchdogSec=

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> EdgeAgent:
        """Connect and handle messages in background threads; BrokerUnreachable if it can't."""
        if self.state is not AgentState.NEW:
            raise RuntimeError(f"cannot start an agent in state {self.state.value}")
        if self.config.insecure:
            log.warning(
                "%s runs INSECURE: no trust key, unsigned desired states are accepted "
                "(development only; it says so in its reported state)",
                self.config.device_id,
            )
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
            raise NotServing("no program is active yet")
        return (
            self.offload.predict(runner, x, runner.predict) if self.offload else runner.predict(x)
        )

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
        if self.report.domain != domain:
            self.voice.set(domain=domain)

    def infer(self, x: np.ndarray, domain: str) -> np.ndarray:
        """Class scores for a batch seen in ``domain`` (see :meth:`enter`), through that
        domain's adapter when the device adapts."""
        runner = self.runner
        if runner is None:
            raise NotServing("no program is active yet")
        self.enter(domain)
        learner = self.learner
        local = runner.predict if learner is None else lambda x: learner.logits(runner.features(x))
        return self.offload.predict(runner, x, local) if self.offload else local(x)

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
            self.voice.set(mix=tuple(round(float(p), 4) for p in mix))

    def _upload(self, domain: str) -> None:
        update = self.learner.update(domain, self.config.device_id, str(self._applied_serial))
        self.client.publish(self._topic("updates"), update.encode(), qos=1)
        self.stats.uploads += 1
        log.info("uploaded the %s adapter (%d samples)", domain, update.samples)

    def tick(self) -> bool:
        """Read the resources and let the sub-model follow them; True if it changed."""
        runner = self.runner
        if runner is None:
            return False
        self._last_tick = self.clock()
        try:
            self._reading = self.resources.read()
            changed = runner.tick(self._reading)
        except (BackendError, ArtifactError) as exc:  # the previous set keeps serving
            self.voice.event(EventCode.SWAP_FAILED, str(exc), self._topic("reported"))
            if isinstance(exc, DamagedArtifact):
                self.keeper.damaged(exc.sha256, "a module")  # fetched again when idle
            return False
        finally:
            if runner.over_budget:
                self.stats.budget_violations += 1
        if changed:
            self.stats.swaps += 1
            self.voice.set(active=runner.active, detail=runner.detail)
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
            + ([self.offload.subscription] if self.offload else [])
        )
        online = wire.Status(device_id=self.config.device_id, online=True).encode()
        client.publish(self._topic("status"), online, qos=1, retain=True)
        self.voice.publish_report()
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
                self.stats.refusals += 1
                self.voice.refused(getattr(exc, "code", EventCode.ARTIFACT), str(exc), item[0])
            except Exception as exc:  # one place where handler bugs are caught and reported
                log.exception("handling a message on %s failed", item[0])
                self.stats.refusals += 1
                self.keeper.drop()  # what was active keeps serving
                self.voice.set(phase=Phase.FAILED, detail=f"internal error: {exc!r}"[:1000])
                self.voice.refused(EventCode.INTERNAL, repr(exc), item[0])
            self._idle()

    def _idle(self) -> None:
        self.notifier.ping()  # the worker loop turns: systemd's watchdog need not restart us
        self.voice.flush()
        self.keeper.idle()
        if self.clock() - self._last_tick >= self.config.policy_interval:
            self.tick()
        if self.clock() - self._last_health >= self.config.health_interval:
            self._report_health()

    def _report_health(self) -> None:
        """Put the latest resource reading in the report: the cloud's view of the board,
        and a heartbeat from a device that has nothing else to say."""
        self._last_health = self.clock()
        reading = self._reading if self.runner and self._reading else self.resources.read()
        self.voice.set(
            available_mb=round(max(reading.available_mb, 0.0), 1),
            cpu_percent=round(min(max(reading.cpu_percent, 0.0), 100.0), 1),
            temperature_c=None
            if reading.temperature_c is None
            else round(reading.temperature_c, 1),
        )

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic.startswith(_ARTIFACTS):  # a broadcast: chunks checked like our own
            sha, index = wire.parse_artifact_topic(topic)
            if index is None:
                self.keeper.on_done(wire.decode(wire.BroadcastDone, payload))
            else:
                self.keeper.on_chunk(sha, index, wire.unpack_chunk(payload))
            return
        device_id, kind, rest = wire.parse_device_topic(topic)
        if device_id != self.config.device_id:
            raise ProtocolError(f"message for device {device_id}", field="topic")
        if kind == "desired":
            self._on_desired(wire.decode(wire.DesiredState, payload))
        elif kind == "adapter":
            self._on_offer(wire.decode(wire.AdapterOffer, payload))
        elif kind == "chunks" and len(rest) == 2 and _chunk_index(rest[1]):
            self.keeper.on_chunk(rest[0], int(rest[1]), wire.unpack_chunk(payload))
        else:
            raise ProtocolError(f"unexpected topic {topic[:200]!r}", field="topic")

    def _on_desired(self, desired: wire.DesiredState) -> None:
        if desired.device_id != self.config.device_id:
            raise ProtocolError("names another device", field="device_id", code="wrong-device")
        again = self.gate.check(desired)  # ProtocolError: refused, what runs keeps running
        goal = self.keeper.goal
        if again and goal is not None and desired.serial == goal.desired.serial:
            log.info("desired serial %d is on its way; ignored", desired.serial)
            return
        if not again:
            self.gate.accept(desired)
        backend, refs = self.installer.choose(desired)
        # The state that serves already is only checked: its damaged parts come again.
        applied = again and desired.serial == self._applied_serial
        self.keeper.want(Goal(desired, backend, refs, install=not applied))

    def _on_offer(self, offer: wire.AdapterOffer) -> None:
        self.stats.offers_received += 1
        if offer.device_id != self.config.device_id:
            raise ProtocolError("names another device", field="device_id", code="wrong-device")
        self.gate.check_offer(offer)
        if self.learner is None:
            log.info("adapter offer for %s ignored: this device does not adapt", offer.domain)
        else:
            self.learner.warm_start(offer.domain, offer.tensors(), offer.samples)
            self.stats.warm_starts += 1
            log.info("warm start for %s (the fleet's %d samples)", offer.domain, offer.samples)

    def _install(self, goal: Goal) -> None:
        desired, refs, backend = goal.desired, goal.refs, goal.backend
        self.voice.set(
            phase=Phase.INSTALLING, serial=desired.serial, detail=f"loading {len(refs)} programs"
        )
        like = self.learner.base if self.learner else None
        try:
            installed = self.installer.load(desired, refs, backend, like)
        except DamagedArtifact as exc:  # changed since it was checked: fetch it again
            self.keeper.damaged(exc.sha256, "a program")
            self.keeper.want(goal)
            return
        except (BackendError, ArtifactError, ProtocolError) as exc:
            self.voice.set(phase=Phase.FAILED, detail=str(exc)[:1000])
            self.voice.event(EventCode.INSTALL_FAILED, str(exc), self._topic("desired"))
            return
        self._serve(goal, installed)

    def _serve(self, goal: Goal, installed: Installed) -> None:
        """Put a health-checked runner in service in place of the one before."""
        runner, head, latency = installed.runner, installed.head, installed.latency_ms
        if head is not None and self.learner is None:
            self.learner = Learner(head, self.config.learning)
        elif head is not None:
            self.learner.rebase(head)
        previous, self.runner = self.runner, runner
        if previous is not None:
            previous.close()
        self._applied_serial = goal.desired.serial
        self.keeper.served(goal)
        self._last_tick = self.clock()
        self.installer.commit(goal.desired, goal.refs)
        self.stats.installs += 1
        self.voice.set(
            phase=Phase.ACTIVE,
            active=runner.active,
            backend=goal.backend,
            accuracy=installed.accuracy,
            detail=f"{runner.detail}; {latency:.1f} ms per sample",
        )
        accuracy = "n/a" if installed.accuracy is None else f"{installed.accuracy:.4f}"
        log.info(
            "%s %s on %s (accuracy %s, %.1f ms per sample)",
            self.config.device_id,
            runner.detail,
            goal.backend,
            accuracy,
            latency,
        )

    def _restore(self) -> None:
        """Check every stored object, then serve the last state that passed its health
        check, before any new one arrives: a restart (even in the middle of an update)
        comes back to a working set. If that set is damaged, the one before it serves
        while the damaged parts are fetched again."""
        for sha in self.store.scrub():
            self.keeper.damaged(sha, "a stored object")
        serve, fetch = self.installer.restore()
        if serve is not None:
            log.info("restoring serial %d", serve.desired.serial)
            self._install(serve)
        if fetch is not None:
            log.warning("serial %d is damaged: fetching it again", fetch.desired.serial)
            self.keeper.want(fetch)

    def _listen(self, shas: list[str], on: bool) -> None:
        topics = [wire.artifact_subscription(sha) for sha in shas]
        if on:
            self.client.subscribe([(t, 1) for t in topics])
        elif topics:
            self.client.unsubscribe(topics)

    def _ask_shared(self, sha: str, first: int) -> None:
        request = wire.FetchRequest(
            device_id=self.config.device_id, sha256=sha, first_chunk=first, shared=True
        )
        self.client.publish(self._topic("fetch"), request.encode(), qos=1)

    def _request_chunk(self, sha: str, index: int) -> None:
        request = wire.FetchRequest(
            device_id=self.config.device_id, sha256=sha, first_chunk=index, count=1
        )
        self.client.publish(self._topic("fetch"), request.encode(), qos=1)

    # --- reporting ----------------------------------------------------------------------

    def _topic(self, kind: str) -> str:
        return wire.device_topic(self.config.device_id, kind)

    @property
    def report(self) -> wire.ReportedState:
        """The state last reported."""
        return self.voice.report

"""A fleet under chaos, for tests/test_chaos.py and bench/chaos.py.

Real edge agents reach a Mosquitto of their own through a :class:`ChaosProxy`; the cloud
service (``eclm cloud serve``, a process) connects to the broker directly. The agents serve
and learn continuously, so adapter updates stream up, rounds close on their quorum and
each clean round is integrated into a new head and rolled out. Faults: the broker is
restarted on the same port and data directory (SIGTERM: Mosquitto saves its persistence
file on the way out, so retained desired states, persistent sessions and their queued
QoS 1 messages survive), the broker is killed (SIGKILL: it comes back with what its last
autosave wrote, up to 30 s old), and the agents' links are cut or partitioned.

Every update whose PUBACK a device got (paho's message handle says published) is
"acknowledged"; none may be missing from the service's ``updates`` table once the fleet
has converged: every device connected, active on the serial of the desired state the
broker retains for it, and every acknowledged update stored (but those a SIGKILL lost:
they are counted per fault and written off).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from cloudproc import Cloud
from netproxy import ChaosProxy

import eclm_wire as wire
from broker import Broker
from cloud_trainer.service.database import Database
from cloud_trainer.service.state import CloudState, update_key
from device_profiles import load_profile
from eclm_wire.mqtt import BrokerAddress
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.learning import LearnerConfig


class Acks:
    """The adapter updates an agent published, and which of them the broker acknowledged."""

    def __init__(self, agent: EdgeAgent) -> None:
        self._lock = threading.Lock()
        self.sent: dict[str, paho.MQTTMessageInfo] = {}
        publish = agent.client.publish

        def tracked(topic, payload=None, qos=0, retain=False, properties=None):
            info = publish(topic, payload, qos, retain, properties)
            if topic.endswith("/updates"):
                key = update_key(wire.decode(wire.AdapterUpdate, payload))
                with self._lock:
                    self.sent[key] = info
            return info

        agent.client.publish = tracked

    def acknowledged(self) -> set[str]:
        # Not is_published(): paho raises there for a message first queued while the client
        # was disconnected, even after a later connection delivered it and got its PUBACK.
        with self._lock:
            return {key for key, info in self.sent.items() if info._published}


class Observer:
    """A plain client that keeps the desired state the broker retains for each device."""

    def __init__(self, port: int) -> None:
        self.desired: dict[str, int] = {}
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="chaos-observer")
        self.client.on_connect = lambda c, *_: c.subscribe(wire.all_devices_topic("desired"), 1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        desired = wire.decode(wire.DesiredState, msg.payload)
        self.desired[desired.device_id] = desired.serial

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Fault:
    kind: str  # restart, kill, cut, partition, partition+cut
    during_rollout: bool
    seconds: float = 0.0  # how long the broker was down or the link held
    converge_s: float | None = None  # from the end of the fault; None: did not converge
    acknowledged: int = 0  # updates acknowledged by then
    lost: int = 0  # acknowledged updates the broker forgot (a SIGKILL before it saved them)


@dataclass
class ChaosFleet:
    work: Path
    model: dict  # model_dir, store (the conftest ``modular`` fixture has both)
    devices: int = 3
    profile: str = "rpi4"
    interval: float = 0.5  # seconds between a device's batches (each one is uploaded)
    wave_timeout: float = 120.0
    faults: list[Fault] = field(default_factory=list)
    written_off: set[str] = field(default_factory=set)  # lost in a kill, counted there

    def start(self) -> ChaosFleet:
        self.broker = Broker(kind="mosquitto", data_dir=self.work / "broker").start()
        self.proxy = ChaosProxy(self.broker.port)
        self.cloud = Cloud(
            self.work / "cloud",
            self.model,
            self.broker.url,
            aggregation=f"quorum = {self.devices}\ndeadline = 600.0\nmax_staleness = 1000",
            rollout=f"canary = 1\nwaves = [0.5, 1.0]\nwave_timeout = {self.wave_timeout}",
        )
        self.cloud.start()
        self.db = CloudState(Database(self.cloud.db_url))
        self.observer = Observer(self.broker.port)
        data = np.load(self.model["model_dir"] / "test.npz")
        self.x, self.y = data["x"], data["y"]
        self.agents: dict[str, EdgeAgent] = {}
        self.acks: dict[str, Acks] = {}
        for i in range(self.devices):
            device_id = f"chaos-{i:02d}"
            config = AgentConfig(
                device_id,
                load_profile(self.profile),
                BrokerAddress("127.0.0.1", self.proxy.port),
                self.work / device_id,
                backend="litert",
                trust_key=self.cloud.public,
                learning=LearnerConfig(upload_every=1),
            )
            agent = EdgeAgent(config)
            self.acks[device_id] = Acks(agent)
            self.agents[device_id] = agent.start()
        self._driving = threading.Event()
        self._drivers: list[threading.Thread] = []
        self.errors: list[str] = []
        return self

    # --- load ----------------------------------------------------------------------------

    def drive(self) -> None:
        """Every device serves a batch and learns from its labels (uploading) every
        ``interval`` seconds, until :meth:`quiet`."""
        self._driving.set()
        for device_id, agent in self.agents.items():
            t = threading.Thread(target=self._drive, args=(device_id, agent), daemon=True)
            t.start()
            self._drivers.append(t)

    def _drive(self, device_id: str, agent: EdgeAgent) -> None:
        rng = np.random.default_rng(int(device_id[-2:]))
        while self._driving.is_set():
            time.sleep(self.interval)
            if agent.runner is None:
                continue
            pick = rng.integers(0, len(self.x), 16)
            try:
                agent.infer(self.x[pick], "clean")
                agent.learn(self.x[pick], self.y[pick])
            except Exception as exc:  # an agent that cannot serve is a finding, not a crash
                self.errors.append(f"{device_id}: {exc!r}")

    def quiet(self) -> None:
        self._driving.clear()
        for t in self._drivers:
            t.join(timeout=10)
        self._drivers.clear()

    # --- faults -----------------------------------------------------------------------------

    def restart_broker(self, down: float = 1.0) -> None:
        """Stop Mosquitto (SIGTERM: it saves its persistence file), keep it down ``down``
        seconds, start it again on the same port and data directory."""
        self.broker.stop()
        time.sleep(down)
        self.broker.start()

    def kill_broker(self, fault: Fault, down: float, settle: float = 60.0) -> float | None:
        """SIGKILL: the broker keeps only what its last autosave wrote. The updates it had
        acknowledged and not handed to the cloud yet are gone; they are written off (and
        counted) once the fleet has had ``settle`` seconds to deliver whatever survived.
        The seconds it took to converge, if it did within ``settle``."""
        fault.seconds = down
        self.broker.proc.kill()
        self.broker.proc.wait()
        self.broker.stop()
        time.sleep(down)  # the clients read the PUBACKs already on their way
        acknowledged = self.acknowledged()  # a dead broker acknowledges nothing more
        self.broker.start()
        took = self.wait_converged(timeout=settle)
        gone = acknowledged - self.stored() - self.written_off
        fault.lost = len(gone)
        self.written_off |= gone
        if took is None and (rest := self.wait_converged(timeout=2 * self.wave_timeout)):
            took = settle + rest
        return took

    def rollout_running(self) -> bool:
        return any(s.state == "running" for s in self.db.rollout_states().values())

    def inject(self, kind: str, rng: random.Random, *, wait_rollout: float = 0.0) -> Fault:
        """One fault of ``kind``, during a rollout if one starts within ``wait_rollout``
        seconds; then wait for the fleet to converge and record how long it took."""
        deadline = time.monotonic() + wait_rollout
        while time.monotonic() < deadline and not self.rollout_running():
            time.sleep(0.1)
        fault = Fault(kind, self.rollout_running())
        if kind == "kill":
            fault.converge_s = self.kill_broker(fault, rng.uniform(0.5, 3.0))
        else:
            if kind == "restart":
                fault.seconds = rng.uniform(0.5, 3.0)
                self.restart_broker(fault.seconds)
            elif kind == "cut":
                self.proxy.cut()
            else:
                fault.seconds = rng.uniform(2.0, 8.0)
                self.proxy.partition(fault.seconds, cut=kind == "partition+cut")
            fault.converge_s = self.wait_converged(timeout=2 * self.wave_timeout)
        fault.acknowledged = len(self.acknowledged())
        self.faults.append(fault)
        return fault

    # --- convergence --------------------------------------------------------------------------

    def acknowledged(self) -> set[str]:
        return set().union(*(a.acknowledged() for a in self.acks.values()))

    def stored(self) -> set[str]:
        return {key for (key,) in self.db.db.execute("SELECT key FROM updates")}

    def lagging(self) -> dict[str, str]:
        """Why each device that has not converged has not (empty: the fleet converged)."""
        out = {}
        for device_id, agent in self.agents.items():
            report, desired = agent.report, self.observer.desired.get(device_id)
            if not agent.client.is_connected():
                out[device_id] = "disconnected"
            elif desired is None or report.serial != desired or report.phase != "active":
                out[device_id] = f"{report.phase} serial {report.serial}, desired {desired}"
        missing = self.acknowledged() - self.stored() - self.written_off
        if missing:
            out["cloud"] = f"{len(missing)} acknowledged updates not stored yet"
        return out

    def wait_converged(self, timeout: float) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.lagging():
                return time.monotonic() - start
            time.sleep(0.1)
        return None

    def settle(self, timeout: float = 300.0) -> dict:
        """Stop the load, let every round and rollout finish, and say where it ended."""
        self.quiet()
        start = time.monotonic()

        def idle() -> bool:
            return (
                not self.db.rounds("closed")
                and not self.rollout_running()
                and all(r.devices < self.devices for r in self.db.rounds("open"))
            )

        while time.monotonic() - start < timeout and not (idle() and not self.lagging()):
            time.sleep(0.2)
        version = self.db.latest_version()[0]
        on_latest = [
            d
            for d, a in self.agents.items()
            if self.db.version_of_serial(a.report.serial) == version
        ]
        acknowledged, stored = self.acknowledged(), self.stored()
        return {
            "converged": not self.lagging(),
            "lagging": self.lagging(),
            "on_latest_version": len(on_latest),
            "model_version": version,
            "acknowledged": len(acknowledged),
            "stored": len(stored),
            "lost": sorted(acknowledged - stored),
            "sent": sum(len(a.sent) for a in self.acks.values()),
            "refused": self.db.counters("rejected:"),
            "rollouts": {k: s.state for k, s in self.db.rollout_states().items()},
            "settle_s": round(time.monotonic() - start, 1),
            "errors": self.errors[:20],
        }

    def stop(self) -> None:
        self.quiet()
        for agent in getattr(self, "agents", {}).values():
            try:
                agent.stop()
            except RuntimeError:
                pass  # its offline status could not be sent: the last will says it
        if hasattr(self, "observer"):
            self.observer.close()
        if hasattr(self, "cloud"):
            self.cloud.stop()
        if hasattr(self, "proxy"):
            self.proxy.close()
        if hasattr(self, "broker"):
            self.broker.stop()

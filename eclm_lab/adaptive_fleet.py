"""The scenario's adaptive system: ``eclm cloud serve`` in its own process, configured for
the scenario by keys every user has, and the devices as real in-process
:class:`EdgeAgent` s over the broker.

The driver knows the cloud only from outside: its ``/metrics`` (messages handled by
kind, warm starts sent, rounds by state) and the desired and reported states any
observer of the broker sees. A step starts once the cloud has handled every update and
report the devices sent, every warm start it sent has arrived, and no round is open or
waiting for its integration: with ``aggregation.quorum = 1`` every update closes a round
at the service's next tick, so that is where a quiet wire is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

import eclm_wire as wire
from cloud_trainer.errors import FleetError
from eclm_lab.lockstep import Record, StepSource
from eclm_lab.process import ServiceProcess
from eclm_lab.scenario import DeviceStream
from eclm_wire.errors import BrokerUnreachable
from eclm_wire.mqtt import BrokerAddress, connect, make_client
from edge_runtime.learning import LearnerConfig

log = logging.getLogger(__name__)
SETTLE_TIMEOUT = 180.0  # seconds a step waits for the wire (a rollout in flight included)


def clean_uploads(streams: list[DeviceStream], steps: int, upload_every: int) -> int:
    """Clean-domain uploads the devices' schedules make in their first ``steps`` steps (one
    every ``upload_every`` steps in the clean domain, one on leaving it): what
    ``integration.min_updates`` waits for to integrate about every ``steps`` steps."""
    n = 0
    for stream in streams:
        d = stream.domains[:steps]
        n += sum(d[t] == "clean" and (t + 1) % upload_every == 0 for t in range(len(d)))
        n += sum(d[t - 1] == "clean" and d[t] != "clean" for t in range(1, len(d)))
    return n


def service_sections(settings, streams: list[DeviceStream]) -> dict[str, str]:
    """The service config (TOML lines per section) the scenario runs: ``settings`` is an
    :class:`eclm_lab.experiment.Settings`."""
    every = settings.integrate_every
    updates = max(1, clean_uploads(streams, every, settings.upload_every)) if every else 0
    return {
        "": 'log_format = "text"',
        "fleet": f"reselect_gain = {float(settings.reselect_gain)}",
        # warm starts and the clean aggregate speak for every device's latest update
        "aggregation": 'strategy = "class-mean"\nquorum = 1\ncarry = true',
        "integration": f"enabled = {'true' if every else 'false'}\nmin_updates = {updates}",
        "rollout": "canary = 1\nwaves = [0.5, 1.0]\nwave_timeout = 60.0",
    }


class Observer:
    """Every device's desired and reported state, as any client of the broker sees them."""

    def __init__(self, address: BrokerAddress) -> None:
        self.desired: dict[str, wire.DesiredState] = {}
        self.reported: dict[str, wire.ReportedState] = {}
        self.client = make_client("adaptation-observer", address)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        connect(self.client, address)
        self.client.loop_start()
        self.client.subscribe([(wire.all_devices_topic(k), 1) for k in ("desired", "reported")])
        if not subscribed.wait(10):
            raise BrokerUnreachable("the broker did not confirm the observer's subscription")

    def _on_message(self, client, userdata, msg) -> None:
        device, kind, _ = wire.parse_device_topic(msg.topic)
        if kind == "desired":
            self.desired[device] = wire.decode(wire.DesiredState, msg.payload)
        else:
            self.reported[device] = wire.decode(wire.ReportedState, msg.payload)

    def serving(self, device: str) -> bool:
        desired, reported = self.desired.get(device), self.reported.get(device)
        if desired is None or reported is None:
            return False
        return reported.serial == desired.serial and reported.phase == "active"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def agent_counters(agent) -> dict:
    """The one place that reads an agent's counters: traffic by (direction, kind), in
    bytes and messages, and what it did."""
    traffic = agent.client.traffic
    return {
        "bytes": Counter(traffic.bytes),
        "messages": Counter(traffic.messages),
        "uploads": agent.stats.uploads,
        "warm_starts": agent.stats.warm_starts,
        "swaps": agent.stats.swaps,
        "budget_violations": agent.stats.budget_violations,
    }


class AdaptiveFleet:
    """``devices`` maps device ids to profile names; ``signing_key`` is the key file the
    cloud signs with, ``trust_key`` the public key the devices check."""

    def __init__(
        self,
        settings,
        devices: dict[str, str],
        streams: dict[str, DeviceStream],
        learning: LearnerConfig,
        *,
        model_dir: Path,
        store: Path,
        work: Path,
        url: str,
        cloud_url: str,
        signing_key: Path,
        trust_key: Path | None,
    ) -> None:
        self.settings, self.devices, self.streams = settings, devices, streams
        self.learning, self.work, self.trust_key = learning, work, trust_key
        self.address = BrokerAddress.parse(url)
        self.cloud = ServiceProcess(
            work / "cloud",
            broker_url=cloud_url,
            model_dir=model_dir,
            artifacts=store,
            signing_key=signing_key,
            worker="adaptation-cloud",
            sections=service_sections(settings, list(streams.values())),
        )
        self.agents: dict = {}
        self.observer: Observer | None = None
        self.unsettled = 0  # steps that went on without a quiet wire
        self._before: dict[str, dict] = {}

    def start(self, timeout: float = 300.0) -> AdaptiveFleet:
        """Start the cloud and the agents; return once the cloud gave every device its
        sub-model and each serves it (FleetError naming the cloud's log otherwise, and
        ServiceError if the cloud exited)."""
        from device_profiles import load_profile
        from edge_runtime.agent import AgentConfig, EdgeAgent

        self.cloud.start()
        self.observer = Observer(self.address)
        for device, profile in self.devices.items():
            config = AgentConfig(
                device_id=device,
                profile=load_profile(profile),
                broker=self.address,
                store_dir=self.work / "devices" / device,
                backend=self.settings.backend,
                policy_interval=1e9,  # the driver reads resources once per step
                trust_key=self.trust_key,
                learning=self.learning,
            )
            source = StepSource(self.streams[device])
            self.agents[device] = EdgeAgent(config, resources=source).start()
        deadline = time.monotonic() + timeout
        while not all(self.observer.serving(d) for d in self.devices):
            self.cloud.healthy()  # ServiceError if the cloud exited
            if time.monotonic() > deadline:
                raise FleetError(
                    f"the fleet was not served in {timeout:.0f} s; see {self.cloud.log}"
                )
            time.sleep(0.1)
        self._before = {d: agent_counters(a) for d, a in self.agents.items()}
        return self

    def selections(self) -> dict[str, tuple]:
        """The modules each device serves now: the largest of the cloud's module sets that
        its policy lets the memory it reads hold (its readings before the first step)."""
        assert self.agents, "start() first"
        return {
            d: tuple(map(tuple, agent.runner.policy.current.selection))
            for d, agent in self.agents.items()
        }

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait for a quiet wire (see the module's docstring)."""
        deadline = time.monotonic() + timeout
        while not self._quiet():
            if time.monotonic() > deadline:
                log.warning("the wire did not settle within %.0f s; going on", timeout)
                self.unsettled += 1
                return
            time.sleep(0.01)

    def _quiet(self) -> bool:
        sent: Counter = Counter()
        for agent in self.agents.values():
            sent.update(agent.client.traffic.messages)
        m = self.cloud.metrics()
        handled = {
            kind: m.get(("eclm_messages_handled_total", (("kind", kind),)), 0.0)
            for kind in ("updates", "reported")
        }
        return (
            all(handled[k] >= sent["sent", k] for k in handled)
            and sent["received", "adapter"] >= m.get(("eclm_offers_sent_total", ()), 0.0)
            and m.get(("eclm_rounds", (("state", "open"),)), 0.0) == 0
            and m.get(("eclm_rounds", (("state", "closed"),)), 0.0) == 0
        )

    def account(self, record: Record) -> dict:
        """Fill ``record`` with the bytes, swaps and violations since :meth:`start`; the
        uploads and warm starts, summed."""
        totals: Counter[str] = Counter()
        for d, agent in self.agents.items():
            now, before = agent_counters(agent), self._before[d]
            for (direction, kind), n in (now["bytes"] - before["bytes"]).items():
                way = "up" if direction == "sent" else "down"
                setattr(record, f"bytes_{way}", getattr(record, f"bytes_{way}") + n)
                key = f"{way}:{kind}"
                record.bytes_by_kind[key] = record.bytes_by_kind.get(key, 0) + n
            record.swaps += now["swaps"]
            record.violations += now["budget_violations"]
            totals.update({k: now[k] for k in ("uploads", "warm_starts")})
        return dict(totals)

    def close(self) -> dict:
        """Stop the agents and the cloud; what the cloud's database and metrics hold."""
        from safetensors.numpy import load

        from cloud_trainer.service.database import Database
        from cloud_trainer.service.state import CloudState

        metrics = {}
        if self.cloud.proc is not None and self.cloud.proc.poll() is None:
            names = (
                "eclm_messages_handled_total",
                "eclm_offers_sent_total",
                "eclm_messages_dropped_total",
            )
            metrics = {
                f"{name}{dict(labels) or ''}": v
                for (name, labels), v in self.cloud.metrics().items()
                if name in names
            }
        self.stop()
        state = CloudState(Database(self.cloud.db_url))
        try:
            rollouts = state.rollout_states()
            return {
                "cloud": {**self.cloud.describe(), "exit_code": self._exit_code()},
                "cloud_metrics": metrics,
                "aggregates": {
                    d: (load(a[0]), a[1])
                    for d in state.domains()
                    if d != "clean" and (a := state.latest_aggregate(d))
                },
                "rejected_updates": state.counters("rejected:"),
                "integrations": [
                    {"rollout": rid, "state": r.state, "succeeded": len(r.succeeded)}
                    for rid, r in rollouts.items()
                    if rid.startswith("integrate-")
                ],
                "reselections": state.counters("reselections").get("", 0),
                "unsettled_steps": self.unsettled,
            }
        finally:
            state.db.close()

    def _exit_code(self) -> int | None:
        return self.cloud.proc.returncode if self.cloud.proc else None

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.agents = {}
        if self.observer:
            self.observer.close()
            self.observer = None
        self.cloud.stop()

"""The adaptation scenario: real edge agents adapting on shifting streams with the cloud
aggregating per domain, side by side with the baselines on the same streams, in one run.

Every device is a real :class:`EdgeAgent` with its own MQTT connection, profile and
memory trace, serving its modular sub-model through LiteRT (or ExecuTorch) programs. The
driver steps all devices in lockstep: read resources (the policy swaps modules), predict a
batch, then learn from the labels that arrived. The baselines see the same batches and
labels; what they send crosses the same broker and is counted the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

import eclm_wire as wire
from cloud_trainer.federation.strategies import ClassWeightedMean
from cloud_trainer.model.checkpoint import head_weights
from eclm_lab.baselines import FedAvg, Method, OnDeviceOnly, StaticCloud, StaticSubModel
from eclm_lab.scenario import DeviceStream, ScenarioSpec, build
from eclm_wire.mqtt import BrokerAddress, connect, make_client
from edge_runtime.learning import Learner, LearnerConfig
from edge_runtime.monitor import Reading, ResourceSource

log = logging.getLogger(__name__)

ADAPTIVE = "adaptive (ECLM)"
OFFER_RATIO = 4.0  # the coordinator's default: an aggregate worth sending to a contributor
PROFILES = ("rpi4", "rpi-zero-2w", "rpi5", "android-phone")
# What each method's settings are tuned over, on a separate seed (the adaptive system's
# learner in a rehearsal without the broker: same learner, aggregation and warm starts).
GRIDS = {
    ADAPTIVE: [
        {"lr": lr, "steps_per_batch": s, "prior": p}
        for lr in (0.01, 0.02, 0.05)
        for s in (8, 16, 32)
        for p in (0.0, 1.0)
    ],
    "on-device only": [
        {"lr": lr, "hidden": h} for lr in (0.1, 0.3, 0.5, 1.0) for h in (32, 64, 128)
    ],
    "FedAvg": [{"lr": lr, "steps": 2} for lr in (0.01, 0.03, 0.1)],
}


@dataclass(frozen=True)
class Settings:
    spec: ScenarioSpec = ScenarioSpec(devices=6, steps=120)
    profiles: tuple[str, ...] = PROFILES  # assigned to devices in turn
    upload_every: int = 10  # steps between upload opportunities, the same for every method
    learning: LearnerConfig = LearnerConfig()
    backend: str = "litert"
    tune: bool = True  # tune the baselines' settings on seed + 1000 first
    after_shift: int = 5  # steps after a shift that "accuracy after shifts" averages
    integrate_every: int = 60  # steps between the cloud's integration rounds (0: never)
    reselect_gain: float = 0.5  # relative importance gain that makes the cloud re-select

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ValueError("profiles: need at least one")
        if self.upload_every < 1:
            raise ValueError(f"upload_every: must be >= 1, got {self.upload_every}")


class StepSource(ResourceSource):
    """A device's memory trace, at the step the driver is on."""

    def __init__(self, stream: DeviceStream) -> None:
        self.stream = stream
        self.t = 0

    def read(self) -> Reading:
        return Reading(available_mb=float(self.stream.memory_mb[self.t]))


class BrokerLink:
    """Carries a baseline's payloads through the broker, in pieces under its packet limit:
    a device-side client publishes up, a cloud-side client down; each call waits until
    the other side has the whole payload. Bytes are counted as received, by kind."""

    PIECE = 96 * 1024

    def __init__(self, address: BrokerAddress, tag: str) -> None:
        self.root = f"{wire.TOPIC_ROOT}/baselines/{tag}"
        self.bytes: Counter[tuple[str, str]] = Counter()  # (up|down, kind) -> bytes
        self._arrived: queue.Queue[bytes] = queue.Queue()
        self._pieces: list[bytes] = []
        self.clients = {}
        for side, listens in (("device", "down"), ("cloud", "up")):
            client = make_client(f"{tag}-{side}", address)
            client.on_message = self._on_message
            subscribed = threading.Event()
            client.on_subscribe = lambda *_, done=subscribed: done.set()
            connect(client, address)
            client.loop_start()
            client.subscribe(f"{self.root}/{listens}/#", qos=1)
            if not subscribed.wait(10):
                raise RuntimeError(f"the broker did not confirm the {tag} subscription")
            self.clients[side] = client

    def _on_message(self, client, userdata, msg) -> None:
        direction, _device, kind, index, total = msg.topic.split("/")[-5:]
        self.bytes[direction, kind] += len(msg.topic) + len(msg.payload)
        self._pieces.append(msg.payload)
        if int(index) == int(total) - 1:
            self._arrived.put(b"".join(self._pieces))
            self._pieces = []

    def __call__(self, device: str, kind: str, direction: str, payload: bytes) -> bytes:
        sender = self.clients["device" if direction == "up" else "cloud"]
        pieces = [payload[i : i + self.PIECE] for i in range(0, len(payload), self.PIECE)] or [b""]
        for i, piece in enumerate(pieces):
            topic = f"{self.root}/{direction}/{device}/{kind}/{i}/{len(pieces)}"
            sender.publish(topic, piece, qos=1)
        return self._arrived.get(timeout=30)

    def close(self) -> None:
        for client in self.clients.values():
            client.disconnect()
            client.loop_stop()


@dataclass
class Record:
    """Per method: accuracy per device per step, and what it cost."""

    accuracy: np.ndarray  # (devices, steps)
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    swaps: int = 0
    violations: int = 0
    adapting: np.ndarray | None = None  # (devices, steps): the adapter served, not the head


def summarize(records: dict[str, Record], streams: list[DeviceStream], after: int) -> dict:
    """The table's figures per method: mean accuracy, accuracy in the ``after`` steps
    after each shift, steps to recover the pre-shift accuracy, bytes, swaps, violations."""
    out = {}
    for name, r in records.items():
        post, recovery = [], []
        for d, stream in enumerate(streams):
            acc = r.accuracy[d]
            for t, _domain in stream.shifts()[1:]:
                end = next((s for s, _ in stream.shifts() if s > t), len(acc))
                post.append(acc[t : t + after].mean())
                before = acc[max(0, t - after) : t].mean()
                smooth = np.convolve(acc[t:end], np.ones(3) / 3, mode="valid")
                hit = np.flatnonzero(smooth >= before - 0.05)
                recovery.append(int(hit[0]) if len(hit) else end - t)
        out[name] = {
            "accuracy": float(r.accuracy.mean()),
            "after_shift": float(np.mean(post)) if post else None,
            "recovery_steps": float(np.mean(recovery)) if recovery else None,
            "bytes_up": r.bytes_up,
            "bytes_down": r.bytes_down,
            "bytes_by_kind": r.bytes_by_kind,
            "swaps": r.swaps,
            "budget_violations": r.violations,
        }
    return out


def newcomer(
    net, selection, aggregates: dict, x, y, learning: LearnerConfig, seed: int, orders: int = 5
):
    """For each domain the fleet adapted to: labelled samples a new device needs to reach
    90% of its final accuracy alone, and with the cloud's aggregate as warm start. The
    held-out half is fixed; accuracy curves are averaged over ``orders`` random orders of
    the labels the newcomer gets (one order alone swings the count by a batch or two)."""
    import torch
    from safetensors.numpy import save

    from cloud_trainer.model.domains import apply

    head = head_weights(net)
    rng = np.random.default_rng([seed, 99])
    out = {}
    for domain, (weights, samples) in aggregates.items():
        split = rng.permutation(len(y))
        train, test = split[: len(y) // 2], split[len(y) // 2 :]
        with torch.no_grad():
            feats = net.features(torch.from_numpy(apply(domain, x, seed)), selection).numpy()
        label_orders = [train] + [rng.permutation(train) for _ in range(orders - 1)]
        curves = {}
        for mode in ("alone", "warm"):  # both on the same orders
            runs = []
            for k, order in enumerate(label_orders):
                learner = Learner(head, learning, seed=seed + k)
                learner.enter(domain)
                if mode == "warm":
                    learner.warm_start(domain, save(weights), samples)
                curve = []
                for i in range(0, len(order) + 1, 8):
                    rows = order[i : i + 8]
                    curve.append(float((learner.logits(feats[test]).argmax(1) == y[test]).mean()))
                    if len(rows):
                        learner.learn(feats[rows], y[rows])
                runs.append(curve)
            curves[mode] = np.mean(runs, axis=0)  # accuracy after 0, 8, 16... labels
        final = curves["alone"][-1]
        reached = {mode: np.flatnonzero(c >= 0.9 * final) for mode, c in curves.items()}
        out[domain] = {
            "final_alone": float(final),
            "samples_alone": 8 * int(reached["alone"][0]),
            "samples_warm": 8 * int(reached["warm"][0]) if len(reached["warm"]) else None,
            "start_alone": float(curves["alone"][0]),
            "start_warm": float(curves["warm"][0]),
        }
    return out


class Rehearsal(Method):
    """The adaptive system's learning without agents or broker, for tuning: each device's
    learner on its sub-model's features (torch), uploads into a local aggregator, warm
    starts on entering a domain others adapted to."""

    def __init__(self, net, selections, learning: LearnerConfig) -> None:
        from cloud_trainer.federation.aggregation import DomainAggregator

        super().__init__()
        self.net, self.selections = net, selections
        head = head_weights(net)
        self.learners = {d: Learner(head, learning, seed=i) for i, d in enumerate(selections)}
        self.aggregator = DomainAggregator(head, strategy=ClassWeightedMean())
        self.domain = dict.fromkeys(selections, "clean")

    def _features(self, device: str, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.net.features(torch.from_numpy(x), self.selections[device]).numpy()

    def enter(self, device: str, domain: str) -> None:
        from safetensors.numpy import save

        if self.domain[device] == domain:
            return
        self.domain[device] = domain
        learner = self.learners[device]
        left = learner.enter(domain)
        if left is not None:
            self.aggregator.add(learner.update(left, device, "0"))
        aggregate = self.aggregator.aggregate(domain)
        own = self.aggregator.samples_of(domain, device)
        if aggregate and aggregate[1] >= OFFER_RATIO * own and aggregate[1] != own:
            learner.warm_start(domain, save(aggregate[0]), aggregate[1])

    def predict(self, device: str, x: np.ndarray) -> np.ndarray:
        return self.learners[device].logits(self._features(device, x)).argmax(1)

    def learn(self, device: str, x: np.ndarray, y: np.ndarray) -> None:
        learner = self.learners[device]
        features = self._features(device, x) if len(y) else np.zeros((0, 1), np.float32)
        if learner.learn(features, y):
            self.aggregator.add(learner.update(learner.domain, device, "0"))


def tune(settings: Settings, net, selections: dict[str, tuple], x, y) -> dict[str, dict]:
    """Each method's best settings by mean accuracy on another seed's streams."""
    spec = replace(settings.spec, seed=settings.spec.seed + 1000)
    streams = dict(zip(selections, build(spec, x, y), strict=True))
    learning = replace(settings.learning, upload_every=settings.upload_every)
    best = {}
    for name, grid in GRIDS.items():
        scores = []
        for params in grid:
            method = _baseline(name, net, selections, params, seed=spec.seed, learning=learning)
            label = f"tune {name} {params}"
            record = _drive({name: method}, streams, settings.upload_every, progress=label)[name]
            scores.append(float(record.accuracy.mean()))
            log.info("tuning %s %s: %.4f", name, params, scores[-1])
        best[name] = grid[int(np.argmax(scores))]
    return best


def _baseline(
    name: str, net, selections, params: dict, *, seed: int, link=None, learning=None
) -> Method:
    if name == ADAPTIVE:
        return Rehearsal(net, selections, replace(learning or LearnerConfig(), **params))
    if name == "on-device only":
        return OnDeviceOnly(list(selections), seed=seed, **params)
    kwargs = {"link": link} if link else {}
    return FedAvg(net, selections, seed=seed, **kwargs, **params)


def _drive(
    methods: dict[str, Method],
    streams: dict,
    upload_every: int,
    agents=None,
    after_step=None,
    before_predict=None,
    progress: str | None = None,
    torch_lock=None,
):
    """Step every device's stream in lockstep through ``methods`` (and ``agents``, the
    adaptive devices, when given): predict, then learn from the labelled samples.
    Agents enter each step's domain first, then ``before_predict`` runs (the wire settles:
    a warm start the cloud sends comes back in a round trip, while a real stream's samples
    arrive over time). ``torch_lock`` is held during each step's torch work."""
    from contextlib import nullcontext

    from tqdm import tqdm

    torch_lock = torch_lock or nullcontext()
    steps = len(next(iter(streams.values())).domains)
    names = [*([ADAPTIVE] if agents else []), *methods]
    accuracy = {n: np.zeros((len(streams), steps)) for n in names}
    adapting = np.zeros((len(streams), steps))
    iterators = {d: iter(s) for d, s in streams.items()}
    for t in tqdm(range(steps), desc=progress, unit="step", leave=False, disable=not progress):
        batch = {device: next(iterators[device]) for device in streams}
        if agents:  # each device learns its context first, as the rehearsal does
            for device, agent in agents.items():
                agent.enter(batch[device].domain)
            if before_predict:
                before_predict()
        for i, device in enumerate(streams):
            step = batch[device]
            lab = step.labelled
            if agents:
                agent = agents[device]
                agent.resources.t = t
                agent.tick()
                predicted = agent.infer(step.x, step.domain).argmax(1)
                accuracy[ADAPTIVE][i, t] = (predicted == step.y).mean()
                adapting[i, t] = agent.learner is not None and agent.learner.adapting
                agent.learn(step.x[lab], step.y[lab])
            with torch_lock:
                for name, method in methods.items():
                    if isinstance(method, Rehearsal):
                        method.enter(device, step.domain)
                    accuracy[name][i, t] = (method.predict(device, step.x) == step.y).mean()
                    method.learn(device, step.x[lab], step.y[lab])
        if (t + 1) % upload_every == 0:
            with torch_lock:
                for method in methods.values():
                    method.exchange()
        if after_step:
            after_step(t)
    return {n: Record(a, adapting=adapting if n == ADAPTIVE else None) for n, a in accuracy.items()}


def run(
    settings: Settings,
    model_dir: Path,
    work: Path,
    url: str,
    *,
    signing_key=None,
    trust_key: Path | None = None,
    store: Path | None = None,
    timeout: float = 300.0,
) -> dict:
    """Deploy the fleet, run every method on the same streams, return the report.
    Programs go to ``store`` (default ``work/artifacts``), devices' stores under ``work``."""
    from cloud_trainer.federation.aggregation import DomainAggregator
    from cloud_trainer.federation.integration import Integrator
    from cloud_trainer.fleet.coordinator import FleetCoordinator
    from cloud_trainer.fleet.deploy import plan_fleet, wait_for_fleet
    from cloud_trainer.model.checkpoint import load_model
    from device_profiles import load_profile
    from edge_runtime.agent import AgentConfig, EdgeAgent
    from edge_runtime.artifacts import ArtifactStore

    spec = settings.spec
    net = load_model(model_dir)
    with np.load(model_dir / "test.npz") as test:
        x, y = test["x"], test["y"]
    devices = {
        f"dev-{i:02d}": settings.profiles[i % len(settings.profiles)] for i in range(spec.devices)
    }
    streams = dict(zip(devices, build(spec, x, y), strict=True))
    address = BrokerAddress.parse(url)
    aggregator = DomainAggregator(head_weights(net), strategy=ClassWeightedMean())
    store = store or work / "artifacts"
    started = time.perf_counter()
    targets = plan_fleet(model_dir, store, list(devices.items()), modular=True)
    selections = {d: t.options[0].selection for d, t in targets.items()}
    tuned = tune(settings, net, selections, x, y) if settings.tune else {n: {} for n in GRIDS}
    if settings.tune:
        print(f"settings tuned on seed {spec.seed + 1000}: {tuned}", flush=True)
    learning = replace(settings.learning, upload_every=settings.upload_every, **tuned[ADAPTIVE])
    links = {"remote": BrokerLink(address, "remote"), "fedavg": BrokerLink(address, "fedavg")}
    agents: dict[str, EdgeAgent] = {}
    fc = FleetCoordinator(
        address, ArtifactStore(store), signing_key=signing_key, aggregator=aggregator
    ).start()
    try:
        for device, profile in devices.items():
            config = AgentConfig(
                device_id=device,
                profile=load_profile(profile),
                broker=address,
                store_dir=work / "devices" / device,
                backend=settings.backend,
                policy_interval=1e9,  # the driver reads resources once per step
                trust_key=trust_key,
                learning=learning,
            )
            agents[device] = EdgeAgent(config, resources=StepSource(streams[device])).start()
        serials = {
            d: fc.assign(d, list(t.artifacts), options=t.options, target=t.profile).serial
            for d, t in targets.items()
        }
        if not wait_for_fleet(fc, serials, timeout):
            raise RuntimeError("the fleet did not reach its desired state; see the logs")
        print(f"{len(agents)} devices serving; streaming {spec.steps} steps", flush=True)
        methods = {
            "static cloud (remote)": StaticCloud(net, links["remote"]),
            "static sub-model": StaticSubModel(net, selections),
            "on-device only": _baseline(
                "on-device only", net, selections, tuned["on-device only"], seed=spec.seed
            ),
            "FedAvg": _baseline(
                "FedAvg", net, selections, tuned["FedAvg"], seed=spec.seed, link=links["fedavg"]
            ),
        }
        torch_lock = threading.Lock()  # the integrator's exports vs the baselines' training
        integrator = Integrator(
            fc,
            aggregator,
            net,
            model_dir,
            store,
            targets,
            {d: load_profile(p) for d, p in devices.items()},
            min_gain=settings.reselect_gain,
            torch_lock=torch_lock,
        )

        def after_step(t: int) -> None:
            _settle(fc, agents)
            every = settings.integrate_every
            if every and (t + 1) % every == 0 and t + 1 < spec.steps:  # not once it is over
                integrator.integrate()

        before = {d: _traffic(a) for d, a in agents.items()}
        records = _drive(
            methods,
            streams,
            settings.upload_every,
            agents,
            after_step=after_step,
            before_predict=lambda: _settle(fc, agents),
            progress="stream",
            torch_lock=torch_lock,
        )
        integrator.join()
        _settle(fc, agents)
        adaptive = records[ADAPTIVE]
        for d, agent in agents.items():
            now = _traffic(agent)
            for (direction, kind), n in (now - before[d]).items():
                way = "up" if direction == "sent" else "down"
                if way == "up":
                    adaptive.bytes_up += n
                else:
                    adaptive.bytes_down += n
                key = f"{way}:{kind}"
                adaptive.bytes_by_kind[key] = adaptive.bytes_by_kind.get(key, 0) + n
            adaptive.swaps += agent.stats.swaps
            adaptive.violations += agent.stats.budget_violations
        for name, link in (("static cloud (remote)", links["remote"]), ("FedAvg", links["fedavg"])):
            r = records[name]
            r.bytes_up = sum(n for (d, _), n in link.bytes.items() if d == "up")
            r.bytes_down = sum(n for (d, _), n in link.bytes.items() if d == "down")
            r.bytes_by_kind = {f"{d}:{k}": n for (d, k), n in link.bytes.items()}
        report = {
            "settings": {
                **asdict(settings),
                "devices": devices,
                "tuned": tuned,
            },
            "methods": summarize(records, list(streams.values()), settings.after_shift),
            "newcomer": newcomer(
                net,
                selections[next(iter(devices))],
                {d: aggregator.aggregate(d) for d in aggregator.domains() if d != "clean"},
                x,
                y,
                learning,
                spec.seed,
            ),
            "uploads": sum(a.stats.uploads for a in agents.values()),
            "warm_starts": sum(a.stats.warm_starts for a in agents.values()),
            "rejected_updates": dict(aggregator.rejected),
            "integrations": [
                {"rollout": r.rollout_id, "state": r.state, "succeeded": len(r.succeeded)}
                for r in integrator.rollouts
            ],
            "reselections": integrator.reselections,
            "seconds": time.perf_counter() - started,
            "curves": {n: r.accuracy.mean(axis=0).round(4).tolist() for n, r in records.items()},
            "adapting_share": adaptive.adapting.mean(axis=0).round(4).tolist(),
            "shifted_share": [
                float(np.mean([s.domains[t] != "clean" for s in streams.values()]))
                for t in range(spec.steps)
            ],
        }
        return report
    finally:
        for agent in agents.values():
            agent.stop()
        fc.stop()
        for link in links.values():
            link.close()


def _traffic(agent) -> Counter:
    return Counter(agent.client.traffic.bytes)


def _settle(fc, agents, timeout: float = 10.0) -> None:
    """Wait until the cloud has every upload and report the devices sent, and every
    device has the warm starts the cloud sent: each step starts from a quiet wire."""
    deadline = time.monotonic() + timeout

    def quiet() -> bool:
        aggregator = fc.aggregator
        uploads = sum(a.stats.uploads for a in agents.values())
        handled = aggregator.accepted + sum(aggregator.rejected.values())
        domains = all(
            fc.reported.get(d) is not None and fc.reported[d].domain == a.report.domain
            for d, a in agents.items()
        )
        offers = sum(a.stats.offers_received for a in agents.values())
        return handled >= uploads and domains and offers >= fc.offers

    while not quiet():
        if time.monotonic() > deadline:
            log.warning("the wire did not settle within %.0f s; going on", timeout)
            return
        time.sleep(0.002)


def run_with_broker(
    settings: Settings,
    work: Path,
    *,
    url: str | None = None,
    broker_kind: str = "auto",
    epochs: int = 25,
) -> tuple[dict, tuple[Path, Path]]:
    """Train (or reuse) the model in ``work/model``, start a broker unless ``url`` names
    one, sign with a key made in ``work/keys``, run, and write the report and plot."""
    from broker.launcher import Broker
    from cloud_trainer.fleet.keys import PRIVATE_NAME, init_keys, load_signing_key
    from cloud_trainer.model.checkpoint import train_model
    from eclm_lab.report import write

    model_dir = work / "model"
    if not (model_dir / "model.pt").exists():
        trained = train_model(model_dir, epochs=epochs, seed=settings.spec.seed, progress=True)
        print(f"cloud model trained: held-out accuracy {trained.accuracy:.4f}", flush=True)
    keys = work / "keys"
    if not (keys / PRIVATE_NAME).exists():
        init_keys(keys)
    broker = None if url else Broker(kind=broker_kind, data_dir=work / "broker")
    try:
        url = url or broker.start().url
        print(f"broker: {broker.kind if broker else 'external'} on {url}", flush=True)
        report = run(
            settings,
            model_dir,
            work,
            url,
            signing_key=load_signing_key(keys / PRIVATE_NAME),
            trust_key=keys / "signing.pub",
        )
    finally:
        if broker:
            broker.stop()
    return report, write(report, work)

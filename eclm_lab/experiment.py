"""The adaptation scenario: real edge agents adapting on shifting streams with the cloud
(``eclm cloud serve``, in its own process) aggregating per domain, side by side with the
baselines on the same streams, in one run.

Every device is a real :class:`EdgeAgent` with its own MQTT connection, profile and
memory trace, serving its modular sub-model through LiteRT (or ExecuTorch) programs; the
cloud gives each its sub-model, sends warm starts, integrates and re-selects as it does
for any fleet (:mod:`eclm_lab.adaptive_fleet`). The driver
(:mod:`eclm_lab.lockstep`) steps all devices in lockstep: read resources (the policy
swaps modules), predict a batch, then learn from the labels that arrived. The baselines
see the same batches and labels; what they send crosses the same broker and is counted
the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cloud_trainer.federation.strategies import ClassWeightedMean
from cloud_trainer.model.checkpoint import head_weights
from eclm_lab.baselines import FedAvg, Method, OnDeviceOnly, StaticCloud, StaticSubModel
from eclm_lab.errors import SettingsError
from eclm_lab.link import BrokerLink
from eclm_lab.lockstep import ADAPTIVE, Record, drive
from eclm_lab.scenario import DeviceStream, ModelMemory, ScenarioSpec, build
from eclm_wire.mqtt import BrokerAddress
from edge_runtime.learning import Learner, LearnerConfig

log = logging.getLogger(__name__)

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
    # steps between the cloud's integrations (0: never): the service's
    # integration.min_updates is set to the clean uploads that many steps make
    integrate_every: int = 60
    reselect_gain: float = 0.5  # the service's fleet.reselect_gain

    def __post_init__(self) -> None:
        if not self.profiles:
            raise SettingsError("profiles: need at least one")
        if self.upload_every < 1:
            raise SettingsError(f"upload_every: must be >= 1, got {self.upload_every}")


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


def tune(
    settings: Settings, net, selections: dict[str, tuple], x, y, memory: ModelMemory
) -> dict[str, dict]:
    """Each method's best settings by mean accuracy on another seed's streams."""
    spec = replace(settings.spec, seed=settings.spec.seed + 1000)
    streams = dict(zip(selections, build(spec, x, y, memory), strict=True))
    learning = replace(settings.learning, upload_every=settings.upload_every)
    best = {}
    for name, grid in GRIDS.items():
        scores = []
        for params in grid:
            method = _baseline(
                name, net, selections, params, seed=spec.seed, shape=x.shape[1:], learning=learning
            )
            label = f"tune {name} {params}"
            record = drive({name: method}, streams, settings.upload_every, progress=label)[name]
            scores.append(float(record.accuracy.mean()))
            log.info("tuning %s %s: %.4f", name, params, scores[-1])
        best[name] = grid[int(np.argmax(scores))]
    return best


def _baseline(
    name: str, net, selections, params: dict, *, seed: int, shape, link=None, learning=None
) -> Method:
    """``name``'s method with ``params``; ``shape`` is a sample's (C, H, W)."""
    if name == ADAPTIVE:
        return Rehearsal(net, selections, replace(learning or LearnerConfig(), **params))
    if name == "on-device only":
        classes = net.spec.num_classes
        return OnDeviceOnly(list(selections), shape=shape, classes=classes, seed=seed, **params)
    kwargs = {"link": link} if link else {}
    return FedAvg(net, selections, seed=seed, **kwargs, **params)


def run(
    settings: Settings,
    model_dir: Path,
    work: Path,
    url: str,
    *,
    signing_key: Path,
    trust_key: Path | None = None,
    cloud_url: str | None = None,
    store: Path | None = None,
    timeout: float = 900.0,  # for the cloud to plan every profile (slow on a busy machine)
    tuned: dict[str, dict] | None = None,
) -> dict:
    """Start the cloud service against the broker at ``cloud_url`` (default ``url``) with
    ``signing_key`` (its key file) and the fleet, run every method on the same streams,
    return the report. Programs go to ``store`` (default ``work/artifacts``); the cloud's
    config, log and database to ``work/cloud``, devices' stores under ``work``. ``tuned``
    (each method's settings, as a report's ``settings.tuned``) skips the tuning."""
    from cloud_trainer.model.checkpoint import load_model
    from device_profiles import load_profile
    from eclm_lab.adaptive_fleet import AdaptiveFleet

    spec = settings.spec
    if tuned is not None and settings.tune:
        raise SettingsError("tuned: given settings with tune=True; tune one way")
    net = load_model(model_dir)
    with np.load(model_dir / "test.npz") as test:
        x, y = test["x"], test["y"]
    devices = {
        f"dev-{i:02d}": settings.profiles[i % len(settings.profiles)] for i in range(spec.devices)
    }
    memory = model_memory(net, load_profile(settings.profiles[0]))
    streams = dict(zip(devices, build(spec, x, y, memory), strict=True))
    started = time.perf_counter()
    selections = planned_selections(model_dir, devices, streams, memory)
    tuned = tuned or _tuned(settings, net, selections, x, y, memory)
    learning = replace(settings.learning, upload_every=settings.upload_every, **tuned[ADAPTIVE])
    fleet = AdaptiveFleet(
        settings,
        devices,
        streams,
        learning,
        model_dir=model_dir,
        store=store or work / "artifacts",
        work=work,
        url=url,
        cloud_url=cloud_url or url,
        signing_key=signing_key,
        trust_key=trust_key,
    )
    links: dict[str, BrokerLink] = {}
    try:
        print(f"cloud: {' '.join(fleet.cloud.command)} (log {fleet.cloud.log})", flush=True)
        # what each device serves under its readings is what the baselines run
        selections = _served(fleet.start(timeout).selections(), selections)
        print(f"{len(devices)} devices serving; streaming {spec.steps} steps", flush=True)
        address = BrokerAddress.parse(url)
        links = {tag: BrokerLink(address, tag) for tag in ("remote", "fedavg")}
        methods = _methods(net, selections, tuned, spec.seed, links, shape=x.shape[1:])
        records = drive(methods, streams, settings.upload_every, fleet, progress="stream")
        fleet.settle()
        totals = fleet.account(records[ADAPTIVE])
        cloud = fleet.close()
        for name, tag in (("static cloud (remote)", "remote"), ("FedAvg", "fedavg")):
            _count_link(records[name], links[tag])
        aggregates = cloud.pop("aggregates")
        first = selections[next(iter(devices))]
        return {
            "settings": {**asdict(settings), "devices": devices, "tuned": tuned},
            "methods": summarize(records, list(streams.values()), settings.after_shift),
            "newcomer": newcomer(net, first, aggregates, x, y, learning, spec.seed),
            **totals,
            **cloud,
            "seconds": time.perf_counter() - started,
            **_curves(records, list(streams.values())),
        }
    finally:
        fleet.stop()
        for link in links.values():
            link.close()


def _tuned(settings: Settings, net, selections, x, y, memory: ModelMemory) -> dict:
    """Each method's settings: tuned (see :func:`tune`), or their defaults."""
    if not settings.tune:
        return {n: {} for n in GRIDS}
    tuned = tune(settings, net, selections, x, y, memory)
    print(f"settings tuned on seed {settings.spec.seed + 1000}: {tuned}", flush=True)
    return tuned


def _curves(records: dict[str, Record], streams: list[DeviceStream]) -> dict:
    """Mean accuracy per step per method, the share of adaptive devices serving their
    adapter, and the share of devices in a shifted domain."""
    steps = len(streams[0].domains)
    return {
        "curves": {n: r.accuracy.mean(axis=0).round(4).tolist() for n, r in records.items()},
        "adapting_share": records[ADAPTIVE].adapting.mean(axis=0).round(4).tolist(),
        "shifted_share": [
            float(np.mean([s.domains[t] != "clean" for s in streams])) for t in range(steps)
        ],
    }


def model_memory(net, profile) -> ModelMemory:
    """The model's memory (all modules, and its smallest sub-model) from its cost table on
    ``profile``: what the scenario's readings are stated against."""
    from cloud_trainer.model.costs import cost_table
    from cloud_trainer.model.selection import smallest_memory_kb

    costs = cost_table(net, profile)
    full = costs.fixed.memory_kb + sum(c.memory_kb for layer in costs.modules for c in layer)
    return ModelMemory(full_kb=full, smallest_kb=smallest_memory_kb(costs))


def planned_selections(
    model_dir: Path, devices: dict[str, str], streams: dict[str, DeviceStream], memory
) -> dict[str, tuple]:
    """The modules the cloud's selection picks for each device under the memory its
    readings give the model most of the time (the baselines are tuned on them before the
    cloud runs; each device then serves the largest of the cloud's module sets that fits)."""
    from cloud_trainer.export.plan import select_for
    from device_profiles import load_profile

    out = {}
    for device, profile_name in devices.items():
        profile = load_profile(profile_name)
        allowed = streams[device].memory_mb.max() * 1024 * memory.fraction
        kb = min(allowed, profile.budget.model_memory_kb)
        budget = replace(profile.budget, model_memory_mb=kb / 1024)
        chosen = select_for(model_dir, replace(profile, budget=budget), None)
        out[device] = tuple(map(tuple, chosen.modules))
    return out


def _served(served: dict[str, tuple], planned: dict[str, tuple]) -> dict[str, tuple]:
    """The selections the cloud gave the devices, which the baselines run too."""
    served = {d: tuple(map(tuple, s)) for d, s in served.items()}
    for device, selection in served.items():
        if selection != planned[device]:
            log.warning(
                "%s: the cloud selected %s, the tuning ran %s", device, selection, planned[device]
            )
    return served


def _methods(net, selections, tuned: dict, seed: int, links: dict, shape) -> dict[str, Method]:
    return {
        "static cloud (remote)": StaticCloud(net, links["remote"]),
        "static sub-model": StaticSubModel(net, selections),
        "on-device only": _baseline(
            "on-device only", net, selections, tuned["on-device only"], seed=seed, shape=shape
        ),
        "FedAvg": _baseline(
            "FedAvg",
            net,
            selections,
            tuned["FedAvg"],
            seed=seed,
            shape=shape,
            link=links["fedavg"],
        ),
    }


def _count_link(record: Record, link: BrokerLink) -> None:
    record.bytes_up = sum(n for (d, _), n in link.bytes.items() if d == "up")
    record.bytes_down = sum(n for (d, _), n in link.bytes.items() if d == "down")
    record.bytes_by_kind = {f"{d}:{k}": n for (d, k), n in link.bytes.items()}


def run_with_broker(
    settings: Settings,
    work: Path,
    *,
    model_dir: Path | None = None,
    data: str | None = None,
    preset: str = "digits",
    url: str | None = None,
    broker_kind: str = "auto",
    epochs: int = 25,
    tuned: dict[str, dict] | None = None,
) -> tuple[dict, tuple[Path, Path]]:
    """Run on the model in ``model_dir`` (trained or decomposed; its ``test.npz`` makes
    the streams), or train (or reuse) one in ``work/model`` (the ``preset`` network on
    ``data``, default digits); start a broker unless ``url`` names one, give the cloud a
    key made in ``work/keys``, run, and write the report and plot."""
    from broker.launcher import Broker
    from cloud_trainer.fleet.keys import PRIVATE_NAME, init_keys
    from cloud_trainer.model.checkpoint import train_model
    from eclm_lab.report import write

    if model_dir is None:
        model_dir = work / "model"
    if not (model_dir / "model.pt").exists():
        trained = train_model(
            model_dir,
            epochs=epochs,
            seed=settings.spec.seed,
            progress=True,
            preset_name=preset,
            data=data,
        )
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
            signing_key=keys / PRIVATE_NAME,
            trust_key=keys / "signing.pub",
            cloud_url=broker.cloud_url if broker else url,
            tuned=tuned,
        )
    finally:
        if broker:
            broker.stop()
    return report, write(report, work)

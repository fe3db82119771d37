"""How far poisoned updates move each strategy's aggregate: the robustness table.

A fleet of real adapters (a head trained on clean digits, devices adapting it to rotated
digits with the numpy trainer, as ``bench/adaptation.py`` does at fleet scale) uploads one
round, with the first ``share`` of the devices attackers of one kind:

- ``scaled``: its honest change to the head times 100;
- ``sign-flipped``: its honest change, negated;
- ``nan``: every value NaN (the update checks refuse it);
- ``lying-count``: an adapter it trained on 64 samples, claiming 1000 times the samples
  (and the labels) of an honest device.

Every update goes through :class:`DomainAggregator` as a decoded message. The distance of
an aggregate is ``|aggregate - honest| / |honest - head|`` over all tensors, ``honest``
the plain mean of the honest devices' updates: 0 is the honest mean, 1 is as far from it
as the head the round started from. "Within 10%" means a distance <= 0.10.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

import eclm_wire as wire
from cloud_trainer.federation.aggregation import DomainAggregator
from cloud_trainer.federation.strategies import Strategy, WeightedMean
from eclm_lab.errors import SettingsError
from eclm_wire.codec import tensor_bytes
from eclm_wire.errors import ProtocolError
from edge_runtime.adapter import Adapter, NumpyTrainer

ATTACKS = ("scaled", "sign-flipped", "nan", "lying-count")
LOOSE = 1e5  # a norm bound scaled updates pass: the strategy has to stop them


@dataclass(frozen=True)
class Device:
    weights: dict[str, np.ndarray]
    histogram: np.ndarray


@dataclass(frozen=True)
class Fleet:
    head: dict[str, np.ndarray]
    honest: list[Device]  # what each device trained on its stream
    weak: list[Device]  # what each trained on 64 samples (what a liar sends)


def rotated_digits(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A head trained on random ReLU features of clean digits, and the features and labels
    of the same digits rotated by 90 degrees: a domain its devices adapt it to."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, y = (digits.images / 16.0).astype(np.float32), digits.target
    projection = np.random.default_rng(seed).normal(0, 1 / 8, (64, 512)).astype(np.float32)

    def features(x):
        return np.maximum(x.reshape(len(x), -1) @ projection, 0)

    clean, rotated = features(images), features(np.rot90(images, 1, axes=(1, 2)))
    cloud = NumpyTrainer(np.zeros((10, 512), np.float32), np.zeros(10, np.float32), lr=0.5)
    for _ in range(20):
        for i in range(0, 1000, 32):
            cloud.step(clean[i : i + 32], y[i : i + 32])
    return cloud.weights(), rotated, y


def digits_fleet(devices: int = 10, stream: int = 1000, seed: int = 0) -> Fleet:
    """``devices`` adapters of one head to rotated digits, each on its own ``stream``."""
    head, rotated, y = rotated_digits(seed)

    def adapt(device: int, samples: int) -> Device:
        adapter = Adapter(NumpyTrainer(head["weight"], head["bias"], lr=0.5), seed=device)
        rows = np.random.default_rng(seed * 1000 + 100 + device).choice(1200, samples, False)
        for i in range(0, samples, 16):
            adapter.observe(rotated[rows[i : i + 16]], y[rows[i : i + 16]])
        return Device(adapter.trainer.weights(), adapter.histogram.astype(np.int64))

    honest = [adapt(d, stream) for d in range(devices)]
    weak = [adapt(d, 64) for d in range(devices)]
    return Fleet(head, honest, weak)


def attacked(fleet: Fleet, kind: str, share: float = 0.2) -> list[wire.AdapterUpdate]:
    """One round of updates, the first ``share`` of them (rounded) from attackers."""
    head, bad = fleet.head, round(share * len(fleet.honest))
    typical = int(np.median([d.histogram.sum() for d in fleet.honest]))
    messages = []
    for i, device in enumerate(fleet.honest):
        weights, histogram = device.weights, device.histogram
        if i < bad:
            if kind == "scaled":
                weights = {k: head[k] + 100 * (v - head[k]) for k, v in weights.items()}
            elif kind == "sign-flipped":
                weights = {k: head[k] - (v - head[k]) for k, v in weights.items()}
            elif kind == "nan":
                weights = {k: np.full_like(v, np.nan) for k, v in weights.items()}
            elif kind == "lying-count":
                weak = fleet.weak[i]
                weights = weak.weights
                histogram = weak.histogram * (1000 * typical // max(1, weak.histogram.sum()))
            else:
                raise SettingsError(f"unknown attack {kind!r}; known: {', '.join(ATTACKS)}")
        messages.append(
            wire.AdapterUpdate(
                device_id=f"pi4-{i}",
                domain="rotate",
                base="1",
                samples=int(histogram.sum()),
                histogram=tuple(int(n) for n in histogram),
                weights=tensor_bytes(weights),
                nonce=secrets.token_hex(8),
            )
        )
    return messages


def _flat(weights: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([weights[k].ravel().astype(np.float64) for k in sorted(weights)])


def distance(aggregate: dict, honest: dict, head: dict) -> float:
    """``|aggregate - honest| / |honest - head|`` (see the module's docstring)."""
    moved = np.linalg.norm(_flat(honest) - _flat(head))
    return float(np.linalg.norm(_flat(aggregate) - _flat(honest)) / moved)


def table(
    fleet: Fleet, strategies: dict[str, Strategy], share: float = 0.2
) -> dict[str, dict[str, float]]:
    """attack -> strategy -> distance of its aggregate from the honest mean; the row
    ``honest device`` has the largest distance of one honest device's own update."""
    bad = round(share * len(fleet.honest))
    received = [wire.decode(wire.AdapterUpdate, m.encode()) for m in attacked(fleet, "nan", 0)]
    reference = DomainAggregator(fleet.head, strategy=WeightedMean(cap=0), max_norm=LOOSE)
    for message in received[bad:]:
        reference.add(message)
    honest = reference.aggregate("rotate")[0]
    out = {
        "honest device": {
            "-": max(distance(d.weights, honest, fleet.head) for d in fleet.honest[bad:])
        }
    }
    for kind in ATTACKS:
        messages = [
            wire.decode(wire.AdapterUpdate, m.encode()) for m in attacked(fleet, kind, share)
        ]
        row = {}
        for name, strategy in strategies.items():
            aggregator = DomainAggregator(fleet.head, strategy=strategy, max_norm=LOOSE)
            for message in messages:
                try:
                    aggregator.add(message)
                except ProtocolError:
                    pass  # refused and counted: the NaN ones
            row[name] = distance(aggregator.aggregate("rotate")[0], honest, fleet.head)
        out[kind] = row
    return out

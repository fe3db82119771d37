"""Streams a fleet sees: per-device label mixes that change over time, covariate shifts
that come and go, memory that drops and recovers, and labels for a fraction of samples.

Built from held-out samples only. Consumers are prequential: predict on ``Step.x`` first,
then learn from the labels that arrived (``Step.y[Step.labelled]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cloud_trainer.model.domains import DOMAINS, apply
from eclm_lab.errors import SettingsError
from edge_runtime.monitor import Reading, TraceSource
from edge_runtime.policy import PolicyConfig


@dataclass(frozen=True)
class ScenarioSpec:
    devices: int = 4
    steps: int = 60  # stream steps per device
    batch: int = 16  # samples per step
    label_rate: float = 0.3  # share of samples whose label arrives, after the prediction
    domains: tuple[str, ...] = ("noise", "rotate", "contrast")
    clean_len: int = 15  # mean steps between shifts
    shift_len: int = 12  # mean steps a shift lasts
    mix_len: int = 30  # mean steps a device keeps one label mix
    alpha: float = 0.3  # Dirichlet concentration of label mixes (smaller: more skewed)
    # per device in turn: the share of the full model's memory its readings leave the
    # sub-model most of the time (a drop leaves room for the smallest sub-model only)
    memory_shares: tuple[float, ...] = (1.0, 0.5, 0.75, 0.6)
    drop_len: int = 8  # mean steps a memory drop lasts (about one per stream)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("devices", "steps", "batch", "clean_len", "shift_len", "mix_len", "drop_len"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.label_rate <= 1.0:
            raise SettingsError(f"label_rate: must be in (0, 1], got {self.label_rate}")
        shifted = [d for d in DOMAINS if d != "clean"]
        if not self.domains or any(d not in shifted for d in self.domains):
            raise SettingsError(
                f"domains: need some of {', '.join(shifted)}; "
                f"got {', '.join(self.domains) or 'none'}"
            )
        if self.alpha <= 0:
            raise SettingsError(f"alpha: must be > 0, got {self.alpha}")
        if not self.memory_shares or not all(0 < s <= 1 for s in self.memory_shares):
            raise SettingsError(f"memory_shares: need shares in (0, 1], got {self.memory_shares!r}")


@dataclass(frozen=True)
class ModelMemory:
    """What the model's sub-models need, in KB (from its cost table): all its modules, and
    the smallest sub-model there is. The scenario's memory readings are stated against it,
    so a drop forces a smaller sub-model on a model of any size."""

    full_kb: float
    smallest_kb: float
    # the share of free memory a device's policy lets the model use
    fraction: float = PolicyConfig().memory_fraction

    def __post_init__(self) -> None:
        if not 0 < self.smallest_kb < self.full_kb:
            raise SettingsError(
                f"model memory: the smallest sub-model ({self.smallest_kb} KB) must be "
                f"smaller than the model ({self.full_kb} KB)"
            )

    def free_mb(self, model_kb: float) -> float:
        """The free memory under which a device's policy allows the model ``model_kb``."""
        return model_kb / self.fraction / 1024

    def normal_kb(self, share: float) -> float:
        # a plan's module sets carry their sizes rounded to 0.1 KB
        return share * self.full_kb + 0.1

    def low_kb(self) -> float:
        # the plan's last resort is selected under the smallest size rounded up
        return math.ceil(self.smallest_kb) + 0.1


@dataclass(frozen=True)
class Step:
    """One step of one device's stream."""

    t: int
    x: np.ndarray  # (batch, C, H, W) of the held-out samples, as seen in ``domain``
    y: np.ndarray  # the true labels; only ``y[labelled]`` ever reach the device
    labelled: np.ndarray  # bool per sample
    domain: str
    mix: np.ndarray  # the label distribution this step was drawn from


@dataclass(frozen=True)
class DeviceStream:
    """One device's schedule; iterating draws the same steps every time."""

    device: int
    domains: tuple[str, ...]  # per step
    mixes: np.ndarray  # (steps, classes)
    memory_mb: np.ndarray  # free memory per step
    pool_x: np.ndarray
    pool_y: np.ndarray
    batch: int
    label_rate: float
    seed: int

    def __iter__(self) -> Iterator[Step]:
        rng = np.random.default_rng([self.seed, self.device, 1])
        by_class = [np.flatnonzero(self.pool_y == c) for c in range(self.mixes.shape[1])]
        for t, (domain, mix) in enumerate(zip(self.domains, self.mixes, strict=True)):
            labels = rng.choice(len(mix), size=self.batch, p=mix)
            rows = np.array([rng.choice(by_class[c]) for c in labels])
            x = apply(domain, self.pool_x[rows], seed=int(rng.integers(2**31)))
            labelled = rng.random(self.batch) < self.label_rate
            yield Step(t, x, self.pool_y[rows], labelled, domain, mix)

    def resources(self) -> TraceSource:
        """The memory trace as readings, one per step."""
        return TraceSource([Reading(available_mb=float(m)) for m in self.memory_mb])

    def shifts(self) -> list[tuple[int, str]]:
        """(step, domain) wherever the domain changes, for plots."""
        return [(t, d) for t, d in enumerate(self.domains) if t == 0 or d != self.domains[t - 1]]


def build(
    spec: ScenarioSpec, x: np.ndarray, y: np.ndarray, memory: ModelMemory
) -> list[DeviceStream]:
    """Every device's stream over the held-out samples ``x`` (N, C, H, W), ``y``, with
    memory readings stated against the model's ``memory``."""
    classes = int(y.max()) + 1
    low = memory.low_kb()
    if any(memory.normal_kb(s) <= low for s in spec.memory_shares):
        raise SettingsError(
            f"memory_shares: {spec.memory_shares} leave some device no more than the "
            f"smallest sub-model ({low:.1f} of {memory.full_kb:.1f} KB): a drop would change "
            "nothing"
        )
    missing = [c for c in range(classes) if not (y == c).any()]
    if missing:
        raise SettingsError(f"the held-out samples lack classes {missing}")
    streams = []
    for device in range(spec.devices):
        rng = np.random.default_rng([spec.seed, device, 0])
        streams.append(
            DeviceStream(
                device=device,
                domains=_domains(spec, rng),
                mixes=_mixes(spec, classes, rng),
                memory_mb=_memory(spec, memory, device, rng),
                pool_x=x,
                pool_y=y,
                batch=spec.batch,
                label_rate=spec.label_rate,
                seed=spec.seed,
            )
        )
    return streams


def _length(mean: int, rng: np.random.Generator) -> int:
    return max(1, int(round(rng.uniform(0.5, 1.5) * mean)))


def _domains(spec: ScenarioSpec, rng: np.random.Generator) -> tuple[str, ...]:
    """Clean stretches and shifted ones in turn, each shift drawn from ``spec.domains``."""
    out: list[str] = []
    shifted = False
    while len(out) < spec.steps:
        domain = str(rng.choice(spec.domains)) if shifted else "clean"
        out += [domain] * _length(spec.shift_len if shifted else spec.clean_len, rng)
        shifted = not shifted
    return tuple(out[: spec.steps])


def _mixes(spec: ScenarioSpec, classes: int, rng: np.random.Generator) -> np.ndarray:
    out: list[np.ndarray] = []
    while len(out) < spec.steps:
        mix = rng.dirichlet(np.full(classes, spec.alpha))
        out += [mix] * _length(spec.mix_len, rng)
    return np.array(out[: spec.steps])


def _memory(
    spec: ScenarioSpec, model: ModelMemory, device: int, rng: np.random.Generator
) -> np.ndarray:
    """The device's share of the model most of the time, with one drop to the smallest
    sub-model somewhere in the middle that later recovers."""
    share = spec.memory_shares[device % len(spec.memory_shares)]
    memory = np.full(spec.steps, model.free_mb(model.normal_kb(share)))
    length = min(_length(spec.drop_len, rng), max(1, spec.steps // 2))
    start = int(rng.integers(spec.steps // 4, max(spec.steps // 4 + 1, spec.steps - length)))
    memory[start : start + length] = model.free_mb(model.low_kb())
    return memory

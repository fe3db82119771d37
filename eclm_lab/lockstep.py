"""The scenario's driver: every device's stream stepped in lockstep through the baselines
and (when given) the adaptive fleet's agents, each step from a quiet wire."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from eclm_lab.baselines import Method
from eclm_lab.scenario import DeviceStream
from edge_runtime.monitor import Reading, ResourceSource

ADAPTIVE = "adaptive (ECLM)"


class StepSource(ResourceSource):
    """A device's memory trace, at the step the driver is on."""

    def __init__(self, stream: DeviceStream) -> None:
        self.stream = stream
        self.t = 0

    def read(self) -> Reading:
        return Reading(available_mb=float(self.stream.memory_mb[self.t]))


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


def drive(
    methods: dict[str, Method],
    streams: dict[str, DeviceStream],
    upload_every: int,
    fleet=None,
    *,
    progress: str | None = None,
    torch_lock=None,
) -> dict[str, Record]:
    """Step every device's stream in lockstep through ``methods`` (and ``fleet``'s agents,
    an :class:`eclm_lab.adaptive_fleet.AdaptiveFleet`, when given): predict, then
    learn from the labelled samples. Agents enter each step's domain first, then the wire
    settles (a warm start the cloud sends comes back in a round trip, while a real
    stream's samples arrive over time), and again after each step (the cloud has every
    update and closed its rounds). ``torch_lock`` is held during each step's torch work."""
    from tqdm import tqdm

    torch_lock = torch_lock or nullcontext()
    steps = len(next(iter(streams.values())).domains)
    names = [*([ADAPTIVE] if fleet else []), *methods]
    accuracy = {n: np.zeros((len(streams), steps)) for n in names}
    adapting = np.zeros((len(streams), steps))
    iterators = {d: iter(s) for d, s in streams.items()}
    for t in tqdm(range(steps), desc=progress, unit="step", leave=False, disable=not progress):
        batch = {device: next(iterators[device]) for device in streams}
        if fleet:  # each device learns its context first, as the rehearsal does
            for device, agent in fleet.agents.items():
                agent.enter(batch[device].domain)
            fleet.settle()
        for i, device in enumerate(streams):
            step = batch[device]
            lab = step.labelled
            if fleet:
                agent = fleet.agents[device]
                agent.resources.t = t
                agent.tick()
                predicted = agent.infer(step.x, step.domain).argmax(1)
                accuracy[ADAPTIVE][i, t] = (predicted == step.y).mean()
                adapting[i, t] = agent.learner is not None and agent.learner.adapting
                agent.learn(step.x[lab], step.y[lab])
            with torch_lock:
                for name, method in methods.items():
                    method.enter(device, step.domain)
                    accuracy[name][i, t] = (method.predict(device, step.x) == step.y).mean()
                    method.learn(device, step.x[lab], step.y[lab])
        if (t + 1) % upload_every == 0:
            with torch_lock:
                for method in methods.values():
                    method.exchange()
        if fleet:
            fleet.settle()
    return {n: Record(a, adapting=adapting if n == ADAPTIVE else None) for n, a in accuracy.items()}

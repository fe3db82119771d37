"""What the cloud does with what devices learned: moves the head toward the devices'
clean-domain adapters and rolls the new head out, and re-selects a device's modules
when its label mix moves enough that another selection serves it clearly better.

Both run on one worker thread, off the MQTT thread; the coordinator hands reports over.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

import eclm_wire as wire
from cloud_trainer.export.plan import Target, with_head
from cloud_trainer.federation.aggregation import DomainAggregator
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.rollout import Rollout, RolloutPlan
from cloud_trainer.model.checkpoint import head_weights

log = logging.getLogger(__name__)
PLAN = RolloutPlan(canary=1, waves=(0.5, 1.0), wave_timeout=60.0)


class Integrator:
    """``targets`` are the devices' current desired contents (updated as they change);
    ``profiles`` their device profiles."""

    def __init__(
        self,
        fc: FleetCoordinator,
        aggregator: DomainAggregator,
        net,
        model_dir: Path,
        store: Path,
        targets: dict[str, Target],
        profiles: dict,
        *,
        blend: float = 0.5,  # how far the head moves toward the devices' aggregate
        min_gain: float = 0.5,  # relative gain in expected importance worth new modules
        plan: RolloutPlan = PLAN,
        torch_lock: threading.Lock | None = None,
    ) -> None:
        """``torch_lock``, if given, is held while jobs trace or run torch: torch.export
        keeps global tracing state that training on another thread trips over."""
        self.fc, self.aggregator, self.net = fc, aggregator, net
        self.model_dir, self.store = model_dir, store
        self.targets, self.profiles = dict(targets), profiles
        self.blend, self.min_gain, self.plan = blend, min_gain, plan
        self.torch_lock = torch_lock or threading.Lock()
        self.rollouts: list[wire.RolloutState] = []
        self.reselections = 0
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="integrator", daemon=True)
        self._worker.start()
        fc.listeners.append(self._on_report)

    def integrate(self) -> None:
        """Queue an integration round (a new head, rolled out)."""
        self._jobs.put(("integrate", None))

    def join(self) -> None:
        """Wait until every queued job is done, then stop the worker."""
        self._jobs.put(None)
        self._worker.join()

    def _on_report(self, before: wire.ReportedState | None, report: wire.ReportedState) -> None:
        if report.mix and (before is None or before.mix != report.mix):
            self._jobs.put(("reselect", (report.device_id, np.array(report.mix))))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            kind, arg = job
            try:
                self._integrate() if kind == "integrate" else self._reselect(*arg)
            except Exception:  # one place where a failed job is logged; the next one runs
                log.exception("%s failed", kind)

    def _integrate(self) -> None:
        aggregate = self.aggregator.aggregate("clean")
        if aggregate is None:
            log.info("integration skipped: no clean-domain adapters yet")
            return
        weights, samples = aggregate
        net = blend_head(self.net, weights, self.blend)
        with self.torch_lock:
            targets = with_head(net, self.targets, self.model_dir, self.store)
        rollout_id = f"integrate-{len(self.rollouts) + 1}"
        log.info("integrating %d samples of clean-domain adapters: rollout %s", samples, rollout_id)
        state = Rollout(self.fc, rollout_id, targets, self.plan).run(progress=log.info)
        self.rollouts.append(state)
        if state.state == "succeeded":  # else the fleet is back on the old head, and so are we
            self.net = net
            self.targets.update(targets)
            self.aggregator.rebase(head_weights(net))  # clipping measures from the new head

    def _reselect(self, device: str, mix: np.ndarray) -> None:
        from cloud_trainer.export.plan import plan_device_modular
        from cloud_trainer.model.checkpoint import load_importance
        from cloud_trainer.model.selection import expected_importance

        target = self.targets.get(device)
        if target is None:
            return
        importance = expected_importance(load_importance(self.model_dir), mix)

        def score(option: wire.ModuleSet) -> float:
            return float(
                sum(importance[layer, list(m)].sum() for layer, m in enumerate(option.selection))
            )

        with self.torch_lock:
            options, refs = plan_device_modular(
                self.model_dir, self.store, self.profiles[device], mix
            )
        current = score(target.options[0])
        if score(options[0]) < (1 + self.min_gain) * current:
            return
        keep = [r for r in target.artifacts if r.part in ("head", "adapter")]
        new = [r for r in refs if r.part not in ("head", "adapter")] + keep
        formats = {r.format for r in target.artifacts}
        updated = replace(
            target, artifacts=tuple(r for r in new if r.format in formats), options=options
        )
        self.fc.assign(device, list(updated.artifacts), options=options, target=updated.profile)
        self.targets[device] = updated
        self.reselections += 1
        log.info("re-selected %s for its label mix: %s", device, options[0].selection)


def blend_head(net, weights: dict[str, np.ndarray], blend: float):
    """A copy of ``net`` whose head moved ``blend`` of the way toward ``weights``."""
    net = copy.deepcopy(net)
    fc = net.head.fc
    for name, value in weights.items():
        old = getattr(fc, name).detach().numpy()
        getattr(fc, name).data[...] = _tensor(old + blend * (value - old))
    return net


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

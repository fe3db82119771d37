"""Module re-selection: the leader gives a device another sub-model when its reported label
mix moved so far that the modules chosen for the new mix carry clearly more expected
importance (``fleet.reselect_gain``, relative) than the ones it runs.

Judging is cheap (a selection, no export); only a re-selection that pays is planned and
exported, in the service's export worker. The device keeps its head and adapter: only the
feature modules change. Each one is logged and counted in the database
(``eclm_reselections`` in /metrics).
"""

from __future__ import annotations

import logging

import numpy as np

import eclm_wire as wire
from cloud_trainer.errors import ExportError
from cloud_trainer.export.plan import Target

log = logging.getLogger(__name__)
COUNTER = "reselections"


def score(importance: np.ndarray, selection) -> float:
    """Expected importance of the modules in ``selection`` (one tuple per layer)."""
    return float(sum(importance[layer, list(m)].sum() for layer, m in enumerate(selection)))


class Reselector:
    """Runs in ``service``'s leader step (a :class:`cloud_trainer.service.Service`)."""

    def __init__(self, service) -> None:
        self.service = service
        self._judged: dict[str, tuple[float, ...]] = {}  # device -> the mix last judged

    def step(self) -> None:
        s = self.service
        gain = s.config.fleet.reselect_gain
        if not gain:
            return
        for device_id, report in list(s.fc.reported.items()):
            if not report.mix or self._judged.get(device_id) == report.mix:
                continue
            self._judged[device_id] = report.mix
            desired = s.fc.desired.get(device_id)
            if desired is None or not desired.options or s.stop_event.is_set():
                continue  # nothing modular to re-select (or no time to)
            try:
                self._judge(device_id, report, desired, gain)
            except (ValueError, ExportError) as exc:  # ProfileError, SelectionError too
                log.error("cannot re-select %s: %s", device_id, exc)

    def _judge(self, device_id: str, report, desired: wire.DesiredState, gain: float) -> None:
        from cloud_trainer.model.checkpoint import load_importance
        from cloud_trainer.model.selection import expected_importance

        s = self.service
        importance = expected_importance(load_importance(s.model_dir), np.array(report.mix))
        current = score(importance, desired.options[0].selection)
        chosen = s.exporter.select(desired.target, report.mix)
        if score(importance, chosen) < (1 + gain) * current:
            return
        planned = s.exporter.plan_for_mix(desired.target, report.mix)
        updated = _keep_head(desired, planned)
        s.fc.assign(
            device_id, list(updated.artifacts), options=updated.options, target=updated.profile
        )
        s.state.count(COUNTER)
        log.info(
            "re-selected %s for its label mix: %s (expected importance %.3f -> %.3f)",
            device_id,
            updated.options[0].selection,
            current,
            score(importance, updated.options[0].selection),
        )


def _keep_head(desired: wire.DesiredState, planned: Target) -> Target:
    """``planned``'s feature modules with the head and adapter ``desired`` runs, in the
    formats it runs."""
    keep = [r for r in desired.artifacts if r.part in ("head", "adapter")]
    new = [r for r in planned.artifacts if r.part not in ("head", "adapter")] + keep
    formats = {r.format for r in desired.artifacts}
    return Target(tuple(r for r in new if r.format in formats), planned.options, desired.target)

"""The research harness: the streams a fleet sees (scenarios with shifts), the baselines,
the adaptation experiment run against ``eclm cloud serve``, its report, the robustness
table and the demo. ``bench/`` and ``eclm demo`` use it; a board never runs it.
"""

from __future__ import annotations

from eclm_common.lazy import lazy_exports

_EXPORTS = {
    "ScenarioSpec": "eclm_lab.scenario",
    "DeviceStream": "eclm_lab.scenario",
    "Settings": "eclm_lab.experiment",
    "run_with_broker": "eclm_lab.experiment",
    "Method": "eclm_lab.baselines",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

"""Staged rollouts: a canary first, then growing waves, stopped by failures.

Each wave sets the new desired state of its devices and waits until every one of them
reports it active or failed (a device that does not answer within the wave timeout counts
as failed). Once at least ``min_reports`` devices have answered, a failure rate at or above
``max_failure_rate`` aborts the rollout, and every device it updated gets its previous
desired state back. The state is published, retained, on ``rollouts/{id}`` after every step,
and handed to a ``journal`` (the service stores it) from which :meth:`Rollout.restore`
resumes a rollout in the wave it was in when the cloud stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import eclm_wire as wire
from cloud_trainer.errors import ConfigError, StateError
from cloud_trainer.export.plan import Target
from cloud_trainer.fleet.coordinator import FleetCoordinator
from eclm_wire import Phase, RolloutStatus
from eclm_wire.mqtt import wait_published

log = logging.getLogger(__name__)
# what parsing a damaged rollout record raises (JSON errors and ProtocolError are ValueErrors)
_DAMAGE = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError)


@dataclass(frozen=True)
class RolloutPlan:
    canary: int = 1  # devices in wave 0
    waves: tuple[float, ...] = (0.25, 0.5, 1.0)  # cumulative share of the fleet after each
    max_failure_rate: float = 0.2
    min_reports: int = 2
    wave_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.canary < 1:
            raise ConfigError(f"canary: must be >= 1, got {self.canary}")
        if not self.waves or any(not 0 < w <= 1 for w in self.waves) or self.waves[-1] != 1:
            raise ConfigError(f"waves: shares in (0, 1] ending with 1, got {self.waves}")
        if list(self.waves) != sorted(self.waves):
            raise ConfigError(f"waves: must grow, got {self.waves}")
        if not 0 < self.max_failure_rate <= 1:
            raise ConfigError(f"max_failure_rate: must be in (0, 1], got {self.max_failure_rate}")

    def batches(self, devices: list[str]) -> list[list[str]]:
        """The devices of each wave, canary first; no wave is empty."""
        cut = [min(self.canary, len(devices))]
        cut += [max(cut[0], math.ceil(share * len(devices))) for share in self.waves]
        bounds = sorted(set(cut))
        return [devices[a:b] for a, b in zip([0, *bounds], bounds, strict=False) if b > a]


class Rollout:
    """Drives one rollout through ``coordinator`` (which must be started)."""

    def __init__(
        self,
        coordinator: FleetCoordinator,
        rollout_id: str,
        targets: dict[str, Target],
        plan: RolloutPlan = RolloutPlan(),
        *,
        settle: float = 2.0,
        journal: Callable[[Rollout], None] | None = None,
    ) -> None:
        """``journal(rollout)`` is called after every step; :meth:`record` is what to keep."""
        wire.check_device_id(rollout_id)
        if not targets:
            raise ConfigError("a rollout needs at least one device")
        self.fc = coordinator
        self.plan = plan
        self.targets = targets
        self.journal = journal
        self.serials: dict[str, int] = {}  # the serial each updated device was given
        # The broker hands the retained desired states over right after connecting.
        coordinator.wait_until(lambda c: all(d in c.desired for d in targets), settle)
        self.previous = {d: coordinator.desired.get(d) for d in targets}
        self.state = wire.RolloutState(
            rollout_id=rollout_id, state=RolloutStatus.RUNNING, wave=0, devices=tuple(targets)
        )

    def record(self) -> str:
        """Everything needed to resume this rollout, as JSON."""
        return json.dumps(
            {
                "state": self.state.to_dict(),
                "plan": asdict(self.plan),
                "targets": {d: _target_dict(t) for d, t in self.targets.items()},
                "previous": {d: p and p.encode().decode() for d, p in self.previous.items()},
                "serials": self.serials,
            }
        )

    @classmethod
    def restore(
        cls, coordinator: FleetCoordinator, record: str, *, journal=None, settle: float = 2.0
    ) -> Rollout:
        """The rollout :meth:`record` described, ready to ``run()`` on from its wave;
        StateError if the record is damaged (the service reports it and goes on)."""
        try:
            state, plan, targets, previous, serials = _parse_record(record)
        except _DAMAGE as exc:
            raise StateError(
                f"rollout record is damaged: {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        rollout = cls(coordinator, state.rollout_id, targets, plan, settle=settle, journal=journal)
        rollout.state, rollout.previous, rollout.serials = state, previous, serials
        return rollout

    def run(self, progress=print, *, pause=None) -> wire.RolloutState:
        """Roll out wave by wave; return the final state (succeeded or aborted). If
        ``pause()`` holds after a wave, return while still running (resume later)."""
        if self.state.state != RolloutStatus.RUNNING:
            return self.state
        self._publish()
        batches = self.plan.batches(list(self.targets))
        for wave, batch in enumerate(batches):
            if wave < self.state.wave:
                continue  # done before a restart
            self.state = replace(self.state, wave=wave)
            fresh = tuple(d for d in batch if d not in self.state.updated)
            desired = self.fc.assign_wave({d: self.targets[d] for d in fresh})
            self.serials.update({d: s.serial for d, s in desired.items()})
            self.state = replace(self.state, updated=self.state.updated + fresh)
            self._publish()
            answered = set(self.state.succeeded + self.state.failed)
            self._wait({d: self.serials[d] for d in batch if d not in answered})
            s = self.state
            progress(
                f"wave {wave}: {len(batch)} devices; {len(s.succeeded)} succeeded, "
                f"{len(s.failed)} failed of {len(s.devices)}"
            )
            reason = self._should_abort()
            if reason:
                return self._abort(reason, progress)
            if pause and pause() and wave + 1 < len(batches):
                self.state = replace(self.state, wave=wave + 1)
                self._publish()
                return self.state
        self.state = replace(self.state, state=RolloutStatus.SUCCEEDED, reason="")
        self._publish()
        return self.state

    def _wait(self, serials: dict[str, int]) -> None:
        def answered(c: FleetCoordinator, device_id: str) -> str | None:
            report = c.reported.get(device_id)
            if report and report.serial == serials[device_id]:
                return {Phase.ACTIVE: "ok", Phase.FAILED: "failed"}.get(report.phase)
            return None

        rid = self.state.rollout_id
        self.fc.wait_until(
            lambda c: rid in c.abort_requests or all(answered(c, d) for d in serials),
            self.plan.wave_timeout,
        )
        ok = tuple(d for d in serials if answered(self.fc, d) == "ok")
        bad = tuple(d for d in serials if d not in ok)
        self.state = replace(
            self.state, succeeded=self.state.succeeded + ok, failed=self.state.failed + bad
        )

    def _should_abort(self) -> str:
        if self.state.rollout_id in self.fc.abort_requests:
            return "aborted by an operator"
        s = self.state
        reported = len(s.succeeded) + len(s.failed)
        rate = len(s.failed) / reported if reported else 0.0
        if reported >= self.plan.min_reports and rate >= self.plan.max_failure_rate:
            return (
                f"failure rate {rate:.0%} of {reported} devices reached the limit "
                f"{self.plan.max_failure_rate:.0%} (failed: {', '.join(s.failed)})"
            )
        return ""

    def _abort(self, reason: str, progress) -> wire.RolloutState:
        progress(f"aborting: {reason}")
        log.warning("rollout %s aborted: %s", self.state.rollout_id, reason)
        back = {  # a device that ran nothing before keeps what it serves
            d: Target(p.artifacts, p.options, p.target)
            for d in self.state.updated
            if (p := self.previous[d]) is not None
        }
        reverted = list(self.fc.assign_all(back))
        self.state = replace(
            self.state, state=RolloutStatus.ABORTED, reason=reason[:2000], reverted=tuple(reverted)
        )
        self._publish()
        progress(f"returned {len(reverted)} devices to their previous state")
        return self.state

    def _publish(self) -> None:
        self.state = replace(self.state, ts=time.time())
        if self.journal:
            self.journal(self)
        sent = self.fc.client.publish(
            wire.rollout_topic(self.state.rollout_id), self.state.encode(), qos=1, retain=True
        )
        wait_published(sent, 5)  # queued while the broker is unreachable: sent on reconnect


def _target_dict(target: Target) -> dict:
    return {
        "artifacts": [a.to_dict() for a in target.artifacts],
        "options": [o.to_dict() for o in target.options],
        "profile": target.profile,
    }


def _target_from(device_id: str, data: dict) -> Target:
    target = Target(
        tuple(wire.ArtifactRef.from_dict(a) for a in data["artifacts"]),
        tuple(wire.ModuleSet.from_dict(o) for o in data["options"]),
        data["profile"],
    )
    # what assign() will build from it: a target that cannot be assigned is damage
    wire.DesiredState(
        device_id=device_id,
        serial=0,
        artifacts=target.artifacts,
        options=target.options,
        target=target.profile,
    )
    return target


def _plan_from(data: dict) -> RolloutPlan:
    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    counts = [data.get(k, 1) for k in ("canary", "min_reports")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        raise TypeError("plan: canary and min_reports must be integers")
    numbers = [data.get(k, 1) for k in ("max_failure_rate", "wave_timeout")]
    if not all(map(number, numbers + list(data["waves"]))):
        raise TypeError("plan: shares, rates and timeouts must be finite numbers")
    return RolloutPlan(**{**data, "waves": tuple(data["waves"])})


def _parse_record(record: str):
    """The parts of a rollout record: state, plan, targets, previous states, serials;
    ValueError, KeyError, TypeError... if it is damaged."""
    data = json.loads(record)
    state = wire.RolloutState.from_dict(data["state"])
    targets = {wire.check_device_id(d): _target_from(d, t) for d, t in data["targets"].items()}
    previous = {
        d: None if p is None else wire.decode(wire.DesiredState, p)
        for d, p in data["previous"].items()
    }
    serials = {d: int(s) for d, s in data["serials"].items()}
    if not targets or not set(targets) == set(previous) == set(state.devices):
        raise ConfigError("targets, previous states and the state's devices disagree")
    if not set(state.updated) <= set(serials) <= set(targets):
        raise ConfigError("updated devices without a serial, or serials of other devices")
    return state, _plan_from(data["plan"]), targets, previous, serials

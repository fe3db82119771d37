"""What an operator may do from the dashboard: start a rollout of the model the cloud
serves to the devices picked by profile and label, and abort a running rollout.

An abort is the same message ``eclm cloud rollout abort`` sends (retained nowhere,
``rollouts/{id}/abort``): whichever worker runs the rollout hears it. A start is queued
for the leader's loop, which runs it wave by wave like an integration rollout and
journals every step; a leader that restarts resumes a rollout the journal says is still
running, so no rollout stays "running" with nobody driving it.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass, replace

import eclm_wire as wire
from cloud_trainer.errors import StateError
from eclm_wire import RolloutStatus
from eclm_wire.errors import ProtocolError
from eclm_wire.mqtt import wait_published

log = logging.getLogger(__name__)
QUEUED = 4  # starts waiting for the leader; more are refused (409)


@dataclass(frozen=True)
class StartRequest:
    rollout_id: str
    profile: str = ""  # "" = every profile
    label: str = ""  # key=value the devices must carry ("" = any)
    devices: tuple[tuple[str, str], ...] = ()  # (device, profile) matched when asked


class OperatorActions:
    """Answers are (HTTP status, JSON body); nothing here raises on a bad request."""

    def __init__(self, service) -> None:
        self.service = service
        self._starts: queue.Queue[StartRequest] = queue.Queue(QUEUED)
        self._queued: set[str] = set()

    def abort(self, rollout_id: str) -> tuple[int, dict]:
        s = self.service
        state = s.state.rollout_states().get(rollout_id)
        if state is None:
            return 404, {"error": f"no rollout {rollout_id[:64]!r}"}
        if state.state != RolloutStatus.RUNNING:
            return 409, {"error": f"rollout {rollout_id} is {state.state}, not running"}
        sent = s.fc.client.publish(wire.rollout_abort_topic(rollout_id), b"{}", qos=1)
        wait_published(sent, 5)
        log.warning("an operator asked to abort rollout %s (dashboard)", rollout_id)
        return 202, {"rollout_id": rollout_id, "abort": "requested"}

    def start(self, body: object) -> tuple[int, dict]:
        if not isinstance(body, dict) or set(body) - {"rollout_id", "profile", "label"}:
            return 400, {"error": "expected {rollout_id, profile?, label?}"}
        values = [body.get(k, "") for k in ("rollout_id", "profile", "label")]
        if not all(isinstance(v, str) for v in values):
            return 400, {"error": "rollout_id, profile and label are strings"}
        request = StartRequest(*values)  # type: ignore[arg-type]
        try:
            wire.check_device_id(request.rollout_id)
            if request.label:
                wire.check_labels((request.label,))
        except ProtocolError as exc:
            return 400, {"error": str(exc)}
        s = self.service
        if not s.leader:
            return 409, {"error": f"worker {s.config.worker} is not the leader"}
        if request.rollout_id in s.state.rollouts() or request.rollout_id in self._queued:
            return 409, {"error": f"rollout {request.rollout_id} exists"}
        # the devices that match now, as the operator saw them: one that goes away before
        # its wave counts as failed, as in any rollout
        request = replace(request, devices=tuple(self._devices(request)))
        if not request.devices:
            return 409, {"error": "no online device with a sub-model matches"}
        try:
            self._starts.put_nowait(request)
        except queue.Full:
            return 409, {"error": "too many rollouts waiting to start"}
        self._queued.add(request.rollout_id)
        log.info("an operator started rollout %s (dashboard)", request.rollout_id)
        return 202, {
            "rollout_id": request.rollout_id,
            "state": "queued",
            "devices": [d for d, _ in request.devices],
        }

    def step(self) -> None:
        """The leader's part: resume an operator rollout left running, else start one."""
        from cloud_trainer.fleet.rollout import Rollout

        s = self.service
        for rid, record in s.state.rollouts(str(RolloutStatus.RUNNING)).items():
            if rid.startswith("integrate-"):
                continue  # the round it came from resumes it
            try:
                rollout = Rollout.restore(s.fc, record, journal=s._journal)
            except StateError as exc:
                log.error("rollout %s cannot resume: %s", rid, exc)
                s.state.save_rollout(rid, str(RolloutStatus.ABORTED), record)
                continue
            self._run(rollout)
            return
        try:
            request = self._starts.get_nowait()
        except queue.Empty:
            return
        self._queued.discard(request.rollout_id)
        targets = {}
        for device_id, profile in request.devices:
            target = s._plan_for(profile)
            if target is not None:
                targets[device_id] = target
        if targets:
            self._run(Rollout(s.fc, request.rollout_id, targets, s._plan(), journal=s._journal))

    def _run(self, rollout) -> None:
        final = rollout.run(progress=log.info, pause=self.service.stop_event.is_set)
        log.info("rollout %s: %s %s", final.rollout_id, final.state, final.reason)

    def _devices(self, request: StartRequest) -> list[tuple[str, str]]:
        """(device, profile) of every online device with a sub-model that matches."""
        s = self.service
        out = []
        for device_id, report in sorted(list(s.fc.reported.items())):
            if not s.fc.online.get(device_id) or device_id not in s.fc.desired:
                continue
            if request.profile and report.profile != request.profile:
                continue
            if request.label and request.label not in report.labels:
                continue
            out.append((device_id, report.profile))
        return out

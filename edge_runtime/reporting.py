"""A device's voice: its retained ``reported`` state (also saved for ``eclm edge status``)
and its ``events``, with events about refused messages bounded (see :mod:`events`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as paho

import eclm_wire as wire
from eclm_wire import EventCode, Phase
from edge_runtime.artifacts import atomic_write
from edge_runtime.events import EventLimiter, EventLimits

log = logging.getLogger(__name__)


class Reporter:
    """Publishes what one device reports. ``set`` may be called from any thread; events
    come from the agent's worker."""

    def __init__(
        self,
        client: paho.Client,
        initial: wire.ReportedState,
        saved: Path,
        *,
        limits: EventLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.saved = client, saved
        self.device_id = initial.device_id
        self._report = initial
        self._lock = threading.Lock()
        self.limiter = EventLimiter(limits or EventLimits(), clock=clock)

    @classmethod
    def idle(cls, config, client: paho.Client, saved: Path, clock) -> Reporter:
        """A device's voice (``config``: its AgentConfig), idle until a desired state
        arrives."""
        initial = wire.ReportedState(
            device_id=config.device_id,
            profile=config.profile.name,
            backends=config.profile.backends,
            labels=config.labels,
            serial=0,
            phase=Phase.IDLE,
            insecure=config.insecure,
        )
        return cls(client, initial, saved, limits=config.events, clock=clock)

    @property
    def report(self) -> wire.ReportedState:
        """The state last reported."""
        return self._report

    def topic(self, kind: str) -> str:
        return wire.device_topic(self.device_id, kind)

    def publish_report(self) -> None:
        """Send the current state again (on connecting)."""
        self.client.publish(self.topic("reported"), self._report.encode(), qos=1, retain=True)

    def set(self, **changes) -> None:
        """Change the reported state and publish it (retained)."""
        with self._lock:  # the worker and the serving thread both report, in order
            self._report = replace(self._report, ts=time.time(), **changes)
            payload = self._report.encode()
            self.client.publish(self.topic("reported"), payload, qos=1, retain=True)
            # A copy for `eclm edge status` (the record is the retained report, and
            # nothing reads this file back): not synced, since two fsyncs per report
            # were most of a report's cost on a flash card, and wore it.
            try:  # a full disk must not stop the agent
                atomic_write(self.saved, payload, sync=False)
            except OSError as exc:
                log.warning("cannot save the reported state: %s", exc)

    def event(self, code: str, reason: str, topic: str = "") -> None:
        """Publish an event about the device's own work (not bounded)."""
        message = wire.Event(
            device_id=self.device_id, code=code[:64], reason=reason[:2000], topic=topic[:512]
        )
        self.client.publish(self.topic("events"), message.encode(), qos=1)

    def refused(self, code: str, reason: str, topic: str) -> None:
        """Log and report a refused message, within the bound; the rest are counted."""
        if not self.limiter.allow(code):
            return
        log.warning("%s rejected a message on %s: %s", self.device_id, topic[:200], reason[:500])
        self.event(code, reason, topic)

    def flush(self) -> None:
        """Publish the summary of suppressed refusals, if one is due."""
        summary = self.limiter.summary()
        if summary is not None:
            log.warning("%s: %s", self.device_id, summary)
            self.event(EventCode.EVENTS_SUPPRESSED, summary)

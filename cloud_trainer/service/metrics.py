"""The service's HTTP face: ``/metrics`` for Prometheus and ``/healthz`` for probes;
the rest goes to the dashboard (:mod:`cloud_trainer.service.api`).

Gauges are read from the service when scraped (devices online, model versions in the
fleet, rollout progress, rounds), counters from the shared database (updates accepted and
refused by reason, re-selections, over every worker), counters of this worker (messages
handled by kind, warm starts sent) and aggregation time from this process.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cloud_trainer.service.state import RoundState

log = logging.getLogger(__name__)


class FleetCollector:
    """Reads ``service`` (a :class:`cloud_trainer.service.Service`) at scrape time."""

    def __init__(self, service) -> None:
        self.service = service

    def collect(self):
        s = self.service
        fc, state = s.fc, s.state
        yield _gauge(
            "eclm_devices_online", "Devices whose status is online.", sum(fc.online.values())
        )
        yield _gauge("eclm_devices_known", "Devices that reported at least once.", len(fc.reported))
        yield _gauge("eclm_model_version", "The model version the cloud serves.", s.version)
        yield _gauge("eclm_leader", "1 if this worker runs rounds and rollouts.", int(s.leader))
        fleet = GaugeMetricFamily(
            "eclm_fleet_devices", "Devices by model version and phase.", labels=["version", "phase"]
        )
        by = Counter((str(s.version_of(r.serial)), r.phase) for r in list(fc.reported.values()))
        for (version, phase), n in sorted(by.items()):
            fleet.add_metric([version, phase], n)
        yield fleet
        progress = GaugeMetricFamily(
            "eclm_rollout_devices", "Devices per rollout by outcome.", labels=["rollout", "outcome"]
        )
        wave = GaugeMetricFamily(
            "eclm_rollout_wave", "The wave a rollout is in.", labels=["rollout"]
        )
        for rid, r in state.rollout_states().items():
            pending = len(r.devices) - len(r.succeeded) - len(r.failed)
            for outcome, n in (("succeeded", len(r.succeeded)), ("failed", len(r.failed))):
                progress.add_metric([rid, outcome], n)
            progress.add_metric([rid, "pending"], pending)
            wave.add_metric([rid], r.wave)
        yield progress
        yield wave
        accepted = CounterMetricFamily("eclm_updates_accepted", "Adapter updates stored.")
        accepted.add_metric([], sum(state.updates_by_worker().values()))
        yield accepted
        yield CounterMetricFamily(
            "eclm_updates_redelivered",
            "Copies of stored updates the broker sent again (their acknowledgement was lost).",
            value=state.counters("redelivered").get("", 0),
        )
        rejected = CounterMetricFamily(
            "eclm_updates_rejected", "Adapter updates refused, by reason.", labels=["reason"]
        )
        for reason, n in sorted(state.counters("rejected:").items()):
            rejected.add_metric([reason], n)
        yield rejected
        dropped = CounterMetricFamily(
            "eclm_messages_dropped",
            "Device messages dropped unread in this worker, by kind and reason.",
            labels=["kind", "reason"],
        )
        for (kind, reason), n in sorted(fc.dropped.items()):
            dropped.add_metric([kind, reason], n)
        yield dropped
        handled = CounterMetricFamily(
            "eclm_messages_handled",
            "Device messages this worker is done with (stored, refused or dropped), by kind.",
            labels=["kind"],
        )
        for kind, n in sorted(fc.handled.items()):
            handled.add_metric([kind], n)
        yield handled
        yield from _delivery(fc)
        yield CounterMetricFamily(
            "eclm_offers_sent", "Warm starts this worker sent to devices.", value=fc.offers
        )
        yield CounterMetricFamily(
            "eclm_reselections",
            "Devices given another module selection for their label mix.",
            value=state.counters("reselections").get("", 0),
        )
        rounds = GaugeMetricFamily("eclm_rounds", "Aggregation rounds by state.", labels=["state"])
        for name in RoundState:
            rounds.add_metric([str(name)], len(state.rounds(name)))
        yield rounds


def _delivery(fc):
    """Artifact bytes out of this worker by topic, and its broadcasts."""
    artifacts = CounterMetricFamily(
        "eclm_artifact_bytes_sent",
        "Artifact chunk bytes this worker published: on devices' own topics (device) or "
        "once per broadcast on shared topics (shared).",
        labels=["topic"],
    )
    artifacts.add_metric(["device"], fc.client.traffic.total("sent", "chunks"))
    artifacts.add_metric(["shared"], fc.client.traffic.total("sent", "artifacts"))
    yield artifacts
    yield CounterMetricFamily(
        "eclm_broadcasts",
        "Artifacts this worker sent once to a gathering of devices.",
        value=sum(fc.broadcaster.sent.values()) if fc.broadcaster else 0,
    )


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


class Metrics:
    def __init__(self, service) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(service))
        self.aggregation = Histogram(
            "eclm_aggregation_seconds",
            "Time to aggregate one round.",
            registry=self.registry,
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10),
        )


def serve_http(service, host: str, port: int) -> ThreadingHTTPServer:
    """Start ``/metrics`` and ``/healthz`` on a daemon thread; ``server_port`` says where."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/metrics":
                try:
                    body, status = generate_latest(service.metrics.registry), 200
                except Exception as exc:  # a failing scrape must not take the service down
                    log.error("metrics scrape failed: %s", exc)
                    body, status = f"scrape failed: {exc}\n".encode(), 500
                self._send(status, body, "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                health = service.health()
                code = 200 if health["status"] == "ok" else 503
                self._send(code, json.dumps(health).encode(), "application/json")
            elif not (service.api and service.api.handle(self, "GET")):  # the dashboard's
                self._send(404, b"try /metrics or /healthz\n", "text/plain")

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if not (service.api and service.api.handle(self, "POST")):
                self._send(404, b"nothing to POST here\n", "text/plain")

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds are not news
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server

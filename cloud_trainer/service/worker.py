"""``eclm cloud serve``: the cloud trainer as a long-running service.

Every worker keeps the fleet's desired, reported and status messages, stores the adapter
updates it receives (a shared subscription gives each update to one worker) and serves
artifact fetches. One worker at a time holds the leader lease in the database; the
leader gives new devices their sub-model, closes aggregation rounds (on a quorum of
devices or a deadline) with the configured strategy, integrates clean-domain rounds into
a new head and rolls it out, and gives a device whose label mix moved another module
selection (:mod:`cloud_trainer.service.reselection`). Every step is in the database before it is
acted on, so a restarted (or another) worker resumes rollouts and rounds where they were,
and no serial is issued twice. SIGTERM lets the wave or round in flight finish, then exits 0.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np

import eclm_wire as wire
from cloud_trainer.errors import ConfigError, ExportError, StateError
from cloud_trainer.export.plan import Target
from cloud_trainer.export.pool import Exporter
from cloud_trainer.fleet.rollout import Rollout, RolloutPlan
from cloud_trainer.service.config import ServiceConfig
from cloud_trainer.service.reselection import Reselector
from cloud_trainer.service.state import CloudState, Round, RoundState
from eclm_wire import RolloutStatus
from eclm_wire.errors import ProtocolError

log = logging.getLogger(__name__)
LEASE = "leader"
TRIM_EVERY = 60.0  # seconds between returns of freed heap to the OS


def release_heap() -> bool:
    """Return the heap's free pages to the OS (glibc's ``malloc_trim``); False where the C
    library has none. A service that decodes updates and journals rollouts for months on
    several threads otherwise keeps freed memory in fragmented arenas: RSS crept ~0.5 MB
    a minute in the soak with no Python object left behind (tracemalloc stayed flat)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


class Service:
    def __init__(self, config: ServiceConfig, *, tick: float = 0.5, lease_ttl: float = 10.0):
        from cloud_trainer.federation.aggregation import DomainAggregator
        from cloud_trainer.fleet.coordinator import FleetCoordinator
        from cloud_trainer.fleet.keys import load_signing_key
        from cloud_trainer.model.checkpoint import head_weights, load_model
        from cloud_trainer.service.access import Access
        from cloud_trainer.service.actions import OperatorActions
        from cloud_trainer.service.api import Api
        from cloud_trainer.service.database import Database
        from cloud_trainer.service.ledger import UpdateLedger
        from cloud_trainer.service.metrics import Metrics
        from cloud_trainer.service.observer import FleetObserver
        from cloud_trainer.service.offload import for_service
        from eclm_wire.mqtt import BrokerAddress
        from edge_runtime.artifacts import ArtifactStore

        c = self.config = config
        self.tick, self.lease_ttl = tick, lease_ttl
        self.model_dir, self.store_dir = Path(c.model.dir), Path(c.model.artifacts)
        if not (self.model_dir / "model.pt").is_file():
            raise ConfigError(f"model.dir: no model.pt in {self.model_dir} (eclm cloud train)")
        try:
            key = load_signing_key(Path(c.model.signing_key))
        except ValueError as exc:
            raise ConfigError(f"model.signing_key: {exc}") from None
        self.state = CloudState(Database(c.state.database))
        self.net = load_model(self.model_dir)
        self.version, head = self.state.latest_version()
        if head is not None:
            self._set_head(head)
        a = c.aggregation
        self.strategy = a.make_strategy()
        checker = DomainAggregator(head_weights(self.net), max_norm=a.max_norm)
        self.ledger = UpdateLedger(
            self.state,
            checker,
            lambda: self.version,
            worker=c.worker,
            max_staleness=a.max_staleness,
        )
        self.leader = False
        self._assigning = self.version  # the model version new desired states carry
        self._serial_versions: dict[int, int | None] = {}
        self._saved_reports: dict[str, object] = {}  # what the database has, to write changes
        self._saved_online: dict[str, bool] = {}
        self._planned: dict[str, str] = {}  # device -> the profile a sub-model was planned for
        self._plans: dict[tuple[str, int], Target] = {}  # (profile, model version) -> target
        self._connected_at = 0.0
        self.db_error = ""
        self.stop_event = threading.Event()
        self.fc = FleetCoordinator(
            BrokerAddress.parse(c.broker.url, cafile=c.broker.cafile or None),
            ArtifactStore(self.store_dir),
            client_id=f"eclm-{c.worker}",
            signing_key=key,
            ttl=c.fleet.ttl_days * 86400,
            aggregator=self.ledger,
            serials=lambda: self.state.next_serial(self._assigning),
            shared_group=c.broker.shared_group,
            is_leader=lambda: self.leader,
            limiter=c.limits.limiter(),
            broadcast=c.broadcast_policy(),
        )
        self.offload = for_service(self.net, self.fc.address, c)  # collaborative inference
        self.metrics = Metrics(self)
        self.observer = FleetObserver(c.dashboard.history)
        self.fc.listeners.append(self.observer)
        self.actions = OperatorActions(self)
        self.api = Api(self, Access.from_config(c.dashboard)) if c.dashboard.enabled else None
        self.exporter = Exporter(self.model_dir, self.store_dir)
        self.reselector = Reselector(self)
        self.http: ThreadingHTTPServer | None = None
        self.content: ThreadingHTTPServer | None = None  # the HTTPS content server, if on
        self.started = time.time()

    # --- lifecycle ------------------------------------------------------------------------

    def run(self, ready=None) -> None:
        """Serve until :meth:`stop`; BrokerUnreachable if the broker cannot be reached.
        ``ready(line)`` is told where the dashboard is once the HTTP port listens."""
        from cloud_trainer.service.metrics import serve_http

        self.fc.start()
        if self.offload:
            self.offload.start()
        self._connected_at = time.monotonic()
        self.http = serve_http(self, self.config.http.host, self.config.http.port)
        if ready and self.api:
            url = f"http://{self.config.http.host}:{self.http.server_port}/"
            ready(f"dashboard: {url} (open {url}#token=TOKEN; {self.api.access.where()})")
        self._serve_content()
        lease = threading.Thread(target=self._hold_lease, name="lease", daemon=True)
        lease.start()
        log.info(
            "serving: worker %s, broker %s, state %s, metrics http://%s:%d/metrics, model v%d",
            self.config.worker,
            self.fc.address,
            self.config.state.database,
            self.config.http.host,
            self.http.server_port,
            self.version,
        )
        try:
            trimmed = time.monotonic()
            while not self.stop_event.is_set():
                self._step()
                if time.monotonic() - trimmed > TRIM_EVERY:
                    release_heap()
                    trimmed = time.monotonic()
                self.stop_event.wait(self.tick)
        finally:
            lease.join(timeout=self.lease_ttl)
            self._shutdown()

    def _serve_content(self) -> None:
        """Start the HTTPS content server if configured, and name it in desired states."""
        from cloud_trainer.fleet.content import load_secret, serve_content

        c = self.config.content
        if not c.enabled:
            return
        secret = load_secret(Path(c.secret_file)) if c.secret_file else None
        self.content = serve_content(
            self.fc.store, c.host, c.port, cert=Path(c.cert), key=Path(c.key), secret=secret
        )
        self.fc.source = c.url or f"https://{c.host}:{self.content.server_port}"
        log.info("content server: %s (tokens: %s)", self.fc.source, "on" if secret else "off")

    def stop(self) -> None:
        """Finish the wave or round in flight, then return from :meth:`run` (signal-safe)."""
        self.stop_event.set()

    def _shutdown(self) -> None:
        self.fc.stop()
        self.exporter.close()
        for server in (self.http, self.content, self.offload):
            if server:
                server.shutdown()
        try:
            self.state.release(LEASE, self.config.worker)
        except StateError as exc:
            log.warning("could not release the leader lease: %s", exc)
        self.state.db.close()
        log.info("stopped: worker %s", self.config.worker)

    def _hold_lease(self) -> None:
        """Renew (or take) the leader lease, apart from the main loop, which may spend a
        whole rollout wave in one step."""
        while not self.stop_event.is_set():
            try:
                held = self.state.claim(LEASE, self.config.worker, self.lease_ttl)
            except StateError as exc:
                held, self.db_error = False, str(exc)
            if held != self.leader:
                log.info(
                    "worker %s %s the leader lease", self.config.worker, "took" if held else "lost"
                )
            self.leader = held
            self.stop_event.wait(self.lease_ttl / 3)

    def _step(self) -> None:
        try:
            self._persist_devices()
            self._follow_version()
            if self.leader:
                self._close_rounds()
                self._integrate_rounds()
                self._assign_new_devices()
                self.reselector.step()
                self.actions.step()
            self.db_error = ""
        except StateError as exc:
            self.db_error = str(exc)
            log.error("state database: %s", exc)

    def health(self) -> dict:
        broker = self.fc.client.is_connected()
        problems = [p for p in (self.db_error, self.fc.store_error) if p]
        return {
            "status": "ok" if broker and not problems else "failing",
            "worker": self.config.worker,
            "broker": "connected" if broker else "disconnected",
            "database": problems[0] if problems else "ok",
            "leader": self.leader,
            "model_version": self.version,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def version_of(self, serial: int) -> int | None:
        if serial not in self._serial_versions:
            self._serial_versions[serial] = self.state.version_of_serial(serial)
        return self._serial_versions[serial]

    # --- leader's work ----------------------------------------------------------------------

    def _follow_version(self) -> None:
        """Take the model version another worker (the leader before us) committed."""
        version, head = self.state.latest_version()
        if version != self.version and head is not None:
            self._set_head(head)
            self.version = self._assigning = version
            log.info("model version %d committed by another worker", version)

    def _persist_devices(self) -> None:
        for device_id, report in list(self.fc.reported.items()):
            if self._saved_reports.get(device_id) is not report:
                self.state.save_report(report)
                self._saved_reports[device_id] = report
        for device_id, online in list(self.fc.online.items()):
            if self._saved_online.get(device_id) != online:
                self.state.save_status(device_id, online)
                self._saved_online[device_id] = online

    def _close_rounds(self) -> None:
        a = self.config.aggregation
        for r in self.state.rounds(RoundState.OPEN):
            if r.devices >= a.quorum or time.time() - r.opened >= a.deadline:
                self._close(r)

    def _close(self, r: Round) -> None:
        from safetensors.numpy import save

        from cloud_trainer.federation.strategies import Contribution
        from cloud_trainer.model.checkpoint import head_weights
        from eclm_wire.codec import check_update

        started = time.perf_counter()
        like = head_weights(self.net)
        contributions = [
            Contribution(
                check_update(u.tensors(), like),
                max(1, round(u.samples * weight)),  # a stale update counts for less
                np.array(u.histogram),
            )
            for u, weight in self._round_updates(r)
        ]
        weights = self.strategy.aggregate(contributions, reference=like)
        samples = sum(c.samples for c in contributions)
        if self.state.close_round(r.id, save(weights), samples, len(contributions)):
            seconds = time.perf_counter() - started
            self.metrics.aggregation.observe(seconds)
            log.info(
                "round %d (%s) closed: %d devices, %d samples, %s in %.3f s",
                r.id,
                r.domain,
                len(contributions),
                samples,
                self.strategy.name,
                seconds,
            )

    def _round_updates(self, r: Round) -> list[tuple[wire.AdapterUpdate, float]]:
        """What round ``r`` aggregates: its updates, or (carry) every device's latest of
        the domain so far, each weighted by its staleness now (too stale: left out)."""
        if not self.config.aggregation.carry:
            return self.state.round_updates(r.id)
        out = []
        for update in self.state.latest_updates(r.domain, r.id):
            try:
                out.append((update, self.ledger.weight(update.base)))
            except ProtocolError:
                continue  # trained too many versions back to count any more
        return out

    def _due(self, r: Round) -> bool:
        """Whether closed clean round ``r`` makes a new head (integration.min_updates)."""
        i = self.config.integration
        if not (i.enabled and self._targets()):
            return False
        since = self.state.last_integrated_round()
        return self.state.updates_after("clean", since) >= i.min_updates

    def _integrate_rounds(self) -> None:
        for r in self.state.rounds(RoundState.CLOSED):
            if self.stop_event.is_set():
                return
            record = self.state.rollouts().get(f"integrate-{r.id}")
            if record is not None:  # started before a restart: resume or finish it
                try:
                    rollout = Rollout.restore(self.fc, record, journal=self._journal)
                except StateError as exc:  # later rounds must not wait on a damaged one
                    log.error("round %d is not integrated: %s", r.id, exc)
                    self.state.finish_round(r.id)
                    continue
                self._finish(rollout, r)
            elif r.domain == "clean" and self._due(r):
                try:
                    self._integrate(r)
                except StateError:
                    raise  # the database: the next step tries again
                except Exception:  # an export or a training that fails would fail again
                    log.exception(
                        "round %d could not be integrated; the fleet keeps its head", r.id
                    )
                    self.state.finish_round(r.id)
            else:
                self.state.finish_round(r.id)

    def _integrate(self, r: Round) -> None:
        from safetensors.numpy import load, save

        from cloud_trainer.federation.integration import blend_head
        from cloud_trainer.model.checkpoint import head_weights

        assert r.weights is not None, "a closed round keeps its aggregate"
        weights = load(r.weights)
        i = self.config.integration
        if i.retrain:
            net = self._retrained(weights, r.samples)
        else:
            net = blend_head(self.net, weights, i.blend)
        targets = self.exporter.with_head(save(head_weights(net)), self._targets())
        self._assigning = self.version + 1
        rollout = Rollout(
            self.fc, f"integrate-{r.id}", targets, self._plan(), journal=self._journal
        )
        log.info(
            "round %d integrated into a new head: rolling it out to %d devices", r.id, len(targets)
        )
        self._finish(rollout, r)

    def _retrained(self, clean: dict, samples: int):
        """A copy of the model whose head is re-trained on the cloud's training data of
        every domain with an aggregate, pulled toward those aggregates (and ``clean``)."""
        import copy

        from cloud_trainer.federation.distributed import run_integration
        from cloud_trainer.model.datasets import load_model_split

        aggregates = {d: a for d in self.state.domains() if (a := self.ledger.aggregate(d))}
        aggregates["clean"] = (clean, samples)
        split = load_model_split(self.model_dir)  # the split the model was trained on
        i = self.config.integration
        job = run_integration(
            self.net,
            aggregates,
            (split.x_train, split.y_train),
            epochs=i.epochs,
            pull=i.pull,
            world_size=i.workers,
        )
        log.info(
            "head re-trained on %s in %d processes (pids %s): loss %.4f -> %.4f",
            ", ".join(sorted(aggregates)),
            len(job.workers),
            ", ".join(str(w.pid) for w in job.workers),
            job.loss_before,
            job.loss_after,
        )
        net = copy.deepcopy(self.net)
        net.head.set_weights(job.weights)
        return net

    def _finish(self, rollout: Rollout, r: Round) -> None:
        final = rollout.run(progress=log.info, pause=self.stop_event.is_set)
        if final.state == RolloutStatus.RUNNING:
            return  # paused by SIGTERM between waves: resumed at the next start
        if final.state == RolloutStatus.SUCCEEDED:
            adapter = next(
                a for t in rollout.targets.values() for a in t.artifacts if a.part == "adapter"
            )
            head = self.fc.store.path(adapter.sha256).read_bytes()
            self.version = self.state.add_version(head, r.id, final.rollout_id)
            self._set_head(head)
            log.info("model version %d is live on %d devices", self.version, len(final.succeeded))
        else:
            log.warning("rollout %s %s: %s", final.rollout_id, final.state, final.reason)
        self._assigning = self.version
        self.state.finish_round(r.id)

    def _journal(self, rollout: Rollout) -> None:
        self.state.save_rollout(rollout.state.rollout_id, rollout.state.state, rollout.record())

    def _set_head(self, head: bytes) -> None:
        from safetensors.numpy import load

        self.net.head.set_weights(load(head))

    def _targets(self) -> dict[str, Target]:
        """What each device with a modular sub-model runs now (its retained desired state)."""
        return {
            d: Target(s.artifacts, s.options, s.target)
            for d, s in sorted(self.fc.desired.items())  # the same canary for the same fleet
            if any(a.part == "head" for a in s.artifacts)
        }

    def _plan(self) -> RolloutPlan:
        r = self.config.rollout
        return RolloutPlan(
            canary=r.canary,
            waves=tuple(r.waves),
            max_failure_rate=r.max_failure_rate,
            min_reports=r.min_reports,
            wave_timeout=r.wave_timeout,
        )

    def _assign_new_devices(self) -> None:
        """Give a sub-model to every online device that never had one (its report says
        serial 0 and no desired state is retained for it), all at once."""
        if not self.config.fleet.auto_assign or time.monotonic() - self._connected_at < 2.0:
            return  # retained desired states arrive right after connecting
        targets = {}
        for device_id, report in list(self.fc.reported.items()):
            if report.serial or device_id in self.fc.desired or not self.fc.online.get(device_id):
                continue
            if self._planned.get(device_id) == report.profile:
                continue  # planned before and failed: wait for another profile
            self._planned[device_id] = report.profile
            target = self._plan_for(report.profile)
            if target is not None:
                targets[device_id] = target
        for device_id, desired in self.fc.assign_wave(targets).items():
            log.info(
                "assigned %s (%s) its sub-model: serial %d",
                device_id,
                desired.target,
                desired.serial,
            )

    def _plan_for(self, profile_name: str) -> Target | None:
        """The sub-model every new device of a profile gets on this model version, planned
        once (planning runs the model; a fleet of one board class needs it once)."""
        from safetensors.numpy import save

        from cloud_trainer.model.checkpoint import head_weights
        from device_profiles import ProfileError, profile_names

        if profile_name not in profile_names():  # a device names a board, never a file
            log.error("a device reported unknown profile %r", profile_name[:80])
            return None
        key = (profile_name, self.version)
        if key not in self._plans:
            head = save(head_weights(self.net)) if self.version else None
            try:
                self._plans[key] = self.exporter.plan(profile_name, head)
            except (ProfileError, ValueError, ExportError) as exc:
                log.error("cannot plan a sub-model for profile %s: %s", profile_name, exc)
                return None
        return self._plans[key]

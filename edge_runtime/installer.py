"""Turning a desired state into a runner: picking the backend, loading and health-checking
the programs, and remembering on disk what passed (and the state before it).

The agent calls :meth:`Installer.choose` when a desired state arrives, :meth:`~Installer.load`
once the store holds its artifacts, :meth:`~Installer.commit` once the runner serves, and
:meth:`~Installer.restore` after a restart. The installer never publishes: what it finds
comes back as values or as the package's errors, and the agent reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import eclm_wire as wire
from device_profiles import DeviceProfile
from eclm_wire.errors import ProtocolError
from edge_runtime.adapter import check_head
from edge_runtime.artifacts import ArtifactStore, atomic_write
from edge_runtime.backends import FORMAT_OF, Backend
from edge_runtime.errors import ArtifactError, BackendError, DamagedArtifact
from edge_runtime.monitor import ResourceSource
from edge_runtime.reconcile import Goal
from edge_runtime.runner import ModularRunner, ProgramRunner, Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Installed:
    """A runner that passed its health check, and what the check found."""

    runner: Runner
    accuracy: float | None  # on the eval set; None without one
    latency_ms: float  # one sample
    head: dict[str, np.ndarray] | None  # the adapter head it brings (weight, bias), if any


class Installer:
    """Loads what desired states name, for one device."""

    def __init__(
        self,
        store: ArtifactStore,
        profile: DeviceProfile,
        resources: ResourceSource,
        make_backend: Callable[[str], Backend],
        *,
        backend: str | None = None,
        eval_set: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.store, self.profile, self.resources = store, profile, resources
        self.make_backend, self.forced, self.eval_set = make_backend, backend, eval_set
        self.backends: dict[str, Backend] = {}
        self.kept: set[str] = set()  # objects of the serving state and the one before
        self.active_path = store.root / "active.json"
        self.previous_path = store.root / "previous.json"

    def choose(self, desired: wire.DesiredState) -> tuple[str, list[wire.ArtifactRef]]:
        """The first backend of the profile's order that can run what is offered, and the
        artifacts it needs: one whole program, or every part of a modular sub-model."""
        order = (self.forced,) if self.forced else self.profile.backends
        for name in order:
            refs = [a for a in desired.artifacts if a.format == FORMAT_OF[name]]
            if not refs:
                continue
            try:
                if name not in self.backends:
                    self.backends[name] = self.make_backend(name)
            except BackendError as exc:
                log.warning("backend %s is unusable here: %s", name, exc)
                continue
            if not desired.options:
                return name, refs[:1]
            return name, refs + [a for a in desired.artifacts if a.format == "safetensors"]
        formats = sorted({a.format for a in desired.artifacts})
        raise ProtocolError(
            f"no artifact this device can run: offered {formats}, backends {list(order)}",
            field="artifacts",
            code="no-usable-artifact",
        )

    def load(
        self, desired: wire.DesiredState, refs: list[wire.ArtifactRef], backend: str, like
    ) -> Installed:
        """The runner for ``desired``, health-checked, with the adapter head it brings
        (shaped like ``like``), if any. DamagedArtifact (moved aside) if a program changed
        since it was checked; BackendError, ArtifactError or ProtocolError if it is
        refused, with nothing left open."""
        fmt = FORMAT_OF[backend]
        programs = {r.sha256: self.store.read(r.sha256) for r in refs if r.format == fmt}
        self.backends[backend].vet(programs)
        if desired.options:
            runner: Runner = ModularRunner(
                backend,
                self.backends[backend],
                self.store,
                refs,
                desired.options,
                self.profile.budget,
                self.resources.read(),
            )
        else:
            data = programs[refs[0].sha256]  # read and hashed just above
            runner = ProgramRunner(backend, self.backends[backend], refs[0], data)
        accuracy, latency = self._health_check(runner)
        try:
            head = self._head(runner, refs, like)
        except (ProtocolError, ArtifactError, BackendError) as exc:
            runner.close()
            if isinstance(exc, DamagedArtifact):
                raise
            raise type(exc)(f"adapter: {exc}") from exc
        return Installed(runner, accuracy, latency, head)

    def _head(
        self, runner: Runner, refs: list[wire.ArtifactRef], like
    ) -> dict[str, np.ndarray] | None:
        """The head the desired state brings, if its shape fits the sub-model's features."""
        head = next((r for r in refs if r.part == "adapter" and r.format == "safetensors"), None)
        if head is None:
            return None
        features = runner.features(runner.one_sample()).shape[1]
        return check_head(self.store.read(head.sha256), features, like)

    def _health_check(self, runner: Runner) -> tuple[float | None, float]:
        """Accuracy on the eval set (None without one) and single-sample latency; a runner
        with non-finite outputs or over the profile's latency budget is closed and refused."""
        try:
            accuracy = runner.evaluate(self.eval_set)
            latency = runner.latency_ms(clock=self.resources.inference_clock)
            budget = self.profile.budget.latency_ms
            if latency > budget:
                raise BackendError(
                    f"health check: {latency:.1f} ms per sample, budget {budget:g} ms"
                )
        except Exception:
            runner.close()
            raise
        return accuracy, latency

    def commit(self, desired: wire.DesiredState, refs: list[wire.ArtifactRef]) -> None:
        """Remember ``desired`` (which serves now) as what to serve after a restart,
        whatever the retained desired state says, each file replaced atomically; the
        state before it stays as the fallback, with its artifacts (a rollback or a damaged
        active set needs no download). Every other object is pruned."""
        encoded = desired.encode()
        try:
            before = self.active_path.read_bytes()
        except OSError:
            before = b""
        try:
            if before and before != encoded:
                atomic_write(self.previous_path, before)
            atomic_write(self.active_path, encoded)
        except OSError as exc:
            log.warning("cannot save the active state: %s", exc)
            return
        shas = {r.sha256 for r in refs}
        removed = self.store.prune(shas | self.kept)
        self.kept = shas
        if removed:
            log.info("removed %d artifacts no longer needed", len(removed))

    def saved(self) -> list[wire.DesiredState]:
        """The states that passed their health check, newest first (at most two)."""
        return [s for s in map(_read_state, (self.active_path, self.previous_path)) if s]

    def restore(self) -> tuple[Goal | None, Goal | None]:
        """After a restart: the newest saved state whose objects are all held, to install
        at once, and the newest saved state if that is not it, to fetch again (a damaged
        active set: the one before it serves meanwhile). Nothing held is pruned until the
        next commit."""
        saved = self.saved()
        if not saved:
            return None, None
        self.kept = self.store.names()
        try:
            goals = [Goal(s, *self.choose(s)) for s in saved]
        except (ProtocolError, BackendError) as exc:
            log.error("cannot restore serial %d: %s", saved[0].serial, exc)
            return None, None
        whole = next((g for g in goals if all(self.store.has(r.sha256) for r in g.refs)), None)
        return whole, None if whole is goals[0] else goals[0]


def _read_state(path: Path) -> wire.DesiredState | None:
    try:
        return wire.decode(wire.DesiredState, path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ProtocolError) as exc:
        log.error("cannot read the saved state %s: %s", path, exc)
        return None

"""The service's exports, run in a child process that is replaced every few jobs.

Exporting a program leaves state behind in the process that does it (torch.fx keeps the
generated source of every graph, ExecuTorch and the LiteRT converter keep caches): about
0.5 MB a program, which a service that plans and integrates for months must not pile up.
A child started with ``spawn`` does the exports and is replaced after ``jobs_per_worker``
jobs; programs land in the content-addressed store, so nothing but refs comes back. The
child ends with the service, whatever ends the service (:mod:`eclm_common.lifeline`).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from cloud_trainer.errors import ExportError
from cloud_trainer.export.plan import Target
from eclm_common.lifeline import die_with_parent, starter


class Exporter:
    def __init__(self, model_dir: Path, store_dir: Path, *, jobs_per_worker: int = 10) -> None:
        self.model_dir, self.store_dir = Path(model_dir), Path(store_dir)
        self.jobs_per_worker = jobs_per_worker
        self._jobs = 0
        self._pool = self._new_pool()

    def plan(self, profile_name: str, head: bytes | None) -> Target:
        """A new device's target for ``profile_name`` (ProfileError, ValueError), with
        ``head`` (safetensors weights) in place of the trained one when given."""
        return self._run(_plan, self.model_dir, self.store_dir, profile_name, head)

    def select(self, profile_name: str, mix: tuple[float, ...]) -> tuple[tuple[int, ...], ...]:
        """The modules ``profile_name``'s full budget buys for label mix ``mix`` (no export:
        what a re-selection is judged by before it is planned)."""
        return self._run(_select, self.model_dir, profile_name, mix)

    def plan_for_mix(self, profile_name: str, mix: tuple[float, ...]) -> Target:
        """Like :meth:`plan` with the trained head, the modules chosen for label mix ``mix``."""
        return self._run(_plan, self.model_dir, self.store_dir, profile_name, None, mix)

    def with_head(self, head: bytes, targets: dict[str, Target]) -> dict[str, Target]:
        """``targets`` with ``head`` exported in each format they run (see
        :func:`cloud_trainer.export.plan.with_head`)."""
        return self._run(_with_head, self.model_dir, self.store_dir, head, targets)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    @staticmethod
    def _new_pool() -> ProcessPoolExecutor:
        # The worker ends with the service, however the service ends (SIGKILL included).
        pool = ProcessPoolExecutor(
            1, mp_context=get_context("spawn"), initializer=die_with_parent, initargs=starter()
        )
        # A worker is always there: the first job does not wait for torch to import, and
        # the service holds the same descriptors whether a job runs or not.
        pool.submit(_warm)
        return pool

    def _run(self, job, *args):
        """``job(*args)`` in the worker; a worker that dies (killed, out of memory) is
        replaced and the job tried once more, then ExportError."""
        for attempt in (1, 2):
            try:
                return self._pool.submit(job, *args).result()
            except BrokenProcessPool as exc:
                self._jobs = self.jobs_per_worker - 1  # a dead worker is replaced at once
                if attempt == 2:
                    what, why = job.__name__.strip("_"), f"the export worker died twice: {exc}"
                    raise ExportError(what, "every backend", why) from exc
            finally:
                self._jobs += 1
                if self._jobs >= self.jobs_per_worker:
                    self._jobs = 0
                    old, self._pool = self._pool, self._new_pool()
                    old.shutdown(wait=False)


def _warm() -> None:
    import cloud_trainer.export.plan  # noqa: F401 (torch and the model code)


def _select(model_dir: Path, profile_name: str, mix) -> tuple[tuple[int, ...], ...]:
    from cloud_trainer.export.plan import select_for
    from device_profiles import load_profile

    return tuple(map(tuple, select_for(model_dir, load_profile(profile_name), mix).modules))


def _plan(
    model_dir: Path, store_dir: Path, profile_name: str, head: bytes | None, mix=None
) -> Target:
    from cloud_trainer.export.plan import plan_device_modular
    from device_profiles import load_profile

    profile = load_profile(profile_name)
    options, refs = plan_device_modular(model_dir, store_dir, profile, mix)
    target = Target(tuple(refs), tuple(options), profile.name)
    if head is None:
        return target
    return _with_head(model_dir, store_dir, head, {"": target})[""]


def _with_head(
    model_dir: Path, store_dir: Path, head: bytes, targets: dict[str, Target]
) -> dict[str, Target]:
    import torch
    from safetensors.numpy import load

    from cloud_trainer.export.plan import with_head
    from cloud_trainer.model.checkpoint import load_model

    net = load_model(model_dir)
    for name, value in load(head).items():
        getattr(net.head.fc, name).data[...] = torch.from_numpy(value)
    return with_head(net, targets, model_dir, store_dir)

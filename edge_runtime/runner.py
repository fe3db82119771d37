"""What an agent serves: one whole program, or a modular sub-model under a budget policy."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

import eclm_wire as wire
from device_profiles import Budget
from eclm_wire.errors import ProtocolError
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import Backend, TensorSpec
from edge_runtime.composer import Layout, part_names, trunk_part
from edge_runtime.errors import BackendError, NotServing
from edge_runtime.hotswap import Slot, SubModelServer
from edge_runtime.monitor import Reading
from edge_runtime.policy import Option, Policy

log = logging.getLogger(__name__)


class Runner(ABC):
    """The serving side of an installed desired state."""

    backend: str
    input_spec: TensorSpec

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray: ...

    @property
    @abstractmethod
    def active(self) -> tuple[str, ...]:
        """sha256 of the artifacts in service."""

    @property
    @abstractmethod
    def detail(self) -> str: ...

    def tick(self, reading: Reading) -> bool:
        """React to a resource reading; True if what is served changed."""
        return False

    @property
    def over_budget(self) -> bool:
        """True if what is served is larger than the last reading allowed."""
        return False

    def features(self, x: np.ndarray) -> np.ndarray:
        """What an adapter head reads; EdgeError if this runner has no such seam."""
        raise NotServing(f"{type(self).__name__} serves a whole program: no features")

    def prefix(self, x: np.ndarray, split: int) -> np.ndarray:
        """The input of modular layer ``split`` (what offloading sends); EdgeError if this
        runner has no layers to split at."""
        raise NotServing(f"{type(self).__name__} serves a whole program: no layers")

    @property
    def splits(self) -> int:
        """The layer boundaries :meth:`prefix` takes are ``0..splits`` (0: none)."""
        return 0

    def close(self) -> None:  # noqa: B027 - an optional hook, most runners hold nothing
        """Release what the runner holds."""

    def one_sample(self) -> np.ndarray:
        shape = tuple(1 if d == -1 else d for d in self.input_spec.shape)
        return np.zeros((1, *shape[1:]), self.input_spec.dtype)

    def evaluate(self, eval_set: tuple[np.ndarray, np.ndarray] | None) -> float | None:
        """Smoke-test; with an eval set, return the accuracy on it. BackendError if the
        outputs are not finite."""
        x, y = eval_set if eval_set is not None else (self.one_sample(), None)
        scores = self.predict(x)
        if not np.isfinite(scores).all():
            raise BackendError("inference gave non-finite outputs")
        return None if y is None else float((scores.argmax(axis=1) == y).mean())

    def latency_ms(self, runs: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
        """Fastest of ``runs`` single-sample inferences by ``clock``, after a warm-up call."""
        x = self.one_sample()
        self.predict(x)
        times = []
        for _ in range(runs):
            start = clock()
            self.predict(x)
            times.append((clock() - start) * 1e3)
        return float(min(times))  # the least disturbed run: other work shares the CPU


class ProgramRunner(Runner):
    """One whole (fused) program."""

    def __init__(
        self, backend_name: str, backend: Backend, ref: wire.ArtifactRef, data: bytes
    ) -> None:
        self.backend, self.ref = backend_name, ref
        self.program = backend.load(data)
        self.input_spec = self.program.inputs[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.program.run(x)[0]

    @property
    def active(self) -> tuple[str, ...]:
        return (self.ref.sha256,)

    @property
    def detail(self) -> str:
        return f"serving {self.ref.name}"


class ModularRunner(Runner):
    """Per-module programs chained into the largest allowed module set that fits now."""

    def __init__(
        self,
        backend_name: str,
        backend: Backend,
        store: ArtifactStore,
        refs: list[wire.ArtifactRef],
        options: tuple[wire.ModuleSet, ...],
        budget: Budget,
        reading: Reading,
    ) -> None:
        self.backend = backend_name
        self.layout = layout = Layout.of(options[0])
        if any(Layout.of(o) != layout for o in options):
            raise ProtocolError("module sets of one model must chain alike", field="options")
        self.parts = {r.part: r.sha256 for r in refs if r.format != "safetensors"}
        for i, option in enumerate(options):
            missing = [p for p in part_names(option.selection, layout) if p not in self.parts]
            if missing:
                raise ProtocolError(
                    f"module set {i} needs parts {missing} that are not offered", field="options"
                )
        self.policy = Policy([Option(o.selection, o.memory_kb) for o in options], budget)
        self.server = SubModelServer(backend, store.read, layout=layout)
        option = self.policy.decide(reading)
        assert option is not None  # the first decision always picks one
        slot = self._swap(option)
        assert slot.model is not None  # a swap that returns has staged its model
        self.input_spec = slot.model.programs["stem"].inputs[0]

    def _swap(self, option: Option) -> Slot:
        needed = part_names(option.selection, self.layout)
        slot = self.server.swap({p: self.parts[p] for p in needed}, option.selection)
        fused = self.parts.get(trunk_part(option.selection))
        if fused:  # the parts serve until the fused trunk is loaded and checked against them
            self.server.fuse_async(fused)
        return slot

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.server.predict(x)

    def features(self, x: np.ndarray) -> np.ndarray:
        return self.server.features(x)

    def prefix(self, x: np.ndarray, split: int) -> np.ndarray:
        return self.server.prefix(x, split)

    @property
    def splits(self) -> int:
        slot = self.server.active
        return len(slot.selection) if slot is not None else 0

    @property
    def over_budget(self) -> bool:
        return self.policy.over_budget

    def tick(self, reading: Reading) -> bool:
        previous = self.policy.current
        option = self.policy.decide(reading)
        if option is None:
            return False
        log.info(
            "resources allow %.2f MB: switching to modules %s (%.2f MB)",
            self.policy.last_allowed_kb / 1024,
            option.selection,
            option.memory_kb / 1024,
        )
        try:
            self._swap(option)
        except Exception:
            self.policy.current = previous  # the previous set is still the one serving
            raise
        return True

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(self.server.active.parts.values())

    @property
    def detail(self) -> str:
        option = self.policy.current
        modules = [list(layer) for layer in option.selection]
        return (
            f"modules {modules} ({option.memory_kb / 1024:.2f} MB; "
            f"{self.policy.last_allowed_kb / 1024:.2f} MB allowed now)"
        )

    def close(self) -> None:
        self.server.close()

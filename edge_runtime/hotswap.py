"""Serving a sub-model while its module set changes under it.

A new module set is loaded into a slot off the hot path (only modules not already loaded
are read), verified with a smoke inference, and switched in by replacing one reference.
``predict`` reads that reference once per call, so every inference runs wholly on one set
and never waits for a load.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.adapter import Adapter
from edge_runtime.artifacts import sha256_bytes
from edge_runtime.backends import Backend, Program
from edge_runtime.composer import DEFAULT_LAYOUT, ComposedModel, Layout
from edge_runtime.errors import ArtifactError, BackendError, NotServing

log = logging.getLogger(__name__)


class SlotState(enum.Enum):
    STAGED = "staged"
    VERIFIED = "verified"
    ACTIVE = "active"
    RETIRED = "retired"
    FAILED = "failed"


_NEXT = {
    SlotState.STAGED: {SlotState.VERIFIED, SlotState.FAILED},
    SlotState.VERIFIED: {SlotState.ACTIVE, SlotState.FAILED},
    SlotState.ACTIVE: {SlotState.RETIRED},
    SlotState.RETIRED: set(),
    SlotState.FAILED: set(),
}


@dataclass
class Slot:
    """One module set on its way in, in service, or out."""

    selection: tuple[tuple[int, ...], ...]
    parts: Mapping[str, str]  # part name -> artifact sha256
    model: ComposedModel | None = None
    state: SlotState = SlotState.STAGED
    reason: str = ""
    load_ms: float = 0.0
    history: list[SlotState] = field(default_factory=list)

    def move(self, new: SlotState, reason: str = "") -> None:
        if new not in _NEXT[self.state]:
            raise RuntimeError(f"a slot in state {self.state.value} cannot become {new.value}")
        self.history.append(self.state)
        self.state, self.reason = new, reason or self.reason


class SubModelServer:
    """Serves the active slot; ``swap`` brings in another module set without a pause."""

    def __init__(
        self,
        backend: Backend,
        read: Callable[[str], bytes],
        *,
        smoke_input: np.ndarray | None = None,
        layout: Layout = DEFAULT_LAYOUT,
    ) -> None:
        self.backend = backend
        self.layout = layout
        self.read = read
        self.smoke_input = smoke_input
        self._programs: dict[str, Program] = {}
        self.adapter: Adapter | None = None  # replaces the head program once set
        self._active: Slot | None = None
        self._lock = threading.Lock()  # one swap at a time; predict never takes it
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swap")

    @property
    def active(self) -> Slot | None:
        return self._active

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class logits from the active sub-model, through the adapter when one is set."""
        slot, adapter = self._active, self.adapter
        if slot is None or slot.model is None:
            raise NotServing("no sub-model is active yet")
        if adapter is None:
            return slot.model.run(x)
        return adapter.logits(slot.model.features(x))

    def features(self, x: np.ndarray) -> np.ndarray:
        """The adapter's input features from the active sub-model."""
        slot = self._active
        if slot is None or slot.model is None:
            raise NotServing("no sub-model is active yet")
        return slot.model.features(x)

    def swap(self, parts: Mapping[str, str], selection) -> Slot:
        """Stage, verify and activate a module set; on failure the previous one stays."""
        slot = Slot(tuple(tuple(layer) for layer in selection), dict(parts))
        with self._lock:
            try:
                self._stage(slot)
                self._verify(slot)
            except (BackendError, ArtifactError) as exc:
                slot.move(SlotState.FAILED, str(exc))
                log.warning("module set %s refused: %s", slot.selection, exc)
                raise
            self._activate(slot)
        return slot

    def swap_async(self, parts: Mapping[str, str], selection) -> Future:
        """``swap`` on the background loader thread."""
        return self._worker.submit(self.swap, parts, selection)

    def _stage(self, slot: Slot) -> None:
        start = time.perf_counter()
        programs = {}
        for name, sha in slot.parts.items():
            program = self._programs.get(sha)
            if program is None:
                data = self.read(sha)
                if sha256_bytes(data) != sha:  # a truncated file may still parse
                    raise ArtifactError(f"{name}: bytes do not match sha256 {sha[:12]}")
                program = self.backend.load(data)
                time.sleep(0)  # a backend that holds the GIL while loading: let serving in
            programs[name] = program
        slot.model = ComposedModel(programs, slot.selection, self.layout)
        slot.load_ms = (time.perf_counter() - start) * 1e3

    def _verify(self, slot: Slot) -> None:
        assert slot.model is not None
        x = self.smoke_input
        if x is None:  # zeros shaped like the stem's input, batch 1
            spec = slot.model.programs["stem"].inputs[0]
            x = np.zeros(tuple(1 if d == -1 else d for d in spec.shape), spec.dtype)
        out = slot.model.run(x)
        if out.shape[0] != len(x) or not np.isfinite(out).all():
            raise BackendError(f"smoke inference gave {out.shape} with non-finite values")
        slot.move(SlotState.VERIFIED)

    def _activate(self, slot: Slot) -> None:
        previous, self._active = self._active, slot
        slot.move(SlotState.ACTIVE)
        if previous is not None:
            previous.move(SlotState.RETIRED)
        # Keep loaded only what the active set uses; in-flight calls hold their own refs.
        assert slot.model is not None
        self._programs = {slot.parts[name]: slot.model.programs[name] for name in slot.parts}
        log.info("module set %s active (loaded in %.1f ms)", slot.selection, slot.load_ms)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

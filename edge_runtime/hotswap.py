"""Serving a sub-model while its module set changes under it.

A new module set is loaded into a slot off the hot path (only modules not already loaded
are read), verified with a smoke inference, and switched in by replacing one reference.
``predict`` reads that reference once per call, so every inference runs wholly on one set
and never waits for a load.

Off the hot path is not enough on its own: the loader shares the GIL with serving. Both
runtimes hold it while they load a program, and a serving call that let it go inside a
program waits for the loader's Python code to hand it back, by default up to 5 ms per
program of the call. So the loader takes each step (one program's load, one program call
of the smoke inference) in a gap between serving calls, and a server lowers the process's
switch interval to :data:`SWITCH_INTERVAL`.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.adapter import Adapter
from edge_runtime.artifacts import sha256_bytes
from edge_runtime.backends import Backend, Program
from edge_runtime.composer import DEFAULT_LAYOUT, TRUNK, ComposedModel, Layout
from edge_runtime.errors import ArtifactError, BackendError, NotServing

log = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.0005  # s: how long a serving call may wait for the GIL (Python: 0.005)
GAP_WAIT = 0.01  # s: the longest a loader step waits for a gap between serving calls


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
        self._serving = 0  # calls under way
        self._count = threading.Lock()  # guards _serving only
        self._gaps = True  # whether this swap's steps still wait for gaps (see _gap)
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))

    @property
    def active(self) -> Slot | None:
        return self._active

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class logits from the active sub-model, through the adapter when one is set."""
        slot, adapter = self._active, self.adapter
        if slot is None or slot.model is None:
            raise NotServing("no sub-model is active yet")
        with self._call():
            if adapter is None:
                return slot.model.run(x)
            return adapter.logits(slot.model.features(x))

    def features(self, x: np.ndarray) -> np.ndarray:
        """The adapter's input features from the active sub-model."""
        slot = self._active
        if slot is None or slot.model is None:
            raise NotServing("no sub-model is active yet")
        with self._call():
            return slot.model.features(x)

    def prefix(self, x: np.ndarray, split: int) -> np.ndarray:
        """The input of layer ``split`` through the active sub-model (see ComposedModel)."""
        slot = self._active
        if slot is None or slot.model is None:
            raise NotServing("no sub-model is active yet")
        with self._call():
            return slot.model.prefix(x, split)

    def swap(self, parts: Mapping[str, str], selection) -> Slot:
        """Stage, verify and activate a module set; on failure the previous one stays."""
        slot = Slot(tuple(tuple(layer) for layer in selection), dict(parts))
        with self._lock:
            self._gaps = True
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

    def fuse(self, trunk_sha: str) -> Slot | None:
        """Replace the active module set's parts by its fused trunk program (``trunk_sha``),
        if it computes what they do on the smoke input; None if the active set changed
        meanwhile. The parts serve until the fused program is in."""
        with self._lock:
            active = self._active
            if active is None or active.model is None or TRUNK in active.parts:
                return None
            slot = Slot(active.selection, {TRUNK: trunk_sha, "head": active.parts["head"]})
            self._gaps = True
            try:
                self._stage(slot)
                self._verify(slot)
                x = self._smoke(slot)
                want = self._politely(active.model).trunk(x)
                got = self._politely(slot.model).trunk(x)  # type: ignore[arg-type]
                if want.shape != got.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3):
                    raise BackendError("the fused trunk disagrees with the module set's parts")
            except (BackendError, ArtifactError) as exc:
                slot.move(SlotState.FAILED, str(exc))
                log.warning(
                    "fused trunk of %s refused (its parts serve on): %s", slot.selection, exc
                )
                return None
            self._activate(slot)
        return slot

    def fuse_async(self, trunk_sha: str) -> Future:
        return self._worker.submit(self.fuse, trunk_sha)

    def _stage(self, slot: Slot) -> None:
        start = time.perf_counter()
        programs = {}
        for name, sha in slot.parts.items():
            program = self._programs.get(sha)
            if program is None:
                data = self.read(sha)
                if sha256_bytes(data) != sha:  # a truncated file may still parse
                    raise ArtifactError(f"{name}: bytes do not match sha256 {sha[:12]}")
                self._gap()
                program = self.backend.load(data)
            programs[name] = program
        slot.model = ComposedModel(programs, slot.selection, self.layout)
        slot.load_ms = (time.perf_counter() - start) * 1e3

    def _verify(self, slot: Slot) -> None:
        assert slot.model is not None
        x = self._smoke(slot)
        out = self._politely(slot.model).run(x)
        if out.shape[0] != len(x) or not np.isfinite(out).all():
            raise BackendError(f"smoke inference gave {out.shape} with non-finite values")
        slot.move(SlotState.VERIFIED)

    def _smoke(self, slot: Slot) -> np.ndarray:
        """The smoke input, or one seeded sample in [0, 1) shaped like the first program's
        input (not zeros: a fused program is compared with its parts on it)."""
        if self.smoke_input is not None:
            return self.smoke_input
        assert slot.model is not None
        first = slot.model.programs[slot.model.part_names()[0]].inputs[0]
        shape = tuple(1 if d == -1 else d for d in first.shape)
        return np.random.default_rng(0).random(shape).astype(first.dtype)

    @contextmanager
    def _call(self):
        with self._count:
            self._serving += 1
        try:
            yield
        finally:
            with self._count:
                self._serving -= 1

    def _gap(self) -> None:
        """Wait until no serving call is under way. A server with no gaps (calls back to
        back) still swaps: once a wait runs out (GAP_WAIT), the rest of the swap goes
        without waiting."""
        if not self._gaps:
            return
        deadline = time.monotonic() + GAP_WAIT
        while self._serving:
            if time.monotonic() > deadline:
                self._gaps = False
                return
            time.sleep(0.0002)

    def _politely(self, model: ComposedModel) -> ComposedModel:
        """``model`` with every program call taken in a gap between serving calls."""
        polite = {name: _Polite(program, self._gap) for name, program in model.programs.items()}
        return ComposedModel(polite, model.selection, model.layout)  # type: ignore[arg-type]

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


class _Polite:
    """A program whose every call first waits for ``gap()``."""

    def __init__(self, program: Program, gap: Callable[[], None]) -> None:
        self.program, self.gap = program, gap

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        self.gap()
        return self.program.run(*arrays)

    def __getattr__(self, name: str):
        return getattr(self.program, name)

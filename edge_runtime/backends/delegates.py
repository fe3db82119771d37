"""Whether LiteRT's default delegates (XNNPACK) work here, checked in a child process.

LiteRT applies XNNPACK by default. Where that build misbehaves (ai-edge-litert 2.3.0
under qemu 7.2, DESIGN.md section 6) it does not raise: it kills the process with
SIGSEGV, which no ``except`` catches, and a board whose agent dies at every load never
serves and never says why. So before a program runs in the agent, a short-lived child
(``python -m edge_runtime.backends.delegates``) runs it twice on one fixed input: first
without the default delegates (LiteRT's builtin kernels: the reference), then with them.

- both finish and agree: ``"default"`` (the delegates stay);
- the delegated run crashes, fails or disagrees: ``"none"`` (run without them);
- the reference itself does not finish: BackendError (the programs do not run here).

Verdicts are cached per program (its sha256) for the life of the process: programs are
content-addressed, so a program checked once on this machine and this LiteRT stays
checked; a later sub-model pays only for programs it brings new.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import BackendError

DEFAULT, NONE = "default", "none"
MODES = (DEFAULT, NONE)
_REFERENCE, _DELEGATED = "reference.npz", "delegated.npz"
# XNNPACK and the builtin kernels round differently (and int8 programs may differ by a
# quantisation step); a broken delegate gives garbage, far beyond this.
_TOLERANCE = 0.05

_verdicts: dict[str, str] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class DelegateCheck:
    """How the child is started: the interpreter (the agent's own, by default), how long
    it may take (the emulated board imports numpy and LiteRT slowly) and its environment."""

    python: str = sys.executable
    timeout: float = 300.0
    env: tuple[tuple[str, str], ...] = ()


CHILD = DelegateCheck()


def verdict(programs: dict[str, bytes], check: DelegateCheck = CHILD) -> str:
    """``"default"`` or ``"none"`` for ``programs`` (sha256 -> bytes), running the child
    for those not checked yet; BackendError if they do not run here at all."""
    with _lock:
        todo = {sha: data for sha, data in programs.items() if sha not in _verdicts}
        if todo:
            found = _run_child(todo, check)
            for sha in todo:
                _verdicts[sha] = found
        return NONE if any(_verdicts[sha] == NONE for sha in programs) else DEFAULT


def forget() -> None:
    """Drop the cached verdicts (a test that checks again in one process)."""
    with _lock:
        _verdicts.clear()


def _run_child(programs: dict[str, bytes], check: DelegateCheck) -> str:
    with tempfile.TemporaryDirectory(prefix="eclm-delegates-") as tmp:
        out = Path(tmp)
        paths = []
        for sha, data in programs.items():
            path = out / f"{sha[:16]}.tflite"
            path.write_bytes(data)
            paths.append(str(path))
        cmd = [check.python, "-m", "edge_runtime.backends.delegates", str(out), *paths]
        env = {**os.environ, **dict(check.env)}
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=check.timeout, env=env
            )
            how = _how(done.returncode, done.stderr)
        except subprocess.TimeoutExpired:
            done, how = None, f"did not finish in {check.timeout:g} s"
        if not (out / _REFERENCE).is_file():
            raise BackendError(
                f"LiteRT cannot run these programs here, even without its default "
                f"delegates: the check {how}"
            )
        if done is None or done.returncode != 0 or not (out / _DELEGATED).is_file():
            return _broken(f"the run with LiteRT's default delegates {how}")
        with np.load(out / _REFERENCE) as ref, np.load(out / _DELEGATED) as got:
            for key in ref.files:
                scale = max(1.0, float(np.abs(ref[key]).max(initial=0.0)))
                diff = float(np.abs(ref[key] - got[key]).max(initial=0.0))
                if not diff <= _TOLERANCE * scale:  # NaN too
                    return _broken(
                        f"the default delegates differ from the builtin kernels by {diff:g}"
                    )
    return DEFAULT


def _how(code: int, stderr: str) -> str:
    if code < 0:
        try:
            return f"died by {signal.Signals(-code).name}"
        except ValueError:  # a real-time or unnamed signal
            return f"died by signal {-code}"
    if code == 0:
        return "finished"
    last = stderr.strip().splitlines()[-1:] or ["no output"]
    return f"failed (exit {code}: {last[0][:200]})"


def _broken(why: str) -> str:
    import logging

    logging.getLogger(__name__).warning("%s: running LiteRT without them", why)
    return NONE


def _fixed_input(detail: dict, seed: int) -> np.ndarray:
    """The same input in both runs: seeded by the program and the input's position."""
    rng = np.random.default_rng(seed)
    shape, dtype = tuple(int(s) for s in detail["shape"]), np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), shape).astype(dtype)


def _outputs(paths: list[str], resolver) -> dict[str, np.ndarray]:
    from edge_runtime.backends.litert import Interpreter  # the backend's own import

    found = {}
    for n, path in enumerate(paths):
        data = Path(path).read_bytes()
        seed = int.from_bytes(hashlib.sha256(data).digest()[:4], "little")
        it = Interpreter(model_content=data, num_threads=1, experimental_op_resolver_type=resolver)
        it.allocate_tensors()
        for i, detail in enumerate(it.get_input_details()):
            it.set_tensor(detail["index"], _fixed_input(detail, seed + i))
        it.invoke()
        for j, detail in enumerate(it.get_output_details()):
            found[f"p{n}_o{j}"] = it.get_tensor(detail["index"]).astype(np.float64)
    return found


def _child(out: Path, paths: list[str]) -> None:
    """The reference first, written before the delegated run starts: if that one dies,
    the parent still knows the programs run without delegates."""
    from edge_runtime.backends.litert import resolver

    _save(out / _REFERENCE, _outputs(paths, resolver(NONE)))
    _save(out / _DELEGATED, _outputs(paths, resolver(DEFAULT)))


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Whole or not at all: a crash while writing must not leave a file that loads."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


if __name__ == "__main__":
    _child(Path(sys.argv[1]), sys.argv[2:])

import numpy as np
import pytest

from edge_runtime.backends import get_backend
from edge_runtime.data import load_npz
from edge_runtime.errors import BackendError

FORMATS = {"executorch": "pte", "litert": "tflite"}


@pytest.fixture(params=["executorch", "litert"])
def loaded(request, exported):
    backend = get_backend(request.param, threads=1)
    path = exported["store"] / "objects" / exported["refs"][FORMATS[request.param]].sha256
    return backend, path


def test_programs_run_any_batch_and_match_the_cloud_accuracy(loaded, exported):
    backend, path = loaded
    program = backend.load(path)
    x, y = load_npz(exported["test_npz"])

    assert program.inputs[0].shape == (-1, 1, 8, 8)
    whole = program.run(x)[0]
    one_by_one = np.concatenate([program.run(x[i : i + 1])[0] for i in range(17)])
    accuracy = (whole.argmax(1) == y).mean()

    assert whole.shape == (len(x), 10)
    np.testing.assert_allclose(one_by_one, whole[:17], atol=1e-5)
    assert abs(accuracy - exported["accuracy"]) < 0.01


def test_truncated_or_foreign_programs_are_refused(loaded):
    backend, path = loaded
    data = path.read_bytes()

    for bad in (data[: len(data) // 2], data[:6], b"\x00" * 64, b"PK\x03\x04" + data[4:]):
        with pytest.raises(BackendError):
            backend.load(bad)


def test_wrong_shape_or_dtype_names_what_was_expected(loaded):
    program = loaded[0].load(loaded[1])

    with pytest.raises(BackendError, match=r"expected shape \(-1, 1, 8, 8\)"):
        program.run(np.zeros((2, 64), np.float32))
    with pytest.raises(BackendError, match="expected dtype float32"):
        program.run(np.zeros((2, 1, 8, 8), np.float64))


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="known: executorch, litert"):
        get_backend("onnx")


def test_starting_a_backend_and_loading_a_program_prints_nothing(loaded):
    """ExecuTorch's import (torchao's CUDA kernels, torch's deprecations) and thread-pool
    reset (cpuinfo's probing) printed eight lines a user had to learn to ignore, and
    LiteRT one on its first program; a new process shows none of them now."""
    import subprocess
    import sys
    from pathlib import Path

    backend, path = loaded
    code = (
        "import sys\n"
        "from edge_runtime.backends import get_backend\n"
        f"get_backend({backend.name!r}, threads=1).load(sys.argv[1])\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_only_the_runtimes_notes_are_held_back(capfd):
    import os

    from edge_runtime.backends.base import without_notes

    assert without_notes((b"[note]",), os.write, 2, b"[note] probing\nan error\n") == 24
    assert capfd.readouterr().err == "an error\n"

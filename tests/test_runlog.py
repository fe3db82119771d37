"""The demo's log file: a real LiteRT interpreter's native start-up line and a Python
warning land in the file, not on the terminal; the command's own output and its errors
stay on the terminal; ``verbose`` keeps everything there. Each case runs in its own
process (fd 2 is redirected, and LiteRT prints its line once per process)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the cloud side (torch) is not installed: an edge-only venv")

ROOT = Path(__file__).resolve().parent.parent
NATIVE = "XNNPACK delegate"  # TensorFlow Lite's C++ logging, straight to fd 2
SCRIPT = """
import logging, sys, warnings
from pathlib import Path
from eclm_common.runlog import routed_to
from ai_edge_litert.interpreter import Interpreter

logging.basicConfig(level=logging.WARNING)
log, program = Path(sys.argv[1]), Path(sys.argv[2])
verbose, fail = sys.argv[3] == "1", sys.argv[4] == "1"
with routed_to(log, verbose=verbose):
    print("result: 42", flush=True)
    print("progress: 1/1", file=sys.stderr, flush=True)
    Interpreter(model_content=program.read_bytes()).allocate_tensors()  # not the backend,
    # which keeps this line from the terminal and the log alike
    warnings.warn("a deprecation wall", DeprecationWarning)
    logging.getLogger("torchao").warning("Failed to load a kernel library")
    # a library that makes its own handler at import, as torch does, keeps that stream
    own = logging.getLogger("torchlike")
    own.propagate = False
    own.addHandler(logging.StreamHandler())
    own.warning("a handler of its own")
    if fail:
        raise RuntimeError("the broker went away")
own.warning("after the block")
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    import torch

    from cloud_trainer.export.programs import export_litert

    path = tmp_path_factory.mktemp("runlog") / "linear.tflite"
    path.write_bytes(export_litert(torch.nn.Linear(4, 2), torch.zeros(2, 4)))
    return path


def run(tmp_path: Path, program: Path, *, verbose=False, fail=False):
    log = tmp_path / "out" / "demo.log"
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "always",
            "-c",
            SCRIPT,
            log,
            program,
            str(int(verbose)),
            str(int(fail)),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    return proc, log.read_text() if log.exists() else ""


def test_library_output_goes_to_the_log_and_the_commands_output_stays(tmp_path, program):
    proc, log = run(tmp_path, program)

    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    for line in (NATIVE, "a deprecation wall", "Failed to load", "a handler of its own"):
        assert line in log
        assert line not in terminal
    assert proc.stdout == "result: 42\n"
    assert proc.stderr == "progress: 1/1\nafter the block\n"  # the terminal is back


def test_verbose_keeps_it_all_on_the_terminal(tmp_path, program):
    proc, log = run(tmp_path, program, verbose=True)

    assert proc.returncode == 0, proc.stderr
    assert NATIVE in proc.stderr and "a deprecation wall" in proc.stderr
    assert log == ""


def test_a_failure_reaches_the_terminal_with_where_the_log_is(tmp_path, program):
    proc, log = run(tmp_path, program, fail=True)

    assert proc.returncode == 1
    assert "RuntimeError: the broker went away" in proc.stderr
    assert f"(the full log: {tmp_path / 'out' / 'demo.log'})" in proc.stderr
    assert "the broker went away" in log and NATIVE in log and NATIVE not in proc.stderr

"""LiteRT with and without its default delegates, on real programs: the same outputs both
ways; the child process that checks the delegates before the agent runs a program keeps
them when they work, drops them when the check dies by SIGSEGV (what XNNPACK does under
qemu), and refuses programs that do not run even without them."""

import os
import textwrap

import numpy as np
import pytest

import eclm_wire as wire
from device_profiles import load_profile
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import delegates, get_backend
from edge_runtime.errors import BackendError, ConfigError
from edge_runtime.installer import Installer
from edge_runtime.monitor import PsutilSource

torch = pytest.importorskip("torch", reason="the programs are exported with torch")

X = np.random.default_rng(1).random((32, 64), dtype=np.float32)

# Loaded by the child before anything else (PYTHONPATH): an interpreter asked for with
# LiteRT's default delegates dies by a real SIGSEGV (a read of address 0), as LiteRT 2.3.0
# does under qemu aarch64; the builtin kernels are left as they are.
CRASHING_DELEGATES = textwrap.dedent(
    """
    import ctypes
    import ai_edge_litert.interpreter as li

    _init = li.Interpreter.__init__

    def init(self, *args, experimental_op_resolver_type=li.OpResolverType.AUTO, **kw):
        if experimental_op_resolver_type == li.OpResolverType.AUTO:
            ctypes.string_at(0)
        _init(self, *args, experimental_op_resolver_type=experimental_op_resolver_type, **kw)

    li.Interpreter.__init__ = init
    """
)


@pytest.fixture(scope="module")
def program():
    """A real LiteRT program (fully connected layers, as the head and router are) and the
    classes torch gives ``X``."""
    from cloud_trainer.export.programs import export_litert

    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)
    ).eval()
    with torch.no_grad():
        labels = net(torch.from_numpy(X)).numpy().argmax(1)
    return {"data": export_litert(net, torch.zeros(2, 64), name="mlp-delegates"), "labels": labels}


@pytest.fixture(autouse=True)
def fresh_verdicts():
    delegates.forget()
    yield
    delegates.forget()


@pytest.fixture
def crashing(tmp_path) -> delegates.DelegateCheck:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASHING_DELEGATES)
    path = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return delegates.DelegateCheck(env=(("PYTHONPATH", path),), timeout=120)


def test_without_default_delegates_programs_give_the_same_outputs(program):
    with_them = get_backend("litert", threads=1, check=None).load(program["data"])
    without = get_backend("litert", threads=1, delegates="none").load(program["data"])

    a, b = with_them.run(X)[0], without.run(X)[0]

    np.testing.assert_allclose(a, b, atol=1e-5)
    assert (b.argmax(1) == program["labels"]).all()


def test_working_delegates_pass_the_check_and_stay(program):
    backend = get_backend("litert", threads=1)
    sha = "a" * 64

    backend.vet({sha: program["data"]})

    assert backend.delegates == "default"
    assert delegates.verdict({sha: b"not run again: cached"}) == "default"


def test_a_check_that_dies_by_sigsegv_drops_the_delegates_and_the_program_still_serves(
    tmp_path, program, crashing, caplog
):
    store = ArtifactStore(tmp_path / "store")
    sha = store.put(program["data"])
    ref = wire.ArtifactRef(name="mlp", sha256=sha, size=len(program["data"]), format="tflite")
    state = wire.DesiredState(device_id="dev-1", serial=1, artifacts=(ref,))
    made = []

    def make(name):
        made.append(get_backend(name, threads=1, check=crashing))
        return made[-1]

    installer = Installer(
        store, load_profile("rpi4"), PsutilSource(), make, eval_set=(X, program["labels"])
    )
    backend, refs = installer.choose(state)
    installed = installer.load(state, refs, backend, None)

    assert made[0].delegates == "none"
    assert "died by SIGSEGV" in caplog.text
    assert installed.accuracy == 1.0
    installed.runner.close()


def test_programs_that_fail_even_without_delegates_are_refused_before_they_load(program):
    data = program["data"]
    broken = data[:8] + bytes(len(data) - 8)  # the identifier, and nothing a program holds

    with pytest.raises(BackendError, match="even without its default delegates"):
        get_backend("litert", threads=1).vet({"b" * 64: broken})


def test_the_delegates_setting_is_checked():
    with pytest.raises(ConfigError, match="not one of default, none"):
        get_backend("litert", delegates="xnnpack")

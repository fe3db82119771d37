"""The installer on a real store with real LiteRT and ExecuTorch programs, no broker: the
backend picked from the profile's order, the health check (scored on an eval set, refused
over the latency budget), damaged and broken programs refused, the atomic commit that keeps
the state before and prunes the rest, and what a restart serves and fetches again."""

import itertools
from dataclasses import replace

import numpy as np
import pytest

import eclm_wire as wire
from device_profiles import load_profile
from eclm_wire.errors import ProtocolError
from edge_runtime.artifacts import ArtifactStore, sha256_bytes
from edge_runtime.backends import get_backend
from edge_runtime.errors import BackendError, DamagedArtifact
from edge_runtime.installer import Installer
from edge_runtime.monitor import PsutilSource

torch = pytest.importorskip("torch", reason="the programs are exported with torch")

FORMAT = {"litert": "tflite", "executorch": "pte"}
X = np.random.default_rng(0).random((32, 64), dtype=np.float32)


def mlp(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)
    ).eval()


@pytest.fixture(scope="module")
def programs():
    """Two real programs per format (MLPs on 8x8 digits of some 10 KB) and the classes
    the torch MLPs give ``X``."""
    from cloud_trainer.export.programs import export_executorch, export_litert

    nets = [mlp(seed) for seed in (0, 1)]
    sample = torch.zeros(2, 64)
    with torch.no_grad():
        labels = [net(torch.from_numpy(X)).numpy().argmax(1) for net in nets]
    return {
        "tflite": [export_litert(n, sample, name=f"mlp-{i}") for i, n in enumerate(nets)],
        "pte": [export_executorch(n, sample, name=f"mlp-{i}") for i, n in enumerate(nets)],
        "labels": labels,
    }


def stored(store: ArtifactStore, data: bytes, fmt: str, name: str = "mlp") -> wire.ArtifactRef:
    sha = store.put(data)
    return wire.ArtifactRef(name=name, sha256=sha, size=len(data), format=fmt)


def desired(serial: int, *refs: wire.ArtifactRef) -> wire.DesiredState:
    return wire.DesiredState(device_id="dev-1", serial=serial, artifacts=refs)


def load(installer: Installer, state: wire.DesiredState):
    backend, refs = installer.choose(state)
    return installer.load(state, refs, backend, None)


def installer(store, profile=None, **options) -> Installer:
    return Installer(
        store,
        profile or load_profile("rpi4"),
        PsutilSource(),
        lambda name: get_backend(name, threads=1),
        **options,
    )


@pytest.mark.parametrize("backend", ["litert", "executorch"])
def test_a_program_is_health_checked_and_scored_on_the_eval_set(tmp_path, programs, backend):
    store = ArtifactStore(tmp_path)
    ref = stored(store, programs[FORMAT[backend]][0], FORMAT[backend])
    state = desired(1, ref)
    right = installer(store, backend=backend, eval_set=(X, programs["labels"][0]))
    wrong = installer(store, backend=backend, eval_set=(X, (programs["labels"][0] + 1) % 10))

    installed, scored_wrong = load(right, state), load(wrong, state)

    assert right.choose(state) == (backend, [ref])
    assert installed.accuracy == 1.0 and scored_wrong.accuracy == 0.0
    assert installed.latency_ms > 0 and installed.head is None
    assert installed.runner.active == (ref.sha256,)


def test_the_first_backend_of_the_profile_order_with_a_program_is_chosen(tmp_path, programs):
    store = ArtifactStore(tmp_path)
    pte = stored(store, programs["pte"][0], "pte")
    tflite = stored(store, programs["tflite"][0], "tflite")
    litert_last = replace(load_profile("rpi4"), backends=("executorch", "litert"))

    assert installer(store).choose(desired(1, pte, tflite)) == ("litert", [tflite])
    assert installer(store).choose(desired(1, pte)) == ("executorch", [pte])
    assert installer(store, litert_last).choose(desired(1, tflite, pte)) == ("executorch", [pte])
    with pytest.raises(ProtocolError) as refused:
        installer(store, backend="executorch").choose(desired(1, tflite))
    assert refused.value.code == "no-usable-artifact" and "tflite" in str(refused.value)


def test_a_program_over_the_latency_budget_is_refused_and_nothing_is_committed(tmp_path, programs):
    store = ArtifactStore(tmp_path)
    board = load_profile("rpi4")
    impatient = replace(board, budget=replace(board.budget, latency_ms=1e-4))
    state = desired(1, stored(store, programs["tflite"][0], "tflite"))
    check = installer(store, impatient)

    with pytest.raises(BackendError, match=r"health check: .* budget 0.0001 ms"):
        load(check, state)
    assert check.saved() == []


def test_the_health_check_times_inferences_by_its_sources_clock(tmp_path, programs):
    """A simulator's agents time by their thread's CPU, not the wall, and so would any
    source: a clock that says each sample took a second fails a 1 s budget."""
    store = ArtifactStore(tmp_path)
    board = load_profile("rpi4")
    state = desired(1, stored(store, programs["tflite"][0], "tflite"))
    ticks = itertools.count()  # a second a reading: 1000 ms a sample
    slow = PsutilSource()
    slow.inference_clock = lambda: float(next(ticks))

    check = installer(store, replace(board, budget=replace(board.budget, latency_ms=999)))
    check.resources = slow
    with pytest.raises(BackendError, match=r"health check: 1000.0 ms per sample, budget 999"):
        load(check, state)
    assert load(installer(store, board), state).latency_ms < 999


def test_a_program_damaged_on_disk_is_moved_aside_and_one_that_is_not_a_program_refused(
    tmp_path, programs
):
    store = ArtifactStore(tmp_path)
    good = programs["tflite"][0]
    damaged = stored(store, good, "tflite")
    broken = stored(store, good[: len(good) // 2], "tflite", "half")  # its own hash: no damage
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    store.path(damaged.sha256).write_bytes(bytes(data))
    check = installer(store)

    with pytest.raises(DamagedArtifact) as found:
        load(check, desired(1, damaged))
    with pytest.raises(BackendError):
        load(check, desired(2, broken))

    assert found.value.sha256 == damaged.sha256 and not store.has(damaged.sha256)
    assert len(list((tmp_path / "damaged").iterdir())) == 1
    assert store.read(broken.sha256) == good[: len(good) // 2]  # refused, not damaged


def test_a_commit_keeps_the_state_before_and_prunes_every_other_object(tmp_path, programs):
    store = ArtifactStore(tmp_path)
    a, b = (stored(store, p, "tflite", n) for p, n in zip(programs["tflite"], "ab", strict=True))
    c = stored(store, programs["pte"][0], "pte", "c")
    data = programs["pte"][1]
    partial = wire.ArtifactRef(
        name="partial", sha256=sha256_bytes(data), size=len(data), format="pte", chunk_size=1024
    )
    store.download(partial).add(0, data[:1024])
    keep = installer(store)

    keep.commit(desired(1, a), [a])  # the first: nothing before it to keep
    names_after_first = store.names()
    b_sha = store.put(programs["tflite"][1])  # fetched again for serial 2
    keep.commit(desired(2, b), [b])
    c_sha = store.put(programs["pte"][0])
    keep.commit(desired(3, c), [c])

    assert names_after_first == {a.sha256} and b_sha == b.sha256 and c_sha == c.sha256
    assert store.names() == {b.sha256, c.sha256}
    assert [s.serial for s in installer(store).saved()] == [3, 2]  # read back from disk
    assert store.download(partial).received == {0}  # a partial download is resumed, not pruned


def test_a_restart_serves_the_newest_whole_state_and_fetches_a_damaged_one_again(
    tmp_path, programs
):
    store = ArtifactStore(tmp_path)
    a, b = (stored(store, p, "tflite", n) for p, n in zip(programs["tflite"], "ab", strict=True))
    first = installer(store)
    assert first.restore() == (None, None)  # nothing saved yet
    first.commit(desired(1, a), [a])
    store.put(programs["tflite"][1])  # pruned by that commit, fetched again for serial 2
    first.commit(desired(2, b), [b])

    whole, again = installer(store).restore()
    store.set_aside(b.sha256)
    fallback, fetch = installer(store).restore()
    store.set_aside(a.sha256)
    nothing, still = installer(store).restore()

    assert whole.desired.serial == 2 and whole.refs == [b] and again is None
    assert (fallback.desired.serial, fallback.refs, fetch.desired.serial) == (1, [a], 2)
    assert nothing is None and still.desired.serial == 2 and still.install


def test_nothing_held_is_pruned_after_a_restart_until_the_next_commit_keeps_it(tmp_path, programs):
    store = ArtifactStore(tmp_path)
    a, b = (stored(store, p, "tflite", n) for p, n in zip(programs["tflite"], "ab", strict=True))
    installer(store).commit(desired(1, a), [a])
    b_sha = store.put(programs["tflite"][1])  # fetched for serial 2, then a restart
    restarted = installer(store)
    restarted.restore()

    restarted.commit(desired(2, b), [b])

    assert b_sha == b.sha256 and store.names() == {a.sha256, b.sha256}


def test_a_saved_state_no_backend_here_can_run_is_not_restored(tmp_path, programs):
    store = ArtifactStore(tmp_path)
    ref = stored(store, programs["tflite"][0], "tflite")
    installer(store).commit(desired(1, ref), [ref])

    assert installer(store).restore()[0].refs == [ref]
    assert installer(store, backend="executorch").restore() == (None, None)

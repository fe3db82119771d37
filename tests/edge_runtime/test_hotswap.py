import threading

import numpy as np
import pytest

from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import get_backend
from edge_runtime.composer import part_names
from edge_runtime.errors import ArtifactError, BackendError
from edge_runtime.hotswap import Slot, SlotState, SubModelServer

A = ((0, 1), (2, 3))
B = ((2,), (0, 3))


def parts_for(modular, variant, selection):
    shas = {r.part: r.ref.sha256 for r in modular["records"] if r.variant == variant}
    return {name: shas[name] for name in part_names(selection)}


@pytest.mark.parametrize(
    ("backend", "variant"), [("executorch", "pte-fp32"), ("litert", "tflite-fp32")]
)
def test_100_swaps_under_continuous_inference_lose_nothing(modular, backend, variant):
    store = ArtifactStore(modular["store"])
    x = np.load(modular["model_dir"] / "test.npz")["x"][:4]
    server = SubModelServer(get_backend(backend, threads=1), store.read, smoke_input=x[:1])
    server.swap(parts_for(modular, variant, A), A)
    expected_a = server.predict(x)
    server.swap(parts_for(modular, variant, B), B)
    expected_b = server.predict(x)
    assert np.abs(expected_a - expected_b).max() > 1e-3  # the two sets really differ
    stop, failures, calls = threading.Event(), [], [0]

    def serve():
        while not stop.is_set():
            try:
                out = server.predict(x)
                if not (
                    np.allclose(out, expected_a, atol=1e-5)
                    or np.allclose(out, expected_b, atol=1e-5)
                ):
                    failures.append("mixed output")
                calls[0] += 1
            except Exception as exc:  # any failure at all counts
                failures.append(repr(exc))

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    slots = []
    for i in range(100):
        selection = A if i % 2 == 0 else B
        slots.append(server.swap(parts_for(modular, variant, selection), selection))
    stop.set()
    for t in threads:
        t.join()
    server.close()

    assert failures == []
    assert calls[0] > 100
    assert [s.state for s in slots[:-1]] == [SlotState.RETIRED] * 99
    assert slots[-1].state is SlotState.ACTIVE
    assert slots[-1].history == [SlotState.STAGED, SlotState.VERIFIED]


def test_a_failed_swap_keeps_the_previous_set_serving(modular):
    store = ArtifactStore(modular["store"])
    x = np.load(modular["model_dir"] / "test.npz")["x"][:4]
    server = SubModelServer(get_backend("litert"), store.read, smoke_input=x[:1])
    server.swap(parts_for(modular, "tflite-fp32", A), A)
    before = server.predict(x)
    broken = parts_for(modular, "tflite-fp32", B)

    def truncating(sha):
        data = store.read(sha)
        return data[: len(data) // 3] if sha == broken["layer0.block2"] else data

    server.read = truncating
    with pytest.raises(ArtifactError, match="layer0.block2"):
        server.swap(broken, B)
    wrong_shape = {**broken, "layer0.block2": broken["stem"]}
    server.read = store.read
    with pytest.raises(BackendError):
        server.swap(wrong_shape, B)

    assert server.active.selection == A
    np.testing.assert_array_equal(server.predict(x), before)
    server.close()


def test_illegal_slot_transitions_name_the_state():
    slot = Slot(A, {})

    with pytest.raises(RuntimeError, match="state staged cannot become active"):
        slot.move(SlotState.ACTIVE)
    slot.move(SlotState.FAILED)
    with pytest.raises(RuntimeError, match="state failed"):
        slot.move(SlotState.VERIFIED)

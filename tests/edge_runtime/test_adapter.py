import numpy as np
import pytest

from eclm_wire.errors import ProtocolError
from edge_runtime.adapter import Adapter, NumpyTrainer

pytest.importorskip("torch", reason="the cloud side (torch) is not installed: an edge-only venv")
from cloud_trainer.export.adapter import export_adapter_training


def make_trainer(kind, shifted, lr=0.01):
    if kind == "numpy":
        return NumpyTrainer(shifted["weight"], shifted["bias"], lr=lr)
    from edge_runtime.backends.executorch import ExecuTorchTrainer

    return ExecuTorchTrainer(
        export_adapter_training(shifted["fc"]), shifted["weight"], shifted["bias"], lr=lr, batch=32
    )


def stream_accuracy(adapter, shifted):
    """Prequential run over the first 400 samples; accuracy on the last 140 after it."""
    f, y = shifted["features"], shifted["labels"]
    before = (adapter.logits(f[400:]).argmax(1) == y[400:]).mean()
    for i in range(0, 400, 8):
        adapter.observe(f[i : i + 8], y[i : i + 8])
    return before, (adapter.logits(f[400:]).argmax(1) == y[400:]).mean()


def test_the_adapter_recovers_accuracy_on_a_shifted_stream_on_both_backends(shifted):
    # Both trainers take the same steps up to float32 rounding (see below), which a few of
    # the 140 held-out samples can feel after 200 steps; the mean over replay seeds cannot.
    results = {
        kind: np.mean(
            [
                stream_accuracy(Adapter(make_trainer(kind, shifted), seed=s), shifted)
                for s in range(4)
            ],
            axis=0,
        )
        for kind in ("numpy", "executorch")
    }

    for kind, (before, after) in results.items():
        assert before < 0.3, kind
        assert after > 0.75, kind
    assert abs(results["numpy"][1] - results["executorch"][1]) <= 0.02


def test_both_trainers_take_the_same_sgd_steps(shifted):
    numpy_t, et_t = make_trainer("numpy", shifted), make_trainer("executorch", shifted)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = rng.integers(0, 540, 32)
        x, y = shifted["features"][idx], shifted["labels"][idx]
        numpy_t.step(x, y)
        et_t.step(x, y)

    moved = np.abs(numpy_t.weights()["weight"] - shifted["weight"]).max()
    assert moved > 1e-2
    # float32 rounding apart (XNNPACK sums in another order; 20 steps compound it), far
    # below how far they moved
    for key in ("weight", "bias"):
        np.testing.assert_allclose(numpy_t.weights()[key], et_t.weights()[key], atol=5e-3 * moved)


def test_updates_round_trip_and_bad_updates_change_nothing(shifted):
    from safetensors.numpy import save

    source = Adapter(make_trainer("numpy", shifted))
    source.observe(shifted["features"][:64], shifted["labels"][:64])
    target = Adapter(make_trainer("numpy", shifted))
    update = source.export_update()
    target.load_update(update)
    sent = source.trainer.weights()["weight"]
    assert len(update) < sent.nbytes * 0.6  # float16 on the wire
    np.testing.assert_allclose(target.trainer.weights()["weight"], sent, rtol=1e-3, atol=1e-4)

    good = target.trainer.weights()
    nan = {**good, "bias": np.full_like(good["bias"], np.nan)}
    bad_updates = {
        b"garbage": "malformed",
        save({"weight": good["weight"]}): "invalid",
        save({**good, "bias": np.zeros(3, np.float32)}): "invalid",
        save({**good, "bias": good["bias"].astype(np.float64)}): "invalid",
        save(nan): "not-finite",
    }
    for update, code in bad_updates.items():
        with pytest.raises(ProtocolError) as info:
            target.load_update(update)
        assert info.value.code == code
    np.testing.assert_array_equal(target.trainer.weights()["bias"], good["bias"])


def test_the_replay_buffer_is_bounded(shifted):
    adapter = Adapter(make_trainer("numpy", shifted), buffer_size=50)

    for i in range(0, 540, 30):
        adapter.observe(shifted["features"][i : i + 30], shifted["labels"][i : i + 30])

    assert adapter._x.shape[0] == 50 and adapter.samples_trained == 540


def test_balanced_replay_learns_the_classes_a_device_rarely_sees():
    """A device that sees class 0 in 85% of its labels: replay drawn class-balanced
    learns what every class looks like (accuracy on a uniform test set), plain replay
    learns mostly how often class 0 comes. Synthetic overlapping classes, 5 seeds."""
    classes, features = 4, 16

    def data(n, p, seed):
        rng = np.random.default_rng(seed)
        y = rng.choice(classes, n, p=p)
        x = rng.normal(0, 0.3, (n, features)).astype(np.float32)
        x[np.arange(n), y] += 1.0
        return x, y

    def accuracy(balanced: bool, seed: int) -> float:
        zeros = np.zeros((classes, features), np.float32), np.zeros(classes, np.float32)
        adapter = Adapter(NumpyTrainer(*zeros, lr=0.5), balanced=balanced, seed=seed)
        x, y = data(240, [0.85, 0.05, 0.05, 0.05], seed)
        for i in range(0, 240, 8):
            adapter.observe(x[i : i + 8], y[i : i + 8])
        xt, yt = data(2000, [0.25] * 4, 100 + seed)
        return float((adapter.logits(xt).argmax(1) == yt).mean())

    plain = [accuracy(False, s) for s in range(5)]
    balanced = [accuracy(True, s) for s in range(5)]
    assert min(balanced) > max(plain), (plain, balanced)
    assert np.mean(balanced) > 0.9 > np.mean(plain) + 0.1


def raw_safetensors(tensors: dict[str, tuple[str, tuple[int, ...], int]]) -> bytes:
    """Safetensors bytes with any dtype name (numpy cannot write BF16)."""
    import json

    header, offset = {}, 0
    for name, (dtype, shape, itemsize) in tensors.items():
        size = int(np.prod(shape)) * itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + bytes(offset)


def test_a_head_that_does_not_fit_the_sub_model_is_refused_with_a_reason():
    from safetensors.numpy import save

    from edge_runtime.adapter import check_head

    good = {"weight": np.ones((10, 8), np.float32), "bias": np.zeros(10, np.float32)}
    assert check_head(save(good), 8)["weight"].shape == (10, 8)
    bad_heads = [
        raw_safetensors({"weight": ("BF16", (10, 8), 2), "bias": ("BF16", (10,), 2)}),
        save({"weight": np.ones(80, np.float32), "bias": np.zeros(10, np.float32)}),  # 1-D
        save({**good, "bias": np.zeros(9, np.float32)}),
        save({"weight": good["weight"]}),
        save(good),  # fits 8 features, not 16
        b"garbage",
    ]
    for i, data in enumerate(bad_heads):
        with pytest.raises(ProtocolError):
            check_head(data, 16 if i == 4 else 8)
    # a learner's head decides the shapes: another number of classes does not fit it
    with pytest.raises(ProtocolError):
        check_head(save({"weight": np.ones((9, 8), np.float32), "bias": np.zeros(9)}), 8, good)

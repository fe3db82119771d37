import os

import numpy as np
import pytest
import torch

from cloud_trainer.federation.distributed import run_integration
from cloud_trainer.model.checkpoint import head_weights
from cloud_trainer.model.data import load_digits_split
from cloud_trainer.model.domains import apply
from edge_runtime.adapter import Adapter, NumpyTrainer

SHIFTED = ("noise", "rotate", "contrast")
EPOCHS = 200


def features(net, domain, x, seed):
    with torch.no_grad():
        return net.features(torch.from_numpy(apply(domain, x, seed))).numpy()


def accuracy(weights, f, y):
    return float(((f @ weights["weight"].T + weights["bias"]).argmax(1) == y).mean())


def device_aggregates(net, split, devices=3, labels=100):
    """What the fleet would hand the cloud: per domain, the sample-weighted mean of a few
    devices' adapters, each trained on the device from the cloud's head (other noise)."""
    head = head_weights(net)
    aggregates = {}
    for domain in SHIFTED:
        f = features(net, domain, split.x_train, seed=7)
        adapters = []
        for device in range(devices):
            rows = slice(device * labels, (device + 1) * labels)
            adapter = Adapter(NumpyTrainer(head["weight"], head["bias"]), seed=device)
            for i in range(0, labels, 8):
                adapter.observe(f[rows][i : i + 8], split.y_train[rows][i : i + 8])
            adapters.append(adapter.trainer.weights())
        mean = {k: np.mean([a[k] for a in adapters], axis=0) for k in head}
        aggregates[domain] = (mean, devices * labels)
    return aggregates


@pytest.fixture(scope="module")
def integrated(modular):
    """The same job on one process and on two."""
    net = modular["net"]
    split = load_digits_split(seed=0)
    aggregates = device_aggregates(net, split)
    data = (split.x_train, split.y_train)
    runs = {n: run_integration(net, aggregates, data, epochs=EPOCHS, world_size=n) for n in (1, 2)}
    return {"net": net, "split": split, "aggregates": aggregates, "runs": runs}


def test_two_processes_each_train_half_and_give_the_weights_of_one(integrated):
    one, two = integrated["runs"][1], integrated["runs"][2]
    samples = len(integrated["split"].y_train) * (1 + len(SHIFTED))

    diff = max(float(np.abs(one.weights[k] - two.weights[k]).max()) for k in one.weights)
    print(f"max abs diff {diff:.2e}; {one.seconds:.1f}s on 1 process, {two.seconds:.1f}s on 2")
    assert diff < 1e-4
    assert [w.rank for w in two.workers] == [0, 1]
    pids = {w.pid for w in two.workers}
    assert len(pids) == 2 and os.getpid() not in pids
    assert sum(w.samples for w in two.workers) == samples == one.workers[0].samples
    assert all(abs(w.samples - samples / 2) <= len(SHIFTED) + 1 for w in two.workers)
    assert two.loss_after == pytest.approx(one.loss_after, rel=1e-4)
    assert one.loss_after < one.loss_before


def test_the_integrated_head_serves_the_shifted_domains_and_keeps_clean(integrated, modular):
    net, aggregates = integrated["net"], integrated["aggregates"]
    new, old = integrated["runs"][2].weights, head_weights(net)
    test = np.load(modular["model_dir"] / "test.npz")
    scores = {}
    for domain in ("clean", *SHIFTED):
        f = features(net, domain, test["x"], seed=1)  # held-out images, unseen noise
        agg = accuracy(aggregates[domain][0], f, test["y"]) if domain in aggregates else None
        scores[domain] = (accuracy(old, f, test["y"]), agg, accuracy(new, f, test["y"]))
        print(domain, np.round([s if s is not None else np.nan for s in scores[domain]], 3))

    shifted_old = np.mean([scores[d][0] for d in SHIFTED])
    shifted_new = np.mean([scores[d][2] for d in SHIFTED])
    assert shifted_new > shifted_old + 0.3
    assert (
        scores["rotate"][2] > scores["rotate"][1] and scores["contrast"][2] > scores["contrast"][1]
    )
    assert scores["clean"][2] >= scores["clean"][0] - 0.02


def test_a_strong_pull_lands_on_the_sample_weighted_aggregate(modular):
    net = modular["net"]
    head = head_weights(net)
    split = load_digits_split(seed=0)
    first = {k: v + 0.5 for k, v in head.items()}
    second = {k: v - 0.5 for k, v in head.items()}
    aggregates = {"rotate": (first, 300), "contrast": (second, 100)}

    weights = run_integration(
        net, aggregates, (split.x_train[:200], split.y_train[:200]), epochs=300, pull=100.0
    ).weights

    for key, value in head.items():  # Adam hovers within a few lr of the optimum
        offset = weights[key] - value
        assert np.mean(offset) == pytest.approx(0.25, abs=2e-3)
        assert np.abs(offset - 0.25).max() < 0.05


@pytest.mark.parametrize(
    ("aggregates", "kwargs", "names"),
    [
        ({"rotate": ({"weight": np.zeros((10, 3)), "bias": np.zeros(10)}, 5)}, {}, "rotate"),
        ({"noise": ({"weight": np.zeros((10, 512))}, 5)}, {}, "noise"),
        ({}, {"world_size": 0}, "world_size"),
        ({}, {"epochs": 0}, "epochs"),
    ],
)
def test_arguments_that_do_not_fit_are_refused_by_name(modular, aggregates, kwargs, names):
    split = load_digits_split(seed=0)
    with pytest.raises(ValueError, match=names):
        run_integration(modular["net"], aggregates, (split.x_train, split.y_train), **kwargs)


def test_the_cli_integrates_an_aggregates_file_and_writes_the_head(modular, tmp_path, capsys):
    from safetensors.numpy import load_file

    from cloud_trainer.federation.distributed import load_aggregates, save_aggregates
    from eclm.cli import main

    head = head_weights(modular["net"])
    aggregates = {"rotate": ({k: v + 0.1 for k, v in head.items()}, 40)}
    save_aggregates(tmp_path / "aggregates.npz", aggregates)
    loaded = load_aggregates(tmp_path / "aggregates.npz")
    model = ["--model", str(modular["model_dir"]), "--out", str(tmp_path / "head.safetensors")]

    code = main(
        ["cloud", "integrate", *model, "--aggregates", str(tmp_path / "aggregates.npz")]
        + ["--domains", "noise", "--epochs", "20"]
    )

    assert loaded["rotate"][1] == 40
    np.testing.assert_array_equal(loaded["rotate"][0]["bias"], aggregates["rotate"][0]["bias"])
    assert code == 0
    written = load_file(str(tmp_path / "head.safetensors"))
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in head.items()}
    out = capsys.readouterr().out
    assert all(f"{d:<10} held-out accuracy" in out for d in ("clean", "noise", "rotate"))

import itertools

import numpy as np
import pytest
import torch

from cloud_trainer.export.plan import select_for
from cloud_trainer.model.checkpoint import load_importance
from cloud_trainer.model.modular import ModularNet, ModularSpec, SubModel
from cloud_trainer.model.train import accuracy, module_importance, sample_selection
from device_profiles import load_profile


def test_the_full_model_and_half_sub_models_are_accurate(modular):
    trained = modular["trained"]

    assert trained.accuracy >= 0.97
    assert trained.half_accuracy >= 0.93
    net = modular["net"]
    test = np.load(modular["model_dir"] / "test.npz")
    for selection in (((0, 1), (2, 3)), ((1, 3), (0, 2))):
        assert accuracy(net, test["x"], test["y"], selection) >= 0.93


def test_importance_selection_beats_random_selection_for_three_class_devices(modular, tmp_path):
    from budgets import ONE_MODULE_PER_LAYER_MB, board_file

    net, model_dir = modular["net"], modular["model_dir"]
    test = np.load(model_dir / "test.npz")
    smallest = load_profile(board_file(tmp_path, "one-each", memory_mb=ONE_MODULE_PER_LAYER_MB))
    pairs = [((a,), (b,)) for a in range(4) for b in range(4)]
    with torch.no_grad():
        right = {
            pair: net(torch.from_numpy(test["x"]), pair).argmax(1).numpy() == test["y"]
            for pair in pairs
        }
    importance = load_importance(model_dir)
    chosen, least, random_mean = [], [], []
    # One module more or less is worth a percent at most (any single pair scores ~0.97),
    # so judge over every three-class device rather than a few.
    for classes in itertools.combinations(range(10), 3):
        histogram = np.isin(np.arange(10), classes).astype(float)
        rows = np.isin(test["y"], classes)
        selection = select_for(model_dir, smallest, histogram)
        assert [len(layer) for layer in selection.modules] == [1, 1]
        scores = importance @ histogram
        worst = tuple((int(layer.argmin()),) for layer in scores)
        chosen.append(right[selection.modules][rows].mean())
        least.append(right[worst][rows].mean())
        random_mean.append(np.mean([right[pair][rows].mean() for pair in pairs]))

    chosen, least = np.array(chosen), np.array(least)
    assert chosen.mean() > np.mean(random_mean)
    assert chosen.mean() > least.mean()
    assert (chosen > least).sum() > (chosen < least).sum()


def test_importance_has_one_weight_distribution_per_layer_and_class(modular):
    importance = load_importance(modular["model_dir"])

    assert importance.shape == (2, 4, 10)
    np.testing.assert_allclose(importance.sum(axis=1), 1.0, atol=1e-5)
    assert load_importance(modular["model_dir"], "rotate").shape == (2, 4, 10)
    with pytest.raises(ValueError, match="known"):
        load_importance(modular["model_dir"], "underwater")


def test_module_dropout_never_leaves_a_layer_empty():
    net = ModularNet(ModularSpec(layers=3, modules_per_layer=3))
    rng = np.random.default_rng(0)

    selections = [sample_selection(net, rng, keep=0.1, full=0.0) for _ in range(200)]

    assert all(all(layer for layer in s) for s in selections)
    assert len({s for s in selections}) > 10


def test_sub_model_equals_the_net_on_its_selection():
    net = ModularNet().eval()
    x = torch.rand(5, 1, 8, 8)

    with torch.no_grad():
        torch.testing.assert_close(SubModel(net, ((1,), (0, 3)))(x), net(x, ((1,), (0, 3))))
    importance = module_importance(net, x.numpy(), np.arange(5))
    assert importance.shape == (2, 4, 10)


def test_a_new_head_is_swapped_in_whole_and_leaves_the_old_layer_as_it_was():
    net = ModularNet().eval()
    x = torch.rand(3, 1, 8, 8)
    old = net.head.fc
    before = old.weight.detach().clone()
    weights = {
        "weight": np.ones(tuple(old.weight.shape), np.float32),
        "bias": np.zeros(10, np.float32),
    }

    net.head.set_weights(weights)

    assert net.head.fc is not old and not net.head.fc.training
    torch.testing.assert_close(old.weight.detach(), before)  # a call under way keeps this one
    with torch.no_grad():
        logits = net(x)
    torch.testing.assert_close(logits[:, 0], logits[:, 9])  # equal rows: the new weights


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="channels"):
        ModularSpec(channels=0)
    with pytest.raises(ValueError, match="image_size"):
        ModularSpec(image_size=7)

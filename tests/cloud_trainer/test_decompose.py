"""Decomposing ResNet-18 and MobileNetV2 (reduced width, 32x32) into modular layers.

The checkpoints are written in torchvision's layout from key and shape lists built here by
hand from torchvision's published architectures (torchvision cannot be imported on this
machine), with random weights and randomised batch-norm statistics so folding is tested.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cloud_trainer.errors import ConfigError
from cloud_trainer.export.modular import export_modular
from cloud_trainer.model.checkpoint import load_model
from cloud_trainer.model.data import Split, fit_to, load_digits_split
from cloud_trainer.model.decompose import (
    PooledHead,
    decompose,
    max_logit_difference,
    original_for,
    spec_for,
)
from cloud_trainer.model.finetune import decompose_model, rgb
from cloud_trainer.model.modular import Components, ModularNet, SubModel
from cloud_trainer.model.networks import load_weights
from eclm.cli import main
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import get_backend
from edge_runtime.composer import ComposedModel

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn(prefix, c):
    return [(f"{prefix}.{k}", () if k == "num_batches_tracked" else (c,)) for k in BN]


def resnet_keys(blocks, widths, classes):
    """torchvision.models.resnet.ResNet with BasicBlock: its state-dict keys and shapes."""
    keys = [("conv1.weight", (widths[0], 3, 7, 7)), *bn("bn1", widths[0])]
    c_in = widths[0]
    for i, (n, c) in enumerate(zip(blocks, widths, strict=True)):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            keys += [(f"{p}.conv1.weight", (c, c_in, 3, 3)), *bn(f"{p}.bn1", c)]
            keys += [(f"{p}.conv2.weight", (c, c, 3, 3)), *bn(f"{p}.bn2", c)]
            if j == 0 and i > 0:
                keys += [(f"{p}.downsample.0.weight", (c, c_in, 1, 1)), *bn(f"{p}.downsample.1", c)]
            c_in = c
    return keys + [("fc.weight", (classes, c_in)), ("fc.bias", (classes,))]


def mobilenet_keys(first, outs, last, classes):
    """torchvision.models.mobilenetv2.MobileNetV2: ``outs`` are features.1..17's outputs."""
    keys = [("features.0.0.weight", (first, 3, 3, 3)), *bn("features.0.1", first)]
    keys += [("features.1.conv.0.0.weight", (first, 1, 3, 3)), *bn("features.1.conv.0.1", first)]
    keys += [
        ("features.1.conv.1.weight", (outs[0], first, 1, 1)),
        *bn("features.1.conv.2", outs[0]),
    ]
    for k, (c_in, c) in enumerate(zip(outs[:-1], outs[1:], strict=True), start=2):
        p, h = f"features.{k}.conv", 6 * c_in
        keys += [(f"{p}.0.0.weight", (h, c_in, 1, 1)), *bn(f"{p}.0.1", h)]
        keys += [(f"{p}.1.0.weight", (h, 1, 3, 3)), *bn(f"{p}.1.1", h)]
        keys += [(f"{p}.2.weight", (c, h, 1, 1)), *bn(f"{p}.3", c)]
    keys += [("features.18.0.weight", (last, outs[-1], 1, 1)), *bn("features.18.1", last)]
    return keys + [("classifier.1.weight", (classes, last)), ("classifier.1.bias", (classes,))]


MOBILE_REPEATS = (1, 2, 3, 4, 3, 3, 1)


def mobile_outs(channels):
    return [c for c, n in zip(channels, MOBILE_REPEATS, strict=True) for _ in range(n)]


KEYS = {  # at width 1.0: torchvision's own numbers
    "resnet18": lambda classes: resnet_keys((2, 2, 2, 2), (64, 128, 256, 512), classes),
    "resnet34": lambda classes: resnet_keys((3, 4, 6, 3), (64, 128, 256, 512), classes),
    "mobilenet_v2": lambda classes: mobilenet_keys(
        32, mobile_outs((16, 24, 32, 64, 96, 160, 320)), 1280, classes
    ),
}
QUARTER = {  # width 0.25 (MobileNetV2 rounds to multiples of 8 and keeps 1280 at the end)
    "resnet18": lambda: resnet_keys((2, 2, 2, 2), (16, 32, 64, 128), 10),
    "mobilenet_v2": lambda: mobilenet_keys(8, mobile_outs((8, 8, 8, 16, 24, 40, 80)), 1280, 10),
}


def random_state(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif (
            key.endswith(("running_var", "bn1.weight", "bn2.weight"))
            or ".weight" in key
            and len(shape) == 1
        ):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("bias", "running_mean")):
            state[key] = torch.randn(shape, generator=g) * 0.2
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_split():
    split = fit_to(load_digits_split(seed=0), 32)
    return rgb(
        Split(split.x_train[:300], split.y_train[:300], split.x_test[:100], split.y_test[:100])
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for arch, keys in QUARTER.items():
        paths[arch] = root / f"{arch}.pth"
        torch.save(random_state(keys()), paths[arch])
    return paths


def quarter(arch, modules=4):
    return spec_for(arch, modules=modules, num_classes=10, width=0.25)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "mobilenet_v2"])
def test_a_torchvision_layout_state_dict_loads_strictly_at_full_width(arch):
    keys = KEYS[arch](1000)
    net = original_for(spec_for(arch, modules=4, num_classes=1000))

    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == keys
    net.load_state_dict({k: torch.zeros(s) for k, s in keys}, strict=True)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("modules", [4, 3])
def test_the_decomposed_model_reproduces_the_original(arch, modules, checkpoints, small_split):
    original = load_weights(original_for(quarter(arch, modules)), checkpoints[arch]).eval()
    net = decompose(original, quarter(arch, modules))
    x = small_split.x_test[:16]

    assert max_logit_difference(original, net, x) < 1e-4
    with torch.no_grad():
        logits = original(torch.from_numpy(x))
    assert logits.std() > 0.05  # not a degenerate network where anything matches
    for selection in ([(0, 2)] * net.spec.layers, [(1,)] * net.spec.layers):
        with torch.no_grad():
            out = net(torch.from_numpy(x), selection)
        assert out.shape == (16, 10) and torch.isfinite(out).all()
        assert (out - logits).abs().max() > 1e-3  # a sub-model is not the full model


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_a_short_fine_tune_writes_a_model_dir_that_loads_back(
    arch, checkpoints, small_split, tmp_path
):
    out = tmp_path / arch
    result = decompose_model(
        out, arch=arch, modules=4, weights=checkpoints[arch], data=small_split, epochs=1, width=0.25
    )
    net = load_model(out)
    metrics = json.loads((out / "metrics.json").read_text())
    x = torch.from_numpy(small_split.x_test[:8])

    assert result.exactness < 1e-4 and metrics["exactness"] == result.exactness
    for key in ("original_accuracy", "accuracy", "half_accuracy", "smallest_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    saved = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    assert net.spec.arch == arch and net.spec.width_mult == 0.25
    with np.load(out / "importance.npz") as importance:
        assert importance["class"].shape == (net.spec.layers, 4, 10)
    assert np.load(out / "test.npz")["x"].shape == (100, 3, 32, 32)
    assert torch.isfinite(net(x)).all()


def test_broken_checkpoints_are_refused_naming_the_file(checkpoints, tmp_path, capsys):
    state = torch.load(checkpoints["resnet18"], weights_only=True)
    cases = {
        "missing.pth": {k: v for k, v in state.items() if k != "layer2.0.bn1.running_var"},
        "extra.pth": {**state, "head.weight": torch.zeros(3)},
        "shape.pth": {**state, "fc.weight": torch.zeros(1000, 128)},
        "list.pth": [1, 2, 3],
    }
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    net = original_for(quarter("resnet18"))

    for name, words in [
        ("missing.pth", "missing keys layer2.0.bn1.running_var"),
        ("extra.pth", "unexpected keys head.weight"),
        ("shape.pth", "fc.weight (1000, 128) (expected (10, 128)) (the classifier must have"),
        ("list.pth", "not a state dict"),
        ("garbage.pth", "not a readable torch checkpoint"),
    ]:
        with pytest.raises(ConfigError, match=str(tmp_path / name)) as err:
            load_weights(net, tmp_path / name)
        assert words in str(err.value)
    args = ["cloud", "decompose", "--arch", "resnet18", "--width", "0.25", "--modules", "4"]
    assert main([*args, "--weights", str(tmp_path / "shape.pth"), "--out", str(tmp_path / "m")])
    assert "shape.pth" in capsys.readouterr().err


def cut(net: ModularNet, layers: list[int]) -> ModularNet:
    """The decomposed stem, consecutive decomposed layers (the first taking the stem's output
    shape) and a global-pool head, with routing that is not uniform so the weights count."""
    inputs: list[torch.Tensor] = []
    with torch.no_grad():
        last = net.trunk(torch.zeros(1, 3, 32, 32), layer_inputs=inputs)
        for router in net.routers:
            torch.nn.init.normal_(router.fc.weight, std=0.5)
    after = inputs[layers[-1] + 1] if layers[-1] + 1 < len(inputs) else last
    assert inputs[layers[0]].shape == inputs[0].shape
    parts = Components(
        net.stem,
        [net.routers[layer] for layer in layers],
        [list(net.blocks[layer]) for layer in layers],
        PooledHead(after.shape[1], after.shape[2], 10),
        {
            i: net.shortcuts[str(layer)]
            for i, layer in enumerate(layers)
            if str(layer) in net.shortcuts
        },
        tuple(net.posts[layer] for layer in layers),
    )
    spec = replace(net.spec, layers=len(layers), widths=(), strides=(), hidden=())
    return ModularNet(spec, parts).eval()


@pytest.mark.parametrize(
    ("arch", "layers", "variants"),
    [
        ("resnet18", [2], [("pte", "fp32"), ("tflite", "fp32")]),  # strided, with a shortcut
        ("mobilenet_v2", [0, 1], [("pte", "fp32")]),  # strided, then an identity residual
    ],
)
def test_exported_decomposed_layers_compose_on_the_edge_like_torch(
    arch, layers, variants, checkpoints, small_split, tmp_path
):
    original = load_weights(original_for(quarter(arch)), checkpoints[arch])
    net = cut(decompose(original, quarter(arch)), layers)
    x = small_split.x_test[:4]
    store = ArtifactStore(tmp_path / "store")

    records = export_modular(net, small_split.x_test[:16], store, variants=variants)

    for fmt, quant in variants:
        backend = get_backend({"pte": "executorch", "tflite": "litert"}[fmt], threads=1)
        programs = {
            r.part: backend.load(store.path(r.ref.sha256))
            for r in records
            if r.variant == f"{fmt}-{quant}"
        }
        for selection in (net.full_selection(), ((0, 2), (1,), (3,))[: len(layers)]):
            composed = ComposedModel(programs, selection, net.layout())
            with torch.no_grad():
                expected = SubModel(net, selection)(torch.from_numpy(x)).numpy()
            assert np.abs(composed.run(x) - expected).max() <= 1e-4


def test_distillation_is_zero_only_where_the_student_matches_the_teacher():
    from cloud_trainer.model.train import distillation

    teacher = torch.nn.Linear(5, 3)
    x = torch.randn(8, 5)
    with torch.no_grad():
        same = teacher(x)

    assert float(distillation(same, teacher, x, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation(same.flip(1), teacher, x, 4.0)) > 1e-3


def test_sandwich_steps_train_the_one_module_sub_models_beyond_full_training(
    checkpoints, small_split
):
    from cloud_trainer.model.sandwich import SandwichConfig, sandwich_step
    from cloud_trainer.model.train import distillation

    original = load_weights(original_for(quarter("resnet18")), checkpoints["resnet18"]).eval()
    x, y = torch.from_numpy(small_split.x_train[:64]), torch.from_numpy(small_split.y_train[:64])
    solos = [[(m,)] * quarter("resnet18").layers for m in range(4)]

    def solo_loss(net):
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(net(x, s), y)) for s in solos) / 4

    def fine_tune(sandwich):
        net = decompose(original, quarter("resnet18"))
        rng = np.random.default_rng(0)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        net.train()
        for _ in range(8):
            opt.zero_grad()
            if sandwich:
                losses = sandwich_step(net, original, x, y, rng, SandwichConfig(randoms=1))
                assert set(losses) == {"full", "smallest", "random1"}
            else:  # the full set only, with the same loss
                out = net(x)
                loss = 0.5 * torch.nn.functional.cross_entropy(out, y)
                (loss + 0.5 * distillation(out, original, x, 4.0)).backward()
            opt.step()
        return net

    before = solo_loss(decompose(original, quarter("resnet18")))
    full_only, sandwiched = solo_loss(fine_tune(False)), solo_loss(fine_tune(True))

    assert sandwiched < 0.5 * before
    assert sandwiched < 0.7 * full_only

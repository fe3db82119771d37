import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from cloud_trainer.errors import ExportError
from cloud_trainer.export.modular import ModularExporter, export_modular
from cloud_trainer.model.modular import SubModel
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import get_backend
from edge_runtime.composer import ComposedModel
from edge_runtime.errors import BackendError

BACKEND = {"pte": "executorch", "tflite": "litert"}
SELECTION = ((0, 2), (1, 3))


def composed(modular, variant):
    fmt = variant.split("-")[0]
    backend = get_backend(BACKEND[fmt], threads=1)
    store = ArtifactStore(modular["store"])
    programs = {
        r.part: backend.load(store.path(r.ref.sha256))
        for r in modular["records"]
        if r.variant == variant
    }
    return ComposedModel(programs, SELECTION)


def torch_logits(modular, x):
    with torch.no_grad():
        return SubModel(modular["net"], SELECTION)(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("variant", ["pte-fp32", "tflite-fp32"])
def test_composed_fp32_programs_match_the_torch_sub_model(modular, variant):
    x = np.load(modular["model_dir"] / "test.npz")["x"]

    out = composed(modular, variant).run(x)

    assert np.abs(out - torch_logits(modular, x)).max() <= 1e-4


@pytest.mark.parametrize("variant", ["pte-int8", "tflite-int8"])
def test_composed_int8_programs_agree_with_the_torch_sub_model(modular, variant):
    x = np.load(modular["model_dir"] / "test.npz")["x"]

    out = composed(modular, variant).run(x)

    agreement = (out.argmax(1) == torch_logits(modular, x).argmax(1)).mean()
    assert agreement >= 0.98


def test_int8_programs_are_smaller(modular):
    sizes = {(r.part, r.variant): r.ref.size for r in modular["records"]}

    for fmt in ("pte", "tflite"):
        assert sizes[("layer0.block0", f"{fmt}-int8")] < sizes[("layer0.block0", f"{fmt}-fp32")] / 2


def test_every_part_is_indexed_and_re_export_is_a_cache_hit(modular):
    index = json.loads((modular["store"] / "modular.json").read_text())
    again = export_modular(
        modular["net"],
        np.load(modular["model_dir"] / "test.npz")["x"],
        ArtifactStore(modular["store"]),
    )

    assert set(index["parts"]) == {"stem", "head"} | {  # no adapter training program
        f"layer{layer}.{kind}"
        for layer in range(2)
        for kind in ("router", "block0", "block1", "block2", "block3")
    }
    assert set(index["parts"]["layer1.block3"]) == {
        "pte-fp32",
        "pte-int8",
        "tflite-fp32",
        "tflite-int8",
    }
    assert all(r.cached for r in again)
    assert [r.ref for r in again] == [r.ref for r in modular["records"]]


def test_changed_weights_are_exported_again(modular, tmp_path):
    exporter = ModularExporter(ArtifactStore(tmp_path))
    block = modular["net"].blocks[0][0]
    x = torch.rand(4, 32, 8, 8)

    first = exporter.export("b", block, x[:2], "tflite", "fp32", calib=x)
    copy = type(block)(32, 32, 32)
    copy.load_state_dict(block.state_dict())
    with torch.no_grad():
        copy.conv1.bias += 0.1
    second = exporter.export("b", copy, x[:2], "tflite", "fp32", calib=x)

    assert not first.cached and not second.cached
    assert first.ref.sha256 != second.ref.sha256


class Unexportable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return x * 2
        return x


@pytest.mark.parametrize("fmt", ["pte", "tflite"])
def test_a_failed_export_names_module_and_backend_and_writes_nothing(tmp_path, fmt):
    store = ArtifactStore(tmp_path)
    x = torch.rand(4, 3)

    with pytest.raises(ExportError) as info:
        ModularExporter(store).export("layer9.block9", Unexportable(), x[:2], fmt, "fp32", calib=x)

    assert info.value.module == "layer9.block9"
    assert info.value.backend == {"pte": "executorch", "tflite": "litert"}[fmt]
    assert os.listdir(tmp_path / "objects") == [] and os.listdir(tmp_path / "cache") == []


def test_the_adapter_training_program_learns(modular):
    from executorch.extension.training import (
        _load_for_executorch_for_training_from_buffer,
        get_sgd_optimizer,
    )

    from cloud_trainer.export.adapter import export_adapter_training

    data = export_adapter_training(modular["net"].head.fc)  # bench/adapter.py measures it
    module = _load_for_executorch_for_training_from_buffer(data)
    test = np.load(modular["model_dir"] / "test.npz")
    with torch.no_grad():
        features = modular["net"].features(torch.from_numpy(test["x"][:32]))
    # Rotated labels: the adapter must learn a new mapping from the same features.
    labels = torch.from_numpy((test["y"][:32] + 1) % 10)

    first, _ = module.forward_backward("forward", (features, labels))
    optimizer = get_sgd_optimizer(module.named_parameters(), 0.5, 0, 0, 0, False)
    for _ in range(60):
        loss, _ = module.forward_backward("forward", (features, labels))
        optimizer.step(module.named_gradients())

    assert float(loss) < float(first) / 2


def test_the_composer_refuses_missing_programs(modular):
    with pytest.raises(BackendError, match="layer1.block3"):
        ComposedModel({"stem": None}, ((0,), (3,)))


@pytest.mark.parametrize("part", ["layer0.block1", "head"])
def test_litert_programs_run_any_batch_resized_or_in_pieces(modular, part):
    record = next(r for r in modular["records"] if r.part == part and r.variant == "tflite-fp32")
    program = get_backend("litert").load(ArtifactStore(modular["store"]).path(record.ref.sha256))
    h = np.random.default_rng(0).random((37, 32, 8, 8), dtype=np.float32)

    whole = program.run(h)[0]
    single = np.concatenate([program.run(h[i : i + 1])[0] for i in range(37)])

    np.testing.assert_allclose(whole, single, atol=1e-5)
    assert program._resizable is (part != "head")  # a flatten bakes the batch in

"""The scenario's streams and baselines on a 3-channel 32x32 model: nothing in them assumes
the digits' 1x8x8 samples (random weights are enough for the shapes)."""

import numpy as np
import pytest
import torch

from cloud_trainer.model.modular import ModularNet, preset
from device_profiles import load_profile
from eclm_lab.baselines import FedAvg, OnDeviceOnly, StaticCloud, StaticSubModel
from eclm_lab.experiment import Rehearsal, model_memory
from eclm_lab.lockstep import drive
from eclm_lab.scenario import ScenarioSpec, build
from edge_runtime.learning import LearnerConfig

SPEC = preset("cifar", channels=8, widths=(8, 16, 16), hidden=(8, 8, 8))


@pytest.fixture(scope="module")
def rgb():
    torch.manual_seed(0)
    net = ModularNet(SPEC).eval()
    rng = np.random.default_rng(0)
    x = rng.random((60, 3, 32, 32), dtype=np.float32)
    y = np.arange(60) % SPEC.num_classes
    return net, x, y


def test_streams_of_rgb_samples_keep_their_shape_through_every_domain(rgb):
    net, x, y = rgb
    memory = model_memory(net, load_profile("rpi5"))
    assert 0 < memory.smallest_kb < memory.full_kb
    spec = ScenarioSpec(devices=2, steps=30, clean_len=4, shift_len=4, seed=1)
    seen = set()
    for stream in build(spec, x, y, memory):
        for step in stream:
            assert step.x.shape == (spec.batch, 3, 32, 32) and step.x.dtype == np.float32
            seen.add(step.domain)
    assert seen == {"clean", *spec.domains}


def test_every_baseline_runs_on_an_rgb_model(rgb):
    net, x, y = rgb
    memory = model_memory(net, load_profile("rpi5"))
    selections = {"dev-00": ((0, 1, 2, 3),) * 3, "dev-01": ((0,), (1, 2), (3,))}
    spec = ScenarioSpec(devices=2, steps=6, clean_len=2, shift_len=2, label_rate=0.5, seed=2)
    streams = dict(zip(selections, build(spec, x, y, memory), strict=True))
    methods = {
        "static cloud": StaticCloud(net),
        "static sub-model": StaticSubModel(net, selections),
        "on-device only": OnDeviceOnly(list(selections), shape=x.shape[1:], classes=10),
        "FedAvg": FedAvg(net, selections, steps=1),
        "rehearsal": Rehearsal(net, selections, LearnerConfig(steps_per_batch=2)),
    }
    fedavg = methods["FedAvg"].models["dev-01"]
    before = {n: p.detach().clone() for n, p in fedavg.named_parameters()}

    records = drive(methods, streams, upload_every=3)

    for name, record in records.items():
        assert record.accuracy.shape == (2, spec.steps), name
        assert ((record.accuracy >= 0) & (record.accuracy <= 1)).all(), name
    # FedAvg sends what the device's sub-model runs: all of dev-00's modules, not dev-01's
    used = methods["FedAvg"].names
    blocks = {
        d: {n.split(".")[2] + "." + n.split(".")[3] for n in used[d] if ".blocks." in n}
        for d in used
    }
    assert blocks["dev-01"] == {"0.0", "1.1", "1.2", "2.3"} and len(blocks["dev-00"]) == 12
    after = dict(fedavg.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in used["dev-01"])  # it trained
    # the on-device model reads every pixel of the 3x32x32 sample
    first = methods["on-device only"].models["dev-00"][1]
    assert first.in_features == 3 * 32 * 32

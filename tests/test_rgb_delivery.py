"""A 3-channel 32x32 model with strided stages, trained, exported per module and delivered
through Mosquitto to an agent that serves it with each backend, and adapts on its features."""

import numpy as np
import pytest
import torch

from cloud_trainer.export.plan import plan_device_modular
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.deploy import wait_for_fleet
from cloud_trainer.model.checkpoint import load_model, train_model
from cloud_trainer.model.modular import ModularSpec
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import FORMAT_OF

# The cifar preset's shape (RGB, three stride-2 stages with shortcut programs), narrow
# enough to train and export in seconds.
SMALL_RGB = ModularSpec(
    in_channels=3,
    image_size=32,
    channels=8,
    layers=3,
    modules_per_layer=2,
    widths=(16, 16, 32),
    strides=(2, 2, 2),
    hidden=(16, 16, 16),
)


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb")
    trained = train_model(root / "model", epochs=4, seed=0, spec=SMALL_RGB)
    return {"dir": trained.model_dir, "store": root / "store", "accuracy": trained.accuracy}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["litert", "executorch"])
def test_an_rgb_model_with_strided_stages_is_served_by_an_agent(
    backend, rgb_model, mosquitto, address, tmp_path
):
    net = load_model(rgb_model["dir"])
    assert net.layout().shortcuts == (0, 1, 2)  # every stage changes width and size
    test = np.load(rgb_model["dir"] / "test.npz")
    assert test["x"].shape[1:] == (3, 32, 32)
    profile = load_profile("rpi5")
    options, refs = plan_device_modular(rgb_model["dir"], rgb_model["store"], profile)
    refs = [r for r in refs if r.format in (FORMAT_OF[backend], "safetensors")]
    assert {"layer0.shortcut", "layer2.shortcut"} <= {r.part for r in refs}

    coordinator = FleetCoordinator(
        address, ArtifactStore(rgb_model["store"]), client_id=f"cloud-rgb-{backend}"
    ).start()
    agent = EdgeAgent(
        AgentConfig(
            device_id=f"rgb-{backend}",
            profile=profile,
            broker=address,
            store_dir=tmp_path / "device",
            eval_data=rgb_model["dir"] / "test.npz",
            backend=backend,
            insecure=True,
        )
    ).start()
    try:
        device = agent.config.device_id
        serial = coordinator.assign(device, refs, options=options).serial
        assert wait_for_fleet(coordinator, {device: serial}, timeout=120)
        report = coordinator.reported[device]
        selection = options[0].selection
        x = test["x"][:8]
        with torch.no_grad():
            expected = net(torch.from_numpy(x), selection).numpy()
        np.testing.assert_allclose(agent.predict(x), expected, atol=1e-3, rtol=1e-3)
        with torch.no_grad():
            want = net(torch.from_numpy(test["x"]), selection).argmax(1).numpy()
        assert report.accuracy == pytest.approx(float((want == test["y"]).mean()), abs=0.02)
        assert report.accuracy > 0.5  # four epochs of a narrow net: far above chance (0.1)
        features = agent.runner.features(x)
        with torch.no_grad():
            torch_features = net.features(torch.from_numpy(x), selection).numpy()
        np.testing.assert_allclose(features, torch_features, atol=1e-3, rtol=1e-3)
    finally:
        agent.stop()
        coordinator.stop()

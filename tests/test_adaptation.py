"""The adaptation loop over Mosquitto: real agents serving LiteRT sub-models adapt their
heads per domain, upload, and a device entering a domain others adapted to gets the
cloud's signed aggregate; and a small run of the whole scenario with the baselines."""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

import eclm_wire as wire
from cloud_trainer.export.plan import plan_device_modular
from cloud_trainer.federation.aggregation import DomainAggregator
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.deploy import wait_for_fleet
from cloud_trainer.fleet.keys import init_keys, load_signing_key, sign
from cloud_trainer.model.domains import apply
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore


@pytest.fixture
def keys(tmp_path):
    private, public = init_keys(tmp_path / "keys")
    return load_signing_key(private), public


def wait(predicate, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_device_entering_a_domain_others_adapted_to_gets_their_aggregate_signed(
    modular, mosquitto, address, tmp_path, keys, collector_factory
):
    key, public = keys
    net = modular["net"]
    head = {
        "weight": net.head.fc.weight.detach().numpy(),
        "bias": net.head.fc.bias.detach().numpy(),
    }
    aggregator = DomainAggregator(head)
    profile = load_profile("rpi4")
    options, refs = plan_device_modular(modular["model_dir"], modular["store"], profile)
    test = np.load(modular["model_dir"] / "test.npz")
    x, y = apply("rotate", test["x"]), test["y"]
    train, held = slice(0, 240), slice(240, None)
    fc = FleetCoordinator(
        address,
        ArtifactStore(modular["store"]),
        signing_key=key,
        aggregator=aggregator,
        client_id="cloud-adapt",
    ).start()
    agents = {}
    try:
        for name in ("pi4-a", "pi4-b", "pi4-c"):
            config = AgentConfig(
                name, profile, address, tmp_path / name, backend="litert", trust_key=public
            )
            agents[name] = EdgeAgent(config).start()
        serials = {
            d: fc.assign(d, refs, options=options, target=profile.name).serial for d in agents
        }
        assert wait_for_fleet(fc, serials, 60)
        a, b, c = agents.values()
        before = float((b.infer(x[held], "clean").argmax(1) == y[held]).mean())

        for device in (a, c):  # two devices see rotated digits and learn on 240 labels
            device.infer(x[:1], "rotate")
            for i in range(0, 240, 8):
                device.learn(x[train][i : i + 8], y[train][i : i + 8])
            device.infer(x[:1], "clean")  # leaving rotate uploads what it learned there
        wait(lambda: aggregator.contributors("rotate") == {"pi4-a", "pi4-c"})
        alone = float(
            (
                a.learner.bank["rotate"].logits(a.runner.features(x[held])).argmax(1) == y[held]
            ).mean()
        )

        b.infer(x[:1], "rotate")  # b enters rotate: the cloud sends the aggregate
        wait(lambda: b.stats.warm_starts == 1)
        after = float((b.infer(x[held], "rotate").argmax(1) == y[held]).mean())
        print(f"rotate on b: head {before:.3f}, a alone {alone:.3f}, b warm-started {after:.3f}")
        assert after > before + 0.3 and after >= alone - 0.1
        # c entered rotate after a had uploaded, so it started from a's adapter too
        assert c.stats.warm_starts == 1 and b.learner.warm["rotate"] == 480 and fc.offers == 2

        # an offer the cloud did not sign is refused and changes nothing
        events = collector_factory(wire.device_topic("pi4-b", "events"))
        forged = wire.AdapterOffer(device_id="pi4-b", domain="noise", samples=5, weights=save(head))
        other, _ = init_keys(tmp_path / "other")
        for offer in (forged, sign(forged, load_signing_key(other))):
            fc.client.publish(wire.device_topic("pi4-b", "adapter"), offer.encode(), qos=1)
        wait(lambda: len(events.messages) >= 2)
        codes = sorted(wire.decode(wire.Event, m).code for _, m in events.messages)
        assert codes == ["bad-signature", "unsigned"]
        assert b.stats.warm_starts == 1 and "noise" not in b.learner.warm
    finally:
        for agent in agents.values():
            agent.stop()
        fc.stop()


@pytest.mark.slow
def test_a_short_scenario_runs_every_method_on_the_same_streams(modular, mosquitto, tmp_path, keys):
    from eclm_lab.experiment import ADAPTIVE, Settings, run
    from eclm_lab.report import headline, table, write
    from eclm_lab.scenario import ScenarioSpec

    _, public = keys
    spec = ScenarioSpec(devices=2, steps=16, clean_len=4, shift_len=4, seed=3)
    settings = Settings(
        spec=spec, profiles=("rpi4", "rpi-zero-2w"), upload_every=4, tune=False, integrate_every=8
    )
    report = run(
        settings,
        modular["model_dir"],
        tmp_path,
        mosquitto.url,
        signing_key=public.with_name("signing.key"),
        trust_key=public,
        store=modular["store"],
    )
    methods = report["methods"]
    print(table(methods))
    assert set(methods) == {
        ADAPTIVE,
        "static cloud (remote)",
        "static sub-model",
        "on-device only",
        "FedAvg",
    }
    for figures in methods.values():
        assert 0.0 <= figures["accuracy"] <= 1.0
    assert methods[ADAPTIVE]["budget_violations"] == 0
    # the figures are of `eclm cloud serve`, whose database and config the report names
    cloud = report["cloud"]
    assert cloud["command"][-3:-1] == ["serve", "--config"] and cloud["exit_code"] == 0
    assert Path(cloud["database"].removeprefix("sqlite:///")).is_file()
    assert "class-mean" in Path(cloud["config"]).read_text()
    assert report["unsettled_steps"] == 0
    # the service folded the devices' clean adapters into a new head and rolled it out
    assert report["integrations"][0]["state"] == "succeeded"
    assert methods[ADAPTIVE]["bytes_by_kind"]["down:chunks"] > 0
    assert report["uploads"] > 0 and methods[ADAPTIVE]["bytes_by_kind"]["up:updates"] > 0
    # full weights both ways cost more than adapter uploads; raw samples went up too
    assert methods["FedAvg"]["bytes_up"] > methods[ADAPTIVE]["bytes_up"]
    assert methods["FedAvg"]["bytes_down"] > methods[ADAPTIVE]["bytes_down"]
    remote = methods["static cloud (remote)"]
    assert remote["bytes_up"] >= 2 * 16 * 16 * 64 * 4 and remote["bytes_down"] > 0
    assert methods["static sub-model"]["bytes_up"] == 0
    # before its adapter beat the cloud's head on new labels, no device served it
    assert len(report["adapting_share"]) == 16 and report["adapting_share"][0] == 0.0
    figures = headline(report, ADAPTIVE)
    assert figures["fedavg_bytes_ratio"] > 1
    json_path, png_path = write(report, tmp_path / "out")
    assert json_path.stat().st_size > 0 and png_path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_service_warm_starts_from_every_devices_latest_update_and_reselects_for_a_mix(
    modular, mosquitto, address, tmp_path, collector_factory, monkeypatch
):
    """``eclm cloud serve`` as the adaptation benchmark runs it: each update closes a round
    that carries the other devices' latest ones, so a device entering a domain starts from
    all of them; a device whose label mix narrows to one class gets the modules chosen
    for that mix (judged against the selection the planner makes, run here as reference).
    The board holds one module per layer, so the choice depends on the mix: a real board's
    budget takes nearly the whole digits model, whatever the mix."""
    from budgets import ONE_MODULE_PER_LAYER_MB, board_file
    from cloudproc import Cloud
    from cloudproc import wait as wait_for

    from cloud_trainer.export.plan import select_for
    from cloud_trainer.model.checkpoint import load_importance
    from cloud_trainer.model.selection import expected_importance
    from cloud_trainer.service.reselection import score

    boards = tmp_path / "boards"  # the service finds the device's board by its name there
    profile = load_profile(board_file(boards, "zero-one-each", memory_mb=ONE_MODULE_PER_LAYER_MB))
    monkeypatch.setenv("ECLM_PROFILE_PATH", str(boards))
    importance = load_importance(modular["model_dir"])
    full = select_for(modular["model_dir"], profile, None).modules
    gains = {}
    for k in range(importance.shape[2]):
        mix = np.eye(importance.shape[2])[k]
        chosen = select_for(modular["model_dir"], profile, mix).modules
        expected = expected_importance(importance, mix)
        gains[k] = (score(expected, chosen) / score(expected, full), tuple(map(tuple, chosen)))
    k = max(gains, key=lambda c: gains[c][0])
    assert gains[k][0] >= 1.5, f"no class makes another selection pay: {gains}"

    cloud = Cloud(
        tmp_path / "cloud",
        modular,
        mosquitto.url,
        aggregation='strategy = "class-mean"\nquorum = 1\ncarry = true',
        fleet="reselect_gain = 0.5",
        integration="enabled = false",
    )
    cloud.start()
    agents = {}
    try:
        for name in ("zero-a", "zero-b", "zero-c"):
            config = AgentConfig(
                name, profile, address, tmp_path / name, backend="litert", trust_key=cloud.public
            )
            agents[name] = EdgeAgent(config).start()
        wait_for(lambda: all(a.report.phase == "active" for a in agents.values()), 180, "serving")
        a, b, c = agents.values()
        test = np.load(modular["model_dir"] / "test.npz")
        x, y = apply("rotate", test["x"]), test["y"]
        state = cloud.state()
        for device in (a, c):  # one after the other: c starts from a's adapter
            device.infer(x[:1], "rotate")
            for i in range(0, 240, 8):
                device.learn(x[i : i + 8], y[i : i + 8])
            device.infer(x[:1], "clean")  # leaving rotate uploads what it learned there
            wait_for(lambda d=device: state.samples_of("rotate", d.config.device_id) == 240)
            wait_for(lambda: not state.rounds("open") and not state.rounds("closed"))
        assert state.latest_aggregate("rotate")[1] == 480  # a's update carried into c's round

        b.infer(x[:1], "rotate")  # b enters rotate: the cloud sends the carried aggregate
        wait_for(lambda: b.stats.warm_starts == 1, 30, "b's warm start")
        assert c.stats.warm_starts == 1 and b.learner.warm["rotate"] == 480
        assert "eclm_offers_sent_total 2.0" in cloud.get("/metrics")

        desired = collector_factory(wire.device_topic("zero-b", "desired"), client_id="watch-b")
        one = np.flatnonzero(test["y"] == k)
        b.infer(x[:1], "clean")
        for i in range(0, 64, 8):  # a label mix of class k alone
            rows = one[np.arange(i, i + 8) % len(one)]
            b.learn(test["x"][rows], test["y"][rows])
        wait_for(lambda: "eclm_reselections_total 1.0" in cloud.get("/metrics"), 120, "reselect")
        wait_for(lambda: len(desired.messages) >= 2, 30, "b's new desired state")
        new = wire.decode(wire.DesiredState, desired.messages[-1][1])
        assert new.options[0].selection == gains[k][1]
        kept = {r.sha256 for r in new.artifacts if r.part in ("head", "adapter")}
        before = wire.decode(wire.DesiredState, desired.messages[0][1])
        assert (
            new.serial > before.serial and new.options[0].selection != before.options[0].selection
        )
        assert kept and kept <= {r.sha256 for r in before.artifacts}  # b keeps head, adapter
        assert "re-selected zero-b for its label mix" in cloud.log.read_text()
    finally:
        for agent in agents.values():
            agent.stop()
        cloud.stop()

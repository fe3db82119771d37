"""Setting a whole wave's desired states in one call, against a real Mosquitto: each is
retained on the broker, signed, with its own newer serial, by the time the call returns;
and whom a wave's broadcast of each artifact waits for."""

import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import eclm_wire as wire
from cloud_trainer.export.plan import Target
from cloud_trainer.fleet.coordinator import FleetCoordinator
from edge_runtime.artifacts import ArtifactStore

WAVE = [f"wave-{i:02d}" for i in range(30)]


def retained_desired(collector, devices, timeout=10.0) -> dict[str, wire.DesiredState]:
    """The retained desired state of each of ``devices`` as a new subscriber gets it."""
    deadline = time.monotonic() + timeout
    found: dict[str, wire.DesiredState] = {}
    while time.monotonic() < deadline and len(found) < len(devices):
        for topic, payload in list(collector.messages):
            device_id = wire.parse_device_topic(topic)[0]
            if device_id in devices:
                found[device_id] = wire.decode(wire.DesiredState, payload)
        time.sleep(0.02)
    return found


def test_one_assign_call_leaves_every_desired_state_of_a_wave_retained(
    address, collector_factory, tmp_path
):
    key = Ed25519PrivateKey.generate()
    with FleetCoordinator(
        address, ArtifactStore(tmp_path / "cloud"), client_id="cloud-assign-all", signing_key=key
    ) as fc:
        ref = fc.add_artifact("wave.tflite", b"TFL3" * 1000, "tflite")
        earlier = fc.assign(WAVE[0], [ref], target="rpi4")

        assigned = fc.assign_all({d: Target((ref,), (), "rpi4") for d in WAVE})
        watcher = collector_factory(wire.all_devices_topic("desired"), client_id="watch-wave")
        retained = retained_desired(watcher, set(WAVE))

    assert list(assigned) == WAVE
    serials = [assigned[d].serial for d in WAVE]
    assert serials == sorted(set(serials)) and serials[0] > earlier.serial
    assert retained == assigned  # the newest of each, as acknowledged
    for desired in assigned.values():
        assert desired.target == "rpi4" and desired.artifacts == (ref,)
        key.public_key().verify(bytes.fromhex(desired.signature), wire.signed_bytes(desired))


def test_assigning_nothing_publishes_nothing(address, tmp_path):
    with FleetCoordinator(
        address, ArtifactStore(tmp_path / "cloud"), client_id="cloud-assign-none"
    ) as fc:
        sent = fc.client.traffic.total("sent", "desired")

        assert fc.assign_all({}) == {}
        assert fc.client.traffic.total("sent", "desired") == sent


def test_a_wave_expects_each_device_to_ask_for_its_backends_programs_and_the_head(
    address, tmp_path
):
    with FleetCoordinator(
        address, ArtifactStore(tmp_path / "cloud"), client_id="cloud-expect"
    ) as fc:
        tflite = fc.add_artifact("m.tflite", b"TFL3" * 100, "tflite")
        pte = fc.add_artifact("m.pte", b"PTE0" * 100, "pte")
        head = fc.add_artifact("head.safetensors", b"{}" * 100, "safetensors")
        for device_id, backend, active in (
            ("on-litert", "litert", ()),
            ("on-executorch", "executorch", ()),
            ("has-head", "litert", (head.sha256,)),
        ):
            fc.reported[device_id] = wire.ReportedState(
                device_id=device_id,
                profile="rpi4",
                backends=("litert", "executorch"),
                serial=1,
                phase="active",
                active=active,
                backend=backend,
            )
        fc.expect({d: [tflite, pte, head] for d in ("on-litert", "on-executorch", "has-head")})
        expected = {sha: devices for sha, (devices, _) in fc.broadcaster._expected.items()}

    assert expected == {
        tflite.sha256: {"on-litert", "has-head"},
        pte.sha256: {"on-executorch"},
        head.sha256: {"on-litert", "on-executorch"},  # whatever they run
    }

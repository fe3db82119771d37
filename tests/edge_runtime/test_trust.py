import json
import os
import stat
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eclm_wire as wire
from cloud_trainer.errors import ConfigError
from cloud_trainer.fleet.keys import init_keys, load_signing_key, sign
from eclm_wire.errors import ProtocolError
from edge_runtime.trust import Gate, load_public_key

SHA = "ab" * 32


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    private, public = init_keys(tmp_path_factory.mktemp("keys"))
    return load_signing_key(private), load_public_key(public)


def state(serial=5, **changes):
    desired = wire.DesiredState(
        device_id="pi4-a",
        serial=serial,
        artifacts=(wire.ArtifactRef(name="m", sha256=SHA, size=10, format="tflite"),),
        target="rpi4",
        expires=time.time() + 3600,
    )
    return replace(desired, **changes)


def refused(gate, desired) -> str:
    with pytest.raises(ProtocolError) as info:
        gate.check(desired)
    return info.value.code


def test_the_private_key_is_owner_only_and_never_silently_replaced(tmp_path):
    private, public = init_keys(tmp_path)

    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="--force"):
        init_keys(tmp_path)
    first = public.read_bytes()
    init_keys(tmp_path, force=True)
    assert public.read_bytes() != first
    os.chmod(private, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_signing_key(private)
    with pytest.raises(ValueError, match="public key"):
        load_public_key(private)


def test_a_signed_state_is_accepted_once_and_refused_when_altered(keys, tmp_path):
    signer, public = keys
    gate = Gate(public, tmp_path / "trust.json", "rpi4")
    good = sign(state(), signer)

    assert gate.check(good) is False
    gate.accept(good)
    assert gate.check(good) is True  # the same state again (a restart, a QoS 1 duplicate)

    newer = sign(state(serial=6), signer)
    assert refused(gate, replace(newer, serial=7)) == "bad-signature"
    other = replace(newer, artifacts=(replace(newer.artifacts[0], sha256="cd" * 32),))
    assert refused(gate, other) == "bad-signature"
    assert refused(gate, replace(newer, signature="")) == "unsigned"
    assert refused(gate, sign(state(serial=6, expires=time.time() - 1), signer)) == "expired"
    assert refused(gate, sign(state(serial=6, target="rpi5"), signer)) == "wrong-target"
    assert refused(gate, sign(state(serial=4), signer)) == "replayed"
    assert refused(gate, sign(state(serial=5, target="rpi4", expires=1e10), signer)) == "replayed"
    assert gate.check(newer) is False


def test_the_newest_accepted_serial_survives_a_restart(keys, tmp_path):
    signer, public = keys
    path = tmp_path / "trust.json"
    accepted = sign(state(serial=9), signer)
    Gate(public, path, "rpi4").accept(accepted)

    restarted = Gate(public, path, "rpi4")

    assert restarted.check(accepted) is True  # applied again after the restart
    assert refused(restarted, sign(state(serial=9, expires=2e9), signer)) == "replayed"
    assert refused(restarted, sign(state(serial=8), signer)) == "replayed"
    assert json.loads(path.read_text())["serial"] == 9


def test_without_a_key_unsigned_states_pass_but_the_other_rules_hold(tmp_path):
    gate = Gate(None, tmp_path / "trust.json", "rpi4")

    assert gate.check(state()) is False
    assert gate.check(state(target="")) is False
    assert refused(gate, state(target="rpi5")) == "wrong-target"
    assert refused(gate, state(expires=time.time() - 5)) == "expired"


def test_an_unreadable_trust_file_falls_back_to_the_active_states_serial(tmp_path, caplog):
    path = tmp_path / "trust.json"
    path.write_text("{not json")

    assert Gate(None, path, "rpi4").serial == -1 and "unreadable" in caplog.text
    gate = Gate(None, path, "rpi4", floor=7)
    assert gate.serial == 7
    assert refused(gate, state(serial=7)) == "replayed"
    assert gate.check(state(serial=8)) is False


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_changed_byte_is_refused_or_changes_nothing(keys, tmp_path, data):
    signer, public = keys
    good = sign(state(expires=4102444800.0, issued_at=1.8e9), signer)  # the same every run
    payload = bytearray(good.encode())
    i = data.draw(st.integers(0, len(payload) - 1))
    payload[i] = data.draw(st.integers(0, 255).filter(lambda b: b != payload[i]))
    gate = Gate(public, tmp_path / "fuzz.json", "rpi4")

    try:
        gate.check(wire.decode(wire.DesiredState, bytes(payload)))
    except ProtocolError:
        return
    assert wire.decode(wire.DesiredState, bytes(payload)) == good

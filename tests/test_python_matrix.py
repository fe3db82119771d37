"""The edge side on the CPython each board's OS ships (3.10 to 3.13): a bundle built with
``--python X.Y`` installs by its own install.sh into a fresh venv of that Python, and its
agent, started as the systemd unit starts it (run.sh, the unit's environment files, the
cloud's trust key), reaches ``active`` over TLS on a real Mosquitto against the cloud in
this process (Python 3.11).

CI runs one version (3.10, JetPack 6's, the oldest); scripts/python-matrix.sh runs every
version it finds (ECLM_PYTHONS="3.10 3.11 3.12 3.13"), with the edge unit tests in an
edge-only venv of each. A Python this machine lacks is skipped, naming how to get it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import pytest
from pythons import find_python
from test_bundle import (
    SYSTEMD_PATH,
    install,
    read_unit,
    start_unit,
    tls_broker,
    tls_cloud,
    unit_env,
)

from broker import Access
from broker.launcher import free_port
from cloud_trainer.fleet.keys import init_keys
from eclm.cli import main
from eclm_common.exit_codes import ExitCode

VERSIONS = ("3.10", "3.11", "3.12", "3.13")
CI_VERSIONS = "3.10"
PROFILE = "rpi-zero-2w"  # LiteRT only: no libtorch to download for each Python


def selected() -> set[str]:
    asked = os.environ.get("ECLM_PYTHONS", CI_VERSIONS)
    return set(VERSIONS) if asked.strip() == "all" else set(asked.split())


@pytest.fixture(scope="module")
def operator(tmp_path_factory):
    """An access directory (CA, server certificate, cloud user) and the cloud's keys."""
    root = tmp_path_factory.mktemp("operator-matrix")
    access = Access(root / "access").init()
    private, public = init_keys(root / "keys")
    return {"access": access, "private": private, "public": public}


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_a_bundle_for_this_python_installs_and_its_agent_reaches_active(
    version, operator, modular, tmp_path
):
    if version not in selected():
        pytest.skip(f"Python {version} runs from scripts/python-matrix.sh (ECLM_PYTHONS)")
    python = find_python(version)
    if python is None:
        pytest.skip(f"no CPython {version} here (pyenv install {version}, or python{version})")
    from cloud_trainer.fleet.deploy import deploy_fleet, wait_for_fleet

    access, device = operator["access"], f"py{version.replace('.', '')}"
    port, archive = free_port(), tmp_path / "bundle.tar.gz"
    started = time.monotonic()
    built = main(
        ["edge", "bundle", "--profile", PROFILE, "--device-id", device, "--python", version]
        + ["--arch", platform.machine(), "--broker", f"mqtts://127.0.0.1:{port}"]
        + ["--access", str(access.dir), "--trust-key", str(operator["public"])]
        + ["--out", str(archive)]
    )
    assert built == ExitCode.OK
    bundle_seconds = time.monotonic() - started
    subprocess.run(["tar", "xzf", str(archive), "-C", str(tmp_path)], check=True)
    top, prefix = tmp_path / f"eclm-edge-{device}", tmp_path / "opt-eclm"
    assert f"# Python {version} (" in (top / "requirements.txt").read_text()

    wrong = install(top, tmp_path / "wrong", "--no-systemd", PYTHON=sys.executable)
    started = time.monotonic()
    installed = install(top, prefix, "--no-systemd", PYTHON=python)
    install_seconds = time.monotonic() - started
    print(f"Python {version}: bundle {bundle_seconds:.1f} s, install.sh {install_seconds:.1f} s")

    if version != "{}.{}".format(*sys.version_info[:2]):
        assert wrong.returncode == 1, wrong.stdout + wrong.stderr
        assert f"pinned for Python {version}" in wrong.stderr
        assert not (tmp_path / "wrong").exists()
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    probe = subprocess.run(
        [prefix / "venv/bin/python", "-c", "import sys, edge_runtime as e; print(sys.version)"],
        cwd="/",
        env={"PATH": SYSTEMD_PATH},
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.startswith(f"{version}.")
    cloud_cmd = subprocess.run(
        [prefix / "venv/bin/eclm", "cloud", "train"], cwd=tmp_path, capture_output=True, text=True
    )
    if version == "3.10":  # the cloud side needs 3.11: said, not a traceback
        assert cloud_cmd.returncode == ExitCode.USAGE, cloud_cmd.stderr
        assert "the cloud side needs Python >= 3.11" in cloud_cmd.stderr

    unit = read_unit((prefix / "lib/systemd/system/eclm-edge.service").read_text())
    env = unit_env(unit)
    assert env["ECLM_TRUST_KEY"] == str(prefix / "etc/signing.pub")  # run.sh passes it
    broker = tls_broker(access, port, tmp_path / "broker")
    log = open(tmp_path / "agent.log", "wb")
    agent = start_unit(unit, env, log)
    fc = tls_cloud(broker, access, modular["store"], operator["private"], f"cloud-{device}")
    try:
        serials = deploy_fleet(
            fc, modular["model_dir"], modular["store"], [(device, PROFILE)], modular=True
        )
        reached = wait_for_fleet(fc, serials, timeout=120)
    finally:
        fc.stop()
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
        broker.stop()
        log.close()

    agent_log = (tmp_path / "agent.log").read_text(errors="replace")
    assert reached, agent_log[-3000:]
    report = fc.reported[device]
    assert report.phase == "active" and report.serial == serials[device]
    assert report.backend == "litert"
    assert agent.returncode == ExitCode.OK, agent_log[-3000:]

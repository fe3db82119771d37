"""Shared fixtures: a real Mosquitto on a free loopback port, a trained and exported model."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import psutil
import pytest

from broker import Broker, find_mosquitto
from eclm_wire.mqtt import BrokerAddress

# Every process the tests start inherits this marker, so the session can find those that
# outlived their test even after they were re-parented away from pytest.
MARKER = "ECLM_TEST_SESSION"
os.environ[MARKER] = uuid.uuid4().hex


def started_by_tests() -> list[psutil.Process]:
    """Live processes the suite started: pytest's descendants and every process with the
    marker, less the resource tracker of pytest's own multiprocessing (it ends with pytest)."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    for p in psutil.process_iter():
        try:
            if p.pid != me.pid and p.environ().get(MARKER) == os.environ[MARKER]:
                found[p.pid] = p
        except psutil.Error:
            pass
    alive = []
    for p in found.values():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.ppid() == me.pid and "resource_tracker" in " ".join(p.cmdline()):
                continue
            alive.append(p)
        except psutil.Error:
            pass
    return alive


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite():
    """Fails the run if a process the tests started is still alive when they end (set up
    first, so it is torn down after every other fixture)."""
    yield
    _, alive = psutil.wait_procs(started_by_tests(), timeout=10)
    if alive:
        names = []
        for p in alive:
            try:
                names.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
                p.kill()
            except psutil.Error:
                pass
        pytest.fail("processes the tests started outlived them (now killed):\n" + "\n".join(names))


NO_CLOUD = "the cloud side (torch) is not installed: an edge-only venv"


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> Broker:
    """A real Mosquitto for the whole session (scripts/setup.sh installs it)."""
    if not find_mosquitto():
        pytest.fail("Mosquitto is not installed; run scripts/setup.sh (apt-get install mosquitto)")
    broker = Broker(kind="mosquitto", data_dir=tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A Mosquitto with TLS, passwords and the device ACLs (an access directory with the
    users dev-a and dev-b), for one test module."""
    from broker import Access

    if not find_mosquitto():
        pytest.fail("Mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients)")
    access = Access(tmp_path_factory.mktemp("access")).init()
    for device in ("dev-a", "dev-b"):
        access.add_user(device)
    broker = Broker(
        kind="mosquitto",
        data_dir=tmp_path_factory.mktemp("secured"),
        password_file=access.password_file,
        tls=access.tls,
    )
    with broker:
        yield access, broker


@pytest.fixture
def address(mosquitto) -> BrokerAddress:
    return BrokerAddress.parse(mosquitto.url)


@pytest.fixture(scope="session")
def exported(modular):
    """A fused sub-model of the trained modular model as .pte and .tflite programs, and
    its accuracy in torch on the held-out digits."""
    import numpy as np
    import torch

    from cloud_trainer.export.plan import export_fused_for

    modules = ((0, 2), (1, 3))
    refs = {
        fmt: export_fused_for(modular["model_dir"], modular["store"], modules, fmt)
        for fmt in ("pte", "tflite")
    }
    test = np.load(modular["model_dir"] / "test.npz")
    with torch.no_grad():
        logits = modular["net"](torch.from_numpy(test["x"]), modules).numpy()
    return {
        "accuracy": float((logits.argmax(1) == test["y"]).mean()),
        "refs": refs,
        "store": modular["store"],
        "test_npz": modular["model_dir"] / "test.npz",
        "modules": modules,
    }


class Collector:
    """A plain paho client that records what arrives on the topics it subscribes to."""

    def __init__(self, address: BrokerAddress, *topics: str, client_id: str = "collector"):
        self.messages: list[tuple[str, bytes]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        time.sleep(0.2)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def wait_for(self, predicate, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in list(self.messages) if predicate(*m)]
            if found:
                return found
            time.sleep(0.02)
        return []

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def collector_factory(address):
    made: list[Collector] = []

    def make(*topics: str, client_id: str = "collector") -> Collector:
        made.append(Collector(address, *topics, client_id=client_id))
        return made[-1]

    yield make
    for c in made:
        c.close()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def modular(tmp_path_factory):
    """The modular model trained with the defaults and exported in every variant."""
    pytest.importorskip(
        "torch", reason="the cloud side (torch) is not installed: an edge-only venv"
    )
    from cloud_trainer.export.plan import export_model
    from cloud_trainer.model.checkpoint import load_model, train_model

    root = tmp_path_factory.mktemp("modular")
    trained = train_model(root / "model", epochs=25)
    records = export_model(root / "model", root / "artifacts")
    return {
        "model_dir": root / "model",
        "store": root / "artifacts",
        "trained": trained,
        "records": records,
        "net": load_model(root / "model"),
    }


@pytest.fixture(scope="session")
def shifted(modular):
    """Features of rotated digits through the frozen full model, and the cloud's head."""
    import numpy as np
    import torch

    from cloud_trainer.model.domains import apply

    net = modular["net"]
    test = np.load(modular["model_dir"] / "test.npz")
    x = apply("rotate", test["x"])
    with torch.no_grad():
        features = net.features(torch.from_numpy(x)).numpy()
    fc = net.head.fc
    return {
        "features": features,
        "labels": test["y"],
        "fc": fc,
        "weight": fc.weight.detach().numpy(),
        "bias": fc.bias.detach().numpy(),
    }


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL on a free loopback port, as the ``postgres`` system user
    (scripts/setup.sh installs it); skipped with the reason where it is not installed."""
    import glob
    import os
    import shutil
    import subprocess
    import tempfile

    from broker.launcher import free_port

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not found[-1]:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)")
    bin_dir = Path(found[-1]).parent
    run_as = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        run_as = ["runuser", "-u", "postgres", "--"]
    data = Path(tempfile.mkdtemp(prefix="eclm-pg-"))
    if run_as:
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run(
        [*run_as, bin_dir / "initdb", "-D", data / "db", "-A", "trust", "-U", "eclm"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *run_as,
            bin_dir / "pg_ctl",
            "-D",
            data / "db",
            "-o",
            options,
            "-l",
            data / "log",
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    yield f"postgresql://eclm@127.0.0.1:{port}"
    subprocess.run(
        [*run_as, bin_dir / "pg_ctl", "-D", data / "db", "-m", "fast", "stop"], capture_output=True
    )
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh database on the session's PostgreSQL."""
    import re

    import psycopg

    name = "t_" + re.sub(r"\W", "_", request.node.name)[:40].lower() + f"_{int(time.time() * 1e6)}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres_server}/{name}"

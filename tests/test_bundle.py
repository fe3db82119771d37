"""`eclm edge bundle`: one archive per board. Its contents and modes, its unit and pinned
requirements, its install script's refusals, and (slow) the whole way: a fresh venv made
by install.sh, the agent started as its systemd unit would start it, TLS and a device
password on a real Mosquitto, a signed sub-model from the cloud, and notify datagrams."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from pythons import find_python

from broker import Access, Broker
from broker.launcher import free_port
from cloud_trainer.fleet.keys import init_keys, load_signing_key
from device_profiles import load_profile
from eclm.bundle import TEMPLATES, BundleSpec, board_python, build_bundle, requirements
from eclm.cli import main
from eclm_common.exit_codes import ExitCode
from eclm_common.lifeline import popen
from eclm_wire.mqtt import BrokerAddress

DEVICE = "zero-bundle"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def read_unit(text: str) -> dict[str, list[str]]:
    """``key -> values`` of a systemd unit's [Service] section."""
    section, found = None, {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads it (KEY=VALUE, comments, quoted values)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            env[key.strip()] = value
    return env


def unit_env(unit: dict[str, list[str]]) -> dict[str, str]:
    """The environment systemd gives the unit's process: its EnvironmentFiles."""
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
    for path in unit["EnvironmentFile"]:
        env.update(read_env_file(Path(path.lstrip("-"))))
    return env


def tls_broker(access: Access, port: int, data_dir: Path) -> Broker:
    """Mosquitto with the access directory's TLS, passwords and ACLs."""
    return Broker(
        kind="mosquitto",
        port=port,
        data_dir=data_dir,
        password_file=access.password_file,
        tls=access.tls,
    ).start()


def start_unit(unit: dict[str, list[str]], env: dict[str, str], log):
    """The unit's ExecStart in its working directory, as systemd would start it."""
    return popen(
        shlex.split(unit["ExecStart"][0]),
        env=env,
        cwd=unit["WorkingDirectory"][0],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def tls_cloud(broker: Broker, access: Access, store: Path, signing_key: Path, client_id: str):
    """A started FleetCoordinator logged in as the cloud, on the cloud's own listener."""
    from cloud_trainer.fleet.coordinator import FleetCoordinator
    from edge_runtime.artifacts import ArtifactStore

    address = BrokerAddress(
        "127.0.0.1",
        broker.cloud_port,
        True,
        "cloud",
        access.password("cloud"),
        str(access.tls.cafile),
    )
    key = load_signing_key(signing_key)
    return FleetCoordinator(
        address, ArtifactStore(store), client_id=client_id, signing_key=key
    ).start()


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    """An access directory (CA, server certificate, cloud user) and the cloud's keys."""
    root = tmp_path_factory.mktemp("operator")
    access = Access(root / "access").init()
    private, public = init_keys(root / "keys")
    return {"root": root, "access": access, "private": private, "public": public}


@pytest.fixture(scope="module")
def bundle(provisioned):
    """A bundle for a LiteRT board (rpi-zero-2w), its device user made by the builder."""
    out = provisioned["root"] / "zero.tar.gz"
    spec = BundleSpec(
        device_id=DEVICE,
        profile="rpi-zero-2w",
        access_dir=provisioned["access"].dir,
        trust_key=provisioned["public"],
        labels=("site=lab", "ring=beta"),
    )
    built = build_bundle(spec, out)
    top = out.parent / f"eclm-edge-{DEVICE}"
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        tar.extractall(out.parent, filter="data")
    return {"result": built, "members": members, "dir": top, "spec": spec, **provisioned}


def test_the_archive_holds_what_a_board_needs_and_keeps_the_password_owner_only(bundle):
    members, top = bundle["members"], f"eclm-edge-{DEVICE}/"
    password = bundle["access"].password(DEVICE)
    files = {name[len(top) :]: m for name, m in members.items() if m.isfile()}
    wheel = next(n for n in files if n.startswith("wheels/"))

    assert stat.S_IMODE(bundle["result"].path.stat().st_mode) == 0o600
    assert all(name == top[:-1] or name.startswith(top) for name in members)
    assert set(files) == {
        "install.sh",
        "bin/run.sh",
        "systemd/eclm-edge.service",
        "requirements.txt",
        "SHA256SUMS",
        wheel,
        *(f"etc/{n}" for n in ("edge.env", "credentials.env", "ca.pem", "signing.pub")),
        "etc/profile.toml",
    }
    assert re.fullmatch(r"wheels/eclm_fleet-[\d.]+-py3-none-any\.whl", wheel)
    assert files["etc/credentials.env"].mode == 0o600
    assert files["install.sh"].mode == files["bin/run.sh"].mode == 0o755
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    holding = [n for n in files if password.encode() in (bundle["dir"] / n).read_bytes()]
    assert holding == ["etc/credentials.env"]
    assert (bundle["dir"] / "etc/ca.pem").read_bytes() == bundle["access"].tls.cafile.read_bytes()
    assert (bundle["dir"] / "etc/signing.pub").read_bytes() == bundle["public"].read_bytes()
    for line in (bundle["dir"] / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((bundle["dir"] / name).read_bytes()).hexdigest() == digest, name
    assert len((bundle["dir"] / "SHA256SUMS").read_text().splitlines()) == len(files) - 1


def test_the_device_user_is_made_once_and_the_config_names_the_device(bundle):
    env = read_env_file(bundle["dir"] / "etc/edge.env")
    again = build_bundle(bundle["spec"], bundle["root"] / "again.tar.gz")

    assert bundle["result"].added_user and not again.added_user
    assert f"{DEVICE}:" in bundle["access"].password_file.read_text()
    # No --broker: the first name in the broker's certificate, as the board must use it.
    assert env["ECLM_BROKER"] == f"mqtts://{DEVICE}@127.0.0.1:8883"
    assert env["ECLM_DEVICE_ID"] == DEVICE and env["ECLM_LABELS"] == "site=lab ring=beta"
    assert env["ECLM_STORE"] == f"@PREFIX@/var/{DEVICE}"
    assert "ECLM_BROKER_PASSWORD" not in env
    creds = read_env_file(bundle["dir"] / "etc/credentials.env")
    assert creds == {"ECLM_BROKER_PASSWORD": bundle["access"].password(DEVICE)}


def test_the_unit_is_a_restarting_watched_notify_service_with_the_password_out_of_argv(bundle):
    unit = read_unit((bundle["dir"] / "systemd/eclm-edge.service").read_text())
    run = (bundle["dir"] / "bin/run.sh").read_text()

    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["on-failure"]
    assert int(unit["WatchdogSec"][0]) > 0
    assert unit["EnvironmentFile"] == ["@PREFIX@/etc/edge.env", "@PREFIX@/etc/credentials.env"]
    assert unit["ExecStart"] == ["@PREFIX@/bin/run.sh"]
    assert "PASSWORD" not in run.split("exec ", 1)[1]
    assert re.search(r'^exec "@PREFIX@/venv/bin/eclm" edge run "\$@"$', run, re.MULTILINE)
    cloud = read_unit((TEMPLATES / "eclm-cloud.service").read_text())
    assert cloud["Restart"] == ["on-failure"]
    assert cloud["ExecStart"][0].endswith("eclm cloud serve --config /etc/eclm/cloud.toml")


def test_requirements_are_pinned_to_this_venv_and_only_executorch_boards_get_torch(bundle):
    wheel = next((bundle["dir"] / "wheels").glob("*.whl"))
    litert = (bundle["dir"] / "requirements.txt").read_text()
    big, nodeps = requirements(wheel, load_profile("jetson-orin-nano"), "aarch64")

    def pins(text):
        lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
        return dict(ln.split("==") for ln in lines if ln)

    small = pins(litert)
    assert {"ai-edge-litert", "numpy", "psutil", "paho-mqtt", "cryptography"} <= set(small)
    assert "safetensors" in small and not {"torch", "executorch"} & set(small)
    for name, pinned in small.items():
        assert version(name) == pinned or name == "ai-edge-litert", name
    # aarch64 gets the LiteRT proven there (DESIGN.md 6: 2.3.0 crashes under qemu aarch64)
    assert small["ai-edge-litert"] == "2.1.6" and "arm64-check" in litert
    assert "aarch64" in litert and "glibc" in litert  # where the board's wheels come from
    assert pins(big)["torch"] == "2.13.0" and "executorch" not in pins(big)
    assert pins(nodeps) == {"executorch": "1.5.1"}
    assert "armv7l" not in litert
    _, none = requirements(wheel, load_profile("rpi4"), "armv7l")
    assert none is None


def test_requirements_for_another_python_are_pinned_for_it_from_the_index(bundle):
    from packaging.version import Version

    wheel = next((bundle["dir"] / "wheels").glob("*.whl"))
    text, nodeps = requirements(wheel, load_profile("rpi-zero-2w"), "aarch64", python="3.10")
    lines = [ln.split("#") for ln in text.splitlines() if ln and not ln.startswith("#")]
    pins = {pin.strip().split("==")[0]: (pin.strip().split("==")[1], why) for pin, why in lines}

    assert "# Python 3.10 (" in text and nodeps is None
    assert {"ai-edge-litert", "numpy", "psutil", "paho-mqtt", "cryptography", "tomli"} <= set(pins)
    assert Version(pins["numpy"][0]) < Version("2.3")  # numpy 2.3 dropped Python 3.10
    for name, (pinned, why) in pins.items():  # no newer than this venv's, or says so
        assert Version(pinned) <= Version(version(name)) or "this venv has" in why, name


def test_the_bundles_python_defaults_to_the_profiles_os_image():
    assert board_python(None, load_profile("jetson-orin-nano")) == "3.10"
    assert board_python(None, load_profile("rpi4")) == "3.11"
    assert board_python("3.13", load_profile("rpi4")) == "3.13"


def test_install_refuses_a_python_the_bundle_was_not_built_for(bundle, tmp_path):
    other = next(filter(None, (find_python(v) for v in ("3.10", "3.12", "3.13"))), None)
    if other is None:
        pytest.skip("no CPython 3.10, 3.12 or 3.13 here (pyenv install 3.12)")

    refused = install(bundle["dir"], tmp_path / "p", "--no-systemd", "--ignore-arch", PYTHON=other)

    assert refused.returncode == 1
    assert "pinned for Python 3.11" in refused.stderr and "--python" in refused.stderr
    assert not (tmp_path / "p").exists()


def install(
    bundle_dir: Path, prefix: Path, *args: str, **extra: str
) -> subprocess.CompletedProcess:
    """install.sh with ``args`` and a service's PATH; ``extra`` adds to its environment."""
    env = {"PATH": SYSTEMD_PATH, "HOME": os.environ.get("HOME", "/root"), "PREFIX": str(prefix)}
    env.update(extra)
    for key in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT"):  # this machine's pip
        if key in os.environ:
            env[key] = os.environ[key]
    return subprocess.run(
        ["sh", str(bundle_dir / "install.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_install_refuses_another_architecture_and_a_damaged_bundle(bundle, tmp_path):
    wrong = install(bundle["dir"], tmp_path / "a", "--no-systemd")  # built for aarch64
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-a", str(bundle["dir"]), str(damaged)], check=True)
    with open(damaged / "etc/edge.env", "a") as fh:
        fh.write("ECLM_BROKER=mqtts://elsewhere:8883\n")
    broken = install(damaged, tmp_path / "b", "--no-systemd", "--ignore-arch")

    if platform.machine() != "aarch64":
        assert wrong.returncode == 1
        assert "this bundle is for aarch64" in wrong.stderr
    assert broken.returncode == 1 and "damaged" in broken.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "args, message, code",
    [
        (
            ["--broker", "mqtts://zero-bundle:secret@h:8883"],
            "leave the password out",
            ExitCode.USAGE,
        ),
        (["--broker", "mqtts://someone@h:8883"], "the user must be the device", ExitCode.USAGE),
        (["--label", "no spaces=x"], "is not key=value", ExitCode.CONFIG),
        (["--trust-key", "/nonexistent.pub"], "no such file", ExitCode.USAGE),
        (["--python", "3.9"], "the edge side runs on 3.10, 3.11, 3.12, 3.13", ExitCode.USAGE),
    ],
)
def test_bad_input_exits_2_or_3_naming_it(bundle, args, message, code, capsys):
    base = ["edge", "bundle", "--profile", "rpi4", "--device-id", DEVICE]
    base += ["--access", str(bundle["access"].dir), "--trust-key", str(bundle["public"])]
    out = bundle["root"] / "bad.tar.gz"

    exited = main([*base, "--out", str(out), *args])

    assert exited == code
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_command_prints_where_the_archive_went_and_what_it_holds(bundle, capsys):
    out = bundle["root"] / "cli" / "pi4.tar.gz"
    args = ["edge", "bundle", "--profile", "rpi4", "--device-id", DEVICE, "--out", str(out)]
    args += ["--access", str(bundle["access"].dir), "--trust-key", str(bundle["public"])]

    assert main(args) == ExitCode.OK

    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and out.is_file()
    assert re.search(rf"0600 +\d+  eclm-edge-{DEVICE}/etc/credentials.env", printed)
    assert re.search(rf"0755 +[\d,]+  eclm-edge-{DEVICE}/install.sh", printed)


class NotifySocket:
    """systemd's side of Type=notify: an abstract unix datagram socket, read in a thread."""

    def __init__(self) -> None:
        self.address = f"@eclm-bundle-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.received.append((time.monotonic(), self.sock.recv(4096)))
            except TimeoutError:
                continue

    def fields(self) -> list[str]:
        return [f for _, d in self.received for f in d.decode().split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.slow
def test_a_bundle_installs_into_a_fresh_venv_and_its_agent_reaches_its_desired_state(
    provisioned, modular, tmp_path
):
    from cloud_trainer.fleet.deploy import deploy_fleet, wait_for_fleet

    access, device = provisioned["access"], "zero-flash"
    port = free_port()
    archive = tmp_path / "flash.tar.gz"
    assert (
        main(
            ["edge", "bundle", "--profile", "rpi-zero-2w", "--device-id", device]
            + ["--arch", platform.machine(), "--broker", f"mqtts://127.0.0.1:{port}"]
            + ["--access", str(access.dir), "--trust-key", str(provisioned["public"])]
            + ["--out", str(archive)]
        )
        == ExitCode.OK
    )
    subprocess.run(["tar", "xzf", str(archive), "-C", str(tmp_path)], check=True)
    prefix = tmp_path / "opt-eclm"

    started = time.monotonic()
    installed = install(tmp_path / f"eclm-edge-{device}", prefix, "--no-systemd")
    install_seconds = time.monotonic() - started
    print(f"install.sh took {install_seconds:.1f} s")

    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert f"done: device {device}" in installed.stdout
    venv_python = prefix / "venv" / "bin" / "python"
    script = "import importlib.util as u, edge_runtime as e; print(e.__file__, *map(u.find_spec, "
    script += "('torch', 'executorch')))"
    probe = subprocess.run(
        [venv_python, "-c", script],
        cwd="/",
        env={"PATH": SYSTEMD_PATH},
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.split()[1:] == ["None", "None"]
    assert probe.stdout.startswith(str(prefix / "venv"))
    for name in ("credentials.env", "edge.env", "ca.pem", "signing.pub"):
        assert stat.S_IMODE((prefix / "etc" / name).stat().st_mode) == 0o600, name

    # Start the agent as systemd would: the unit's ExecStart, its EnvironmentFiles, its
    # working directory, a notify socket. WATCHDOG_USEC is the unit's WatchdogSec made
    # shorter, so the test sees pings repeat within a few seconds.
    unit_path = prefix / "lib/systemd/system/eclm-edge.service"
    if shutil.which("systemd-analyze"):  # the filled-in unit, as systemd would load it
        verify = subprocess.run(["systemd-analyze", "verify", unit_path], capture_output=True)
        assert verify.returncode == 0, verify.stderr
    unit = read_unit(unit_path.read_text())
    env = unit_env(unit)
    notify = NotifySocket()
    env.update(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="2000000")
    assert int(unit["WatchdogSec"][0]) >= 2
    broker = tls_broker(access, port, tmp_path / "broker")
    log = open(tmp_path / "agent.log", "wb")
    agent = start_unit(unit, env, log)
    fc = tls_cloud(broker, access, modular["store"], provisioned["private"], "cloud-bundle")
    try:
        serials = deploy_fleet(
            fc, modular["model_dir"], modular["store"], [(device, "rpi-zero-2w")], modular=True
        )
        reached = wait_for_fleet(fc, serials, timeout=120)
        deadline = time.monotonic() + 10
        while notify.fields().count("WATCHDOG=1") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes()
        agent.send_signal(signal.SIGTERM)  # systemctl stop
        code = agent.wait(30)
    finally:
        fc.stop()
        if agent.poll() is None:
            agent.kill()
        broker.stop()
        log.close()
        notify.close()

    agent_log = (tmp_path / "agent.log").read_text(errors="replace")
    assert reached, agent_log[-3000:]
    report = fc.reported[device]
    assert report.phase == "active" and report.serial == serials[device]
    assert report.backend == "litert"
    fields = notify.fields()
    assert "READY=1" in fields, (fields, agent_log[-3000:])
    assert fields.count("WATCHDOG=1") >= 2
    assert "STOPPING=1" in fields
    assert code == ExitCode.OK, agent_log[-3000:]
    assert access.password(device).encode() not in cmdline
    assert b"eclm\x00edge\x00run" in cmdline and str(prefix / "venv").encode() in cmdline

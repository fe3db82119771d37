"""``eclm demo``: broker, cloud and edge devices on this machine, end to end."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_runtime.exit_codes import ExitCode

log = logging.getLogger(__name__)
DEFAULT_DEVICES = "pi5-01=rpi5,pi4-01=rpi4"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the fleet demo: broker, cloud, two edge devices")
    parser.add_argument(
        "--devices", default=DEFAULT_DEVICES, help="comma list of id=profile (default: %(default)s)"
    )
    parser.add_argument("--broker", help="use this broker URL instead of starting one")
    parser.add_argument("--broker-kind", choices=("auto", "mosquitto", "amqtt"), default="auto")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where models, artifacts and stores go (default: a new temporary directory)",
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.set_defaults(func=run_demo)


def parse_devices(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        device_id, sep, profile = item.partition("=")
        if not sep or not device_id or not profile:
            raise ValueError(f"--devices: expected id=profile, got {item!r}")
        pairs.append((device_id, profile))
    return pairs


def run_demo(args: argparse.Namespace) -> int:
    from broker.launcher import Broker
    from cloud_trainer.cli import print_fleet, wait_for_fleet
    from cloud_trainer.coordinator import FleetCoordinator
    from cloud_trainer.pipeline import export_model, train_model
    from device_profiles import load_profile
    from edge_runtime.artifacts import ArtifactStore
    from edge_runtime.mqtt import BrokerAddress

    devices = parse_devices(args.devices)
    for _, profile in devices:
        load_profile(profile)  # a bad name stops here, before anything starts
    work = args.workdir or Path(tempfile.mkdtemp(prefix="eclm-demo-"))
    broker = None if args.broker else Broker(kind=args.broker_kind, data_dir=work / "broker")
    agents: list[subprocess.Popen] = []
    try:
        url = args.broker or broker.start().url
        print(f"[1/4] broker: {broker.kind if broker else 'external'} on {url}", flush=True)
        trained = train_model(work / "model", epochs=args.epochs, progress=True)
        print(
            f"[2/4] cloud trained the model in {trained.seconds:.1f}s "
            f"(held-out accuracy {trained.accuracy:.4f})",
            flush=True,
        )
        refs = export_model(work / "model", work / "artifacts")
        print("[3/4] exported " + ", ".join(f"{r.name} ({r.size} B)" for r in refs), flush=True)
        with FleetCoordinator(BrokerAddress.parse(url), ArtifactStore(work / "artifacts")) as fc:
            agents = [_spawn_agent(d, p, url, work) for d, p in devices]
            serials = {d: fc.assign(d, refs).serial for d, _ in devices}
            print(
                f"[4/4] {len(agents)} edge devices started; desired state set; waiting", flush=True
            )
            ok = wait_for_fleet(fc, serials, args.timeout)
            print()
            print_fleet(fc, [d for d, _ in devices])
        print(f"\noutputs: {work} (edge logs in {work}/logs)")
        return ExitCode.OK if ok else ExitCode.TIMEOUT
    finally:
        for proc in agents:
            proc.terminate()
        for proc in agents:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if broker:
            broker.stop()


def _spawn_agent(device_id: str, profile: str, url: str, work: Path) -> subprocess.Popen:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "eclm",
        "edge",
        "run",
        "--profile",
        profile,
        "--broker",
        url,
        "--device-id",
        device_id,
        "--store",
        str(work / "devices" / device_id),
        "--eval-data",
        str(work / "model" / "test.npz"),
    ]
    with open(work / "logs" / f"{device_id}.log", "ab") as logfile:
        return subprocess.Popen(
            cmd,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

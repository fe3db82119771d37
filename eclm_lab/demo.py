"""``eclm demo``: broker, cloud and edge devices on this machine, end to end.

By default a short adaptation scenario (see :mod:`eclm_lab.experiment`): a few real
edge agents adapt on shifting streams while the cloud (``eclm cloud serve``, started as
its own process) aggregates, next to the baselines; it prints the table and where the
report, the plot and the cloud's config, log and database went. ``--delivery-only`` instead
starts ``eclm edge run`` processes and shows signed delivery of their sub-models.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
from pathlib import Path

from eclm_common.exit_codes import ExitCode
from eclm_common.lifeline import popen
from eclm_common.runlog import routed_to
from edge_runtime.cli import run_command

log = logging.getLogger(__name__)
DEFAULT_DEVICES = "pi5-01=rpi5,zero-01=rpi-zero-2w"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the fleet demo: edge devices adapting on shifting data, against baselines",
    )
    parser.add_argument("--devices", type=int, default=4, help="edge agents (default: 4)")
    parser.add_argument("--steps", type=int, default=50, help="stream steps (default: 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # absent: eclm -v decides
        help="show the libraries' output and debug logs here (else: demo.log in the outputs)",
    )
    parser.add_argument(
        "--domains", default="noise,rotate,contrast", help="shifts (default: %(default)s)"
    )
    parser.add_argument(
        "--tune", action="store_true", help="tune every method on another seed first (slower)"
    )
    parser.add_argument(
        "--delivery-only",
        action="store_true",
        help="instead: start `eclm edge run` processes and show signed delivery",
    )
    parser.add_argument(
        "--fleet",
        default=DEFAULT_DEVICES,
        help="with --delivery-only: comma list of id=profile (default: %(default)s)",
    )
    parser.add_argument("--broker", help="use this broker URL instead of starting one")
    parser.add_argument("--broker-kind", choices=("auto", "mosquitto", "amqtt"), default="auto")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where models, artifacts and stores go (default: a new temporary directory)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="a model dir (eclm cloud train|decompose) to run instead of training one; its "
        "test.npz gives the streams and the devices' evaluation data",
    )
    parser.add_argument("--data", help="without --model: the data to train on (default: digits)")
    parser.add_argument(
        "--preset", default="digits", help="without --model: the network (default: digits)"
    )
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument(
        "--delivery",
        choices=("modular", "fused"),
        default="modular",
        help="with --delivery-only: per-module programs the device swaps between as its "
        "resources change, or one fused program (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="with --delivery-only: seconds to wait"
    )
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo with what the libraries print (warnings, native start-up lines) in
    ``demo.log`` in the outputs, unless ``-v``."""
    work = args.workdir or Path(tempfile.mkdtemp(prefix="eclm-demo-"))
    logfile = work / "demo.log"
    with routed_to(logfile, verbose=getattr(args, "verbose", False)):
        code = run_delivery(args, work) if args.delivery_only else run_adaptation(args, work)
    if not getattr(args, "verbose", False):
        print(f"log:     {logfile}")
    return code


def run_adaptation(args: argparse.Namespace, work: Path) -> int:
    from dataclasses import replace

    # One torch thread per process (this one, the cloud service and its export worker share
    # the cores): spinning thread pools made the benchmark's steps 30x slower on a busy machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from eclm_lab.experiment import Settings, run_with_broker
    from eclm_lab.report import table
    from eclm_lab.scenario import ScenarioSpec

    spec = ScenarioSpec(
        devices=args.devices,
        steps=args.steps,
        seed=args.seed,
        domains=tuple(args.domains.split(",")),
    )
    for name in ("edge_runtime", "cloud_trainer.federation.aggregation"):
        logging.getLogger(name).setLevel(logging.WARNING)  # per-message lines: see the report
    report, (json_path, png_path) = run_with_broker(
        replace(Settings(spec=spec), tune=args.tune),
        work,
        model_dir=args.model,
        data=args.data,
        preset=args.preset,
        url=args.broker,
        broker_kind=args.broker_kind,
        epochs=args.epochs,
    )
    print(f"\n{table(report['methods'])}\n")
    print(
        f"{report['uploads']} adapter uploads, {report['warm_starts']} warm starts from the "
        f"cloud, {sum(report['rejected_updates'].values())} updates refused; "
        f"{report['seconds']:.0f} s"
    )
    cloud = report["cloud"]
    print(f"cloud:  {cloud['config']} (log {cloud['log']}, state {cloud['database']})")
    print(f"report: {json_path}\nplot:   {png_path}\noutputs: {work}")
    return ExitCode.OK


def run_delivery(args: argparse.Namespace, work: Path) -> int:
    from broker.launcher import Broker
    from cloud_trainer.fleet.coordinator import FleetCoordinator
    from cloud_trainer.fleet.deploy import deploy_fleet, parse_devices, print_fleet, wait_for_fleet
    from cloud_trainer.fleet.keys import PRIVATE_NAME, init_keys, load_signing_key
    from cloud_trainer.model.checkpoint import train_model
    from device_profiles import load_profile
    from eclm_wire.mqtt import BrokerAddress
    from edge_runtime.artifacts import ArtifactStore

    devices = parse_devices(args.fleet.split(","))
    for _, profile in devices:
        load_profile(profile)  # a bad name stops here, before anything starts
    broker = None if args.broker else Broker(kind=args.broker_kind, data_dir=work / "broker")
    agents: list[subprocess.Popen] = []
    try:
        url = args.broker or broker.start().url
        print(f"[1/4] broker: {broker.kind if broker else 'external'} on {url}", flush=True)
        model_dir = args.model or work / "model"
        if args.model:
            print(f"[2/4] cloud model: {model_dir}", flush=True)
        else:
            trained = train_model(
                model_dir,
                epochs=args.epochs,
                progress=True,
                preset_name=args.preset,
                data=args.data,
            )
            print(
                f"[2/4] cloud trained the modular model in {trained.seconds:.1f}s "
                f"(held-out accuracy {trained.accuracy:.4f})",
                flush=True,
            )
        store = work / "artifacts"
        keys = work / "keys"
        if not (keys / PRIVATE_NAME).exists():
            init_keys(keys)
        key = load_signing_key(keys / PRIVATE_NAME)
        address = BrokerAddress.parse(url)
        with FleetCoordinator(address, ArtifactStore(store), signing_key=key) as fc:
            agents = [_spawn_agent(d, p, url, work, model_dir) for d, p in devices]
            print("[3/4] sub-models selected per device budget and exported:", flush=True)
            serials = deploy_fleet(
                fc, model_dir, store, devices, modular=args.delivery == "modular"
            )
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


def _spawn_agent(
    device_id: str, profile: str, url: str, work: Path, model_dir: Path
) -> subprocess.Popen:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    cmd = run_command(
        profile,
        url,
        device_id,
        work / "devices" / device_id,
        eval_data=model_dir / "test.npz",
        trust_key=work / "keys" / "signing.pub",
    )
    with open(work / "logs" / f"{device_id}.log", "ab") as logfile:
        return popen(
            cmd,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

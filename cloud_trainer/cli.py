"""``eclm cloud train|export|deploy``. Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edge_runtime.exit_codes import ExitCode

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("cloud", help="train, export and deploy from the cloud side")
    cmds = parser.add_subparsers(dest="cloud_cmd", required=True)

    train = cmds.add_parser("train", help="train the model on scikit-learn's digits")
    train.add_argument(
        "--out",
        type=Path,
        default=Path("runs/model"),
        help="where model.pt, metrics.json and test.npz go (default: %(default)s)",
    )
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=_train)

    export = cmds.add_parser("export", help="export the model as .pte and .tflite programs")
    export.add_argument("--model", type=Path, default=Path("runs/model"))
    export.add_argument(
        "--out",
        type=Path,
        default=Path("runs/artifacts"),
        help="content-addressed artifact store (default: %(default)s)",
    )
    export.add_argument("--formats", default="pte,tflite", help="comma list of pte, tflite")
    export.set_defaults(func=_export)

    deploy = cmds.add_parser("deploy", help="set devices' desired state and serve their fetches")
    deploy.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    deploy.add_argument("--artifacts", type=Path, default=Path("runs/artifacts"))
    deploy.add_argument(
        "--device",
        action="append",
        required=True,
        dest="devices",
        help="a device id; repeat for several",
    )
    deploy.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for every device to be active"
    )
    deploy.set_defaults(func=_deploy)


def _train(args: argparse.Namespace) -> int:
    from cloud_trainer.pipeline import train_model

    result = train_model(args.out, epochs=args.epochs, seed=args.seed, progress=True)
    print(f"trained in {result.seconds:.1f}s: held-out accuracy {result.accuracy:.4f}")
    print(f"wrote {args.out}/model.pt, metrics.json, test.npz")
    return ExitCode.OK


def _export(args: argparse.Namespace) -> int:
    from cloud_trainer.pipeline import FORMATS, export_model

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    unknown = set(formats) - set(FORMATS)
    if unknown:
        print(f"unknown formats {sorted(unknown)}; known: {', '.join(FORMATS)}")
        return ExitCode.USAGE
    refs = export_model(args.model, args.out, formats=formats)
    for ref in refs:
        print(f"{ref.name:<20} {ref.size:>9} bytes  {args.out}/objects/{ref.sha256}")
    print(f"index: {args.out}/index.json")
    return ExitCode.OK


def _deploy(args: argparse.Namespace) -> int:
    from cloud_trainer.coordinator import FleetCoordinator
    from cloud_trainer.pipeline import load_index
    from edge_runtime.artifacts import ArtifactStore
    from edge_runtime.mqtt import BrokerAddress

    refs = load_index(args.artifacts)
    with FleetCoordinator(BrokerAddress.parse(args.broker), ArtifactStore(args.artifacts)) as fc:
        serials = {d: fc.assign(d, refs).serial for d in args.devices}
        print(f"desired state set for {len(serials)} devices; waiting up to {args.timeout:.0f}s")
        ok = wait_for_fleet(fc, serials, args.timeout)
        print_fleet(fc, args.devices)
    return ExitCode.OK if ok else ExitCode.TIMEOUT


def wait_for_fleet(fc, serials: dict[str, int], timeout: float) -> bool:
    """Wait until every device is active or failed on its serial; True if all are active."""

    def phase(c, device_id: str) -> str | None:
        report = c.reported.get(device_id)
        return report.phase if report and report.serial == serials[device_id] else None

    fc.wait_until(lambda c: all(phase(c, d) in ("active", "failed") for d in serials), timeout)
    return all(phase(fc, d) == "active" for d in serials)


def print_fleet(fc, devices: list[str]) -> None:
    """One line per device: profile, backend, phase, accuracy."""
    print(f"{'device':<14} {'profile':<18} {'backend':<11} {'phase':<12} accuracy")
    for device_id in devices:
        r = fc.reported.get(device_id)
        if r is None:
            print(f"{device_id:<14} (no report)")
            continue
        acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}%"
        print(f"{device_id:<14} {r.profile:<18} {r.backend or '-':<11} {r.phase:<12} {acc}")

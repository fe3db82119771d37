"""``eclm cloud train|export|select|deploy``. Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cloud_trainer import data_cli, model_cli
from cloud_trainer.errors import FleetError, RolloutAborted
from cloud_trainer.fleet.deploy import (
    deploy_fleet,
    parse_devices,
    plan_fleet,
    print_fleet,
    reporting,
    wait_for_fleet,
)
from eclm_common.errors import UsageError
from eclm_common.exit_codes import ExitCode

log = logging.getLogger(__name__)
MODEL = model_cli.MODEL
ARTIFACTS = model_cli.ARTIFACTS
KEYS = Path("runs/keys")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("cloud", help="train, export, select and deploy from the cloud")
    cmds = parser.add_subparsers(dest="cloud_cmd", required=True)
    model_cli.add_parser(cmds)
    data_cli.add_parser(cmds)
    _fleet_commands(cmds)
    _service_commands(cmds)


def _fleet_commands(cmds: argparse._SubParsersAction) -> None:
    """deploy, rollout start|status|abort: sub-models onto devices from outside the service."""
    deploy = cmds.add_parser("deploy", help="select, export and deliver sub-models to devices")
    _broker_args(deploy)
    _fleet_args(deploy)
    deploy.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for every device to be active"
    )
    deploy.set_defaults(func=_deploy)

    rollout = cmds.add_parser("rollout", help="staged rollouts: canary, waves, abort on failures")
    rollout_cmds = rollout.add_subparsers(dest="rollout_cmd", required=True)
    start = rollout_cmds.add_parser("start", help="roll a new sub-model out wave by wave")
    start.add_argument("rollout_id", help="a name for this rollout (letters, digits, _ . -)")
    _broker_args(start)
    _fleet_args(start, by_report=True)
    start.add_argument("--canary", type=int, default=1, help="devices in the first wave")
    start.add_argument(
        "--waves",
        default="0.25,0.5,1",
        help="cumulative share of the devices after each wave (default: %(default)s)",
    )
    start.add_argument("--max-failure-rate", type=float, default=0.2)
    start.add_argument(
        "--min-reports", type=int, default=2, help="devices that must answer before aborting"
    )
    start.add_argument("--wave-timeout", type=float, default=120.0, help="seconds per wave")
    start.set_defaults(func=_rollout_start)
    for name, func, text in (
        ("status", _rollout_status, "print a rollout's state (retained on rollouts/ID)"),
        ("abort", _rollout_abort, "ask the cloud running a rollout to abort it"),
    ):
        cmd = rollout_cmds.add_parser(name, help=text)
        cmd.add_argument("rollout_id")
        _broker_args(cmd)
        cmd.set_defaults(func=func)


def _service_commands(cmds: argparse._SubParsersAction) -> None:
    """serve, keys init: the long-running cloud and the key it signs with."""
    serve = cmds.add_parser(
        "serve",
        help="run the cloud as a service: fleet state in a database, aggregation rounds, "
        "integration rollouts, /metrics and /healthz",
    )
    serve.add_argument("--config", type=Path, help="TOML config (default: the built-in defaults)")
    serve.add_argument(
        "--print-config", action="store_true", help="print the default config and exit"
    )
    serve.add_argument("--strategy", help="aggregation.strategy, e.g. krum or multi-krum")
    serve.set_defaults(func=_serve)

    keys = cmds.add_parser("keys", help="the ed25519 key pair that signs desired states")
    keys_cmds = keys.add_subparsers(dest="keys_cmd", required=True)
    init = keys_cmds.add_parser(
        "init", help="create signing.key (0600, stays here) and signing.pub (for devices)"
    )
    init.add_argument("--dir", type=Path, default=KEYS, help="where (default: %(default)s)")
    init.add_argument("--force", action="store_true", help="replace an existing key pair")
    init.set_defaults(func=_keys_init)
    token = keys_cmds.add_parser(
        "content-token",
        help="a device's bearer token for the content server (give it to the board as "
        "$ECLM_CONTENT_TOKEN)",
    )
    token.add_argument("device_id")
    token.add_argument(
        "--secret", type=Path, default=KEYS / "content.secret", help="(default: %(default)s)"
    )
    token.set_defaults(func=_content_token)


def _broker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        default="mqtt://127.0.0.1:1883",
        help="mqtt[s]://[user[:password]@]host:port; a password left out comes from "
        "$ECLM_BROKER_PASSWORD (default: %(default)s)",
    )
    parser.add_argument("--cafile", help="CA certificate for mqtts://")


def _fleet_args(parser: argparse.ArgumentParser, *, by_report: bool = False) -> None:
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS)
    parser.add_argument(
        "--device",
        action="append",
        dest="devices",
        metavar="ID=PROFILE",
        required=not by_report,
        help="a device and its profile; repeat for several",
    )
    if by_report:
        parser.add_argument(
            "--profile",
            action="append",
            dest="profiles",
            metavar="NAME",
            help="every online device that reported this profile; repeat for several",
        )
        parser.add_argument(
            "--label",
            action="append",
            dest="labels",
            metavar="KEY=VALUE",
            help="only online devices that carry this label (eclm edge run --label); "
            "repeat to require several",
        )
    parser.add_argument(
        "--delivery",
        choices=("modular", "fused"),
        default="modular",
        help="per-module programs and module sets, or one fused program",
    )
    parser.add_argument(
        "--signing-key",
        type=Path,
        default=KEYS / "signing.key",
        help="sign desired states with this key (default: %(default)s)",
    )
    parser.add_argument(
        "--unsigned", action="store_true", help="send unsigned states (development boards only)"
    )


def _coordinator(args: argparse.Namespace):
    """A FleetCoordinator for the command's broker, signing unless ``--unsigned``."""
    from cloud_trainer.fleet.coordinator import FleetCoordinator
    from cloud_trainer.fleet.keys import load_signing_key
    from eclm_wire.mqtt import BrokerAddress
    from edge_runtime.artifacts import ArtifactStore

    address = BrokerAddress.parse(args.broker, cafile=args.cafile)
    key = None if args.unsigned else load_signing_key(args.signing_key)
    return FleetCoordinator(address, ArtifactStore(args.artifacts), signing_key=key)


def _client(args: argparse.Namespace):
    """A plain connected MQTT client for a one-off look or request."""
    import os

    from eclm_wire.mqtt import BrokerAddress, connect, make_client

    address = BrokerAddress.parse(args.broker, cafile=args.cafile)
    client = make_client(f"eclm-cli-{os.getpid()}", address)
    connect(client, address)
    client.loop_start()
    return client


def _rollout_start(args: argparse.Namespace) -> int:
    from cloud_trainer.fleet.rollout import Rollout, RolloutPlan
    from eclm_wire import RolloutStatus

    if bool(args.devices) == bool(args.profiles or args.labels):
        raise UsageError("name devices with --device ID=PROFILE, or pick them by --profile/--label")
    plan = RolloutPlan(
        canary=args.canary,
        waves=tuple(float(w) for w in args.waves.split(",")),
        max_failure_rate=args.max_failure_rate,
        min_reports=args.min_reports,
        wave_timeout=args.wave_timeout,
    )
    with _coordinator(args) as fc:
        if args.devices:
            devices = parse_devices(args.devices)
        else:
            devices = reporting(fc, args.profiles, args.labels)
        if not devices:
            raise UsageError(
                f"no online device reported profile {args.profiles or 'any'} "
                f"with labels {args.labels or 'any'}"
            )
        targets = plan_fleet(
            args.model, args.artifacts, devices, modular=args.delivery == "modular"
        )
        final = Rollout(fc, args.rollout_id, targets, plan).run(
            lambda line: print(line, flush=True)
        )
        print_fleet(fc, [d for d, _ in devices])
    if final.state != RolloutStatus.SUCCEEDED:
        raise RolloutAborted(f"rollout {final.rollout_id}: {final.state}: {final.reason}")
    print(f"rollout {final.rollout_id}: {final.state}")
    return ExitCode.OK


def _rollout_status(args: argparse.Namespace) -> int:
    import json
    import threading

    import eclm_wire as wire

    topic = wire.rollout_topic(args.rollout_id)
    got: list[bytes] = []
    arrived = threading.Event()
    client = _client(args)
    client.on_message = lambda c, u, m: (got.append(m.payload), arrived.set())
    client.subscribe(topic, qos=1)
    arrived.wait(3)  # a retained state arrives at once
    client.loop_stop()
    client.disconnect()
    if not got:
        print(f"no rollout {args.rollout_id} on this broker")
        return ExitCode.CONFIG
    state = wire.decode(wire.RolloutState, got[0])
    print(json.dumps(json.loads(state.encode()), indent=2))
    return ExitCode.OK


def _rollout_abort(args: argparse.Namespace) -> int:
    import eclm_wire as wire

    client = _client(args)
    client.publish(wire.rollout_abort_topic(args.rollout_id), b"{}", qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()
    print(
        f"asked the cloud to abort rollout {args.rollout_id}; "
        "it stops and returns the devices it reached"
    )
    return ExitCode.OK


def _deploy(args: argparse.Namespace) -> int:
    devices = parse_devices(args.devices)
    with _coordinator(args) as fc:
        serials = deploy_fleet(
            fc, args.model, args.artifacts, devices, modular=args.delivery == "modular"
        )
        print(f"desired state set for {len(serials)} devices; waiting up to {args.timeout:.0f}s")
        ok = wait_for_fleet(fc, serials, args.timeout)
        print_fleet(fc, [d for d, _ in devices])
    if not ok:
        raise FleetError(f"not every device was active within {args.timeout:.0f}s (see above)")
    return ExitCode.OK


def _serve(args: argparse.Namespace) -> int:
    import signal
    from dataclasses import replace

    from cloud_trainer.service.config import ServiceConfig, example, load_config
    from cloud_trainer.service.jsonlog import use_json_logs
    from cloud_trainer.service.worker import Service

    if args.print_config:
        print(example(), end="")
        return ExitCode.OK
    config = load_config(args.config) if args.config else ServiceConfig()
    if args.strategy:  # ConfigError (exit 2) names an unknown one
        config = replace(config, aggregation=replace(config.aggregation, strategy=args.strategy))
    if config.log_format == "json":
        use_json_logs(config.worker)
    service = Service(config)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    try:
        service.run(ready=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        service.stop()
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def _keys_init(args: argparse.Namespace) -> int:
    from cloud_trainer.fleet.keys import init_keys

    private, public = init_keys(args.dir, force=args.force)
    print(f"signing key: {private} (mode 600; keep it on the cloud)")
    print(f"public key:  {public} (provision onto devices: eclm edge run --trust-key)")
    return ExitCode.OK


def _content_token(args: argparse.Namespace) -> int:
    from cloud_trainer.fleet.content import device_token, load_secret
    from eclm_wire import check_device_id

    print(device_token(load_secret(args.secret), check_device_id(args.device_id)))
    return ExitCode.OK

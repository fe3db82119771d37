"""``eclm edge run|status``: the agent in the foreground and what it has installed."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

from eclm_common.exit_codes import ExitCode


def add_parser(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``eclm edge``; return its subcommands, for commands that live elsewhere."""
    parser = sub.add_parser("edge", help="run the edge agent on a board")
    cmds = parser.add_subparsers(dest="edge_cmd", required=True)
    run = cmds.add_parser("run", help="connect to the broker and serve the desired sub-model")
    run.add_argument("--profile", required=True, help="board profile name or .toml path")
    run.add_argument(
        "--broker",
        default="mqtt://127.0.0.1:1883",
        help="mqtt[s]://[user[:password]@]host:port; a password left out comes from "
        "$ECLM_BROKER_PASSWORD (default: %(default)s)",
    )
    run.add_argument("--device-id", required=True, help="this device's id (its MQTT identity)")
    run.add_argument("--cafile", help="CA certificate for mqtts://")
    run.add_argument(
        "--content-cafile",
        help="CA certificate of the content server a desired state may name (default: "
        "--cafile, else the system's)",
    )
    run.add_argument(
        "--broadcast-wait",
        type=float,
        default=5.0,
        help="seconds of silence before a broadcast counts as over and the device fetches "
        "what it lacks on its own topic (0: never listen; default: %(default)s)",
    )
    run.add_argument(
        "--store",
        type=Path,
        help="the agent's own artifact store; it deletes what it no longer needs "
        "(default: .eclm/<device-id>)",
    )
    run.add_argument(
        "--eval-data",
        type=Path,
        help="samples to report accuracy on: .npz with x (N, C, H, W) and y, a CIFAR batch "
        "folder (its test batch) or an image folder (needs Pillow)",
    )
    run.add_argument(
        "--trust-key",
        type=Path,
        help="the cloud's public key (signing.pub); required unless --insecure",
    )
    run.add_argument(
        "--insecure",
        action="store_true",
        help="run without a trust key, accepting unsigned desired states (development "
        "only: warned at every start and shown in the reported state)",
    )
    run.add_argument(
        "--label",
        action="append",
        default=[],
        dest="labels",
        metavar="KEY=VALUE",
        help="a label rollouts can pick this device by (site=lab, ring=beta); repeatable",
    )
    run.add_argument(
        "--backend",
        choices=("executorch", "litert"),
        help="force a backend instead of the profile's order",
    )
    _add_offload_options(run)
    _add_emulation_options(run)
    _add_privacy_options(run)
    run.set_defaults(func=_run)
    status = cmds.add_parser("status", help="what the agent last reported from its store")
    status.add_argument("--device-id", required=True)
    status.add_argument("--store", type=Path, help="artifact store (default: .eclm/<device-id>)")
    status.set_defaults(func=_status)
    return cmds


def _add_privacy_options(run: argparse.ArgumentParser) -> None:
    """Differential privacy for what the device uploads."""
    run.add_argument(
        "--dp-clip",
        type=float,
        default=0.0,
        help="differential privacy: clip each uploaded adapter's change to this L2 norm "
        "(with --dp-noise; 0: off)",
    )
    run.add_argument(
        "--dp-noise",
        type=float,
        default=0.0,
        help="differential privacy: Gaussian noise std as a multiple of --dp-clip; the "
        "epsilon spent travels with each upload",
    )


def _add_emulation_options(run: argparse.ArgumentParser) -> None:
    """What a board whose LiteRT misbehaves, or an emulated one, needs."""
    run.add_argument(
        "--litert-delegates",
        choices=("default", "none"),
        default="default",
        help="LiteRT's default delegates (XNNPACK): 'default' uses them once a child "
        "process has checked them on the programs, falling back to 'none' when they crash "
        "or disagree; 'none' runs LiteRT's builtin kernels only (default: %(default)s)",
    )
    run.add_argument(
        "--latency-slack",
        type=float,
        default=1.0,
        metavar="X",
        help="hold the health check to X times the profile's latency budget (an emulated "
        "board, as scripts/arm64-check.sh runs, is far slower than the silicon; default: 1)",
    )


def run_command(
    profile: str,
    broker: str,
    device_id: str,
    store: Path,
    *,
    eval_data: Path | None = None,
    trust_key: Path | None = None,
    backend: str | None = None,
    insecure: bool = False,
) -> list[str]:
    """The argv that starts ``eclm edge run`` with this interpreter (for launchers)."""
    import sys

    cmd = [sys.executable, "-m", "eclm", "edge", "run", "--profile", profile, "--broker", broker]
    cmd += ["--device-id", device_id, "--store", str(store)]
    for flag, value in (
        ("--eval-data", eval_data),
        ("--trust-key", trust_key),
        ("--backend", backend),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + (["--insecure"] if insecure else [])


def _add_offload_options(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--offload",
        choices=("never", "always", "gated"),
        default="never",
        help="let the cloud's full model answer: never, always, or the samples the device "
        "is unsure of (top-2 margin under --offload-threshold; default: %(default)s)",
    )
    run.add_argument("--offload-threshold", type=float, default=0.2, help="(default: 0.2)")
    run.add_argument(
        "--offload-deadline-ms",
        type=float,
        default=0.0,
        help="wait at most this for the cloud, then answer locally (0: the profile's budget)",
    )


def _run(args: argparse.Namespace) -> int:
    from device_profiles import load_profile
    from eclm_wire.mqtt import BrokerAddress
    from edge_runtime.agent import AgentConfig, EdgeAgent
    from edge_runtime.content import ContentAccess
    from edge_runtime.errors import ConfigError
    from edge_runtime.learning import LearnerConfig
    from edge_runtime.offload import OffloadConfig

    if not args.latency_slack >= 1.0:
        raise ConfigError(f"--latency-slack: at least 1, got {args.latency_slack}")
    profile = load_profile(args.profile)
    budget = replace(profile.budget, latency_ms=profile.budget.latency_ms * args.latency_slack)
    config = AgentConfig(
        device_id=args.device_id,
        profile=replace(profile, budget=budget),
        broker=BrokerAddress.parse(args.broker, cafile=args.cafile),
        store_dir=args.store or Path(".eclm") / args.device_id,
        eval_data=args.eval_data,
        backend=args.backend,
        trust_key=args.trust_key,
        insecure=args.insecure,
        labels=tuple(args.labels),
        learning=LearnerConfig(dp_clip=args.dp_clip, dp_noise=args.dp_noise),
        litert_delegates=args.litert_delegates,
        broadcast_wait=args.broadcast_wait,
        offload=OffloadConfig(
            policy=args.offload,
            threshold=args.offload_threshold,
            deadline_ms=args.offload_deadline_ms,
        ),
        # the token is a secret: from the environment, never the command line
        content=ContentAccess(
            token=os.environ.get("ECLM_CONTENT_TOKEN", ""),
            cafile=Path(cafile) if (cafile := args.content_cafile or args.cafile) else None,
        ),
    )
    agent = EdgeAgent(config)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    print(
        f"{config.device_id} ({config.profile.title}) connecting to {config.broker}; "
        f"store {config.store_dir}",
        flush=True,
    )
    try:
        agent.run()
    except KeyboardInterrupt:
        agent.stop()
        return ExitCode.INTERRUPTED
    logging.getLogger(__name__).info("%s stopped", config.device_id)
    return ExitCode.OK


def _status(args: argparse.Namespace) -> int:
    store = args.store or Path(".eclm") / args.device_id
    path = store / "reported.json"
    if not path.exists():
        print(f"no state in {store}: the agent has not run there yet")
        return ExitCode.CONFIG
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # a power cut may leave it empty (not synced)
        print(
            f"the saved state in {path} is unreadable ({exc}); it is rewritten at the next report"
        )
        return ExitCode.CONFIG
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["ts"]))
    print(f"device    {report['device_id']} ({report['profile']})")
    print(f"phase     {report['phase']} at {when}: {report['detail']}")
    print(f"serial    {report['serial']}")
    print(f"backend   {report['backend'] or '-'} (profile order: {', '.join(report['backends'])})")
    print(f"active    {', '.join(s[:12] for s in report['active']) or '-'}")
    acc = report.get("accuracy")
    print(f"accuracy  {'-' if acc is None else f'{acc:.4f}'}")
    objects = sorted((store / "objects").glob("*"))
    print(f"store     {len(objects)} artifacts, {sum(p.stat().st_size for p in objects)} bytes")
    _print_resources()
    return ExitCode.OK


def _print_resources() -> None:
    from edge_runtime.monitor import PsutilSource

    r = PsutilSource().read()
    battery = (
        "none"
        if r.battery_percent is None
        else (f"{r.battery_percent:.0f}% ({'charging' if r.on_power else 'on battery'})")
    )
    temp = "n/a" if r.temperature_c is None else f"{r.temperature_c:.1f} C"
    print(
        f"now       {r.available_mb:.0f} MB available, CPU {r.cpu_percent:.0f}%, "
        f"battery {battery}, temperature {temp}"
    )

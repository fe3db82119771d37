"""``eclm broker run|config``."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("broker", help="run or configure the MQTT broker")
    cmds = parser.add_subparsers(dest="broker_cmd", required=True)
    run = cmds.add_parser("run", help="run Mosquitto (or the embedded amqtt) in the foreground")
    _common(run)
    run.add_argument(
        "--kind",
        choices=("auto", "mosquitto", "amqtt"),
        default="auto",
        help="auto uses Mosquitto when installed (default: %(default)s)",
    )
    run.set_defaults(func=_run)
    config = cmds.add_parser("config", help="print the generated mosquitto.conf and ACL")
    _common(config)
    config.set_defaults(func=_config)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    parser.add_argument("--port", type=int, default=1883, help="0 picks a free port")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".eclm/broker"),
        help="config, persistence and log (default: %(default)s)",
    )
    parser.add_argument(
        "--max-packet-size",
        type=int,
        default=256 * 1024,
        help="largest MQTT packet in bytes (default: %(default)s)",
    )


def _run(args: argparse.Namespace) -> int:
    from broker.launcher import Broker

    broker = Broker(
        kind=args.kind,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        max_packet_size=args.max_packet_size,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with broker:
        print(
            f"{broker.kind} broker on {broker.url}; config and log in {broker.data_dir}; "
            "Ctrl-C stops it",
            flush=True,
        )
        try:
            while not done.wait(0.5):
                if broker.proc and broker.proc.poll() is not None:
                    print(
                        f"broker exited with code {broker.proc.returncode}; log: {broker.log_path}"
                    )
                    return 1
        except KeyboardInterrupt:
            pass
    print("broker stopped")
    return 0


def _config(args: argparse.Namespace) -> int:
    from broker.config import BrokerConfig, render_acl, render_mosquitto_conf

    config = BrokerConfig(
        port=args.port, host=args.host, data_dir=args.data_dir, max_packet_size=args.max_packet_size
    )
    print(render_mosquitto_conf(config))
    print("# --- acl (used when a password file is configured) ---")
    print(render_acl(config))
    return 0

"""``eclm broker run|config``."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from broker.access import Access

ACCESS = Path(".eclm/access")


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

    access = cmds.add_parser("access", help="TLS certificates and per-device credentials")
    access_cmds = access.add_subparsers(dest="access_cmd", required=True)
    init = access_cmds.add_parser("init", help="create a CA, a server certificate, the cloud user")
    init.add_argument("--dir", type=Path, default=ACCESS, help="where (default: %(default)s)")
    init.add_argument(
        "--hostname",
        action="append",
        dest="hosts",
        help="a name or IP devices reach the broker by; repeat (default: 127.0.0.1, localhost)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing setup")
    init.set_defaults(func=_access_init)
    add = access_cmds.add_parser("add", help="give a device (or user) a new password")
    add.add_argument("user", help="the device id (its MQTT username)")
    add.add_argument("--dir", type=Path, default=ACCESS, help="(default: %(default)s)")
    add.set_defaults(func=_access_add)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--access",
        type=Path,
        help="an access directory (eclm broker access init): TLS only, passwords, device ACLs",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    parser.add_argument("--port", type=int, default=1883, help="0 picks a free port")
    parser.add_argument(
        "--cloud-port",
        type=int,
        help="with --access: the cloud's own listener (default: --port + 1; 0: a free one)",
    )
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


def _settings(args: argparse.Namespace) -> dict:
    """What `run` and `config` share: listener, limits and, with --access, TLS and logins."""
    access = Access(args.access).check() if args.access else None
    return {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "max_packet_size": args.max_packet_size,
        "password_file": access.password_file if access else None,
        "tls": access.tls if access else None,
        "cloud_port": args.cloud_port if access else None,
    }


def _run(args: argparse.Namespace) -> int:
    from broker.launcher import Broker

    broker = Broker(kind=args.kind, **_settings(args))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with broker:
        cloud = f", the cloud's listener on {broker.cloud_url}" if args.access else ""
        print(
            f"{broker.kind} broker on {broker.url}{cloud}; config and log in "
            f"{broker.data_dir}; Ctrl-C stops it",
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

    config = BrokerConfig(**_settings(args))
    print(render_mosquitto_conf(config))
    print("# --- acl (used when a password file is configured) ---")
    print(render_acl(config))
    return 0


def _access_init(args: argparse.Namespace) -> int:
    access = Access(args.dir).init(tuple(args.hosts or ("127.0.0.1", "localhost")), args.force)
    print(f"CA for devices: {access.tls.cafile} (its key {access.dir / 'ca.key'}: keep it safe)")
    print(f"server certificate: {access.tls.certfile}")
    print(f"cloud credentials: {access.dir / 'credentials' / 'cloud.json'}")
    print(f"next: eclm broker access add DEVICE_ID; eclm broker run --access {access.dir}")
    return 0


def _access_add(args: argparse.Namespace) -> int:
    access = Access(args.dir).check()
    access.add_user(args.user)  # the password goes to the owner-only file, never to stdout
    print(f"{args.user}: new password in {access.credentials_file(args.user)} (owner-only)")
    print(
        f"on the board: ECLM_BROKER_PASSWORD=<that password> eclm edge run --device-id "
        f"{args.user} --broker mqtts://{args.user}@BROKER:PORT --cafile ca.pem ..."
    )
    print("(a running broker reads new passwords on SIGHUP or restart)")
    return 0

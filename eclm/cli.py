"""``eclm``: dispatch to the broker, profiles, edge, cloud and demo commands.

Each role's CLI module imports only argparse at load time, so ``eclm edge`` works on a
board that has no torch; the handlers import what they need.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from broker import cli as broker_cli
from cloud_trainer import cli as cloud_cli
from device_profiles import cli as profiles_cli
from eclm import bundle
from eclm.exits import exit_code_for
from eclm_common.exit_codes import ExitCode, epilog
from eclm_common.lifeline import watch_from_env
from eclm_lab import demo
from edge_runtime import cli as edge_cli

# Commands that run the cloud side (torch, executorch, litert-torch): Python >= 3.11 only;
# the edge side runs on 3.10-3.13 (pyproject.toml).
CLOUD_COMMANDS = ("cloud", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eclm",
        description="Modular edge-cloud learning: cloud trainer, edge runtime, "
        "MQTT fleet delivery.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    broker_cli.add_parser(sub)
    profiles_cli.add_parser(sub)
    bundle.add_parser(edge_cli.add_parser(sub))  # eclm edge bundle: operator-side
    cloud_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``eclm`` command; its exit code. A reader that goes away (``| head``) ends
    the command quietly."""
    watch_from_env()  # started by one of our harnesses: end with it
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback
    except BrokenPipeError:
        # Python would try to flush stdout again at exit: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # Our packages log at INFO; libraries (the LiteRT converter is chatty) at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("eclm", "edge_runtime", "cloud_trainer", "broker", "device_profiles", "eclm_wire"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.command in CLOUD_COMMANDS and sys.version_info < (3, 11):
        print(
            f"eclm {args.command}: the cloud side needs Python >= 3.11 (this is "
            f"{sys.version.split()[0]}); here the edge, broker and profiles commands work",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    try:
        return int(args.func(args))
    except BrokenPipeError:
        raise  # the reader went away: main() ends quietly
    except (Exception, KeyboardInterrupt) as exc:
        return _failed(exc, verbose=args.verbose)


def _failed(exc: BaseException, *, verbose: bool) -> int:
    """Say why a command failed, in one line, and return its exit code (see
    :mod:`eclm.exits`); an unexpected error is a bug, with its traceback under ``-v``."""
    code = exit_code_for(exc)
    if code == ExitCode.INTERRUPTED:
        return code
    if code is None:
        if verbose:
            traceback.print_exception(exc)
        print(
            f"eclm: unexpected error, a bug: {type(exc).__name__}: {exc}"
            + ("" if verbose else " (-v shows the traceback)"),
            file=sys.stderr,
        )
        return ExitCode.ERROR
    print(f"eclm: {exc}", file=sys.stderr)
    return code

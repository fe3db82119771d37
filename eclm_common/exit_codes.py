"""Exit codes of every ``eclm`` command and service, with the help text users see."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    CONFIG = 3
    BROKER_UNREACHABLE = 4
    TIMEOUT = 5
    ABORTED = 6
    STATE = 7
    BROKER = 8
    BUILD = 9
    SERVICE = 10
    INTERRUPTED = 130


HELP: dict[ExitCode, str] = {
    ExitCode.OK: "Success.",
    ExitCode.ERROR: "An unexpected error (a bug): -v shows the traceback; please report it.",
    ExitCode.USAGE: "Wrong command-line arguments; see --help.",
    ExitCode.CONFIG: "A profile, config, key or data file, or a setting, is invalid or missing\n"
    "       (a backend that is not installed, say); the message names it.",
    ExitCode.BROKER_UNREACHABLE: "The MQTT broker could not be reached or refused the login.",
    ExitCode.TIMEOUT: "Devices did not reach the desired state in time.",
    ExitCode.ABORTED: "A rollout was aborted; the devices it reached got their previous state.",
    ExitCode.STATE: "The service's state database is locked, full, corrupt or unreachable.",
    ExitCode.BROKER: "The broker could not start (Mosquitto missing, port taken, config refused).",
    ExitCode.BUILD: "An export, a training job or a board bundle failed; the message says why.",
    ExitCode.SERVICE: "The cloud service this command started exited or never got healthy.",
    ExitCode.INTERRUPTED: "Stopped by Ctrl-C.",
}


def epilog() -> str:
    """The exit-code table for ``--help``."""
    return "exit codes:\n" + "\n".join(f"  {int(c):>3}  {HELP[c]}" for c in ExitCode)

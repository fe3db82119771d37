"""Start Mosquitto (or the embedded amqtt broker) on a free port, wait for it, stop it."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker.config import BrokerConfig, TLSFiles, write_config
from broker.errors import BrokerError, ConfigError
from eclm_common.lifeline import popen

log = logging.getLogger(__name__)
MOSQUITTO_PATHS = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    for candidate in MOSQUITTO_PATHS:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Broker:
    """A broker process on loopback, as a context manager.

    ``kind`` is ``mosquitto``, ``amqtt`` or ``auto`` (Mosquitto when installed). ``port=0``
    picks a free port. The generated config, persistence and log live in ``data_dir``.
    With a ``password_file``, the cloud's users log in on ``cloud_port`` (0: a free one;
    None: ``port + 1``) with the ``cloud-passwd`` beside it (:attr:`cloud_url`).
    """

    def __init__(
        self,
        *,
        kind: str = "auto",
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | Path | None = None,
        max_packet_size: int = 256 * 1024,
        password_file: Path | None = None,
        tls: TLSFiles | None = None,
        cloud_port: int | None = 0,
    ) -> None:
        if kind not in ("auto", "mosquitto", "amqtt"):
            raise ConfigError(f"kind: expected auto, mosquitto or amqtt, got {kind!r}")
        self.binary = find_mosquitto() if kind != "amqtt" else None
        if kind == "mosquitto" and not self.binary:
            raise BrokerError("Mosquitto is not installed (apt-get install -y mosquitto)")
        self.kind = "mosquitto" if self.binary else "amqtt"
        self._fell_back = kind == "auto" and not self.binary
        self.host = host
        self.port = port or free_port(host)
        if password_file and cloud_port == 0:
            cloud_port = free_port(host)
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="eclm-broker-"))
        self.config = BrokerConfig(
            port=self.port,
            host=host,
            data_dir=self.data_dir,
            max_packet_size=max_packet_size,
            password_file=password_file,
            tls=tls,
            cloud_port=cloud_port if password_file else None,
        )
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / f"{self.kind}.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.config.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def cloud_port(self) -> int:
        """Where the cloud logs in: its own listener with logins, else the only one."""
        return self.config.cloud_port or self.port

    @property
    def cloud_url(self) -> str:
        return f"{'mqtts' if self.config.tls else 'mqtt'}://{self.host}:{self.cloud_port}"

    def start(self, timeout: float = 10.0) -> Broker:
        """Start the broker and return once it accepts TCP connections."""
        if self.kind == "mosquitto":
            cmd = [self.binary, "-c", str(write_config(self.config))]
        else:
            if self._fell_back:
                log.warning(
                    "Mosquitto is not installed: starting the embedded amqtt broker "
                    "(MQTT 3.1.1 only, slower; apt-get install -y mosquitto for the "
                    "real one)"
                )
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "broker.embedded",
                "--host",
                self.host,
                "--port",
                str(self.port),
            ]
        with open(self.log_path, "ab") as logfile:
            self.proc = popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)
        log.info("%s listening on %s (data in %s)", self.kind, self.url, self.data_dir)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise BrokerError(
                    f"{self.kind} exited with code {self.proc.returncode}; "
                    f"log: {self.log_path}\n{self._log_tail()}"
                )
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(
            f"{self.kind} did not listen on {self.host}:{self.port} within "
            f"{timeout:.0f}s; log: {self.log_path}"
        )

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-10:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

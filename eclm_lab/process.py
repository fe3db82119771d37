"""``eclm cloud serve`` as a child process: its config written to a TOML file, its output
to a log file, ``/healthz`` and ``/metrics`` read over HTTP. What the adaptation
benchmark, the demo and the tests run the fleet against, so they measure the service
people deploy. The child ends with its starter (:mod:`eclm_common.lifeline`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cloud_trainer.errors import ServiceError
from eclm_common.lifeline import popen

__all__ = ["ServiceError", "ServiceProcess"]


class ServiceProcess:
    """A worker configured by ``sections`` ({section: TOML lines}, top-level keys under
    ""), with its state database, model, artifacts and signing key as given; config
    (``cloud.toml``) and log (``service.log``) in ``home``; HTTP on a free port."""

    def __init__(
        self,
        home: Path,
        *,
        broker_url: str,
        model_dir: Path,
        artifacts: Path,
        signing_key: Path,
        db_url: str | None = None,
        worker: str = "cloud-1",
        sections: dict[str, str] | None = None,
    ) -> None:
        from broker.launcher import free_port

        home.mkdir(parents=True, exist_ok=True)
        self.home, self.worker = home, worker
        self.db_url = db_url or f"sqlite:///{home}/state.db"
        self.port = free_port()
        self.log = home / "service.log"
        text = {
            "": f'worker = "{worker}"',
            "broker": f'url = "{broker_url}"',
            "state": f'database = "{self.db_url}"',
            "model": f'dir = "{model_dir}"\nartifacts = "{artifacts}"\n'
            f'signing_key = "{signing_key}"',
            "http": f"port = {self.port}",
        }
        for name, lines in (sections or {}).items():
            text[name] = f"{text[name]}\n{lines}" if name in text else lines
        self.config = home / "cloud.toml"
        self.config.write_text(
            text.pop("") + "\n" + "".join(f"[{k}]\n{v}\n" for k, v in text.items())
        )
        self.command = [
            sys.executable,
            "-m",
            "eclm",
            "cloud",
            "serve",
            "--config",
            str(self.config),
        ]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        """Start the worker; return once ``/healthz`` says ok (ServiceError if it exits)."""
        with open(self.log, "ab") as out:
            self.proc = popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"no healthy /healthz in {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.05)
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServiceError(f"the service exited (code {code}):\n{self.tail()}")
        try:
            return json.loads(self.get("/healthz"))["status"] == "ok"
        except OSError:
            return False

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return r.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The ``/metrics`` samples: (name, sorted labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(self.get("/metrics"))
            for sample in family.samples
        }

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self, sig=signal.SIGKILL, timeout: float = 60.0) -> int:
        if self.proc is None:
            raise ServiceError("the service was never started")
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the round or wave in flight finishes), SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        try:
            return self.kill(signal.SIGTERM, timeout)
        except subprocess.TimeoutExpired:
            return self.kill(signal.SIGKILL)

    def describe(self) -> dict:
        """What a report names the cloud by."""
        return {
            "command": self.command,
            "config": str(self.config),
            "worker": self.worker,
            "database": self.db_url,
            "log": str(self.log),
            "pid": self.proc.pid if self.proc else None,
        }

"""``eclm cloud serve`` in its own process for tests, started and killed as systemd would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from broker.launcher import free_port
from cloud_trainer.fleet.keys import init_keys
from cloud_trainer.service.database import Database
from cloud_trainer.service.state import CloudState
from eclm_common.lifeline import popen


def wait(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


class Cloud:
    """A service worker with a config in ``home``; ``sections`` add lines to a section."""

    def __init__(
        self, home: Path, modular, broker_url: str, *, worker="cloud-1", db_url=None, **sections
    ) -> None:
        home.mkdir(parents=True, exist_ok=True)
        keys = home.parent / "keys"
        if not (keys / "signing.key").exists():
            init_keys(keys)
        self.public = keys / "signing.pub"
        self.db_url = db_url or f"sqlite:///{home}/state.db"
        self.port = free_port()
        self.log = home / "service.log"
        text = {
            "broker": f'url = "{broker_url}"',
            "state": f'database = "{self.db_url}"',
            "model": f'dir = "{modular["model_dir"]}"\nartifacts = "{modular["store"]}"\n'
            f'signing_key = "{keys / "signing.key"}"',
            "http": f"port = {self.port}",
        }
        for name, lines in sections.items():
            text[name] = f"{text[name]}\n{lines}" if name in text else lines
        self.config = home / "cloud.toml"
        self.config.write_text(
            f'worker = "{worker}"\n' + "".join(f"[{k}]\n{v}\n" for k, v in text.items())
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "eclm", "cloud", "serve", "--config", str(self.config)]
        with open(self.log, "ab") as out:
            self.proc = popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        wait(self.healthy, 60, "the service to answer /healthz")

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"the service exited:\n{self.log.read_text()[-3000:]}"
        try:
            return json.loads(self.get("/healthz"))["status"] == "ok"
        except OSError:
            return False

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return r.read().decode()

    def kill(self, sig=signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()

    def state(self) -> CloudState:
        return CloudState(Database(self.db_url))

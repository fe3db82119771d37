"""``eclm cloud serve`` in its own process for tests, started and killed as systemd would
(:class:`eclm_lab.process.ServiceProcess`, with a key made beside ``home``)."""

from __future__ import annotations

import time
from pathlib import Path

from cloud_trainer.fleet.keys import init_keys
from cloud_trainer.service.database import Database
from cloud_trainer.service.state import CloudState
from eclm_lab.process import ServiceProcess


def wait(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


class Cloud(ServiceProcess):
    """A service worker with a config in ``home``; ``sections`` add lines to a section."""

    def __init__(
        self, home: Path, modular, broker_url: str, *, worker="cloud-1", db_url=None, **sections
    ) -> None:
        keys = home.parent / "keys"
        if not (keys / "signing.key").exists():
            init_keys(keys)
        self.public = keys / "signing.pub"
        super().__init__(
            home,
            broker_url=broker_url,
            model_dir=modular["model_dir"],
            artifacts=modular["store"],
            signing_key=keys / "signing.key",
            db_url=db_url,
            worker=worker,
            sections=sections,
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()

    def state(self) -> CloudState:
        return CloudState(Database(self.db_url))

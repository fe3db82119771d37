"""systemd's notify protocol: tell the service manager the agent is up, alive and stopping.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a unix datagram socket; a
leading ``@`` means Linux's abstract namespace) and, with ``WatchdogSec=``,
``$WATCHDOG_USEC``. The agent sends ``READY=1`` once connected, ``WATCHDOG=1`` from its
worker loop at half the watchdog interval (so a hung loop gets the process restarted) and
``STOPPING=1`` on stop. Without ``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify datagrams to ``address``; None disables it. Never raises: a service
    manager that went away must not stop the agent."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if address and address[0] not in "/@":
            log.warning("NOTIFY_SOCKET %r is neither a path nor @abstract: ignored", address)
            address = None
        self.address = "\0" + address[1:] if address and address[0] == "@" else address
        # half the interval, as sd_watchdog_enabled(3) advises
        self.interval = watchdog_usec / 2e6 if self.address and watchdog_usec else None
        self.clock = clock
        self._last_ping: float | None = None
        self._sock = (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            if self.address
            else None
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **kwargs) -> Notifier:
        """A notifier for what systemd set: ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` (only
        if ``$WATCHDOG_PID`` is unset or this process)."""
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        watchdog = int(usec) if usec.isdigit() and int(usec) > 0 and mine else None
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog_usec=watchdog, **kwargs)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; True if it went out."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify the service manager: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: the service is up (systemd ignores it after the first time)."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def ping(self) -> bool:
        """``WATCHDOG=1`` if the watchdog is on and half its interval has passed since the
        last ping; call it as often as the loop turns."""
        now = self.clock()
        if self.interval is None or (
            self._last_ping is not None and now - self._last_ping < self.interval
        ):
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""Errors of the wire contract, shared by both ends.

WireError
├── ProtocolError        a message or topic that fails validation (names the field)
├── AddressError         a broker URL that does not parse
└── BrokerUnreachable    the MQTT broker cannot be reached or refused the login
"""

from __future__ import annotations

from eclm_wire.enums import EventCode


class WireError(Exception):
    """Base of every error the wire contract raises on purpose."""


class ProtocolError(WireError, ValueError):
    """A message that fails validation. ``code`` is the short reason sent on ``events``."""

    def __init__(
        self, reason: str, *, field: str | None = None, code: EventCode = EventCode.INVALID
    ) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field
        self.code = EventCode(code)


class AddressError(WireError, ValueError):
    """A broker URL that does not look like ``mqtt[s]://[user@]host:port``."""


class BrokerUnreachable(WireError):
    """The MQTT broker refused or did not answer the connection."""

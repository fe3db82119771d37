"""MQTT connection settings and a paho client factory shared by devices and the cloud."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho

from edge_runtime.errors import BrokerUnreachable


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in. ``mqtts`` means TLS."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    cafile: str | None = None

    @classmethod
    def parse(cls, url: str, *, cafile: str | None = None) -> BrokerAddress:
        """Parse ``mqtt://[user:pass@]host[:port]`` or ``mqtts://...``."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL must look like mqtt://host:port, got {url!r}")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ValueError(f"broker URL {url!r}: {exc}") from None
        return cls(
            parts.hostname,
            port,
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
            cafile,
        )

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def make_client(client_id: str, address: BrokerAddress) -> paho.Client:
    """A paho client (MQTT 3.1.1, persistent session) set up for ``address``."""
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=paho.MQTTv311,
    )
    if address.username:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(ca_certs=address.cafile, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def connect(client: paho.Client, address: BrokerAddress, *, keepalive: int = 30) -> None:
    """Connect once; raise BrokerUnreachable with the reason instead of a socket error."""
    try:
        client.connect(address.host, address.port, keepalive=keepalive)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUnreachable(f"cannot reach the MQTT broker at {address}: {exc}") from exc

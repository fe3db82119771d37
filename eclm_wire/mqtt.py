"""MQTT connection settings and a paho client factory shared by devices and the cloud."""

from __future__ import annotations

import os
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho

from eclm_wire import parse_device_topic
from eclm_wire.errors import AddressError, BrokerUnreachable, ProtocolError

PASSWORD_ENV = "ECLM_BROKER_PASSWORD"


def password_from_env(username: str | None) -> str | None:
    return os.environ.get(PASSWORD_ENV) if username else None


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
        """Parse ``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...``. With a user and no
        password in the URL, the password comes from ``$ECLM_BROKER_PASSWORD`` (so it does not
        show in the process list)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise AddressError(f"broker URL must look like mqtt://host:port, got {url!r}")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise AddressError(f"broker URL {url!r}: {exc}") from None
        return cls(
            parts.hostname,
            port,
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else password_from_env(parts.username),
            cafile,
        )

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class Traffic:
    """Bytes (topic and payload) and messages a client sent and received, by topic kind
    (``desired``, ``chunks``, ``fetch``... for device topics; ``rollouts``; ``other``).
    Counts what the application hands over, not QoS retries or MQTT headers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes: Counter[tuple[str, str]] = Counter()  # (direction, kind) -> bytes
        self.messages: Counter[tuple[str, str]] = Counter()

    def add(self, direction: str, topic: str, payload: bytes | None) -> None:
        size = len(topic.encode()) + len(payload or b"")
        kind = _kind(topic)
        with self._lock:
            self.bytes[direction, kind] += size
            self.messages[direction, kind] += 1

    def total(self, direction: str, kind: str | None = None) -> int:
        with self._lock:
            return sum(
                n for (d, k), n in self.bytes.items() if d == direction and kind in (None, k)
            )


def _kind(topic: str) -> str:
    try:
        return parse_device_topic(topic)[1]
    except ProtocolError:
        parts = topic.split("/")
        return parts[2] if len(parts) > 2 and parts[:2] == ["eclm", "v1"] else "other"


class Client(paho.Client):
    """A paho client that counts what it publishes; handlers call ``traffic.add`` with
    what arrives."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.traffic = Traffic()

    def publish(self, topic, payload=None, qos=0, retain=False, properties=None):
        data = payload.encode() if isinstance(payload, str) else payload
        self.traffic.add("sent", topic, data if isinstance(data, bytes | bytearray) else None)
        return super().publish(topic, payload, qos, retain, properties)


def make_client(client_id: str, address: BrokerAddress, *, manual_ack: bool = False) -> Client:
    """A paho client (MQTT 3.1.1, persistent session) set up for ``address``. With
    ``manual_ack`` a QoS 1 message is acknowledged only when the handler calls ``ack``."""
    client = Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=paho.MQTTv311,
        manual_ack=manual_ack,
    )
    if address.username:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(ca_certs=address.cafile, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def wait_published(info: paho.MQTTMessageInfo, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the broker to acknowledge a QoS 1 message; True if it
    did. A message published while the client is disconnected stays queued and goes out
    when it connects again (paho's ``wait_for_publish`` raises for it instead): False."""
    if info.rc == paho.MQTT_ERR_NO_CONN:
        return False
    info.wait_for_publish(timeout)
    return info.is_published()


def connect(client: paho.Client, address: BrokerAddress, *, keepalive: int = 30) -> None:
    """Connect once; raise BrokerUnreachable with the reason instead of a socket error."""
    try:
        client.connect(address.host, address.port, keepalive=keepalive)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUnreachable(f"cannot reach the MQTT broker at {address}: {exc}") from exc

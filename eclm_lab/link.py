"""How a baseline's payloads cross the broker, so its bytes are counted at the broker's
clients the same way as the adaptive system's."""

from __future__ import annotations

import queue
import threading
from collections import Counter

import eclm_wire as wire
from eclm_wire.errors import BrokerUnreachable
from eclm_wire.mqtt import BrokerAddress, connect, make_client


class BrokerLink:
    """Carries a baseline's payloads through the broker, in pieces under its packet limit:
    a device-side client publishes up, a cloud-side client down; each call waits until
    the other side has the whole payload. Bytes are counted as received, by kind."""

    PIECE = 96 * 1024

    def __init__(self, address: BrokerAddress, tag: str) -> None:
        self.root = f"{wire.TOPIC_ROOT}/baselines/{tag}"
        self.bytes: Counter[tuple[str, str]] = Counter()  # (up|down, kind) -> bytes
        self._arrived: queue.Queue[bytes] = queue.Queue()
        self._pieces: list[bytes] = []
        self.clients = {}
        for side, listens in (("device", "down"), ("cloud", "up")):
            client = make_client(f"{tag}-{side}", address)
            client.on_message = self._on_message
            subscribed = threading.Event()
            client.on_subscribe = lambda *_, done=subscribed: done.set()
            connect(client, address)
            client.loop_start()
            client.subscribe(f"{self.root}/{listens}/#", qos=1)
            if not subscribed.wait(10):
                raise BrokerUnreachable(f"the broker did not confirm the {tag} subscription")
            self.clients[side] = client

    def _on_message(self, client, userdata, msg) -> None:
        direction, _device, kind, index, total = msg.topic.split("/")[-5:]
        self.bytes[direction, kind] += len(msg.topic) + len(msg.payload)
        self._pieces.append(msg.payload)
        if int(index) == int(total) - 1:
            self._arrived.put(b"".join(self._pieces))
            self._pieces = []

    def __call__(self, device: str, kind: str, direction: str, payload: bytes) -> bytes:
        sender = self.clients["device" if direction == "up" else "cloud"]
        pieces = [payload[i : i + self.PIECE] for i in range(0, len(payload), self.PIECE)] or [b""]
        for i, piece in enumerate(pieces):
            topic = f"{self.root}/{direction}/{device}/{kind}/{i}/{len(pieces)}"
            sender.publish(topic, piece, qos=1)
        return self._arrived.get(timeout=30)

    def close(self) -> None:
        for client in self.clients.values():
            client.disconnect()
            client.loop_stop()

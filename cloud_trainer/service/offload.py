"""The cloud's half of collaborative inference: finish what devices started.

A device that runs its sub-model up to a layer boundary ``split`` sends the boundary
tensor on ``devices/{id}/infer`` (an :mod:`eclm_wire.features` frame). The server takes
every device's requests through the shared subscription (several workers split them),
waits up to ``window_ms`` after the first for more, runs each split's batch through every
module of the layers from ``split`` on and the head (:meth:`ModularNet.suffix`) in torch,
and answers each device on ``devices/{id}/answer`` with float32 logits under its request
id. A request that does not parse, names a split the model has not, or has the wrong
shape for it is counted and logged, never answered, and never stops the server.

Requests and answers travel at QoS 0: an answer later than the device's deadline is
worth nothing (the device has answered by itself), so neither is queued for a client
that is away.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as paho

import eclm_wire as wire
from eclm_wire import features
from eclm_wire.errors import ProtocolError
from eclm_wire.mqtt import BrokerAddress, connect, make_client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    device_id: str
    frame: features.Frame


class OffloadServer:
    """Answers devices' ``infer`` requests with the full model's logits."""

    def __init__(
        self,
        net,
        address: BrokerAddress,
        *,
        client_id: str,
        shared_group: str = "",
        window_ms: float = 5.0,
        max_batch: int = 64,
        max_frame_bytes: int = features.MAX_FRAME_BYTES,
        queue_size: int = 1024,
    ) -> None:
        self.net, self.address = net, address
        self.window, self.max_batch = window_ms / 1e3, max_batch
        self.max_frame_bytes = max_frame_bytes
        self.shapes = boundary_shapes(net)  # per split: one sample's shape
        self.counts: Counter[str] = Counter()  # requests, answered, batches, refused, dropped
        self._share = f"$share/{shared_group}/" if shared_group else ""
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self.client = make_client(client_id, address)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()  # set once the broker confirmed the subscription
        self.client.on_subscribe = lambda *args: self.subscribed.set()

    def start(self) -> OffloadServer:
        """Connect and serve in the background; BrokerUnreachable if it can't connect."""
        connect(self.client, self.address)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._serve, name="offload", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Disconnect and stop serving (named like the HTTP servers' ``shutdown``)."""
        self.client.disconnect()
        self.client.loop_stop()
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the offload connection: %s", reason_code)
            return
        client.subscribe(self._share + wire.all_devices_topic("infer"), qos=0)

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        try:
            self._inbox.put_nowait((msg.topic, msg.payload))
        except queue.Full:  # the device answers by itself; the server must not fall behind
            self.counts["dropped"] += 1

    # --- the serving thread ---------------------------------------------------------------

    def _serve(self) -> None:
        import torch

        torch.set_num_threads(1)  # the worker's other threads share the cores
        with torch.no_grad():  # the first call of each shape is slow: not a device's
            for split, shape in self.shapes.items():
                self.net.suffix(torch.zeros(1, *shape), split)
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                self._answer(batch)
            except Exception:  # one place where a bug in a batch is caught: serve on
                log.exception("an offload batch of %d requests failed", len(batch))
                self.counts["failed"] += len(batch)

    def _gather(self) -> list[Request] | None:
        """The next batch: the first request, then more until the window closes or the
        batch is full. None when stopped."""
        batch: list[Request] = []
        samples, closes = 0, None
        while samples < self.max_batch:
            timeout = None if closes is None else max(0.0, closes - time.monotonic())
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                break
            if item is None:
                return None
            request = self._parse(*item)
            if request is None:
                continue
            batch.append(request)
            samples += len(request.frame.tensor)
            closes = closes or time.monotonic() + self.window
        return batch

    def _parse(self, topic: str, payload: bytes) -> Request | None:
        self.counts["requests"] += 1
        try:
            device_id, kind, rest = wire.parse_device_topic(topic)
            if kind != "infer" or rest:
                raise ProtocolError(f"unexpected topic {topic[:200]!r}", field="topic")
            frame = features.decode(payload, max_bytes=self.max_frame_bytes)
            if frame.split not in self.shapes:
                raise ProtocolError(f"no layer boundary {frame.split}", field="split")
            want = self.shapes[frame.split]
            if frame.tensor.shape[1:] != want:  # the frame's limits bound the batch
                raise ProtocolError(f"{frame.tensor.shape}, expected (n, *{want})", field="shape")
        except ProtocolError as exc:
            self.counts["refused"] += 1
            log.warning("offload request on %s refused: %s", topic[:200], exc)
            return None
        return Request(device_id, frame)

    def _answer(self, batch: list[Request]) -> None:
        import torch

        self.counts["batches"] += 1
        for split in sorted({r.frame.split for r in batch}):
            group = [r for r in batch if r.frame.split == split]
            x = torch.from_numpy(np.concatenate([r.frame.tensor for r in group]))
            with torch.no_grad():
                logits = self.net.suffix(x, split).numpy()
            at = 0
            for r in group:
                n = len(r.frame.tensor)
                try:  # features far out of range give inf: that request only, not the batch
                    payload = features.encode(
                        r.frame.request_id, split, logits[at : at + n], dtype="float32"
                    )
                except ProtocolError as exc:
                    self.counts["refused"] += 1
                    log.warning("no answer for %s: %s", r.device_id, exc)
                    continue
                finally:
                    at += n
                self.client.publish(wire.device_topic(r.device_id, "answer"), payload, qos=0)
                self.counts["answered"] += 1


def boundary_shapes(net) -> dict[int, tuple[int, ...]]:
    """Per layer boundary of ``net`` (0 = the stem's output .. L = the trunk's), the shape
    of one sample's tensor there."""
    import torch

    spec = net.spec
    x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    inputs: list = []
    with torch.no_grad():
        out = net.trunk(x, layer_inputs=inputs)
    return {k: tuple(h.shape[1:]) for k, h in enumerate([*inputs, out])}


def for_service(net, address: BrokerAddress, config) -> OffloadServer | None:
    """The server a service config's ``[offload]`` section asks for (None: off)."""
    o = config.offload
    if not o.enabled:
        return None
    return OffloadServer(
        net,
        address,
        client_id=f"eclm-{config.worker}-offload",
        shared_group=config.broker.shared_group,
        window_ms=o.window_ms,
        max_batch=o.max_batch,
        max_frame_bytes=o.max_frame_bytes,
        queue_size=o.queue,
    )

"""The device's half of collaborative inference: let the cloud finish what it is unsure of.

The device runs its sub-model up to a layer boundary (the split) and, when the policy
says so, sends that boundary tensor on its ``infer`` topic; the cloud runs every module of
the remaining layers and the head and answers on ``answer``. Policies:

- ``never`` (the default): every sample is answered by the device alone;
- ``always``: every batch is offloaded (the features go out before the local answer is
  computed, so the two overlap); forced whenever the sub-model in service is above what
  the budget allows, i.e. below the smallest sub-model the manifest offers;
- ``gated``: the samples whose own prediction is unsure are offloaded (the top-2 softmax
  margin under ``threshold``, or the entropy above it; :func:`tune_threshold` picks the
  threshold that offloads a target share of held-out samples).

The local prediction is always computed and is the answer unless a reply that passes
every check (the request id waited for, shape ``(n, classes)``, finite values) arrives
before the deadline, counted from the call: no prediction is dropped or late because of
the cloud. A hostile or late reply is refused, logged and counted. After ``misses``
unanswered requests in a row the cloud is taken as gone: one request every ``retry_s``
probes it, the others are answered locally at once.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as paho

import eclm_wire as wire
from eclm_wire import features
from eclm_wire.errors import ProtocolError
from edge_runtime.composer import softmax
from edge_runtime.errors import BackendError, ConfigError, NotServing

log = logging.getLogger(__name__)
POLICIES = ("never", "always", "gated")
GATES = ("margin", "entropy")


@dataclass(frozen=True)
class OffloadConfig:
    """The agent's ``[offload]`` settings."""

    policy: str = "never"
    gate: str = "margin"  # margin: offload below threshold; entropy (nats): above it
    threshold: float = 0.2
    split: int = -1  # the layer boundary to cut at; -1: the smallest tensor, earliest on ties
    deadline_ms: float = 0.0  # 0: the profile's budget.latency_ms
    dtype: str = "int8"  # how features travel: int8 (one scale per tensor) or float32
    misses: int = 3  # unanswered requests in a row after which the cloud is taken as gone
    retry_s: float = 1.0  # then: one probing request this often

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"offload.policy: one of {POLICIES}, got {self.policy!r}")
        if self.gate not in GATES:
            raise ConfigError(f"offload.gate: one of {GATES}, got {self.gate!r}")
        if self.dtype not in features.DTYPES.values():
            raise ConfigError(f"offload.dtype: int8 or float32, got {self.dtype!r}")
        if not (np.isfinite(self.threshold) and 0 <= self.deadline_ms <= 60_000):
            raise ConfigError("offload: threshold must be finite, deadline_ms 0..60000")
        if self.split < -1 or self.misses < 1 or not self.retry_s > 0:
            raise ConfigError("offload: split >= -1, misses >= 1, retry_s > 0")


def uncertainty(logits: np.ndarray, gate: str) -> np.ndarray:
    """Per sample, how unsure the prediction is: ``-margin`` of the top-2 softmax or the
    entropy; larger is less sure."""
    p = softmax(np.asarray(logits, np.float64))
    if gate == "entropy":
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    top = np.sort(p, axis=1)
    return -(top[:, -1] - top[:, -2]) if p.shape[1] > 1 else -np.ones(len(p))


def unsure(logits: np.ndarray, gate: str, threshold: float) -> np.ndarray:
    """Which samples the gated policy offloads."""
    u = uncertainty(logits, gate)
    return u > -threshold if gate == "margin" else u > threshold


def tune_threshold(logits: np.ndarray, share: float, gate: str = "margin") -> float:
    """The threshold at which the gate offloads ``share`` of these (held-out) samples."""
    if not 0 <= share <= 1 or len(logits) == 0:
        raise ConfigError(f"share must be in [0, 1] of a non-empty set, got {share}")
    u = uncertainty(logits, gate)
    # offloaded: u above the cut, so the cut is the (1 - share) quantile
    cut = float(np.quantile(u, 1 - share, method="higher")) if share < 1 else -np.inf
    return -cut if gate == "margin" else cut


@dataclass
class _Waiter:
    rows: int  # samples asked for: the answer must have as many
    done: threading.Event
    logits: np.ndarray | None = None


class Offloader:
    """Sends what the policy offloads on the agent's client and waits for the answers."""

    def __init__(
        self,
        client: paho.Client,
        device_id: str,
        config: OffloadConfig,
        deadline_ms: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.config, self.clock = client, config, clock
        self.deadline = (config.deadline_ms or deadline_ms) / 1e3
        self.request_topic = wire.device_topic(device_id, "infer")
        self.answer_topic = wire.device_topic(device_id, "answer")
        self.counts: Counter[str] = Counter()  # offloaded, answered, late, refused, skipped
        self._ids = f"{secrets.token_hex(4)}-"  # not guessable by another client
        self._next = 0
        self._pending: dict[str, _Waiter] = {}
        self._expired: deque[str] = deque(maxlen=64)  # ids given up on: late, not forged
        self._lock = threading.Lock()
        self._missed, self._probe_at = 0, 0.0
        # runner -> {layers: chosen split}; a runner that is gone takes its entry with it
        self._splits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        client.message_callback_add(self.answer_topic, self._on_answer)

    @property
    def subscription(self) -> tuple[str, int]:
        """What the agent subscribes to on connecting."""
        return self.answer_topic, 0

    def predict(self, runner, x: np.ndarray, local: Callable[[np.ndarray], np.ndarray]):
        """Class scores for ``x``: ``local(x)``, with the rows the cloud answered in time
        replaced by its logits."""
        start = self.clock()
        policy = self.config.policy
        if policy != "never" and runner.over_budget:
            policy = "always"  # what serves is above the budget: the cloud does better
        split = None if policy == "never" else self._split(runner)
        if split is None:
            return local(x)
        if policy == "always":
            rows = np.arange(len(x))
            waiter = self._ask(runner, x, split, len(x))
            out = local(x)
        else:
            out = local(x)
            rows = np.flatnonzero(unsure(out, self.config.gate, self.config.threshold))
            waiter = self._ask(runner, x[rows], split, len(rows)) if len(rows) else None
        if waiter is None:
            return out
        answer = self._wait(waiter, start)
        if answer is None:
            return out
        if answer.shape[1] != out.shape[1]:
            self.counts["refused"] += 1
            log.warning("answer refused: %d classes, expected %d", answer.shape[1], out.shape[1])
            return out
        out = np.array(out, np.float32)
        out[rows] = answer
        return out

    def _split(self, runner) -> int | None:
        layers = runner.splits
        if layers == 0:
            return None
        if self.config.split >= 0:
            return self.config.split if self.config.split <= layers else None
        chosen = self._splits.setdefault(runner, {})
        if layers not in chosen:
            try:
                sizes = [runner.prefix(runner.one_sample(), k).size for k in range(layers)]
            except (BackendError, NotServing) as exc:  # a fused trunk has no inner boundary
                self.counts["unsplittable"] += 1
                log.debug("no split point to offload at: %s", exc)
                return None
            chosen[layers] = int(np.argmin(sizes))  # the first of the smallest
        return chosen[layers]

    def _ask(self, runner, x: np.ndarray, split: int, n: int) -> _Waiter | None:
        """Publish a request for ``x``; None if it was not sent (answer locally now)."""
        now = self.clock()
        if self._missed >= self.config.misses and now < self._probe_at:
            self.counts["skipped"] += n
            return None
        if self._missed >= self.config.misses:
            self._probe_at = now + self.config.retry_s
        request_id = self._new_id()
        try:
            payload = features.encode(
                request_id, split, runner.prefix(x, split), dtype=self.config.dtype
            )
        except (BackendError, NotServing, ProtocolError) as exc:
            self.counts["unsplittable"] += n
            log.warning("cannot offload at split %d: %s", split, exc)
            return None
        waiter = _Waiter(n, threading.Event())
        with self._lock:
            self._pending[request_id] = waiter
        sent = self.client.publish(self.request_topic, payload, qos=0)
        if sent.rc != paho.MQTT_ERR_SUCCESS:  # not connected: no one will answer
            with self._lock:
                self._pending.pop(request_id, None)
            self.counts["unsent"] += n
            return None
        self.counts["offloaded"] += n
        return waiter

    def _new_id(self) -> str:
        with self._lock:
            self._next += 1
            return f"{self._ids}{self._next}"

    def _wait(self, waiter: _Waiter, start: float) -> np.ndarray | None:
        # the deadline bounds the whole call: keep a little of it for what follows the wait
        slack = min(0.002, 0.1 * self.deadline)
        left = self.deadline - slack - (self.clock() - start)
        answered = left > 0 and waiter.done.wait(left)
        with self._lock:
            for rid, w in list(self._pending.items()):
                if w is waiter:
                    del self._pending[rid]
                    self._expired.append(rid)
        if not answered or waiter.logits is None:
            self.counts["late"] += waiter.rows
            self._missed += 1
            return None
        self._missed = 0
        self.counts["answered"] += waiter.rows
        return waiter.logits

    def _on_answer(self, client, userdata, msg: paho.MQTTMessage) -> None:
        """On the network thread: check a reply and hand it to the call waiting for it."""
        traffic = getattr(self.client, "traffic", None)  # eclm_wire.mqtt.Client counts it
        if traffic is not None:
            traffic.add("received", msg.topic, msg.payload)
        try:
            frame = features.decode(msg.payload)
            with self._lock:
                waiter = self._pending.get(frame.request_id)
            if waiter is None and frame.request_id in self._expired:
                self.counts["late_answers"] += 1  # the cloud is there, but slower than us
                return
            if waiter is None:
                raise ProtocolError("no request waits for this id", field="id")
            n = waiter.rows
            if frame.tensor.ndim != 2 or len(frame.tensor) != n or frame.tensor.shape[1] < 1:
                raise ProtocolError(f"{frame.tensor.shape}, expected ({n}, classes)", field="shape")
        except ProtocolError as exc:
            self.counts["refused"] += 1
            if self.counts["refused"] <= 10 or self.counts["refused"] % 1000 == 0:
                log.warning("answer refused (%d so far): %s", self.counts["refused"], exc)
            return
        waiter.logits = frame.tensor
        waiter.done.set()


def offloader(client: paho.Client, config) -> Offloader | None:
    """The offloader an agent config asks for (None: ``never``); the deadline defaults to
    the profile's latency budget."""
    o = config.offload
    if o.policy == "never":
        return None
    return Offloader(client, config.device_id, o, config.profile.budget.latency_ms)

"""The on-device adapter: a linear head on the frozen sub-model's features, trained as
labelled samples arrive, from a bounded replay buffer.

Two trainers behind one seam: numpy, what every board runs, and ExecuTorch's training
runtime (``backends.executorch.ExecuTorchTrainer``, so that torch stays inside the
backend), which ``bench/adapter.py`` measures about 5x slower at the adapter's size (a
512 -> 10 head) and exports therefore do not ship. Both run plain SGD on the mean
cross-entropy of a minibatch, so the same samples give the same weights. Updates travel
as safetensors bytes.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod

import numpy as np

from eclm_wire import AdapterUpdate
from eclm_wire.codec import check_update, load_tensors, tensor_bytes
from eclm_wire.errors import ProtocolError

WEIGHT, BIAS = "weight", "bias"


class AdapterTrainer(ABC):
    """Holds the adapter's weights and takes SGD steps on fixed-size minibatches."""

    @abstractmethod
    def weights(self) -> dict[str, np.ndarray]:
        """Copies of ``weight`` (classes, features) and ``bias`` (classes,)."""

    @abstractmethod
    def set_weights(self, weights: dict[str, np.ndarray]) -> None: ...

    @abstractmethod
    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One SGD step on a minibatch; returns its loss before the step."""

    def logits(self, features: np.ndarray) -> np.ndarray:
        w = self.weights()
        return features @ w[WEIGHT].T + w[BIAS]


class NumpyTrainer(AdapterTrainer):
    """Softmax regression in numpy: what a board without torch runs."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, *, lr: float = 0.01) -> None:
        self._w = weight.astype(np.float32).copy()
        self._b = bias.astype(np.float32).copy()
        self.lr = lr

    def weights(self) -> dict[str, np.ndarray]:
        return {WEIGHT: self._w.copy(), BIAS: self._b.copy()}

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self._w.T + self._b

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self._w[...] = weights[WEIGHT]
        self._b[...] = weights[BIAS]

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        z = self.logits(x)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
        p[np.arange(len(y)), y] -= 1.0
        p /= len(y)
        self._w -= self.lr * (p.T @ x)
        self._b -= self.lr * p.sum(axis=0)
        return loss


class Adapter:
    """A replay buffer and a trainer: ``observe`` labelled samples, ``logits`` for serving."""

    def __init__(
        self,
        trainer: AdapterTrainer,
        *,
        buffer_size: int = 512,
        batch: int = 32,
        steps_per_batch: int = 4,
        balanced: bool = False,
        seed: int = 0,
    ) -> None:
        self.trainer = trainer
        self.batch = batch
        self.steps_per_batch = steps_per_batch
        self.balanced = balanced
        self.buffer_size = buffer_size
        self._x: np.ndarray | None = None
        self._y = np.zeros(buffer_size, np.int64)
        self._count = 0  # samples seen; the buffer holds the newest buffer_size of them
        self._rng = np.random.default_rng(seed)
        self.samples_trained = 0
        self.histogram = np.zeros(len(trainer.weights()[BIAS]), np.int64)  # labels trained on

    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.trainer.logits(features)

    def observe(self, features: np.ndarray, labels: np.ndarray) -> float | None:
        """Add labelled samples to the buffer and train on minibatches drawn from it
        (``balanced``: every class the buffer holds equally often, so that the adapter
        learns what a class looks like and not how often this device sees it)."""
        if self._x is None:
            self._x = np.zeros((self.buffer_size, features.shape[1]), np.float32)
        for f, y in zip(features, labels, strict=True):
            slot = self._count % self.buffer_size
            self._x[slot], self._y[slot] = f, y
            self._count += 1
        held = min(self._count, self.buffer_size)
        p = None
        if self.balanced:
            held_y = self._y[:held]
            p = 1.0 / np.bincount(held_y)[held_y]
            p /= p.sum()
        loss = None
        for _ in range(self.steps_per_batch):
            if p is None:
                idx = self._rng.integers(0, held, self.batch)
            else:
                idx = self._rng.choice(held, self.batch, p=p)
            loss = self.trainer.step(self._x[idx], self._y[idx])
        self.samples_trained += len(labels)
        np.add.at(self.histogram, labels, 1)
        return loss

    def export_update(self) -> bytes:
        """The adapter's weights as safetensors bytes, in half precision (half the bytes;
        the receiver trains and averages in float32)."""
        return tensor_bytes(self.trainer.weights())

    def update_message(
        self,
        device_id: str,
        domain: str,
        base: str,
        *,
        weights: dict[str, np.ndarray] | None = None,
        epsilon: float = 0.0,
    ) -> AdapterUpdate:
        """What the device uploads on ``updates``: the weights (or ``weights`` in their
        place: a privatized copy that spent ``epsilon``), the samples and labels they were
        trained on, and a fresh nonce (ProtocolError before any sample)."""
        return AdapterUpdate(
            device_id=device_id,
            domain=domain,
            base=base,
            samples=self.samples_trained,
            histogram=tuple(int(n) for n in self.histogram),
            weights=self.export_update() if weights is None else tensor_bytes(weights),
            nonce=secrets.token_hex(8),
            epsilon=epsilon,
        )

    def load_update(self, data: bytes) -> None:
        """Replace the weights with an update; ProtocolError if it does not fit or is not
        finite. The current weights stay on any error."""
        self.trainer.set_weights(check_update(data, self.trainer.weights()))


def check_head(data: bytes, features: int, like: dict[str, np.ndarray] | None = None):
    """The head a desired state brings, as float32: ``weight`` (classes, ``features``) and
    ``bias`` (classes,), like ``like`` if given (the head the learner has); ProtocolError
    otherwise."""
    like = load_tensors(data) if like is None else like
    shapes = {k: v.shape for k, v in like.items()}
    if (
        set(shapes) != {WEIGHT, BIAS}
        or shapes[WEIGHT][1:] != (features,)
        or shapes[BIAS] != shapes[WEIGHT][:1]
    ):
        raise ProtocolError(
            f"adapter head {shapes} does not fit {features} features", field="adapter"
        )
    return check_update(data, like)

"""On-device adaptation: one adapter head per data domain on the served sub-model's
features, trained prequentially (predict, then learn from the labels that arrive).

The learner says when to upload (on leaving a domain it learned in, and on a schedule
once enough new labels arrived), takes warm starts the cloud aggregated from other
devices for a domain it has not learned in yet, and notices when the label mix it sees
moves away from the one it last reported.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from edge_runtime.adapter import BIAS, WEIGHT, Adapter, NumpyTrainer, check_update
from edge_runtime.errors import ProtocolError
from edge_runtime.privacy import GaussianNoise
from edge_runtime.protocol import AdapterUpdate

BASE_DOMAIN = "clean"


@dataclass(frozen=True)
class LearnerConfig:
    # lr and steps_per_batch: what the adaptation benchmark's tuning picks (GRIDS in
    # cloud_trainer.experiment; seeds 1000-1002 chose lr 0.01/0.02/0.02, steps 32/16/32,
    # prior 1.0), so that an untuned run (``eclm demo``, a board) adapts as the tuned one;
    # lr 0.05 x 4 steps served 1-3 points below the cloud's head before any shift.
    lr: float = 0.02
    batch: int = 32
    steps_per_batch: int = 32  # SGD steps per batch of labels that arrives
    buffer_size: int = 256
    upload_every: int = 10  # learn() calls between scheduled uploads
    min_new_samples: int = 8  # labels an adapter must have learned from since its last upload
    mix_window: int = 48  # latest labels the current label mix is estimated from
    mix_shift: float = 0.35  # total variation distance from the reported mix that is a shift
    # Label shift: adapters train on class-balanced minibatches from their replay buffer
    # and predictions add ``prior`` x log of the current label mix (0: off), so a device
    # that sees a few classes most of the time favours them, and its uploads do not carry
    # its label mix into the fleet's aggregate.
    balanced: bool = True
    prior: float = 1.0
    # Differential privacy of uploads (edge_runtime.privacy): the L2 norm an adapter's delta
    # from the head is clipped to and the noise multiplier; both 0 (off) or both > 0.
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        for name in ("batch", "steps_per_batch", "buffer_size", "upload_every", "mix_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.prior <= 10:
            raise ValueError(f"prior: must be in [0, 10], got {self.prior}")
        if not 0 < self.mix_shift <= 1:
            raise ValueError(f"mix_shift: must be in (0, 1], got {self.mix_shift}")
        if self.dp_clip < 0 or self.dp_noise < 0 or (self.dp_clip > 0) != (self.dp_noise > 0):
            raise ValueError(
                f"dp_clip, dp_noise: both 0 (off) or both > 0, got {self.dp_clip}, {self.dp_noise}"
            )
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_delta: must be in (0, 1), got {self.dp_delta}")


class Learner:
    """``base`` is the cloud's head (``weight`` (classes, features), ``bias``): every
    domain's adapter starts from it unless the cloud sends a warm start. With DP in
    ``config``, uploads are clipped and noised (``dp_seed`` None: noise from the OS)."""

    def __init__(
        self,
        base: dict[str, np.ndarray],
        config: LearnerConfig = LearnerConfig(),
        *,
        seed=0,
        dp_seed: int | None = None,
    ) -> None:
        self.config = config
        self.base = {k: np.asarray(v, np.float32) for k, v in base.items()}
        self.seed = seed
        self.domain = BASE_DOMAIN
        self.bank: dict[str, Adapter] = {}
        self.warm: dict[str, int] = {}  # domain -> samples behind the warm start it took
        self._uploaded: dict[str, int] = {}  # domain -> samples_trained at its last upload
        self._calls = 0
        self._recent: list[int] = []
        self.reported_mix: np.ndarray | None = None
        self.privacy = (
            GaussianNoise(config.dp_clip, config.dp_noise, delta=config.dp_delta, seed=dp_seed)
            if config.dp_clip > 0
            else None
        )
        self._lock = threading.Lock()

    @property
    def classes(self) -> int:
        return self.base[BIAS].shape[0]

    def _adapter(self, domain: str) -> Adapter:
        adapter = self.bank.get(domain)
        if adapter is None:
            c = self.config
            trainer = NumpyTrainer(self.base[WEIGHT], self.base[BIAS], lr=c.lr)
            adapter = Adapter(
                trainer,
                buffer_size=c.buffer_size,
                batch=c.batch,
                steps_per_batch=c.steps_per_batch,
                balanced=c.balanced,
                seed=self.seed + len(self.bank),
            )
            self.bank[domain] = adapter
        return adapter

    def enter(self, domain: str) -> str | None:
        """Switch to ``domain``'s adapter; returns the domain left if it has labels to
        upload (a shift upload), else None."""
        with self._lock:
            if domain == self.domain:
                return None
            left, self.domain = self.domain, domain
            return left if self._due(left) else None

    def logits(self, features: np.ndarray) -> np.ndarray:
        with self._lock:
            logits = self._adapter(self.domain).logits(features)
            if self.config.prior and self._recent:
                counts = np.bincount(self._recent, minlength=self.classes) + 1.0  # Laplace
                logits = logits + self.config.prior * np.log(counts / counts.sum())
            return logits

    def learn(self, features: np.ndarray, labels: np.ndarray) -> bool:
        """Train the current domain's adapter; True if a scheduled upload is due."""
        with self._lock:
            self._calls += 1
            if len(labels):
                self._adapter(self.domain).observe(features, labels)
                self._recent = (self._recent + [int(y) for y in labels])[-self.config.mix_window :]
            return self._calls % self.config.upload_every == 0 and self._due(self.domain)

    def _due(self, domain: str) -> bool:
        adapter = self.bank.get(domain)
        if adapter is None:
            return False
        new = adapter.samples_trained - self._uploaded.get(domain, 0)
        return new >= self.config.min_new_samples

    def update(self, domain: str, device_id: str, base: str) -> AdapterUpdate:
        """The upload for ``domain`` (ProtocolError if it learned nothing there). With DP,
        it carries a clipped and noised copy of the adapter (which keeps serving as it is)
        and the epsilon spent so far."""
        with self._lock:
            adapter = self._adapter(domain)
            if adapter.samples_trained == 0:  # before a release is counted
                raise ProtocolError("nothing learned to upload", field="samples")
            self._uploaded[domain] = adapter.samples_trained
            if self.privacy is None:
                return adapter.update_message(device_id, domain, base)
            weights = self.privacy.privatize(adapter.trainer.weights(), self.base)
            return adapter.update_message(
                device_id, domain, base, weights=weights, epsilon=self.privacy.epsilon
            )

    def warm_start(self, domain: str, data: bytes, samples: int) -> None:
        """Take the cloud's aggregate of ``samples`` labels for ``domain``: as it is where
        this device has not learned yet, else averaged with its own adapter by the labels
        behind each (its own knows its label mix). ProtocolError if it does not fit."""
        with self._lock:
            adapter = self._adapter(domain)
            theirs = check_update(data, self.base)
            own = adapter.samples_trained
            mine = adapter.trainer.weights()
            share = own / (own + samples)
            adapter.trainer.set_weights(
                {k: (share * mine[k] + (1 - share) * theirs[k]).astype(np.float32) for k in mine}
            )
            self.warm[domain] = samples

    def rebase(self, base: dict[str, np.ndarray]) -> None:
        """A new head from the cloud: domains this device has not learned in start from it."""
        checked = check_update_dict(base, self.base)
        with self._lock:
            self.base = checked
            for domain in [d for d, a in self.bank.items() if a.samples_trained == 0]:
                del self.bank[domain]
                self.warm.pop(domain, None)

    def mix_shifted(self) -> np.ndarray | None:
        """The current label mix if it moved ``mix_shift`` away from the one last reported
        (or none was); the caller reports it and it becomes the reference."""
        with self._lock:
            if len(self._recent) < self.config.mix_window:
                return None
            mix = np.bincount(self._recent, minlength=self.classes) / len(self._recent)
            ref = self.reported_mix
            if ref is not None and 0.5 * np.abs(mix - ref).sum() < self.config.mix_shift:
                return None
            self.reported_mix = mix
            return mix


def check_update_dict(weights: dict[str, np.ndarray], like: dict[str, np.ndarray]):
    """``weights`` if they have ``like``'s names, shapes, float32 and are finite."""
    from safetensors.numpy import save

    return dict(check_update(save({k: np.asarray(v) for k, v in weights.items()}), like))

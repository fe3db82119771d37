"""The methods the adaptive system is measured against, on the same streams.

Each serves ``predict`` on a device's batch before its labels arrive and ``learn`` from the
labelled part afterwards; ``exchange`` runs at every upload opportunity (the same schedule
the adaptive devices upload on). What a method sends travels through ``link`` (see
:mod:`eclm_lab.experiment`), so its bytes are counted at the broker's clients.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors
from torch import nn

from cloud_trainer.model.modular import ModularNet, SubModel

# link(device, kind, direction, payload) -> the payload as the other side received it
Link = Callable[[str, str, str, bytes], bytes]


def _local(device: str, kind: str, direction: str, payload: bytes) -> bytes:
    return payload  # tuning runs: nothing crosses a broker


class Replay:
    """The newest labelled samples a device holds, and minibatches drawn from them."""

    def __init__(self, size: int = 256, seed: int = 0) -> None:
        self.size = size
        self.x: list[np.ndarray] = []
        self.y: list[int] = []
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = (self.x + list(x))[-self.size :]
        self.y = (self.y + [int(v) for v in y])[-self.size :]

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.rng.integers(0, len(self.y), n)
        x = torch.from_numpy(np.stack([self.x[i] for i in idx]))
        return x, torch.tensor([self.y[i] for i in idx])


class Method(ABC):
    name: str

    def __init__(self, link: Link = _local) -> None:
        self.link = link

    @abstractmethod
    def predict(self, device: str, x: np.ndarray) -> np.ndarray:
        """Predicted labels for a batch."""

    def learn(self, device: str, x: np.ndarray, y: np.ndarray) -> None:  # noqa: B027
        """Learn from the labelled samples of the batch just predicted."""

    def enter(self, device: str, domain: str) -> None:  # noqa: B027
        """``device``'s input now comes from ``domain`` (a method that knows contexts)."""

    def exchange(self) -> None:  # noqa: B027
        """An upload opportunity (every device's, at once)."""


class StaticCloud(Method):
    """The full cloud model serves every sample remotely: samples up, labels down."""

    name = "static cloud (remote)"

    def __init__(self, net: ModularNet, link: Link = _local) -> None:
        super().__init__(link)
        self.net = net.eval()

    def predict(self, device: str, x: np.ndarray) -> np.ndarray:
        sent = load_tensors(self.link(device, "samples", "up", save_tensors({"x": x})))["x"]
        with torch.no_grad():
            labels = self.net(torch.from_numpy(sent)).argmax(1).numpy().astype(np.uint8)
        return np.frombuffer(self.link(device, "predictions", "down", labels.tobytes()), np.uint8)


class StaticSubModel(Method):
    """Each device's sub-model as delivered, never adapted."""

    name = "static sub-model"

    def __init__(self, net: ModularNet, selections: dict[str, tuple]) -> None:
        super().__init__()
        self.models = {d: SubModel(net, s).eval() for d, s in selections.items()}

    def predict(self, device: str, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.models[device](torch.from_numpy(x)).argmax(1).numpy()


class _Trained(Method):
    """A torch model per device trained by SGD on minibatches from its replay buffer."""

    clip_norm: float | None = None  # gradient norm each step is clipped to (None: not)

    def __init__(self, models: dict[str, nn.Module], *, lr: float, steps: int, seed: int) -> None:
        super().__init__()
        self.models = models
        self.steps = steps
        self.opt = {d: torch.optim.SGD(m.parameters(), lr=lr) for d, m in models.items()}
        self.replay = {d: Replay(seed=seed + i) for i, d in enumerate(models)}
        self.samples = dict.fromkeys(models, 0)  # labelled samples since the last exchange

    def predict(self, device: str, x: np.ndarray) -> np.ndarray:
        model = self.models[device].eval()
        with torch.no_grad():
            return model(torch.from_numpy(x)).argmax(1).numpy()

    def learn(self, device: str, x: np.ndarray, y: np.ndarray) -> None:
        if not len(y):
            return
        replay, model, opt = self.replay[device], self.models[device].train(), self.opt[device]
        replay.add(x, y)
        self.samples[device] += len(y)
        for _ in range(self.steps):
            bx, by = replay.batch(32)
            opt.zero_grad()
            nn.functional.cross_entropy(model(bx), by).backward()
            if self.clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), self.clip_norm)
            opt.step()


class OnDeviceOnly(_Trained):
    """A small model trained from scratch on each device's own labels, nothing shared: an
    MLP over the raw samples of ``shape`` (C, H, W) into ``classes``."""

    name = "on-device only"

    def __init__(self, devices, *, shape, classes, lr=0.1, steps=4, hidden=32, seed=0) -> None:
        torch.manual_seed(seed)
        inputs = int(np.prod(shape))

        def small() -> nn.Module:
            if not hidden:
                return nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes))
            return nn.Sequential(
                nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes)
            )

        super().__init__({d: small() for d in devices}, lr=lr, steps=steps, seed=seed)


class FedAvg(_Trained):
    """Each device fine-tunes its whole sub-model; at every exchange the devices send all
    its weights up, the cloud averages each tensor over the devices holding it (weighted
    by their new labelled samples) and sends every device its sub-model's weights back."""

    name = "FedAvg"
    # On the RGB streams one device's whole-sub-model SGD (lr 0.03) reached NaN within 10
    # steps, and the average carried it to every device (14% accuracy): clipped steps, as
    # federated fine-tuning does, and a cloud that refuses non-finite weights, as the
    # adaptive system's refuses non-finite adapters. Healthy steps here stay under 10.
    clip_norm = 10.0

    def __init__(
        self,
        net: ModularNet,
        selections: dict[str, tuple],
        link: Link = _local,
        *,
        lr=0.01,
        steps=4,
        seed=0,
    ) -> None:
        models = {d: SubModel(copy.deepcopy(net), s) for d, s in selections.items()}
        super().__init__(models, lr=lr, steps=steps, seed=seed)
        self.link = link
        self.names = {d: self._used(m) for d, m in models.items()}

    @staticmethod
    def _used(model: SubModel) -> list[str]:
        """The parameters of the parts the sub-model runs (what the device holds)."""
        spec = model.net.spec
        x = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        used = [n for n, p in model.named_parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return used

    def exchange(self) -> None:
        sums: dict[str, np.ndarray] = {}
        weights: dict[str, float] = {}
        for device, model in self.models.items():
            w = max(self.samples[device], 1)
            params = dict(model.named_parameters())
            mine = {n: params[n].detach().numpy().copy() for n in self.names[device]}
            received = load_tensors(self.link(device, "weights", "up", save_tensors(mine)))
            if not all(np.isfinite(v).all() for v in received.values()):
                continue
            for n, v in received.items():
                sums[n] = sums.get(n, 0) + w * v
                weights[n] = weights.get(n, 0) + w
        for device, model in self.models.items():
            mean = {
                n: (sums[n] / weights[n]).astype(np.float32)
                for n in self.names[device]
                if n in sums
            }
            received = load_tensors(self.link(device, "weights", "down", save_tensors(mean)))
            with torch.no_grad():
                params = dict(model.named_parameters())
                for n, v in received.items():
                    params[n].copy_(torch.from_numpy(v))
            self.samples[device] = 0

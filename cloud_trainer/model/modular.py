"""The modular cloud model: a stem, L layers of M interchangeable blocks with a router, a head.

Layer ``l`` computes ``x + sum_m w_m * block_m(x)`` where ``w`` is the router's softmax over
the modules present. Trained with module dropout, any non-empty subset per layer works, so
a device's sub-model is just a choice of modules per layer. Every part is a plain
``nn.Module`` that exports on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from cloud_trainer.errors import ConfigError
from edge_runtime.composer import part_name


@dataclass(frozen=True)
class ModularSpec:
    """Sizes of the modular model. The defaults train on digits in well under a minute."""

    in_channels: int = 1
    image_size: int = 8
    channels: int = 32
    layers: int = 2
    modules_per_layer: int = 4
    num_classes: int = 10

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.image_size % 2:
            raise ConfigError(f"image_size: must be even, got {self.image_size}")

    @property
    def feature_size(self) -> int:
        """Length of the feature vector the head (and the adapter) reads."""
        return self.channels * (self.image_size // 2) ** 2


class Stem(nn.Module):
    def __init__(self, spec: ModularSpec) -> None:
        super().__init__()
        self.conv = nn.Conv2d(spec.in_channels, spec.channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class Block(nn.Module):
    """One module: two 3x3 convolutions, enough work that calling it alone stays cheap."""

    def __init__(self, spec: ModularSpec) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(spec.channels, spec.channels, 3, padding=1)
        self.conv2 = nn.Conv2d(spec.channels, spec.channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))


class Router(nn.Module):
    """Logits over all M modules of its layer from the 2x2-pooled layer input.

    Global pooling would hide what the sample is; the coarse map lets routing differ by
    class and domain, which is what makes modules specialise.
    """

    def __init__(self, spec: ModularSpec) -> None:
        super().__init__()
        self.fc = nn.Linear(spec.feature_size, spec.modules_per_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.avg_pool2d(x, 2), 1))


class Features(nn.Module):
    """Pool and flatten the last layer's output into the head's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.avg_pool2d(x, 2), 1)


class Head(nn.Module):
    """Features to class logits. Its weights also initialise the device's adapter."""

    def __init__(self, spec: ModularSpec) -> None:
        super().__init__()
        self.features = Features()
        self.fc = nn.Linear(spec.feature_size, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def mix(
    x: torch.Tensor, logits: torch.Tensor, outputs: list[torch.Tensor], present: list[int]
) -> torch.Tensor:
    """``x + sum w_m * out_m`` with the router softmax taken over the present modules."""
    weights = torch.softmax(logits[:, present], dim=1)
    mixed = sum(weights[:, i, None, None, None] * out for i, out in enumerate(outputs))
    return x + mixed


class ModularNet(nn.Module):
    """The whole cloud model; ``forward(x, selection)`` runs any sub-model of it."""

    def __init__(self, spec: ModularSpec = ModularSpec()) -> None:
        super().__init__()
        self.spec = spec
        self.stem = Stem(spec)
        self.routers = nn.ModuleList(Router(spec) for _ in range(spec.layers))
        self.blocks = nn.ModuleList(
            nn.ModuleList(Block(spec) for _ in range(spec.modules_per_layer))
            for _ in range(spec.layers)
        )
        self.head = Head(spec)

    def full_selection(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(range(self.spec.modules_per_layer)) for _ in range(self.spec.layers))

    def forward(self, x: torch.Tensor, selection=None) -> torch.Tensor:
        """Logits of the sub-model ``selection`` (module indices per layer; None = all)."""
        return self.head(self.trunk(x, selection))

    def features(self, x: torch.Tensor, selection=None) -> torch.Tensor:
        """The head's input (what the adapter reads) through the sub-model."""
        return self.head.features(self.trunk(x, selection))

    def trunk(
        self,
        x: torch.Tensor,
        selection=None,
        router_weights: list | None = None,
        layer_inputs: list | None = None,
    ) -> torch.Tensor:
        """Stem and modular layers. Appends each router's full softmax to ``router_weights``
        and each layer's input to ``layer_inputs`` when given."""
        h = self.stem(x)
        layers = zip(self.routers, self.blocks, selection or self.full_selection(), strict=True)
        for router, blocks, present in layers:
            if layer_inputs is not None:
                layer_inputs.append(h)
            logits = router(h)
            if router_weights is not None:
                router_weights.append(torch.softmax(logits, dim=1))
            h = mix(h, logits, [blocks[m](h) for m in present], list(present))
        return h


class SubModel(nn.Module):
    """A fixed sub-model as one module: what a fused program is exported from."""

    def __init__(self, net: ModularNet, selection) -> None:
        super().__init__()
        self.net = net
        self.selection = tuple(tuple(layer) for layer in selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.selection)


def parts(net: ModularNet) -> dict[str, nn.Module]:
    """Every separately exported part, in the order a forward pass calls them."""
    out: dict[str, nn.Module] = {"stem": net.stem}
    for layer in range(net.spec.layers):
        out[part_name(layer)] = net.routers[layer]
        for module in range(net.spec.modules_per_layer):
            out[part_name(layer, module)] = net.blocks[layer][module]
    out["head"] = net.head
    return out

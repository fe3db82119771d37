"""The modular cloud model: a stem, L layers of M interchangeable modules with a router, a head.

Layer ``l`` computes ``post(base + sum_m w_m * module_m(x))`` where ``w`` is the router's
softmax over the modules present and ``base`` is the layer's shortcut program when it has one
(a strided or widening layer), else ``x`` when the shapes match, else zero. Trained with
module dropout, any non-empty subset per layer works, so a device's sub-model is just a
choice of modules per layer. Every part is a plain ``nn.Module`` that exports on its own.

The same container holds the native presets (built here from a ``ModularSpec``) and networks
decomposed from an existing architecture (``cloud_trainer.model.decompose``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from cloud_trainer.errors import ConfigError
from edge_runtime.composer import POSTS, Layout, part_name, part_names, pool_grid

BLOCKS = ("conv", "inverted")


@dataclass(frozen=True)
class ModularSpec:
    """Sizes of the modular model. The defaults (the ``digits`` preset) train on digits in
    well under a minute; ``widths``/``strides``/``hidden`` give each layer its own output
    width, stride and module hidden width (empty: ``channels``, 1 and ``channels``)."""

    in_channels: int = 1
    image_size: int = 8
    channels: int = 32
    layers: int = 2
    modules_per_layer: int = 4
    num_classes: int = 10
    widths: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    hidden: tuple[int, ...] = ()
    stem_stride: int = 1
    block: str = "conv"  # "conv": two 3x3 convolutions; "inverted": 1x1, depthwise 3x3, 1x1
    arch: str = "modular"  # or the architecture a decomposed model came from
    width_mult: float = 1.0  # a decomposed architecture's channel multiplier

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # read back from JSON
                object.__setattr__(self, f.name, value := tuple(value))
            if f.type == "int" and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{f.name}: must be a positive integer, got {value!r}")
        for name in ("widths", "strides", "hidden"):
            value = getattr(self, name)
            if value and (len(value) != self.layers or min(value) < 1):
                raise ConfigError(f"{name}: must give {self.layers} positive integers")
        if self.block not in BLOCKS:
            raise ConfigError(f"block: must be one of {BLOCKS}, got {self.block!r}")
        if self.arch != "modular":
            return  # the architecture decides its own sizes
        size = self.image_size // self.stem_stride
        for layer in range(self.layers):
            if size % 2 or size % self.stride(layer):
                raise ConfigError(
                    f"image_size: {self.image_size} does not divide down to layer {layer} "
                    f"(strides {self.strides or 'all 1'}); the layers need even sizes"
                )
            size //= self.stride(layer)

    def width(self, layer: int) -> int:
        return self.widths[layer] if self.widths else self.channels

    def stride(self, layer: int) -> int:
        return self.strides[layer] if self.strides else 1

    def hidden_width(self, layer: int) -> int:
        return self.hidden[layer] if self.hidden else self.channels

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "digits": ModularSpec(),
    # 32x32 RGB, three downsampling stages of four modules: 9.3 MB of fp32 weights, every
    # module at least 330 KB, each a few million multiply-accumulates.
    "cifar": ModularSpec(
        in_channels=3,
        image_size=32,
        channels=32,
        layers=3,
        widths=(64, 128, 256),
        strides=(2, 2, 2),
        hidden=(96, 96, 96),
    ),
    # The cifar preset at half its widths and a third of its module width (1.65 MB): on
    # these 2-core machines it trains on rgb-digits to about 90% in under two minutes,
    # where cifar reached 21% in 4 epochs (23 minutes under load), and FedAvg, which trains
    # each device's whole sub-model in the adaptation scenario, stays affordable; its
    # smallest sub-model also meets the small boards' latency budgets.
    "cifar-small": ModularSpec(
        in_channels=3,
        image_size=32,
        channels=16,
        layers=3,
        widths=(32, 64, 128),
        strides=(2, 2, 2),
        hidden=(32, 32, 32),
    ),
    # 96x96 RGB with inverted-residual modules (MobileNetV2's block, its expansion split
    # over the modules).
    "mobile": ModularSpec(
        in_channels=3,
        image_size=96,
        channels=16,
        layers=4,
        widths=(24, 32, 64, 96),
        strides=(2, 2, 2, 1),
        hidden=(48, 96, 128, 256),
        stem_stride=2,
        block="inverted",
    ),
}


def preset(name: str, **changes) -> ModularSpec:
    """A preset's spec with ``changes`` (e.g. the data's channels and classes)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return ModularSpec(**{**PRESETS[name].to_dict(), **changes})


def relu6(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, 0.0, 6.0)


ACTIVATIONS = {"none": lambda x: x, "relu": torch.relu, "relu6": relu6}
assert set(ACTIVATIONS) == set(POSTS)


class Stem(nn.Module):
    def __init__(self, spec: ModularSpec) -> None:
        super().__init__()
        self.conv = nn.Conv2d(spec.in_channels, spec.channels, 3, spec.stem_stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class Block(nn.Module):
    """One module: two 3x3 convolutions, enough work that calling it alone stays cheap."""

    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, hidden, 3, stride, padding=1)
        self.conv2 = nn.Conv2d(hidden, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))


class InvertedBlock(nn.Module):
    """One module of an inverted-residual layer: expand, depthwise, project (linear out)."""

    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c_in, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(relu6(self.depthwise(relu6(self.expand(x)))))


class Router(nn.Module):
    """Logits over all M modules of its layer from the layer input pooled to a coarse grid
    (4x4 where the map allows).

    Global pooling would hide what the sample is; the coarse map lets routing differ by
    class and domain, which is what makes modules specialise.
    """

    def __init__(self, channels: int, size: int, modules: int) -> None:
        super().__init__()
        self.pool = size // pool_grid(size)
        self.fc = nn.Linear(channels * pool_grid(size) ** 2, modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.avg_pool2d(x, self.pool), 1))


class Features(nn.Module):
    """Pool and flatten the last layer's output into the head's input."""

    def __init__(self, pool: int = 2) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            x = nn.functional.avg_pool2d(x, self.pool)
        return torch.flatten(x, 1)


class Head(nn.Module):
    """Features to class logits. Its weights also initialise the device's adapter."""

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.features = Features(size // pool_grid(size))
        self.fc = nn.Linear(channels * pool_grid(size) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def set_weights(self, weights) -> None:
        """Take ``weights`` ({"weight", "bias"}: arrays) in a new layer swapped in whole, so
        that a call under way (an offload answer) uses the old head or the new, not a mix."""
        fc = nn.Linear(self.fc.in_features, self.fc.out_features)
        for name, value in weights.items():
            getattr(fc, name).data[...] = torch.as_tensor(value)
        self.fc = fc.train(self.training)


@dataclass(frozen=True)
class Components:
    """The parts a ModularNet is made of; ``shortcuts`` maps a layer to its shortcut."""

    stem: nn.Module
    routers: list[nn.Module]
    blocks: list[list[nn.Module]]
    head: nn.Module
    shortcuts: dict[int, nn.Module]
    posts: tuple[str, ...]


def native_components(spec: ModularSpec) -> Components:
    """The parts of a native preset, randomly initialised."""
    block = Block if spec.block == "conv" else InvertedBlock
    size, c_in = spec.image_size // spec.stem_stride, spec.channels
    routers, blocks, shortcuts = [], [], {}
    for layer in range(spec.layers):
        c_out, stride = spec.width(layer), spec.stride(layer)
        routers.append(Router(c_in, size, spec.modules_per_layer))
        hidden = spec.hidden_width(layer)
        blocks.append([block(c_in, hidden, c_out, stride) for _ in range(spec.modules_per_layer)])
        if stride != 1 or c_in != c_out:
            shortcuts[layer] = nn.Conv2d(c_in, c_out, 1, stride)
        size, c_in = size // stride, c_out
    head = Head(c_in, size, spec.num_classes)
    return Components(Stem(spec), routers, blocks, head, shortcuts, ("none",) * spec.layers)


def components_for(spec: ModularSpec) -> Components:
    if spec.arch == "modular":
        return native_components(spec)
    from cloud_trainer.model.decompose import blank_components

    return blank_components(spec)


def mix(
    base: torch.Tensor, logits: torch.Tensor, outputs: list[torch.Tensor], present: list[int]
) -> torch.Tensor:
    """``base + sum w_m * out_m`` with the router softmax taken over the present modules."""
    weights = torch.softmax(logits[:, present], dim=1)
    return base + sum(weights[:, i, None, None, None] * out for i, out in enumerate(outputs))


class ModularNet(nn.Module):
    """The whole cloud model; ``forward(x, selection)`` runs any sub-model of it."""

    def __init__(self, spec: ModularSpec = ModularSpec(), parts: Components | None = None):
        super().__init__()
        built = parts or components_for(spec)
        self.spec = spec
        self.stem = built.stem
        self.routers = nn.ModuleList(built.routers)
        self.blocks = nn.ModuleList(nn.ModuleList(layer) for layer in built.blocks)
        self.shortcuts = nn.ModuleDict({str(k): v for k, v in built.shortcuts.items()})
        self.head = built.head
        self.posts = built.posts

    def layout(self) -> Layout:
        """What a device needs besides the programs to chain them like this model."""
        return Layout(
            posts=self.posts,
            pool=self.head.features.pool,
            shortcuts=tuple(sorted(int(k) for k in self.shortcuts)),
        )

    def full_selection(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(range(self.spec.modules_per_layer)) for _ in range(self.spec.layers))

    def forward(self, x: torch.Tensor, selection=None) -> torch.Tensor:
        """Logits of the sub-model ``selection`` (module indices per layer; None = all)."""
        return self.head(self.trunk(x, selection))

    def features(self, x: torch.Tensor, selection=None) -> torch.Tensor:
        """The head's input (what the adapter reads) through the sub-model."""
        return self.head.features(self.trunk(x, selection))

    def base(self, layer: int, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor | float:
        """What the layer's module outputs are added to."""
        if str(layer) in self.shortcuts:
            return self.shortcuts[str(layer)](h)
        return h if h.shape == out.shape else 0.0

    def trunk(
        self,
        x: torch.Tensor,
        selection=None,
        router_weights: list | None = None,
        layer_inputs: list | None = None,
    ) -> torch.Tensor:
        """Stem and modular layers. Appends each router's full softmax to ``router_weights``
        and each layer's input to ``layer_inputs`` when given."""
        return self.layers(self.stem(x), selection, 0, router_weights, layer_inputs)

    def suffix(self, h: torch.Tensor, split: int) -> torch.Tensor:
        """Logits of the full model from ``h``, the input of layer ``split`` (what a
        device that ran the layers before it sends): every module of the layers from
        ``split`` on, then the head."""
        return self.head(self.layers(h, None, split))

    def layers(
        self,
        h: torch.Tensor,
        selection=None,
        start: int = 0,
        router_weights: list | None = None,
        layer_inputs: list | None = None,
    ) -> torch.Tensor:
        """The modular layers from ``start`` on, ``h`` being the input of layer ``start``."""
        layers = zip(self.routers, self.blocks, selection or self.full_selection(), strict=True)
        for layer, (router, blocks, present) in enumerate(layers):
            if layer < start:
                continue
            if layer_inputs is not None:
                layer_inputs.append(h)
            logits = router(h)
            if router_weights is not None:
                router_weights.append(torch.softmax(logits, dim=1))
            outputs = [blocks[m](h) for m in present]
            mixed = mix(self.base(layer, h, outputs[0]), logits, outputs, list(present))
            h = ACTIVATIONS[self.posts[layer]](mixed)
        return h


class SubModel(nn.Module):
    """A fixed sub-model as one module: what a fused program is exported from."""

    def __init__(self, net: ModularNet, selection) -> None:
        super().__init__()
        self.net = net
        self.selection = tuple(tuple(layer) for layer in selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.selection)


class Trunk(nn.Module):
    """A fixed sub-model's stem and layers as one module: its fused trunk program, which a
    device runs instead of the parts once loaded (the head stays its own program)."""

    def __init__(self, net: ModularNet, selection) -> None:
        super().__init__()
        self.net = net
        self.selection = tuple(tuple(layer) for layer in selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(x, self.selection)


def parts(net: ModularNet) -> dict[str, nn.Module]:
    """Every separately exported part, in the order a forward pass calls them."""
    names = part_names(net.full_selection(), net.layout())
    return {name: part_module(net, name) for name in names}


def part_module(net: ModularNet, name: str) -> nn.Module:
    """The module behind the part called ``name``."""
    if name in ("stem", "head"):
        return getattr(net, name)
    layer, _, kind = name.removeprefix("layer").partition(".")
    if kind == "router":
        return net.routers[int(layer)]
    if kind == "shortcut":
        return net.shortcuts[layer]
    return net.blocks[int(layer)][int(kind.removeprefix("block"))]


__all__ = ["ModularNet", "ModularSpec", "SubModel", "parts", "part_name", "preset"]

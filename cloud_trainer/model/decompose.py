"""ECLM's block-level decomposition: an existing network as layers of M combinable modules.

Every residual block becomes one layer of the ``ModularNet`` container. In eval mode each
batch norm is an affine map, so it folds into the convolution before it. The block's
hidden channels are split into M groups (``numpy.array_split``, so M need not divide them):

- ResNet BasicBlock: module m is ``conv2_m(relu(conv1_m(x)))``; ``conv1_m`` holds conv1's
  output channels of group m with bn1 folded in, ``conv2_m`` conv2's input channels of group
  m with bn2's scale. A convolution is a sum over its input channels, so the M modules'
  outputs add up to ``bn2(conv2(...))`` minus bn2's shift; each module carries shift/M.
  The shortcut is the folded downsample (or the identity), the post-sum activation ReLU.
- MobileNetV2 InvertedResidual: the expanded channels are split; module m is expand 1x1
  (group m, bn folded), ReLU6, depthwise 3x3 (group m, bn folded), ReLU6, project 1x1 from
  group m with the bn's scale (shift/M in its bias). The residual is the identity where the
  block has one (the container adds ``h`` when the shapes match); nothing follows the sum.
- MobileNetV2's ends: ``features.0`` and ``features.1`` (the stem convolution and the one
  block without an expansion, which has nothing to split) form the stem. ``features.18``
  (1x1 conv to 1280, bn, ReLU6) is one more layer, split by *input* channels: module m
  reads channel group m of the last block's output (a 1x1 convolution is the sum of its
  input channels' contributions), no base, ReLU6 after the sum - exact, and it keeps the
  head a pool and a linear layer, so the device's adapter still starts from the head's fc
  on the features the device computes (the pooled last layer's output).

The router of a layer starts at zero, so its softmax gives each of the M modules 1/M; each
module's output is scaled by M (folded into its last convolution) and the full decomposed
model starts equal to the original. ``blank_components(spec)`` rebuilds the same structure
from the spec alone (a saved decomposed model loads through ``load_model``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cloud_trainer.errors import ConfigError
from cloud_trainer.model.modular import (
    Components,
    Features,
    InvertedBlock,
    ModularNet,
    ModularSpec,
    Router,
    relu6,
)
from cloud_trainer.model.networks import RESNET_BLOCKS, build


class BasicModule(nn.Module):
    """One module of a decomposed BasicBlock: two 3x3 convolutions over a hidden group."""

    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, hidden, 3, stride, padding=1)
        self.conv2 = nn.Conv2d(hidden, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


class ChannelGroupConv(nn.Module):
    """A 1x1 convolution over input channels ``start:stop`` only."""

    def __init__(self, start: int, stop: int, c_out: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.conv = nn.Conv2d(stop - start, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x[:, self.start : self.stop])


class MobileStem(nn.Module):
    """MobileNetV2's ``features.0`` and ``features.1`` with their batch norms folded."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_mid, 3, 2, padding=1)
        self.depthwise = nn.Conv2d(c_mid, c_mid, 3, 1, padding=1, groups=c_mid)
        self.project = nn.Conv2d(c_mid, c_out, 1)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = relu6(self.conv(x))
        out = self.project(relu6(self.depthwise(h)))
        return h + out if self.residual else out


class PooledHead(nn.Module):
    """Global average pooling (as the ``Features`` the device mirrors) and the classifier."""

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.features = Features(size)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@torch.no_grad()
def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``bn(conv(x))`` as one convolution (eval-mode statistics)."""
    scale, shift = bn_affine(bn)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    return conv.weight * scale[:, None, None, None], bias * scale + shift


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    weight, bias = fold(conv, bn)
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        groups=conv.groups,
    )
    out.weight.copy_(weight)
    out.bias.copy_(bias)
    return out


def groups(hidden: int, modules: int) -> list[np.ndarray]:
    if hidden < modules:
        raise ConfigError(f"--modules: {modules} is more than a block's {hidden} hidden channels")
    return np.array_split(np.arange(hidden), modules)


@torch.no_grad()
def _set(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> None:
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)


@torch.no_grad()
def basic_layer(block, modules: int) -> list[nn.Module]:
    """The M modules of a ResNet BasicBlock."""
    w1, b1 = fold(block.conv1, block.bn1)
    scale, shift = bn_affine(block.bn2)
    w2 = block.conv2.weight * scale[:, None, None, None]
    out = []
    for g in groups(w1.shape[0], modules):
        g = torch.from_numpy(g)
        m = BasicModule(block.conv1.in_channels, len(g), w2.shape[0], block.conv1.stride[0])
        _set(m.conv1, w1[g], b1[g])
        _set(m.conv2, modules * w2[:, g], shift)  # M * (shift / M)
        out.append(m)
    return out


@torch.no_grad()
def inverted_layer(block, modules: int) -> list[nn.Module]:
    """The M modules of a MobileNetV2 InvertedResidual with an expansion."""
    expand, depthwise, project, bn = block.conv
    we, be = fold(expand[0], expand[1])
    wd, bd = fold(depthwise[0], depthwise[1])
    scale, shift = bn_affine(bn)
    wp = project.weight * scale[:, None, None, None]
    out = []
    for g in groups(we.shape[0], modules):
        g = torch.from_numpy(g)
        m = InvertedBlock(we.shape[1], len(g), wp.shape[0], depthwise[0].stride[0])
        _set(m.expand, we[g], be[g])
        _set(m.depthwise, wd[g], bd[g])
        _set(m.project, modules * wp[:, g], shift)
        out.append(m)
    return out


@torch.no_grad()
def last_conv_layer(conv_bn_act, modules: int) -> list[nn.Module]:
    """MobileNetV2's ``features.18`` split by its input channels."""
    w, b = fold(conv_bn_act[0], conv_bn_act[1])
    out = []
    for g in groups(w.shape[1], modules):
        m = ChannelGroupConv(int(g[0]), int(g[-1]) + 1, w.shape[0])
        _set(m.conv, modules * w[:, int(g[0]) : int(g[-1]) + 1], b)
        out.append(m)
    return out


@torch.no_grad()
def _stem(net: nn.Module, arch: str) -> nn.Module:
    if arch in RESNET_BLOCKS:
        return nn.Sequential(folded_conv(net.conv1, net.bn1), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    first, block = net.features[0], net.features[1]
    dw, project, bn = block.conv
    stem = MobileStem(
        first[0].in_channels, first[0].out_channels, project.out_channels, block.use_res_connect
    )
    _set(stem.conv, *fold(first[0], first[1]))
    _set(stem.depthwise, *fold(dw[0], dw[1]))
    _set(stem.project, *fold(project, bn))
    return stem


def _layers(net: nn.Module, arch: str, modules: int):
    """(original block, its modules, its shortcut or None, post, has identity residual)."""
    if arch in RESNET_BLOCKS:
        for block in net.block_list():
            short = block.downsample
            shortcut = None if short is None else folded_conv(short[0], short[1])
            yield block, basic_layer(block, modules), shortcut, "relu", short is None
        return
    for block in list(net.features)[2:-1]:
        yield block, inverted_layer(block, modules), None, "none", block.use_res_connect
    yield net.features[-1], last_conv_layer(net.features[-1], modules), None, "relu6", False


@torch.no_grad()
def decompose(net: nn.Module, spec: ModularSpec) -> ModularNet:
    """The decomposed ModularNet of ``net`` (an ``networks.build(spec.arch, ...)`` network)."""
    net = net.eval()
    modules = spec.modules_per_layer
    stem = _stem(net, spec.arch)
    h = stem(torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size))
    routers, blocks, shortcuts, posts = [], [], {}, []
    layers = enumerate(_layers(net, spec.arch, modules))
    for layer, (block, parts, shortcut, post, identity) in layers:
        router = Router(h.shape[1], h.shape[2], modules)
        nn.init.zeros_(router.fc.weight)  # uniform routing: the decomposed model is exact
        nn.init.zeros_(router.fc.bias)
        out = block(h)
        if shortcut is None and (out.shape == h.shape) != identity:
            raise ConfigError(
                f"{spec.arch}: block {layer} keeps its shape without a residual; the modular "
                "container would add one"
            )
        routers.append(router)
        blocks.append(parts)
        posts.append(post)
        if shortcut is not None:
            shortcuts[layer] = shortcut
        h = out
    fc = net.fc if spec.arch in RESNET_BLOCKS else net.classifier[1]
    head = PooledHead(fc.in_features, h.shape[2], fc.out_features)
    head.fc.load_state_dict(fc.state_dict())
    parts = Components(stem, routers, blocks, head, shortcuts, tuple(posts))
    return ModularNet(spec, parts).eval()


def spec_for(
    arch: str,
    *,
    modules: int,
    num_classes: int,
    width: float = 1.0,
    image_size: int = 32,
    in_channels: int = 3,
) -> ModularSpec:
    """The spec of ``arch`` decomposed into ``modules`` per layer (sizes for the record)."""
    net = build(arch, num_classes=num_classes, width=width, in_channels=in_channels).eval()
    if arch in RESNET_BLOCKS:
        stem, blocks = net.conv1.out_channels, net.block_list()
        widths = [b.conv2.out_channels for b in blocks]
        strides = [b.conv1.stride[0] for b in blocks]
        hidden = [b.conv1.out_channels for b in blocks]
        stem_stride = 4
    else:
        stem, blocks = net.features[1].conv[-2].out_channels, list(net.features)[2:]
        widths = [b.conv[-2].out_channels for b in blocks[:-1]] + [net.last_channel]
        strides = [b.stride for b in blocks[:-1]] + [1]
        hidden = [b.conv[0][0].out_channels for b in blocks[:-1]] + [widths[-2]]
        stem_stride = 2
    return ModularSpec(
        in_channels=in_channels,
        image_size=image_size,
        channels=stem,
        layers=len(widths),
        modules_per_layer=modules,
        num_classes=num_classes,
        widths=tuple(widths),
        strides=tuple(strides),
        hidden=tuple(hidden),
        stem_stride=stem_stride,
        block="conv" if arch in RESNET_BLOCKS else "inverted",
        arch=arch,
        width_mult=width,
    )


def original_for(spec: ModularSpec) -> nn.Module:
    """The (random) original network a decomposed spec came from."""
    return build(
        spec.arch,
        num_classes=spec.num_classes,
        width=spec.width_mult,
        in_channels=spec.in_channels,
    )


def blank_components(spec: ModularSpec) -> Components:
    """The parts of a decomposed model of ``spec``, random: a saved state dict loads into
    them. (Decomposing a random original gives exactly the structure a real one does.)"""
    net = decompose(original_for(spec), spec)
    routers = list(net.routers)
    blocks = [list(layer) for layer in net.blocks]
    shortcuts = {int(k): v for k, v in net.shortcuts.items()}
    return Components(net.stem, routers, blocks, net.head, shortcuts, net.posts)


@torch.no_grad()
def max_logit_difference(original: nn.Module, decomposed: ModularNet, x: np.ndarray) -> float:
    """Max abs difference of the logits of the original and the full decomposed model."""
    t = torch.from_numpy(x)
    return float((original.eval()(t) - decomposed.eval()(t)).abs().max())

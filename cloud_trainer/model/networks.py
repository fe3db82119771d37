"""ResNet-18/34 and MobileNetV2 with torchvision's module and state-dict key names.

torchvision cannot be imported on this machine (its PyPI build links CUDA, DESIGN.md section
6), so the architectures are written out here, key for key (``conv1``, ``bn1``,
``layer1.0.downsample.0``, ``fc``; ``features.0.0``, ``features.1.conv.0.0``,
``features.18.1``, ``classifier.1``): a user's torchvision checkpoint loads with
``load_state_dict(strict=True)``. ``width`` scales every channel count for reduced-width
tests; at 1.0 the networks are torchvision's exactly.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cloud_trainer.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "mobilenet_v2")
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
# MobileNetV2's inverted-residual settings: expansion t, channels c, repeats n, stride s.
MOBILENET_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of 8, never 10% below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, blocks, num_classes: int = 1000, width: float = 1.0, in_channels=3):
        super().__init__()
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = widths[0]
        for i, (n, c) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(c_in, c, stride)] + [BasicBlock(c, c) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            c_in = c
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, num_classes)

    def block_list(self) -> list[BasicBlock]:
        return [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.avgpool(x).flatten(1))


class ConvBNReLU(nn.Sequential):
    """torchvision's Conv2dNormActivation: keys ``0`` (conv) and ``1`` (bn), ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(c_in * expand))
        self.stride, self.expand = stride, expand
        self.use_res_connect = stride == 1 and c_in == c_out
        layers = [ConvBNReLU(c_in, hidden, 1)] if expand != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        c_in = make_divisible(32 * width)
        self.last_channel = make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [ConvBNReLU(in_channels, c_in, stride=2)]
        for t, c, n, s in MOBILENET_SETTINGS:
            c_out = make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        features.append(ConvBNReLU(c_in, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(x.flatten(1))


def build(arch: str, *, num_classes: int, width: float = 1.0, in_channels: int = 3) -> nn.Module:
    """The network ``arch`` with random weights."""
    if arch in RESNET_BLOCKS:
        return ResNet(RESNET_BLOCKS[arch], num_classes, width, in_channels)
    if arch == "mobilenet_v2":
        return MobileNetV2(num_classes, width, in_channels)
    raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")


def load_weights(net: nn.Module, path: Path) -> nn.Module:
    """``net`` with the state dict in ``path`` loaded strictly; any mismatch is refused
    with the file named. Accepts a bare state dict or one under ``state_dict``/``model``."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such checkpoint file") from exc
    except Exception as exc:  # torch.load raises many unrelated types on a broken file
        raise ConfigError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"{path}: not a state dict (a mapping of names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_few(wrong)}")
    if problems:
        hint = ""
        if wrong and all(w.startswith(("fc.", "classifier.1.")) for w in wrong):
            hint = " (the classifier must have as many classes as the data)"
        raise ConfigError(
            f"{path}: does not fit {type(net).__name__}: " + "; ".join(problems) + hint
        )
    net.load_state_dict(state, strict=True)
    return net


def _few(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

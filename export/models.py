"""The model registry: a name maps to a builder plus its input sizes, normalization and task.

Adding a model is one decorated function::

    @register_model("mynet", resize=256, crop=224)
    def mynet(num_classes: int) -> nn.Module: ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

Builder = Callable[[int], nn.Module]
DENSENET_BC_DEPTH = 22  # the registry's cifar_densenet_bc: k=12, 3 blocks of 3 bottleneck layers


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about an architecture.

    resize/crop: the default S and C (resize shorter side to S, crop C x C).
    torchvision_name: the torchvision builder whose weight enums and state_dicts apply.
    geometry: how the gateway fits an image to the input: "crop" (resize S, crop C) or
        "letterbox" (fit into S x S keeping the aspect ratio, padded; detection and segmentation).
    pad_to: the spatial size the network itself consumes when it is larger than crop; the
        crop is zero-padded (black) to pad_to x pad_to before normalization, in training and
        inside the exported graph alike (LeNet-5: 28 -> 32).
    """

    name: str
    builder: Builder
    resize: int
    crop: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str = "classification"
    ten_crop_default: bool = False
    torchvision_name: str | None = None
    pad_to: int | None = None
    geometry: str = "crop"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, resize: int, crop: int, channels: int = 3,
                   mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                   task: str = "classification", ten_crop_default: bool = False,
                   torchvision_name: str | None = None, pad_to: int | None = None,
                   geometry: str = "crop") -> Callable[[Builder], Builder]:
    def decorate(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, resize, crop, channels, tuple(mean), tuple(std), task,
                                     ten_crop_default, torchvision_name, pad_to, geometry)
        return fn
    return decorate


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, init: str | None = "kaiming") -> nn.Module:
    """Build a registered model; ``init`` re-initialises conv/linear weights (None keeps the builder's)."""
    model = get_entry(name).builder(num_classes)
    if init is not None:
        init_weights(model, init)
        if hasattr(model, "reset_heads"):  # heads with their own priors (CenterNet's heatmap bias)
            model.reset_heads()
    return model


def init_weights(model: nn.Module, scheme: str = "kaiming") -> None:
    """He init (Var[w] = 2/n_in) for ReLU nets, or "lecun" (Var[w] = 1/n_in) to compare against.

    n_in is the fan-in (in_channels * kh * kw for a conv). Biases start at 0,
    BatchNorm at weight 1 / bias 0.
    """
    gains = {"kaiming": 2.0, "he": 2.0, "lecun": 1.0}
    if scheme not in gains:
        raise ValueError(f"init must be one of {sorted(gains)}, not {scheme!r}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, 0.0, math.sqrt(gains[scheme] / fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------ models

class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and BatchNorm: 32x32x1 in, logits out."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.BatchNorm1d(120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.BatchNorm1d(84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# MNIST digits are 28x28; LeNet sees them zero-padded to 32x32 (the ONNX graph pads in-graph).
@register_model("lenet5", resize=28, crop=28, channels=1, mean=MNIST_MEAN, std=MNIST_STD, pad_to=32)
def lenet5(num_classes: int) -> nn.Module:
    return LeNet5(num_classes)


def _torchvision(arch: str) -> Builder:
    def build(num_classes: int) -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, arch)(weights=None, num_classes=num_classes)
    build.__name__ = arch
    return build


# AlexNet's own paper used 10-crop at test time, so it is that model's default.
register_model("alexnet", resize=256, crop=224, ten_crop_default=True, torchvision_name="alexnet")(_torchvision("alexnet"))
register_model("resnet18", resize=256, crop=224, torchvision_name="resnet18")(_torchvision("resnet18"))
register_model("resnet34", resize=256, crop=224, torchvision_name="resnet34")(_torchvision("resnet34"))
register_model("resnet50", resize=256, crop=224, torchvision_name="resnet50")(_torchvision("resnet50"))
register_model("densenet121", resize=256, crop=224, torchvision_name="densenet121")(_torchvision("densenet121"))


# ------------------------------------------------------------------ CIFAR-style nets (He et al. 2016, sec. 4.2)

class _CifarBlock(nn.Module):
    """Two 3x3 conv + BN layers; with ``residual`` the input is added back (option A: a parameter-free
    shortcut, strided and zero-padded in channels when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual, self.stride, self.extra = residual, stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.extra:
                shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
            y = y + shortcut
        return torch.relu(y)


class CifarNet(nn.Module):
    """The 6n+2-layer CIFAR network of "Deep Residual Learning": a 3x3 conv, three stages of n blocks
    at widths w, 2w, 4w (stride 2 between stages), global average pooling and a linear classifier.
    ``residual=False`` gives the "plain" counterpart with the same layers and no shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10, *, width: int = 16, residual: bool = True,
                 in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, ... 56), got {depth}")
        n = (depth - 2) // 6
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True)]
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(n):
                layers.append(_CifarBlock(cin, cout, 2 if stage > 0 and block == 0 else 1, residual))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.depth, self.residual = depth, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _cifar(depth: int, residual: bool) -> Builder:
    def build(num_classes: int) -> nn.Module:
        return CifarNet(depth, num_classes, residual=residual)
    build.__name__ = f"cifar_{'resnet' if residual else 'plain'}{depth}"
    return build


# Small 3-channel nets that train in CPU minutes on 32x32 crops (the residual-vs-plain experiment uses them).
for _depth in (20, 56):
    register_model(f"cifar_resnet{_depth}", resize=36, crop=32)(_cifar(_depth, True))
    register_model(f"cifar_plain{_depth}", resize=36, crop=32)(_cifar(_depth, False))


# ------------------------------------------------------------------ CIFAR-scale AlexNet and DenseNet-BC

class LocalResponseNorm(nn.Module):
    """AlexNet's local response normalization, b_c = a_c / (k + alpha/n * sum of a^2 over n channels around c)^beta.

    The same function as ``nn.LocalResponseNorm`` (tests check it), computed as a sum of n shifted
    channel slices instead of a 3-D average pool: on the CPU that pool made the LRN layers half of
    the CIFAR AlexNet's training time.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        squares = nn.functional.pad(x * x, (0, 0, 0, 0, self.size // 2, (self.size - 1) // 2))
        window = squares[:, 0:channels]
        for offset in range(1, self.size):
            window = window + squares[:, offset:offset + channels]
        return x / (self.k + (self.alpha / self.size) * window).pow(self.beta)


class CifarAlexNet(nn.Module):
    """AlexNet's design (Krizhevsky et al. 2012) at 32x32: five conv layers with ReLU, local response
    normalization after the first two, overlapping 3x3/2 max-pooling, and three fully-connected layers
    with p=0.5 dropout on the outputs of the first two (the paper's placement). Widths are cut so it
    trains in a CPU minute.

    Every hidden layer, conv and fully-connected, is followed by BatchNorm, the recipe's one addition
    to the paper: without it this net sat at chance for two epochs on the shapes data, and with it on
    the convolutions only it still learned several times slower than ResNet-20.
    """

    def __init__(self, num_classes: int = 10, *, width: int = 32, hidden: int = 256, dropout: float = 0.25,
                 in_channels: int = 3) -> None:
        super().__init__()
        w = width

        def conv(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        def fc(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True), nn.Dropout(dropout)]

        def lrn() -> nn.Module:
            return LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)  # the paper's constants

        self.features = nn.Sequential(
            *conv(in_channels, w, 5), lrn(), nn.MaxPool2d(3, 2),      # 32 -> 15
            *conv(w, 2 * w, 5), lrn(), nn.MaxPool2d(3, 2),            # 15 -> 7
            *conv(2 * w, 3 * w, 3), *conv(3 * w, 3 * w, 3), *conv(3 * w, 2 * w, 3),
            nn.MaxPool2d(3, 2),                                       # 7 -> 3
        )
        self.classifier = nn.Sequential(nn.Flatten(), *fc(2 * w * 9, hidden), *fc(hidden, hidden),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if tuple(x.shape[-2:]) != (3, 3):  # crops other than 32: pool to the classifier's 3x3 (decided at trace time)
            x = nn.functional.adaptive_avg_pool2d(x, 3)
        return self.classifier(x)


class _DenseLayer(nn.Module):
    """DenseNet-BC's bottleneck layer: BN-ReLU-1x1 conv (4k) then BN-ReLU-3x3 conv (k); its k maps are
    concatenated to everything before it."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class CifarDenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs (Huang et al. 2017, sec. 3): a 3x3 conv to 2k maps, three dense
    blocks of (depth - 4) / 6 bottleneck layers, transitions that halve the maps (compression 0.5)
    and the resolution, then BN-ReLU, global average pooling and a linear classifier."""

    def __init__(self, depth: int, num_classes: int = 10, *, growth: int = 12, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4 with n >= 1 (10, 16, 22, ... 100), got {depth}")
        n = (depth - 4) // 6
        channels = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(n):
                layers.append(_DenseLayer(channels, growth))
                channels += growth
            if block < 2:
                out = channels // 2
                layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, out, 1, bias=False),
                           nn.AvgPool2d(2)]
                channels = out
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# AlexNet keeps its 10-crop default at this scale too; the default repository serves both on shapes.
@register_model("cifar_alexnet", resize=36, crop=32, ten_crop_default=True)
def cifar_alexnet(num_classes: int) -> nn.Module:
    return CifarAlexNet(num_classes)


@register_model("cifar_densenet_bc", resize=36, crop=32)
def cifar_densenet_bc(num_classes: int) -> nn.Module:
    return CifarDenseNet(DENSENET_BC_DEPTH, num_classes)


# The detection and segmentation networks register themselves on import (they use register_model above).
from export import dense_models as _dense_models  # noqa: E402,F401

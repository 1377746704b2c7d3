"""Small dense-prediction networks trained from scratch: a CenterNet-style detector and a U-Net segmenter.

Both see letterboxed S x S RGB inputs (S = 128 for the generated scenes) and are registered in
export/models.py's registry with their task, so ``imgserve train`` picks the matching recipe and the
exporter the matching serving graph (export/dense_export.py).

* ``CenterNetTiny`` (Zhou et al. 2019, "Objects as Points", with TTFNet's box head): a residual
  encoder to stride 16, a small top-down decoder with lateral connections back to stride 4, and two heads
  at stride 4: a per-class centre heatmap (logits) and the box as distances (left, top, right,
  bottom, input pixels, >= 0) from each cell. Decoding (peaks by 3x3 max-pooling, TopK) happens in
  the serving graph; export/centernet.py has the targets, loss and decoding.
* ``UNetTiny`` (Ronneberger et al. 2015, narrowed): the same encoder with skips at strides 2, 4
  and 8, a decoder back to stride 2, class logits there and a bilinear upsampling to S x S, plus an
  auxiliary stride-8 classifier for deep supervision in training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.models import register_model

SCENES_SIZE = 128
DETECTOR_STRIDE = 4
HEATMAP_PRIOR_BIAS = -2.19  # sigmoid(-2.19) = 0.1: CenterNet's initial heatmap, so the focal loss starts calm
BOX_SCALE = 16.0  # distances are ReLU(raw) * 16 px (TTFNet's wh_offset_base): raw values of order 1


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU, 'same' padding."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BN layers with the input added back (He et al. 2016's basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class Encoder(nn.Module):
    """Four stride-2 stages, each a strided conv and ``blocks[i]`` residual blocks; returns the features at
    strides 2, 4, 8, 16.

    Depth goes where the objects are resolved (strides 8 and 16, few pixels, cheap): telling a star from a
    cross at any rotation takes depth, as the shapes classifiers showed (ResNet-20 learns it in epochs, a
    shallow net does not), while the stride-2 stage stays a single conv because it is the expensive one.
    """

    def __init__(self, widths: tuple[int, int, int, int], blocks: tuple[int, int, int, int] = (0, 1, 2, 2),
                 in_channels: int = 3) -> None:
        super().__init__()
        stages, cin = [], in_channels
        for w, n in zip(widths, blocks):
            stages.append(nn.Sequential(conv_bn(cin, w, 3, 2), *(ResidualBlock(w) for _ in range(n))))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.widths = widths

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class CenterNetTiny(nn.Module):
    """Heatmap logits [N, C, S/4, S/4] and box distances [N, 4, S/4, S/4] in input pixels (see the module doc)."""

    def __init__(self, num_classes: int, *, widths: tuple[int, int, int, int] = (16, 32, 64, 96),
                 neck: int = 48, head: int = 48) -> None:
        super().__init__()
        self.encoder = Encoder(widths)
        w1, w2, w3, w4 = widths
        self.reduce16 = conv_bn(w4, 64, 1)
        self.lateral8 = conv_bn(w3, 64, 1)
        self.smooth8 = conv_bn(64, 64)
        self.reduce8 = conv_bn(64, neck, 1)
        self.lateral4 = conv_bn(w2, neck, 1)
        self.smooth4 = conv_bn(neck, neck)
        self.trunk = conv_bn(neck, head)
        self.heatmap = nn.Conv2d(head, num_classes, 1)
        self.box = nn.Conv2d(head, 4, 1)
        self.num_classes, self.stride = num_classes, DETECTOR_STRIDE

    def reset_heads(self) -> None:
        """The heatmap starts at the prior (0.1), boxes at 16 px a side; called after the registry's init."""
        nn.init.constant_(self.heatmap.bias, HEATMAP_PRIOR_BIAS)
        for conv in (self.heatmap, self.box):
            nn.init.normal_(conv.weight, 0.0, 0.01)
        nn.init.constant_(self.box.bias, 0.5)  # positive, so no distance starts in the ReLU's flat part

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, c4, c8, c16 = self.encoder(x)
        p8 = self.smooth8(_up(self.reduce16(c16)) + self.lateral8(c8))
        p4 = self.smooth4(_up(self.reduce8(p8)) + self.lateral4(c4))
        t = self.trunk(p4)
        return self.heatmap(t), F.relu(self.box(t)) * BOX_SCALE


class UNetTiny(nn.Module):
    """Class logits [N, C, S, S] for S x S inputs (see the module doc).

    In training mode it also returns auxiliary logits at stride 8, from the decoder's deepest stage
    (deep supervision): the class of an object is decided by deep features, and a loss right there trains
    them directly instead of through the full-resolution path. Eval mode (and so the export) returns the
    logits alone.
    """

    def __init__(self, num_classes: int, *, widths: tuple[int, int, int, int] = (16, 32, 64, 96),
                 decoder: tuple[int, int, int] = (64, 32, 16)) -> None:
        super().__init__()
        self.encoder = Encoder(widths)
        w1, w2, w3, w4 = widths
        d8, d4, d2 = decoder
        self.up8 = nn.Sequential(conv_bn(w4 + w3, d8), conv_bn(d8, d8))
        self.up4 = nn.Sequential(conv_bn(d8 + w2, d4), conv_bn(d4, d4))
        self.up2 = nn.Sequential(conv_bn(d4 + w1, d2, 1), conv_bn(d2, d2))  # 1x1 fuse first: stride 2 is costly
        self.classifier = nn.Conv2d(d2, num_classes, 1)
        self.aux_classifier = nn.Conv2d(d8, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        c2, c4, c8, c16 = self.encoder(x)
        y8 = self.up8(torch.cat([_up(c16), c8], dim=1))
        y = self.up4(torch.cat([_up(y8), c4], dim=1))
        y = self.up2(torch.cat([_up(y), c2], dim=1))
        logits = F.interpolate(self.classifier(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.training:
            return logits, self.aux_classifier(y8)
        return logits


@register_model("centernet_tiny", resize=SCENES_SIZE, crop=SCENES_SIZE, task="detection", geometry="letterbox")
def centernet_tiny(num_classes: int) -> nn.Module:
    return CenterNetTiny(num_classes)


@register_model("unet_tiny", resize=SCENES_SIZE, crop=SCENES_SIZE, task="segmentation", geometry="letterbox")
def unet_tiny(num_classes: int) -> nn.Module:
    return UNetTiny(num_classes)

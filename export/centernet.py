"""CenterNet's training targets, loss and decoding ("Objects as Points", Zhou et al. 2019).

One module for the maths so training, validation and the exported graph cannot drift apart:
the serving graph (export/dense_export.py) calls ``decode`` exactly as validation does.

Targets, per image at the output resolution (S / stride): a per-class heatmap with a Gaussian
bump at each object's centre cell (1 at the cell itself; an elliptical Gaussian with sigma
``alpha * side / 6`` per axis, as in TTFNet, so elongated boxes get elongated bumps), and at up
to ``max_objects`` centre cells the box size (w, h) and the sub-cell offset of the true centre,
all in output cells. The loss is the penalty-reduced focal loss on the heatmap plus L1 on size
(weight 0.1) and offset (weight 1), normalised by the number of objects.

Decoding: sigmoid heatmap, keep cells equal to their 3x3 max (the peaks; this replaces NMS),
TopK over classes and cells, gather size and offset at each peak, boxes in input pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

GAUSSIAN_ALPHA = 0.54
SIZE_WEIGHT = 0.1
OFFSET_WEIGHT = 1.0
MAX_OBJECTS = 32
SCORE_FLOOR = 0.05  # detections below this are not reported (rows zeroed, not counted)


@dataclass(frozen=True)
class Encoded:
    """One image's targets: heatmap float32 [C, H, W]; index int64 [M]; size, offset float32 [M, 2]; valid float32 [M]."""

    heatmap: np.ndarray
    index: np.ndarray
    size: np.ndarray
    offset: np.ndarray
    valid: np.ndarray


def encode(boxes: np.ndarray, labels: np.ndarray, *, num_classes: int, input_size: int, stride: int,
           max_objects: int = MAX_OBJECTS, alpha: float = GAUSSIAN_ALPHA) -> Encoded:
    """Targets for boxes (x1 y1 x2 y2, input pixels) with 0-based ``labels`` (see the module docstring)."""
    out = input_size // stride
    heat = np.zeros((num_classes, out, out), dtype=np.float32)
    index = np.zeros(max_objects, dtype=np.int64)
    size = np.zeros((max_objects, 2), dtype=np.float32)
    offset = np.zeros((max_objects, 2), dtype=np.float32)
    valid = np.zeros(max_objects, dtype=np.float32)
    grid = np.arange(out, dtype=np.float32)
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")  # big first
    for k, i in enumerate(order[:max_objects]):
        x1, y1, x2, y2 = (float(v) / stride for v in boxes[i])
        w, h = x2 - x1, y2 - y1
        if w <= 0 or h <= 0:
            continue
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ix, iy = min(int(cx), out - 1), min(int(cy), out - 1)
        sx, sy = max(alpha * w / 6, 0.3), max(alpha * h / 6, 0.3)
        bump = np.exp(-((grid[None, :] - ix) ** 2) / (2 * sx * sx) - ((grid[:, None] - iy) ** 2) / (2 * sy * sy))
        c = int(labels[i])
        np.maximum(heat[c], bump, out=heat[c])
        heat[c, iy, ix] = 1.0
        index[k], size[k], offset[k], valid[k] = iy * out + ix, (w, h), (cx - ix, cy - iy), 1.0
    return Encoded(heat, index, size, offset, valid)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (alpha 2, beta 4), summed, not yet normalised."""
    logits = logits.float()
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = F.logsigmoid(logits) * (1 - p) ** 2 * pos
    neg_loss = F.logsigmoid(-logits) * p ** 2 * (1 - target) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum())


def _gather(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[N, 2, H, W] at flat cell indices [N, K] -> [N, K, 2]."""
    flat = maps.flatten(2)
    return flat.gather(2, index.unsqueeze(1).expand(-1, flat.shape[1], -1)).transpose(1, 2)


def centernet_loss(heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, targets: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (heatmap, size, offset) for a batch of network outputs and encoded targets."""
    valid = targets["valid"]
    num = valid.sum().clamp_min(1.0)
    hm = focal_loss(heat, targets["heatmap"]) / num
    m = valid.unsqueeze(-1)
    sz = (torch.abs(_gather(size, targets["index"]) - targets["size"]) * m).sum() / num
    off = (torch.abs(_gather(offset, targets["index"]) - targets["offset"]) * m).sum() / num
    total = hm + SIZE_WEIGHT * sz + OFFSET_WEIGHT * off
    return total, {"heatmap_loss": float(hm.detach()), "size_loss": float(sz.detach()),
                   "offset_loss": float(off.detach())}


def decode(heat_logits: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, *, k: int, stride: int,
           input_size: int, floor: float = SCORE_FLOOR
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Network outputs -> (num_detections int32 [N, 1], boxes float32 [N, K, 4], scores [N, K], classes int32 [N, K]).

    Boxes are x1 y1 x2 y2 in input pixels, clipped to the input; scores sorted descending; rows from
    num_detections on (scores under ``floor``) are all zero. Traceable to ONNX with a dynamic batch.
    """
    heat = torch.sigmoid(heat_logits.float())
    peaks = F.max_pool2d(heat, 3, stride=1, padding=1)
    heat = torch.where(peaks == heat, heat, torch.zeros_like(heat))
    cells = heat.shape[2] * heat.shape[3]
    width = heat.shape[3]
    scores, index = torch.topk(heat.flatten(1), k, dim=1)
    classes = torch.div(index, cells, rounding_mode="floor")
    cell = index - classes * cells
    ys = torch.div(cell, width, rounding_mode="floor")
    xs = cell - ys * width
    wh = _gather(size.float(), cell).clamp_min(0.0)
    off = _gather(offset.float(), cell)
    cx = xs.to(torch.float32) + off[..., 0]
    cy = ys.to(torch.float32) + off[..., 1]
    half_w, half_h = wh[..., 0] / 2, wh[..., 1] / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1) * float(stride)
    boxes = boxes.clamp(0.0, float(input_size))
    keep = scores >= floor
    keep_f = keep.to(torch.float32)
    num = keep.sum(dim=1, keepdim=True).to(torch.int32)  # a sum of int32 is int64 in torch
    return num, boxes * keep_f.unsqueeze(-1), scores * keep_f, (classes * keep.to(classes.dtype)).to(torch.int32)

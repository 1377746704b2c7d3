"""CenterNet's training targets, loss and decoding, with TTFNet's box regression.

("Objects as Points", Zhou et al. 2019; "Training-Time-Friendly Network", Liu et al. 2020.)
One module for the maths so training, validation and the exported graph cannot drift apart:
the serving graph (export/dense_export.py) calls ``decode`` exactly as validation does.

Targets, per image at the output resolution (S / stride):

* a per-class heatmap with a Gaussian bump at each object's centre cell (1 at the cell itself; an
  elliptical Gaussian with sigma ``alpha * side / 6`` per axis, so elongated boxes get elongated
  bumps), trained with CenterNet's penalty-reduced focal loss, normalised by the object count;
* the box itself, regressed as distances (left, top, right, bottom, input pixels) from every cell
  near the centre (inside ``beta`` times the box around it), not only from the centre cell: many
  more regression samples per object is what makes TTFNet train several times faster than
  CenterNet's size + offset at one cell. Each object's cells are weighted by the Gaussian,
  normalised to log(box area) in total, and the loss is GIoU (weight 5). Smaller objects are drawn
  last, so where objects overlap the cells belong to the smaller one.

Decoding: sigmoid heatmap, keep cells equal to their 3x3 max (the peaks; this replaces NMS) and only
the best class of each cell (otherwise one object can come out twice, as two classes with the same
box), TopK over classes and cells, the distances at each peak give its box.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

GAUSSIAN_ALPHA = 0.54
REGRESSION_BETA = 0.54
BOX_WEIGHT = 5.0
SCORE_FLOOR = 0.05  # detections below this are not reported (rows zeroed, not counted)


@dataclass(frozen=True)
class Encoded:
    """One image's targets: heatmap float32 [C, H, W]; box float32 [4, H, W] (x1 y1 x2 y2, input pixels) with
    its per-cell weight float32 [H, W] (0 where a cell regresses nothing)."""

    heatmap: np.ndarray
    box: np.ndarray
    weight: np.ndarray


def cell_centres(cells: int, stride: int) -> np.ndarray:
    """Input-pixel coordinate of each output cell's reference point along one axis."""
    return (np.arange(cells, dtype=np.float32) + 0.5) * stride


def encode(boxes: np.ndarray, labels: np.ndarray, *, num_classes: int, input_size: int, stride: int,
           alpha: float = GAUSSIAN_ALPHA, beta: float = REGRESSION_BETA) -> Encoded:
    """Targets for boxes (x1 y1 x2 y2, input pixels) with 0-based ``labels`` (see the module docstring)."""
    out = input_size // stride
    heat = np.zeros((num_classes, out, out), dtype=np.float32)
    box = np.zeros((4, out, out), dtype=np.float32)
    weight = np.zeros((out, out), dtype=np.float32)
    grid = np.arange(out, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in np.argsort(-areas, kind="stable"):  # big first: smaller objects overwrite shared cells
        x1, y1, x2, y2 = (float(v) / stride for v in boxes[i])
        w, h = x2 - x1, y2 - y1
        if w <= 0 or h <= 0:
            continue
        ix, iy = min(int((x1 + x2) / 2), out - 1), min(int((y1 + y2) / 2), out - 1)
        sx, sy = max(alpha * w / 6, 0.3), max(alpha * h / 6, 0.3)
        bump = np.exp(-((grid[None, :] - ix) ** 2) / (2 * sx * sx) - ((grid[:, None] - iy) ** 2) / (2 * sy * sy))
        c = int(labels[i])
        np.maximum(heat[c], bump, out=heat[c])
        heat[c, iy, ix] = 1.0
        region = (np.abs(grid[None, :] - ix) <= beta * w / 2) & (np.abs(grid[:, None] - iy) <= beta * h / 2)
        region[iy, ix] = True
        local = np.where(region, bump, 0.0)
        box[:, region] = boxes[i][:, None]
        weight[region] = (local[region] / local.sum() * np.log(max(float(areas[i]), 2.0))).astype(np.float32)
    return Encoded(heat, box, weight)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (alpha 2, beta 4), summed, not yet normalised."""
    logits = logits.float()
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = F.logsigmoid(logits) * (1 - p) ** 2 * pos
    neg_loss = F.logsigmoid(-logits) * p ** 2 * (1 - target) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum())


def boxes_from_distances(ltrb: torch.Tensor, stride: int) -> torch.Tensor:
    """Distances [N, 4, H, W] from each cell's reference point -> boxes [N, H, W, 4] (x1 y1 x2 y2, input pixels)."""
    h, w = ltrb.shape[-2:]
    ys = (torch.arange(h, dtype=ltrb.dtype, device=ltrb.device) + 0.5) * stride
    xs = (torch.arange(w, dtype=ltrb.dtype, device=ltrb.device) + 0.5) * stride
    cx, cy = xs.view(1, 1, w), ys.view(1, h, 1)
    return torch.stack([cx - ltrb[:, 0], cy - ltrb[:, 1], cx + ltrb[:, 2], cy + ltrb[:, 3]], dim=-1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalised IoU of matching [M, 4] boxes, per box."""
    area_p = (pred[:, 2] - pred[:, 0]).clamp_min(0) * (pred[:, 3] - pred[:, 1]).clamp_min(0)
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    iw = (torch.minimum(pred[:, 2], target[:, 2]) - torch.maximum(pred[:, 0], target[:, 0])).clamp_min(0)
    ih = (torch.minimum(pred[:, 3], target[:, 3]) - torch.maximum(pred[:, 1], target[:, 1])).clamp_min(0)
    inter = iw * ih
    union = area_p + area_t - inter
    iou = inter / union.clamp_min(1e-6)
    enclosing = ((torch.maximum(pred[:, 2], target[:, 2]) - torch.minimum(pred[:, 0], target[:, 0])) *
                 (torch.maximum(pred[:, 3], target[:, 3]) - torch.minimum(pred[:, 1], target[:, 1]))).clamp_min(1e-6)
    return 1 - (iou - (enclosing - union) / enclosing)


def centernet_loss(heat: torch.Tensor, ltrb: torch.Tensor, targets: dict[str, torch.Tensor], *, stride: int
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (heatmap, box) for a batch of network outputs and encoded targets."""
    target_heat = targets["heatmap"]
    num = target_heat.eq(1).float().sum().clamp_min(1.0)
    hm = focal_loss(heat, target_heat) / num
    weight = targets["weight"]
    cells = weight > 0
    if bool(cells.any()):
        pred = boxes_from_distances(ltrb.float(), stride)[cells]
        true = targets["box"].permute(0, 2, 3, 1)[cells]
        w = weight[cells]
        box = (giou_loss(pred, true) * w).sum() / (w.sum() + 1e-4)
    else:
        box = ltrb.sum() * 0.0
    total = hm + BOX_WEIGHT * box
    return total, {"heatmap_loss": float(hm.detach()), "box_loss": float(box.detach())}


def decode(heat_logits: torch.Tensor, ltrb: torch.Tensor, *, k: int, stride: int, input_size: int,
           floor: float = SCORE_FLOOR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Network outputs -> (num_detections int32 [N, 1], boxes float32 [N, K, 4], scores [N, K], classes int32 [N, K]).

    Boxes are x1 y1 x2 y2 in input pixels, clipped to the input; scores sorted descending; rows from
    num_detections on (scores under ``floor``) are all zero. Traceable to ONNX with a dynamic batch.
    """
    heat = torch.sigmoid(heat_logits.float())
    peaks = F.max_pool2d(heat, 3, stride=1, padding=1)
    best_class = heat.amax(dim=1, keepdim=True)  # one class per cell: no box reported twice as two classes
    heat = torch.where((peaks == heat) & (heat == best_class), heat, torch.zeros_like(heat))
    cells = heat.shape[2] * heat.shape[3]
    scores, index = torch.topk(heat.flatten(1), k, dim=1)
    classes = torch.div(index, cells, rounding_mode="floor")
    cell = index - classes * cells
    boxes = boxes_from_distances(ltrb.float(), stride).flatten(1, 2)  # [N, H*W, 4]
    boxes = boxes.gather(1, cell.unsqueeze(-1).expand(-1, -1, 4)).clamp(0.0, float(input_size))
    keep = scores >= floor
    keep_f = keep.to(torch.float32)
    num = keep.sum(dim=1, keepdim=True).to(torch.int32)  # a sum of int32 is int64 in torch
    return num, boxes * keep_f.unsqueeze(-1), scores * keep_f, (classes * keep.to(classes.dtype)).to(torch.int32)

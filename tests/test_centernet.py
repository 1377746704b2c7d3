"""CenterNet targets, loss and in-graph decoding agree: outputs built from the targets decode to the boxes."""
from __future__ import annotations

import numpy as np
import torch

from export.centernet import boxes_from_distances, centernet_loss, decode, encode, giou_loss

SIZE, STRIDE, CLASSES = 128, 4, 3
BOXES = np.array([[10, 12, 40, 30], [60, 60, 100, 118], [64, 70, 80, 90], [3, 90, 20, 127]], np.float32)
LABELS = np.array([0, 1, 2, 1])


def _ideal_outputs() -> tuple[torch.Tensor, torch.Tensor]:
    """What a perfect network would output: logits high exactly at the centre cells, and at every regression
    cell the distances to its target box's sides."""
    enc = encode(BOXES, LABELS, num_classes=CLASSES, input_size=SIZE, stride=STRIDE)
    logits = torch.where(torch.from_numpy(enc.heatmap) == 1, torch.tensor(6.0), torch.tensor(-6.0))[None]
    cells = SIZE // STRIDE
    centres = (np.arange(cells, dtype=np.float32) + 0.5) * STRIDE
    ltrb = np.stack([centres[None, :] - enc.box[0], centres[:, None] - enc.box[1],
                     enc.box[2] - centres[None, :], enc.box[3] - centres[:, None]])
    return logits, torch.from_numpy(np.where(enc.weight > 0, ltrb, 0).astype(np.float32))[None]


def test_ideal_outputs_decode_to_the_boxes() -> None:
    logits, ltrb = _ideal_outputs()
    num, boxes, scores, classes = decode(logits, ltrb, k=10, stride=STRIDE, input_size=SIZE)
    n = int(num[0, 0])
    assert n == len(BOXES)
    got = sorted(zip(classes[0, :n].tolist(), boxes[0, :n].tolist()))
    want = sorted(zip(LABELS.tolist(), BOXES.tolist()))
    for (c1, b1), (c2, b2) in zip(got, want):
        assert c1 == c2 and np.allclose(b1, b2, atol=1e-4)
    assert not boxes[0, n:].any() and not scores[0, n:].any() and not classes[0, n:].any()


def test_ideal_outputs_have_near_zero_box_loss_and_worse_ones_more() -> None:
    logits, ltrb = _ideal_outputs()
    enc = encode(BOXES, LABELS, num_classes=CLASSES, input_size=SIZE, stride=STRIDE)
    targets = {"heatmap": torch.from_numpy(enc.heatmap)[None], "box": torch.from_numpy(enc.box)[None],
               "weight": torch.from_numpy(enc.weight)[None]}
    _, parts = centernet_loss(logits, ltrb, targets, stride=STRIDE)
    assert parts["box_loss"] < 1e-5
    _, worse = centernet_loss(logits, ltrb * 1.3, targets, stride=STRIDE)
    assert worse["box_loss"] > 0.05
    assert enc.weight.sum() > 0 and np.isclose(enc.weight.sum(), np.log((BOXES[:, 2] - BOXES[:, 0]) *
                                                                        (BOXES[:, 3] - BOXES[:, 1])).sum(), rtol=0.25)


def test_giou_and_distances() -> None:
    a = torch.tensor([[0.0, 0, 10, 10]])
    assert float(giou_loss(a, a)) == 0.0
    assert float(giou_loss(a, torch.tensor([[20.0, 0, 30, 10]]))) > 1.0  # disjoint: GIoU < 0
    ltrb = torch.zeros(1, 4, 2, 2)
    ltrb[0, :, 1, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert boxes_from_distances(ltrb, 4)[0, 1, 0].tolist() == [1.0, 4.0, 5.0, 10.0]  # cell (x 0, y 1): centre (2, 6)


def test_a_cell_reports_only_its_best_class() -> None:
    """Two classes peaking at one cell are one object, reported once (with the higher score)."""
    logits = torch.full((1, CLASSES, 8, 8), -6.0)
    logits[0, 0, 3, 3], logits[0, 2, 3, 3] = 2.0, 1.0
    ltrb = torch.full((1, 4, 8, 8), 5.0)
    num, boxes, scores, classes = decode(logits, ltrb, k=5, stride=STRIDE, input_size=32)
    assert int(num[0, 0]) == 1 and int(classes[0, 0]) == 0
    assert float(scores[0, 0]) == float(torch.sigmoid(torch.tensor(2.0)))

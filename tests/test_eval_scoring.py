"""The scorer: pycocotools mAP and mIoU on hand-made predictions (perfect, shifted, missing, wrong class),
and that scoring and the repository predictors never import torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.evaluation.scoring import ConfusionMatrix, Detections, score_detections, score_masks

ROOT = Path(__file__).resolve().parents[1]


def _coco() -> dict:
    """Two images, three objects of two classes (category ids 3 and 7: non-contiguous on purpose)."""
    return {
        "images": [{"id": 10, "width": 100, "height": 80, "file_name": "a.png"},
                   {"id": 11, "width": 60, "height": 90, "file_name": "b.png"}],
        "categories": [{"id": 3, "name": "circle"}, {"id": 7, "name": "star"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [50, 40, 25, 25], "area": 625, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [5, 30, 40, 40], "area": 1600, "iscrowd": 0},
        ],
    }


def _perfect() -> list[Detections]:
    return [Detections(np.array([[10, 10, 40, 30], [50, 40, 75, 65]], np.float32), np.array([0.9, 0.8], np.float32),
                       np.array([0, 1])),
            Detections(np.array([[5, 30, 45, 70]], np.float32), np.array([0.95], np.float32), np.array([1]))]


def test_perfect_detections_score_one() -> None:
    scores = score_detections(_coco(), [10, 11], _perfect())
    assert scores.map == pytest.approx(1.0) and scores.map50 == pytest.approx(1.0)
    assert scores.per_class == {"circle": pytest.approx(1.0), "star": pytest.approx(1.0)}


def test_shifted_box_lowers_map_but_not_map50() -> None:
    dets = _perfect()
    shifted = dets[1].boxes + np.array([6, 0, 6, 0], np.float32)  # IoU 34/46 = 0.74: a hit at .5, not at .75+
    dets[1] = Detections(shifted, dets[1].scores, dets[1].labels)
    scores = score_detections(_coco(), [10, 11], dets)
    assert scores.map50 == pytest.approx(1.0)
    assert scores.map < 0.9 and scores.per_class["circle"] == pytest.approx(1.0)


def test_wrong_class_and_missing_detections_lower_map() -> None:
    dets = _perfect()
    dets[0] = Detections(dets[0].boxes, dets[0].scores, np.array([1, 1]))  # the circle called a star
    assert score_detections(_coco(), [10, 11], dets).map50 < 1.0
    assert score_detections(_coco(), [10, 11], [Detections.empty(), Detections.empty()]).map == 0.0


def test_masks_perfect_and_off() -> None:
    truth = [np.zeros((20, 30), np.uint8), np.zeros((25, 10), np.uint8)]
    truth[0][5:10, 5:20] = 1
    truth[1][3:20, 2:8] = 2
    truth[1][0, 0] = 255  # void: ignored
    names = ["background", "a", "b"]
    perfect = score_masks([t.copy() for t in truth], truth, names)
    assert perfect.miou == 1.0 and perfect.pixel_accuracy == 1.0
    off = [t.copy() for t in truth]
    off[0][5:10, 5:10] = 0  # a third of object a missed
    scores = score_masks(off, truth, names)
    assert scores.per_class["a"] == pytest.approx(50 / 75) and scores.per_class["b"] == 1.0
    assert scores.miou < 1.0
    with pytest.raises(ValueError, match="differ in size"):
        score_masks([np.zeros((5, 5), np.uint8)], [np.zeros((5, 6), np.uint8)], names)


def test_confusion_matrix_counts() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 1, 2, 2]]), np.array([[0, 1, 1, 255]]))
    assert cm.counts.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert np.isnan(cm.iou()[2]) or cm.iou()[2] == 0.0


def test_scoring_and_predictors_do_not_import_torch() -> None:
    """imgserve eval must work in a serve-only install."""
    code = ("import sys; import export.evaluation.scoring, export.evaluation.predictors, export.evaluation.cli; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

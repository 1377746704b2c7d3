"""Detector and segmenter export: the serving contract's outputs, parity with PyTorch, batch invariance,
and that the checks fail when the ONNX file is not the model (random weights: no training needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.data.scenes import SCENE_CLASSES, ScenesConfig, generate_scene
from export.dense_export import (DETECTION_OUTPUTS, PROB_ATOL, SCORE_ATOL, TIE_MARGIN, DetectionGraph, SegmentationGraph,
                                 _compare_detections, _compare_masks, check_detector, check_segmenter, export_dense_to_repository)
from export.models import create_model, get_entry
from export.onnx_export import ExportError, export_onnx
from serving.preprocess import letterbox
from serving.repository import read_model

SIZE = 128
SEG_LABELS = ("background", *SCENE_CLASSES)


@pytest.fixture(scope="module")
def scene_inputs() -> np.ndarray:
    """Eight letterboxed generated scenes, what the gateway would send."""
    return np.stack([letterbox(generate_scene(ScenesConfig(seed=5), "test", i).image, SIZE)[0] for i in range(8)])


def _detector(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("centernet_tiny", len(SCENE_CLASSES)).eval()
    with torch.no_grad():  # random heads score ~0.1 everywhere; lift them so many peaks pass the floor
        model.heatmap.bias.fill_(0.5)
        model.box.bias.fill_(0.6)
    return model


def test_detector_export_parity_and_batch_invariance(tmp_path: Path, scene_inputs: np.ndarray) -> None:
    result = export_dense_to_repository(_detector(), get_entry("centernet_tiny"), tmp_path, "det", SCENE_CLASSES,
                                        images=scene_inputs, max_detections=50)
    p = result.parity
    assert p.detections > 8 * 10, "too few detections for the comparison to mean anything"
    assert p.max_box_diff <= 1e-3 and p.batch_max_diff <= 1e-3
    local = read_model(tmp_path / "det")
    spec = local.spec
    assert spec.task == "detection" and spec.preprocess.geometry == "letterbox" and spec.preprocess.crop == SIZE
    assert spec.labels == SCENE_CLASSES and float(spec.extra["score_threshold"]) == pytest.approx(0.3)
    assert [(o.name, o.datatype, o.dims) for o in spec.outputs] == [
        ("num_detections", "INT32", (1,)), ("detection_boxes", "FP32", (50, 4)),
        ("detection_scores", "FP32", (50,)), ("detection_classes", "INT32", (50,))]

    import onnxruntime as ort

    session = ort.InferenceSession(str(local.onnx_path), providers=["CPUExecutionProvider"])
    num, boxes, scores, classes = session.run(list(DETECTION_OUTPUTS), {"image": scene_inputs[:3]})
    assert num.dtype == np.int32 and boxes.dtype == np.float32 and classes.dtype == np.int32
    assert num.shape == (3, 1) and boxes.shape == (3, 50, 4)
    for i in range(3):
        n = int(num[i, 0])
        assert np.all(np.diff(scores[i, :n]) <= 0) and np.all(scores[i, :n] >= 0.05)
        assert not boxes[i, n:].any() and not scores[i, n:].any() and not classes[i, n:].any()
        assert np.all((boxes[i, :n] >= 0) & (boxes[i, :n] <= SIZE)) and np.all(classes[i, :n] < len(SCENE_CLASSES))


def test_segmenter_export_parity_and_batch_invariance(tmp_path: Path, scene_inputs: np.ndarray) -> None:
    torch.manual_seed(0)
    model = create_model("unet_tiny", len(SEG_LABELS)).eval()
    result = export_dense_to_repository(model, get_entry("unet_tiny"), tmp_path, "seg", SEG_LABELS, images=scene_inputs)
    assert result.parity.mask_pixels_differ == 0 and result.parity.batch_mask_pixels_differ == 0
    spec = read_model(tmp_path / "seg").spec
    assert spec.task == "segmentation" and spec.labels == SEG_LABELS
    assert [(o.name, o.datatype, o.dims) for o in spec.outputs] == [
        ("labels", "UINT8", (SIZE, SIZE)), ("probabilities", "FP32", (len(SEG_LABELS), SIZE, SIZE))]
    import onnxruntime as ort

    labels, probs = ort.InferenceSession(str(read_model(tmp_path / "seg").onnx_path)).run(None, {"image": scene_inputs[:2]})
    assert labels.dtype == np.uint8 and labels.shape == (2, SIZE, SIZE)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert len(np.unique(labels)) > 1  # a random net still paints more than one class: the parity check compared masks


def test_checks_fail_when_the_file_is_another_model(tmp_path: Path, scene_inputs: np.ndarray) -> None:
    entry = get_entry("centernet_tiny")
    other = tmp_path / "other.onnx"
    export_onnx(DetectionGraph(_detector(seed=1), entry, size=SIZE).eval(), other, crop=SIZE, channels=3,
                output_names=DETECTION_OUTPUTS)
    with pytest.raises(ExportError):
        check_detector(DetectionGraph(_detector(seed=0), entry, size=SIZE).eval(), other, scene_inputs)
    seg_entry = get_entry("unet_tiny")
    torch.manual_seed(1)
    seg_other = SegmentationGraph(create_model("unet_tiny", 6).eval(), seg_entry.mean, seg_entry.std, channels=3, crop=SIZE)
    export_onnx(seg_other.eval(), tmp_path / "seg.onnx", crop=SIZE, channels=3, output_names=("labels", "probabilities"))
    torch.manual_seed(2)
    seg_model = SegmentationGraph(create_model("unet_tiny", 6).eval(), seg_entry.mean, seg_entry.std, channels=3, crop=SIZE)
    with pytest.raises(ExportError, match="mask pixels differ"):
        check_segmenter(seg_model.eval(), tmp_path / "seg.onnx", scene_inputs)


def _probs_and_labels(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return probs.argmax(axis=1).astype(np.uint8), probs.astype(np.float32)


def test_mask_comparison_forgives_only_near_ties() -> None:
    """Engines that sum in other orders may break a near-tie either way; a decided pixel must never move."""
    pixels = 64 * 64
    rng = np.random.default_rng(0)
    ref = rng.dirichlet(np.ones(3), size=(1, pixels)).transpose(0, 2, 1).reshape(1, 3, 64, 64)
    ref[0, :, 0, 0] = (0.5 + TIE_MARGIN / 4, 0.5 - TIE_MARGIN / 4, 0.0)  # a near-tie, class 0 by a hair
    ref[0, :, 0, 1] = (0.9, 0.1, 0.0)                                    # decided: class 0
    other = ref.copy()
    other[0, :, 0, 0] = (0.5 - TIE_MARGIN / 4, 0.5 + TIE_MARGIN / 4, 0.0)  # the tie breaks the other way
    tied = _compare_masks(_probs_and_labels(ref), _probs_and_labels(other))
    assert (tied.decided_differ, tied.ties_differ) == (0, 1) and tied.failure() is None
    flipped = other.copy()
    flipped[0, :, 0, 1] = (0.9 - PROB_ATOL / 2, 0.1, PROB_ATOL / 2)
    a, b = _probs_and_labels(ref), _probs_and_labels(flipped)
    b[0][0, 0, 1] = 2  # a decided pixel labelled otherwise fails even when the probabilities barely moved
    assert "mask pixels differ" in (_compare_masks(a, b).failure() or "")
    drifted = ref.copy()
    drifted[0, :, 5, 5] += (2 * PROB_ATOL, -2 * PROB_ATOL, 0.0)
    assert "probabilities differ" in (_compare_masks(_probs_and_labels(ref), _probs_and_labels(drifted)).failure() or "")
    many = ref.copy()
    many[0, 0], many[0, 1], many[0, 2] = 0.5, 0.5, 0.0  # every pixel a perfect tie, broken the other way in all of them
    a, b = _probs_and_labels(many), _probs_and_labels(many)
    b[0][:] = 1 - a[0]
    assert "near-tie" in (_compare_masks(a, b).failure() or "")


def _detections(rows: list[list[tuple[int, float]]], k: int = 4) -> list[np.ndarray]:
    """EfficientNMS-layout outputs from (class, score) rows per image; box = (score, score, 1, 1) * 10."""
    num = np.array([[len(r)] for r in rows], dtype=np.int32)
    boxes, scores, classes = np.zeros((len(rows), k, 4), np.float32), np.zeros((len(rows), k), np.float32), \
        np.zeros((len(rows), k), np.int32)
    for i, r in enumerate(rows):
        for j, (c, s) in enumerate(r):
            boxes[i, j], scores[i, j], classes[i, j] = (10 * s, 10 * s, 10, 10), s, c
    return [num, boxes, scores, classes]


def test_detection_comparison_forgives_only_detections_at_a_cut() -> None:
    floor, eps = 0.05, SCORE_ATOL / 4
    ref = _detections([[(1, 0.9), (2, 0.5), (0, floor + eps)]])
    # the near-floor detection fell under the floor in the other engine: not a failure
    assert _compare_detections(ref, _detections([[(2, 0.5 + eps), (1, 0.9)]]), floor)[1] == pytest.approx(eps, rel=1e-3)
    with pytest.raises(ExportError, match="no counterpart"):  # a confident detection lost
        _compare_detections(ref, _detections([[(1, 0.9), (0, floor + eps)]]), floor)
    with pytest.raises(ExportError, match="no counterpart"):  # or given another class
        _compare_detections(ref, _detections([[(1, 0.9), (3, 0.5), (0, floor + eps)]]), floor)
    with pytest.raises(ExportError, match="no counterpart"):  # or a score further off than SCORE_ATOL
        _compare_detections(ref, _detections([[(1, 0.9), (2, 0.5 + 2 * SCORE_ATOL)]]), floor)
    with pytest.raises(ExportError, match="no counterpart"):  # an extra confident one in the second output
        _compare_detections(ref, _detections([[(1, 0.9), (2, 0.5), (4, 0.7)]]), floor)
    full = _detections([[(1, 0.9), (2, 0.8), (3, 0.7), (0, 0.6)]])  # top-K full: the K-th is a cut too
    assert _compare_detections(full, _detections([[(1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6 - eps)]]), floor)[0] == 0.0


def test_classifier_entries_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="classification"):
        export_dense_to_repository(create_model("lenet5", 10), get_entry("lenet5"), tmp_path, "x", [str(i) for i in range(10)])

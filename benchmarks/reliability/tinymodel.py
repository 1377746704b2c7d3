"""A tiny ONNX classifier whose answer names its version, for version-swap tests and figures.

Why: swapping versions under load needs models that load in milliseconds and whose answers
tell which version computed them. The graph takes the uint8 NHWC crops a ModelSpec declares
and answers class ``version % num_classes`` with probability ~1 whatever the pixels.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.repository import ModelSpec, write_model


def tiny_onnx(spec: ModelSpec, answer: int) -> onnx.ModelProto:
    h, w, c = spec.input_shape
    k = spec.num_classes
    bias = np.full((k,), -10.0, np.float32)
    bias[answer % k] = 10.0
    nodes = [
        helper.make_node("Cast", [spec.input_name], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "axes1"], ["m1"]),
        helper.make_node("Mul", ["m1", "zero"], ["z"]),
        helper.make_node("Add", ["z", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [spec.output_name], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(spec.input_name, TensorProto.UINT8, ["N", h, w, c])],
        [helper.make_tensor_value_info(spec.output_name, TensorProto.FLOAT, ["N", k])],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axes1"),
                     numpy_helper.from_array(np.zeros((1, k), np.float32), "zero"),
                     numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def add_version(repo: Path, spec: ModelSpec, answer: int | None = None, *, broken: bool = False) -> Path:
    """Write the next version of ``spec.name`` (answering ``answer``, default the new version number).

    ``broken`` writes bytes that are not an ONNX model (what a half-finished copy looks like).
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.onnx"
        if broken:
            source.write_bytes(b"this is not an onnx model")
        else:
            from serving.repository import next_version
            version = next_version(Path(repo) / spec.name)
            onnx.save(tiny_onnx(spec, version if answer is None else answer), source)
        return write_model(Path(repo), spec, source)


def tiny_detector_onnx(spec: ModelSpec) -> onnx.ModelProto:
    """A detector graph for ``spec`` (tests/fakes.py tiny_detector_spec) that finds one fixed box.

    Why: the hostile battery needs a real detection model in a real repository (Classify on a
    detector must be refused by task), and no default model is a detector. Every image gets
    one detection of class 0 at (2, 2, 20, 20) with score 0.9; the pixels only set the batch size.
    """
    k = spec.output("detection_scores").dims[0]
    h, w, c = spec.input_shape
    boxes = np.zeros((1, k, 4), np.float32)
    boxes[0, 0] = (2.0, 2.0, 20.0, 20.0)
    scores = np.zeros((1, k), np.float32)
    scores[0, 0] = 0.9
    nodes = [
        helper.make_node("Cast", [spec.input_name], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),                       # [N] zeros
        helper.make_node("Reshape", ["z", "col"], ["z1"]),                    # [N, 1]
        helper.make_node("Reshape", ["z", "cube"], ["z2"]),                   # [N, 1, 1]
        helper.make_node("Add", ["z1", "one"], ["n_f"]),
        helper.make_node("Cast", ["n_f"], ["num_detections"], to=TensorProto.INT32),
        helper.make_node("Add", ["z2", "boxes"], ["detection_boxes"]),
        helper.make_node("Add", ["z1", "scores"], ["detection_scores"]),
        helper.make_node("Add", ["z1", "classes_f"], ["c_f"]),
        helper.make_node("Cast", ["c_f"], ["detection_classes"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes, "tinydet",
        [helper.make_tensor_value_info(spec.input_name, TensorProto.UINT8, ["N", h, w, c])],
        [helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["N", 1]),
         helper.make_tensor_value_info("detection_boxes", TensorProto.FLOAT, ["N", k, 4]),
         helper.make_tensor_value_info("detection_scores", TensorProto.FLOAT, ["N", k]),
         helper.make_tensor_value_info("detection_classes", TensorProto.INT32, ["N", k])],
        initializer=[numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                     numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                     numpy_helper.from_array(np.array([-1, 1], np.int64), "col"),
                     numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "cube"),
                     numpy_helper.from_array(boxes, "boxes"),
                     numpy_helper.from_array(scores, "scores"),
                     numpy_helper.from_array(np.zeros((1, k), np.float32), "classes_f")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def add_detector(repo: Path, spec: ModelSpec) -> Path:
    """Write ``tiny_detector_onnx(spec)`` as the next version of ``spec.name`` in ``repo``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.onnx"
        onnx.save(tiny_detector_onnx(spec), source)
        return write_model(Path(repo), spec, source)

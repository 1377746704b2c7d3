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

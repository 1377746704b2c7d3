"""A real, tiny ONNX model repository built in a blink with onnx.helper (no torch, no training).

For tests that need the embedded backend or a real gateway process but not a meaningful
model: ``tiny`` takes uint8 [N, 4, 4, 1] (tests.fakes.tiny_spec) and answers
softmax(flatten @ W) over three classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.repository import write_model
from tests.fakes import NUM_CLASSES, tiny_spec


def tiny_onnx_repository(root: Path) -> Path:
    """A one-model repository: uint8 [N, 4, 4, 1] -> softmax(flatten @ W) [N, 3], built with onnx.helper."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weights = np.arange(16 * NUM_CLASSES, dtype=np.float32).reshape(16, NUM_CLASSES) / 100.0
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Reshape", ["f", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 4, 4, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=[numpy_helper.from_array(np.array([-1, 16], dtype=np.int64), "shape"),
                     numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.onnx"
    onnx.save(model, str(path))
    repo = root / "repo"
    write_model(repo, tiny_spec(), path)
    return repo

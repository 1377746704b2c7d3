"""A Python-based Triton backend named ``onnxruntime`` that runs ``model.onnx`` with ONNX Runtime.

Why it exists: the tritonserver shipped in the ``nvidia-pytriton`` wheel has the
python backend but no C++ onnxruntime backend. Installed as
``<backend-directory>/onnxruntime/model.py`` (see serving/triton_local.py), it
makes unmodified ``platform: "onnxruntime_onnx"`` model configs load, so the
same repository serves on this local Triton and on a production Triton.

Triton's dynamic batcher hands ``execute`` a list of requests; they are
concatenated along the batch axis and run in ONE ``session.run`` call, then the
outputs are split back per request. That keeps Triton's batching real.

This file runs inside Triton's python backend stub, not in the gateway: it may
only import the standard library, numpy, onnxruntime and
``triton_python_backend_utils`` (provided by the stub).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

DEFAULT_MODEL_FILE = "model.onnx"


def _param(config: dict[str, Any], key: str) -> str | None:
    """A string value of a config ``parameters`` entry, or None."""
    entry = config.get("parameters", {}).get(key)
    if isinstance(entry, dict):
        value = entry.get("string_value")
        return value if value not in (None, "") else None
    return None


def _int_param(config: dict[str, Any], key: str, default: int) -> int:
    raw = _param(config, key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise pb_utils.TritonModelException(f"parameter {key}={raw!r} is not an integer") from exc


class TritonPythonModel:
    """One instance per Triton model instance: owns one ONNX Runtime session."""

    def initialize(self, args: dict[str, str]) -> None:
        self.config: dict[str, Any] = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.config.get("name", "?"))
        model_dir = args["model_repository"]
        version = args["model_version"]
        filename = self.config.get("default_model_filename") or DEFAULT_MODEL_FILE
        path = os.path.join(model_dir, version, filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"model {self.model_name!r}: no {path}")

        options = ort.SessionOptions()
        # Same knobs as Triton's C++ onnxruntime backend, so configs behave alike.
        options.intra_op_num_threads = _int_param(self.config, "intra_op_thread_count", 0)
        options.inter_op_num_threads = _int_param(self.config, "inter_op_thread_count", 0)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[Any] = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(args.get("model_instance_device_id", "0") or 0)
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:  # ORT's own exception types; Triton shows the message in its log
            raise pb_utils.TritonModelException(f"model {self.model_name!r}: cannot load {path}: {exc}") from exc

        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        self.input_names = [i["name"] for i in self.config.get("input", [])]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in self.config.get("output", [])
        }
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.input_names if n not in graph_inputs]
        missing += [n for n in self.output_dtypes if n not in graph_outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"model {self.model_name!r}: config names {missing} are not in {filename} "
                f"(graph inputs {sorted(graph_inputs)}, outputs {sorted(graph_outputs)})")

    def execute(self, requests: list[Any]) -> list[Any]:
        if not requests:
            return []
        if not self.batched:
            return [self._run_group([r])[0] for r in requests]
        return self._run_group(requests)

    def _run_group(self, requests: list[Any]) -> list[Any]:
        """Run all requests in one session.run; per-request failures become error responses."""
        feeds: dict[str, list[np.ndarray]] = {name: [] for name in self.input_names}
        sizes: list[int] = []
        for request in requests:
            first = None
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    return self._fail_all(requests, f"request lacks input {name!r}")
                array = tensor.as_numpy()
                feeds[name].append(array)
                first = array if first is None else first
            sizes.append(int(first.shape[0]) if self.batched and first is not None else 1)

        wanted = self._requested_outputs(requests)
        try:
            if self.batched:
                joined = {name: (arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0))
                          for name, arrs in feeds.items()}
            else:
                joined = {name: arrs[0] for name, arrs in feeds.items()}
            results = self.session.run(wanted, joined)
        except Exception as exc:  # ORT raises its own exception types; the client gets the message
            return self._fail_all(requests, f"onnxruntime failed: {exc}")

        outputs = {name: np.ascontiguousarray(value, dtype=self.output_dtypes[name])
                   for name, value in zip(wanted, results)}
        responses = []
        start = 0
        for request, size in zip(requests, sizes):
            names = request.requested_output_names() or list(self.output_dtypes)
            tensors = []
            for name in names:
                value = outputs[name][start:start + size] if self.batched else outputs[name]
                tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(value)))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _requested_outputs(self, requests: list[Any]) -> list[str]:
        wanted: set[str] = set()
        for request in requests:
            wanted.update(request.requested_output_names() or self.output_dtypes)
        return [name for name in self.output_dtypes if name in wanted]

    @staticmethod
    def _fail_all(requests: list[Any], message: str) -> list[Any]:
        error = pb_utils.TritonError(message)
        return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]

    def finalize(self) -> None:
        self.session = None

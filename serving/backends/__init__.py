"""Inference backends: embedded ONNX Runtime and Triton share one small async interface."""

"""Training, ONNX export and repository building (torch lives only here)."""

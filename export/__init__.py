"""Deployment: ONNX export of folded graphs, ONNX Runtime sessions, and ONNX graph diffs."""
from .onnx_diff import OnnxDiff, onnx_diff
from .onnx_export import ExportError, export_onnx
from .runtime import cuda_usable, optimized_model, ort_run, ort_session

__all__ = ["export_onnx", "ExportError", "onnx_diff", "OnnxDiff", "ort_session", "ort_run", "optimized_model",
           "cuda_usable"]

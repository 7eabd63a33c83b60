"""Deployment: ONNX export of folded graphs, ONNX Runtime sessions, and ONNX graph diffs."""
from .onnx_diff import OnnxDiff, onnx_diff
from .onnx_export import ExportError, export_onnx
from .runtime import cuda_usable, optimized_model, ort_run, ort_session
from .serving import AdapterServer, export_adapter, export_multi_adapter

__all__ = ["export_onnx", "ExportError", "onnx_diff", "OnnxDiff", "ort_session", "ort_run", "optimized_model",
           "cuda_usable", "export_multi_adapter", "export_adapter", "AdapterServer"]

"""Deployment: ONNX export of folded graphs (with a KV cache for generation), ONNX Runtime sessions
and generation, multi-adapter serving, and ONNX graph diffs."""
from .generation import generate
from .kv_cache import GENAI_CONFIG, KvCache, read_metadata
from .onnx_diff import OnnxDiff, onnx_diff
from .onnx_export import ExportError, export_onnx
from .onnx_quantize import quantize_onnx
from .runtime import cuda_usable, optimized_model, ort_run, ort_session
from .serving import AdapterServer, export_adapter, export_multi_adapter

__all__ = ["export_onnx", "ExportError", "quantize_onnx", "onnx_diff", "OnnxDiff", "ort_session", "ort_run", "optimized_model",
           "cuda_usable", "generate", "KvCache", "read_metadata", "GENAI_CONFIG", "export_multi_adapter",
           "export_adapter", "AdapterServer"]

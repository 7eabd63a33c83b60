"""lora-fx: LoRA as a pair of compiler passes over torch.fx graphs.

The pipeline, one module each: capture (torch.export) -> match (targets -> weights) -> rewrite
(W0 / lora_A / lora_B subgraph) -> fold (B @ A into W0) -> diff (what a pass changed).
"""
from .capture import capture
from .diff import GraphDiff, graph_diff
from .errors import CaptureError, ConfigError, FoldError, InputsError, LoraFxError, TargetError
from .fold import merge_lora
from .graph_module import LoraGraphModule
from .inject import inject_lora
from .saved import load_graph, save_graph

__all__ = [
    "capture",
    "inject_lora",
    "merge_lora",
    "graph_diff",
    "save_graph",
    "load_graph",
    "GraphDiff",
    "LoraGraphModule",
    "LoraFxError",
    "TargetError",
    "ConfigError",
    "InputsError",
    "CaptureError",
    "FoldError",
]

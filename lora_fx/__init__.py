"""lora-fx: LoRA as a pair of compiler passes over torch.fx graphs.

The pipeline, one module each: capture (torch.export) -> match (targets -> weights) -> rewrite
(W0 / lora_A / lora_B subgraph) -> fold (B @ A into W0) -> diff (what a pass changed).
"""
from .adapter_io import AdapterFileError, load_adapter, save_adapter
from .adapters import (
    active_adapters,
    adapter_weights,
    add_adapter,
    delete_adapter,
    disable_adapters,
    lora_state_dict,
    set_adapter,
    size_report,
)
from .capture import capture
from .diff import GraphDiff, graph_diff
from .errors import CaptureError, ConfigError, FoldError, InputsError, LoraFxError, TargetError
from .fold import merge_lora
from .graph_module import LoraGraphModule
from .inject import inject_lora
from .mixed import mixed_adapters
from .saved import load_graph, save_graph

__all__ = [
    "capture",
    "inject_lora",
    "merge_lora",
    "graph_diff",
    "save_adapter",
    "load_adapter",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "active_adapters",
    "adapter_weights",
    "lora_state_dict",
    "size_report",
    "mixed_adapters",
    "AdapterFileError",
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

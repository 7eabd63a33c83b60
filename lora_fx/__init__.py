"""lora-fx: LoRA as a pair of compiler passes over torch.fx graphs.

The pipeline, one module each: capture (torch.export) -> match (targets -> weights) -> rewrite
(W0 / lora_A / lora_B subgraph) -> fold (B @ A into W0) -> diff (what a pass changed). `attach` is
the one door an adapter goes through into a graph; `slot` owns the LoRA weights' names and contents.
"""
from . import analysis, quantized
from .adapter_io import AdapterFile, adapter_file, load_adapter, read_adapter, save_adapter
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
from .checkpoints import LoadReport, checkpoint_files, load_base, load_checkpoint, save_checkpoint
from .combine import combine_adapters
from .capture import auto_dims, capture, capture_decoder, decoder_dims
from .diff import GraphDiff, graph_diff
from .errors import (
    AdapterFileError,
    AdapterNameError,
    CaptureError,
    CheckpointError,
    ConfigError,
    FoldError,
    InputsError,
    LoraFxError,
    TargetError,
)
from .fold import MAX_REQUANTIZE_LOSS, RequantizeLoss, delta_bias, delta_weight, merge_and_unload, merge_lora, requantize_loss
from .generation import MODEL_DEFAULT, Sampling, check_request, generate_with, max_positions, special_tokens
from . import regions
from .graph_module import CaptureInfo, LoraGraphModule, Regions, regions_of, unfolded_lora
from .hierarchy import unflatten
from .inject import inject_lora
from .loftq import LoftQConfig
from .mixed import bank_name, bank_source, mixed_adapters
from .report import InjectReport, LoftQRow, NearMiss
from .saved import load_graph, save_graph
from .slot import LORA_A, LORA_B, LORA_M, LoraName, lora_parameters, parse_slot_free, scale_slot_free, slot_free_name
from .slot import parse_name as parse_lora_name
from .paths import is_shard
from .ranks import check_ranks
from .state import Adapter, LoraState, Site

__all__ = [
    "analysis",
    "capture",
    "capture_decoder",
    "inject_lora",
    "combine_adapters",
    "LoftQConfig",
    "LoftQRow",
    "merge_lora",
    "unflatten",
    "check_ranks",
    "load_base",
    "LoadReport",
    "checkpoint_files",
    "save_checkpoint",
    "load_checkpoint",
    "merge_and_unload",
    "delta_weight",
    "delta_bias",
    "requantize_loss",
    "RequantizeLoss",
    "MAX_REQUANTIZE_LOSS",
    "quantized",
    "graph_diff",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "adapter_file",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "active_adapters",
    "adapter_weights",
    "lora_state_dict",
    "lora_parameters",
    "size_report",
    "mixed_adapters",
    "bank_name",
    "bank_source",
    "save_graph",
    "load_graph",
    "auto_dims",
    "decoder_dims",
    "generate_with",
    "check_request",
    "Sampling",
    "MODEL_DEFAULT",
    "max_positions",
    "special_tokens",
    "unfolded_lora",
    "regions",
    "regions_of",
    "Regions",
    "slot_free_name",
    "is_shard",
    "parse_slot_free",
    "scale_slot_free",
    "parse_lora_name",
    "LoraName",
    "LORA_A",
    "LORA_M",
    "LORA_B",
    "AdapterFile",
    "GraphDiff",
    "LoraGraphModule",
    "CaptureInfo",
    "LoraState",
    "Adapter",
    "Site",
    "InjectReport",
    "NearMiss",
    "LoraFxError",
    "TargetError",
    "ConfigError",
    "InputsError",
    "CaptureError",
    "FoldError",
    "AdapterFileError",
    "AdapterNameError",
    "CheckpointError",
]

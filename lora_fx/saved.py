"""Graphs on disk: a captured, injected or folded graph saved as a torch.export program (.pt2), so
two of them can be diffed later (`lora-fx diff a.pt2 b.pt2`)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from .capture import auto_dims, without_fake_tensor_cache
from .errors import InputsError
from .graph_module import LoraGraphModule


def save_graph(gm: LoraGraphModule, path) -> Path:
    """Write `gm` (as traced at its capture inputs, in eval mode) to a .pt2 file."""
    cap = gm.capture_info
    if cap is None or cap.example_inputs is None:
        raise InputsError("save_graph needs a graph that lora_fx captured (it re-traces at the capture inputs)")
    if not Path(path).parent.is_dir():  # before the trace, which takes a while
        raise InputsError(f"cannot save the graph to {path}: directory {Path(path).parent} does not exist; create it first")
    inputs = cap.example_inputs
    args, kwargs = (tuple(inputs), {}) if cap.positional else ((), dict(inputs))
    dims = auto_dims(args if cap.positional else kwargs)
    was_training = gm.training
    gm.eval()
    try:
        with without_fake_tensor_cache():
            ep = torch.export.export(gm, args, kwargs, dynamic_shapes=dims, strict=False)
    finally:
        gm.train(was_training)
    torch.export.save(ep, str(path))
    return Path(path)


def load_graph(path) -> torch.fx.GraphModule:
    """The graph module saved by `save_graph` (or any torch.export .pt2 file)."""
    try:  # optional: ModelOutput classes register as pytree nodes when defined; the file's out_spec names them
        import transformers.modeling_outputs  # noqa: F401
    except ImportError:
        pass
    if not Path(path).is_file():
        raise InputsError(f"no saved graph at {path} (lora_fx.save_graph writes a .pt2 file)")
    if not zipfile.is_zipfile(path):  # torch would raise zipfile.BadZipFile from deep inside
        raise InputsError(f"{path} is not a saved graph (a .pt2 file is a zip archive that torch.export.save writes); "
                          "save one with lora_fx.save_graph(gm, path)")
    return torch.export.load(str(path)).module()

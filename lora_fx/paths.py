"""Small helpers for finding and placing modules, parameters and buffers at dotted paths."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def resolve(root: nn.Module, path: str):
    """The module, parameter, buffer or attribute at `path`, or None when there is none."""
    obj = root
    for part in path.split(".") if path else []:
        if isinstance(obj, nn.Module):
            if part in obj._modules:
                obj = obj._modules[part]
                continue
            if part in obj._parameters:
                obj = obj._parameters[part]
                continue
            if part in obj._buffers:
                obj = obj._buffers[part]
                continue
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def is_shard(t: torch.Tensor) -> bool:
    """A tensor sharded across ranks (an FSDP2 DTensor): each rank holds a piece of it."""
    return hasattr(t, "full_tensor")


def lora_like(weight: torch.Tensor) -> torch.Tensor:
    """What LoRA's tensors for `weight` are created like: the weight itself, or, for a weight on the
    meta device (a model built from its config; `lora_fx.load_base` reads its values later), an
    empty CPU tensor of its dtype. LoRA is small and gets its values at inject, from the same random
    stream as on a real model: every rank draws the same A, and no separate init is needed later."""
    return torch.empty(0, dtype=weight.dtype) if weight.is_meta else weight


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Install `module` at `path`, creating empty parent modules as needed."""
    *parents, leaf = path.split(".")
    cur = root
    for part in parents:
        nxt = cur._modules.get(part)
        if nxt is None:
            nxt = nn.Module()
            cur.add_module(part, nxt)
        cur = nxt
    cur.add_module(leaf, module)


def set_parameter(root: nn.Module, path: str, value: nn.Parameter) -> None:
    """Point the parameter slot at `path` to `value` (the parent module must exist)."""
    parent, _, leaf = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    owner._parameters[leaf] = value


def replace_parameter(root: nn.Module, old: torch.Tensor, value: nn.Parameter) -> None:
    """Point every parameter slot of `root` that holds `old` (a weight under several names) to `value`."""
    for name in [n for n, p in root.named_parameters(remove_duplicate=False) if p is old]:
        set_parameter(root, name, value)


def set_buffer(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Point the buffer slot at `path` to `value` (the parent module must exist)."""
    parent, _, leaf = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    owner._buffers[leaf] = value


def free_path(root: nn.Module, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first path under `root` that holds nothing yet."""
    path, i = base, 0
    while resolve(root, path) is not None:
        i += 1
        path = f"{base}_{i}"
    return path


def innermost_module_path(node: torch.fx.Node) -> str:
    """The path of the innermost module a node was traced in ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path


def innermost_module_type(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    _, typ = list(stack.values())[-1]
    return typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A deep copy of an fx graph (quiet: torch's own pytree specs warn while being copied)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph)


def copy_non_persistent(src: nn.Module, dst: nn.Module) -> None:
    """Buffers `src` keeps out of its state_dict (rotary inv_freq, ...) stay out of `dst`'s, so the
    state_dict keys of a graph module match the model's."""
    for path, module in src.named_modules():
        for leaf in module._non_persistent_buffers_set:
            parent = resolve(dst, path) if path else dst
            if isinstance(parent, nn.Module) and leaf in parent._buffers:
                parent._non_persistent_buffers_set.add(leaf)


def own_stateless_modules(gm: torch.fx.GraphModule) -> None:
    """Replace every called module that has no parameters (dropout, attention) by a copy, so a new
    graph module built over another one's weights switches train/eval on its own."""
    for node in gm.graph.find_nodes(op="call_module"):
        parent, _, leaf = node.target.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        module = owner._modules[leaf]
        if next(module.parameters(), None) is None:
            owner._modules[leaf] = copy.deepcopy(module)


def structure_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules, settings and config whose parameters and buffers are storage-free
    (on the meta device, same shapes, dtypes and requires_grad): what capturing the model again needs
    when the weights are passed in. Tensor subclasses (quantized weights) are shared, not copied."""
    memo: dict[int, object] = {}
    for t in (*model.parameters(), *model.buffers()):
        if type(t) not in (nn.Parameter, torch.Tensor):
            memo[id(t)] = t
            continue
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that shares its tensors: every parameter a frozen alias of the
    model's own (same storage, requires_grad=False; one alias per tensor, so ties stay tied), every
    buffer the model's own. Training or replacing modules of the copy leaves the model as it was."""
    memo: dict[int, object] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        memo.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=False))
    for _, b in model.named_buffers(remove_duplicate=False):
        memo.setdefault(id(b), b)
    return copy.deepcopy(model, memo)

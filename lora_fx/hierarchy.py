"""The injected model with its module hierarchy again, for the recipes that work per layer.

The captured graph is flat: no submodule's forward runs, so per-layer FSDP2 (`fully_shard(layer)`),
activation checkpointing (`checkpoint_wrapper`) and regional compilation (`torch.compile(layer)`)
have nothing to hold on to. `unflatten(gm)` captures the model again as a torch.export program and
unflattens it (`torch.export.unflatten`: every submodule an `InterpreterModule` running its own
graph, called by its parent), then puts LoRA into each adapted layer's own graph with the same
rewrite as the flat graph. Every parameter, buffer and LoRA module is the flat graph's own object,
and the flat graph's modules that hold tensors become the tree's (so a layer sharded with
fully_shard is sharded for both): training either trains both, adapters switch on both, and fold, diff, ONNX export and
mixed batches stay on the flat graph. The flat graph then stops keeping the user's model alive
(`release_source`): once the user deletes it, sharding the tree frees the whole weights.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .capture import FORWARD, export_program, tracing_weights
from .errors import TargetError
from .graph_module import LoraGraphModule, require_lora
from .match import rematch
from .paths import copy_non_persistent, resolve, set_buffer, set_parameter
from .ranks import check_ranks
from .rewrite import LORA_META, insert_lora
from .slot import has_dropout, has_magnitude, lora_bias, scale_path
from .state import Site


def _relative(path: str | None, root: str) -> str | None:
    if path is None or not root:
        return path
    return path[len(root) + 1:] if path.startswith(root + ".") else path


def _local_site(site: Site) -> Site:
    """`site` as its own layer sees it: paths relative to the module LoRA lives on."""
    root = site.holder
    return replace(site, param=_relative(site.param, root), owner="", holder="", file_holder="",
                   bias=_relative(site.bias, root))


def unflatten(gm: LoraGraphModule, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """`gm` as a module tree like the user's model (`hier.model.layers.get_submodule("3")` is the fourth
    layer, running its own forward; a ModuleList becomes a module whose children are named "0", "1",
    ...), with `gm`'s LoRA in each adapted layer's graph. Shares every tensor and LoRA module
    with `gm`, and `gm`'s modules that hold tensors become the tree's, so what fully_shard does to
    a layer `gm` sees too; `gm` then no longer keeps the user's model alive (`release_source`), so
    once the user drops the model, sharding the tree frees the whole weights. While they are
    sharded, what needs them whole (fold, export, calling `gm` itself, capturing it again) says so.
    Linear and conv layers used as products are supported; weights adapted in place
    (W + scaling·B·A), quantized layers and expert stacks are refused. In a process group every rank
    calls it, and a rank whose graph differs from rank 0's is an error here (`check_ranks`).

    compute_dtype: the dtype the layers will compute in, when it is not the weights' own (FSDP2's
    MixedPrecisionPolicy(param_dtype=torch.bfloat16) gathers bfloat16 weights): an exported graph
    fixes its dtypes, so the tree is traced at that dtype; its weights stay the graph's own."""
    state = require_lora(gm, "unflatten")
    cap = gm.capture_info
    if cap is None or cap.source is None or cap.kind != FORWARD:
        raise TargetError("unflatten needs the graph inject_lora returned for a model's forward (its source model "
                          "is captured again with the module hierarchy)")
    refused = [s.param for s in state.sites.values() if s.quantized or s.kind == "experts"] + sorted(state.weight_form)
    if refused:
        raise TargetError(f"unflatten puts LoRA beside products with an activation; {refused[0]} is adapted as a "
                          "weight (W + scaling·B·A), a quantized layer or an expert stack. Train the flat graph")
    check_ranks(gm)
    own = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    def at_dtype(t):  # parameters only: FSDP2's policy casts parameters, buffers stay as they are
        if compute_dtype is None or not isinstance(t, nn.Parameter) or not t.is_floating_point():
            return t
        return nn.Parameter(t.detach().to(compute_dtype), requires_grad=False)

    traced = {n: at_dtype(t) for n, t in tracing_weights(cap.source, own).items()}
    hier = torch.export.unflatten(export_program(cap.source, cap.example_inputs, cap.positional, weights=traced))
    del traced  # a cast copy of every weight, with compute_dtype
    copy_non_persistent(cap.source, hier)
    for name, _ in list(hier.named_parameters(remove_duplicate=False)):
        if name in own:
            set_parameter(hier, name, own[name])
    for name, _ in list(hier.named_buffers(remove_duplicate=False)):
        if name in own:
            set_buffer(hier, name, own[name])
    for site in state.sites.values():
        _adapt_layer(gm, hier, site, state.slot, compute_dtype)
    hier.train(gm.training)
    for module in hier.modules():
        _drop_code_tensors(module)
    _share_modules(gm, hier)
    gm.release_source()
    hier.__class__ = _checked(type(hier))
    gm.remember_tree(hier)
    return hier


def _checked(cls: type) -> type:
    """`cls` with a call that first checks that no weight is still on the meta device: FSDP2's own
    check would fail later, inside its lazy init, and leave the tree unusable even after loading."""
    return type(cls.__name__, (cls,), {"__call__": _call_when_loaded, "__module__": cls.__module__})


def _call_when_loaded(self: nn.Module, *args, **kwargs):
    if not self.__dict__.get("_loaded"):
        meta = next((n for n, t in (*self.named_parameters(), *self.named_buffers()) if t.is_meta), None)
        if meta is not None:
            raise TargetError(f"{meta} is on the meta device: this tree was made from a model built without its "
                              "weights. Load them first: lora_fx.load_base(gm, checkpoint_folder) (after fully_shard, "
                              "each rank reads its own shards)")
        self.__dict__["_loaded"] = True
    return nn.Module.__call__(self, *args, **kwargs)


def _drop_code_tensors(module: nn.Module) -> None:
    """An InterpreterModule runs its graph (or, compiled, its generated code) on itself; the
    GraphModule it keeps for the code also holds the tensors its graph reads, from when it was
    built (the traced program's). Those references would keep whole weights alive after fully_shard
    swaps the module's own for shards: drop them (modules the code shares with the layer stay)."""
    code = module.__dict__.get("graph_module")
    if code is None:
        return
    mine = {id(m) for m in module.modules()}
    stack = [code]
    while stack:
        container = stack.pop()
        if id(container) in mine:
            continue
        container._parameters.clear()
        container._buffers.clear()
        stack.extend(container._modules.values())


def _share_modules(gm: nn.Module, hier: nn.Module) -> None:
    """Make the modules of `gm` that hold tensors the tree's own objects (where the tree's module
    holds the same tensors): fully_shard swaps parameters for shards on the module that holds them,
    and the flat graph then sees the shards too, not the whole weights. Containers (layers) stay
    the flat graph's, so wrapping a layer of the tree (checkpoint_wrapper) leaves its paths alone."""
    for name, mine in list(gm.named_children()):
        theirs = hier._modules.get(name)
        if theirs is None:
            continue
        if (mine._parameters or mine._buffers) and _holds_all_of(theirs, mine):
            gm._modules[name] = theirs
        else:
            _share_modules(mine, theirs)


def _holds_all_of(theirs: nn.Module, mine: nn.Module) -> bool:
    for path, module in mine.named_modules(remove_duplicate=False):
        other = resolve(theirs, path) if path else theirs
        if not isinstance(other, nn.Module):
            return False
        for table in ("_parameters", "_buffers"):
            if any(getattr(other, table).get(k) is not t for k, t in getattr(module, table).items()):
                return False
    return True


def _adapt_layer(gm: LoraGraphModule, hier: nn.Module, site: Site, slot: str, compute_dtype) -> None:
    """Put `site`'s LoRA (gm's own modules) into the graph of the layer it lives on."""
    layer = hier.get_submodule(site.holder)
    local = _local_site(site)
    for name, child in gm.get_submodule(site.holder).named_children():
        if name.startswith("lora_"):
            layer.add_module(name, child)
    layer.finalize()  # a GraphModule over the layer's graph (the same graph object) and attributes
    code = layer.graph_module
    for name, child in layer.named_children():
        if name.startswith("lora_"):
            code.add_module(name, child)
    matches = rematch(code, [local])
    if not matches:
        raise TargetError(f"{site.param}: its layer's own graph ({site.holder}) has no product to put LoRA beside")
    insert_lora(code, matches, slot,
                {local.param} if has_dropout(gm, site, slot) else set(),
                {local.param} if has_magnitude(gm, site, slot) else set(),
                {local.param} if lora_bias(gm, site, slot) is not None else set())
    if compute_dtype is not None:  # the scale is a buffer (FSDP2 casts parameters only): read it at that dtype
        scale = scale_path(local, slot)
        for node in list(code.graph.find_nodes(op="get_attr", target=scale)):
            with code.graph.inserting_after(node):
                cast = code.graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": compute_dtype})
            cast.meta[LORA_META] = node.meta.get(LORA_META, {})
            node.replace_all_uses_with(cast, delete_user_cb=lambda user, cast=cast: user is not cast)
        code.recompile()

"""Batches that mix adapters: row i of one forward uses adapter k_i (or none).

`mixed_adapters(gm, names)` returns an inference graph with one more input, `adapter_index` (one int
per row: a position in `names`, or -1 for the base model). Every adapted product gets a branch that
gathers each row's A, B and scaling from banks of all the adapters and applies them with batched
matmuls; adapters of smaller rank are zero-padded to the largest (exact). It exports to ONNX like any
other graph, so ONNX Runtime serves mixed batches too.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from . import slot
from .attach import base_copy
from .errors import ConfigError
from .graph_module import CaptureInfo, LoraGraphModule, require_lora
from .match import rematch
from .paths import set_module
from .rewrite import LORA_META
from .state import Site

INDEX = "adapter_index"


class MixedLora(nn.Module):
    """base + per-row LoRA update, for one adapted product; banks hold every adapter (+ a zero one)."""

    def __init__(self, site: Site, banks_a: list[torch.Tensor], banks_b: list[torch.Tensor], scale: torch.Tensor):
        super().__init__()
        self.out_features, self.fused = site.out_features, site.fused
        self.blocks = [(b.start, b.stop) for b in site.blocks]
        for i, (a, b) in enumerate(zip(banks_a, banks_b)):
            self.register_buffer(f"A{i}", a)  # [adapters + 1, rank, in]
            self.register_buffer(f"B{i}", b)  # [adapters + 1, rows, rank]
        self.register_buffer("scale", scale)  # [adapters + 1, rank]

    def forward(self, x, index, base):
        rows = index.shape[0]
        xb = x.reshape(rows, -1, x.shape[-1])
        scale = self.scale[index].unsqueeze(1)
        total = None
        for i, (start, stop) in enumerate(self.blocks):
            a = torch.bmm(xb, getattr(self, f"A{i}")[index].transpose(1, 2)) * scale
            d = torch.bmm(a, getattr(self, f"B{i}")[index].transpose(1, 2))
            if self.fused:
                d = torch.nn.functional.pad(d, (start, self.out_features - stop))
            total = d if total is None else total + d
        return base + total.reshape(base.shape)


def mixed_adapters(gm: LoraGraphModule, names: list[str]) -> LoraGraphModule:
    """An inference graph serving `names` in one batch, chosen per row by the `adapter_index` input."""
    state = require_lora(gm, "mixed_adapters")
    names = list(names)
    if not names:
        raise ConfigError(f"name the adapters to mix, e.g. {sorted(state.adapters)}")
    state.check_names(names, f"cannot mix adapters {names}")
    cap = gm.capture_info
    if cap is None or cap.positional or cap.example_inputs is None:
        raise ConfigError("mixed_adapters needs a graph captured with keyword inputs")
    weights = {n: slot.read(gm, state, n) for n in names}

    mixed = base_copy(gm)
    graph = mixed.graph
    sites = list(state.sites.values())
    matches = rematch(mixed, sites)
    if any(u.kind == "weight" for m in matches for u in m.uses):
        raise ConfigError("mixed batches need every adapted weight to be used in a product with an activation")

    placeholders = graph.find_nodes(op="placeholder")
    with graph.inserting_after(placeholders[-1]):
        index = graph.placeholder(INDEX)
    with graph.inserting_after(index):  # -1 (no adapter) selects the zero bank at the end
        selected = graph.call_function(torch.remainder, (index, len(names) + 1))
    for m in matches:
        site = m.site
        rank = max([state.adapters[n].ranks.get(site.param, 0) for n in names] + [1])
        k = len(names) + 1
        banks_a = [torch.zeros(k, rank, site.in_features) for _ in site.blocks]
        banks_b = [torch.zeros(k, b.stop - b.start, rank) for b in site.blocks]
        scale = torch.zeros(k, rank)
        for j, name in enumerate(names):
            adapter = state.adapters[name]
            if site.param not in adapter.ranks:
                continue
            r = adapter.ranks[site.param]
            for i, (a, b) in enumerate(weights[name][site.param]):
                banks_a[i][j, :r], banks_b[i][j, :, :r] = a, b
            scale[j, :r] = adapter.scaling(site.param)
        like = gm.get_parameter(site.param)
        module = MixedLora(site, [t.to(like) for t in banks_a], [t.to(like) for t in banks_b], scale.to(like))
        path = f"{site.holder}.lora_mixed"
        set_module(mixed, path, module)
        for use in m.uses:
            with graph.inserting_after(use.node):
                out = graph.call_module(path, (use.x, selected, use.node))
            out.meta[LORA_META] = {"param": site.param, "role": "mixed"}
            use.node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
    graph.lint()

    example = dict(cap.example_inputs)
    batch = next(v for v in example.values() if isinstance(v, torch.Tensor)).shape[0]
    example[INDEX] = torch.zeros(batch, dtype=torch.long)
    orig = graph._codegen.pytree_info
    in_spec = pytree.tree_flatten(((), example))[1]
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(list(orig.orig_args) + [INDEX], in_spec, orig.out_spec))
    mixed._in_spec = in_spec
    signature = cap.signature.replace(parameters=[
        *[p for p in cap.signature.parameters.values() if p.kind is not p.VAR_KEYWORD],
        inspect.Parameter(INDEX, inspect.Parameter.KEYWORD_ONLY),
    ])
    mixed.lora_state = None
    mixed.capture_info = CaptureInfo(source=None, signature=signature, input_names=(*cap.input_names, INDEX),
                                 example_inputs=example, notes=[f"mixed adapters: {names}"])
    mixed.recompile()
    mixed.eval()
    return mixed

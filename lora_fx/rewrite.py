"""Rewrite: turn each matched weight into the paper's parallel W0 / A / B subgraph.

For a product y = x @ W0.T (+ b), the graph becomes
    y = linear(x, W0, b) + linear(scale * linear(dropout(x), lora_A), lora_B)
which trains only A and B and never materializes a weight-sized tensor. `scale` is a buffer holding
alpha / rank for each rank row: it makes switching adapters (of any rank, or several summed) an
in-place update with no change to the graph. Where W0 is consumed by an op that is not a product with
an activation (a split, a custom op), the weight itself is adapted: W0 + (B * scale) @ A, transposed
for [in, out] weights. Every node added carries `meta["lora_fx"]`, which is how fold and re-layout
find them.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

from ._modules import resolve, set_module
from .match import Match, Site

aten = torch.ops.aten
LORA_META = "lora_fx"


class LoraScaling(nn.Module):
    """Per-rank-row scaling (alpha / rank of the adapter owning the row; 0 for unused rows)."""

    def __init__(self, rank: int, device=None, dtype=None):
        super().__init__()
        self.register_buffer("scale", torch.zeros(rank, device=device, dtype=dtype), persistent=False)


def lora_path(site: Site, which: str, slot: str, block_index: int | None = None) -> str:
    """Where a LoRA weight lives: `<holder>.lora_A.<slot>.weight` (PEFT's names), or
    `<holder>.lora_A.<slot>.block<i>.weight` for a block of a fused projection."""
    if site.fused:
        return f"{site.holder}.{which}.{slot}.block{block_index}.weight"
    return f"{site.holder}.{which}.{slot}.weight"


def scale_path(site: Site, slot: str) -> str:
    return f"{site.holder}.lora_scaling.{slot}.scale"


def init_weights(site: Site, rank: int, init: str, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fresh adapter's (A, B) for every block of a site: A random, B zero."""
    out = []
    for block in site.blocks:
        a = torch.empty(rank, site.in_features, device=like.device, dtype=like.dtype)
        if init == "gaussian":  # the paper's A ~ N(0, sigma^2); sigma = 1/r as PEFT's "gaussian"
            nn.init.normal_(a, std=1 / rank)
        else:  # "kaiming": loralib's and PEFT's default (nn.Linear's own init)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(block.stop - block.start, rank, device=like.device, dtype=like.dtype)  # B = 0
        out.append((a, b))
    return out


def install_slot(gm: nn.Module, site: Site, slot: str, rank: int, dropout: float, like: torch.Tensor) -> None:
    """Create (or resize) a site's slot: lora_A / lora_B holders of `rank` rows, its scaling, dropout."""
    kw = dict(bias=False, device=like.device, dtype=like.dtype)

    def holder(which):
        found = resolve(gm, f"{site.holder}.{which}")
        if found is None:
            found = nn.ModuleDict()
            set_module(gm, f"{site.holder}.{which}", found)
        return found

    a_mods = {f"block{b.index}": nn.Linear(site.in_features, rank, **kw) for b in site.blocks}
    b_mods = {f"block{b.index}": nn.Linear(rank, b.stop - b.start, **kw) for b in site.blocks}
    for mods in (a_mods, b_mods):
        for m in mods.values():
            nn.init.zeros_(m.weight)
    holder("lora_A")[slot] = nn.ModuleDict(a_mods) if site.fused else a_mods["block0"]
    holder("lora_B")[slot] = nn.ModuleDict(b_mods) if site.fused else b_mods["block0"]
    holder("lora_scaling")[slot] = LoraScaling(rank, device=like.device, dtype=like.dtype)
    drops = holder("lora_dropout")
    if dropout > 0:
        drops[slot] = nn.Dropout(dropout)
    elif slot in drops:
        del drops[slot]


def slot_rank(gm: nn.Module, site: Site, slot: str) -> int:
    scaling = resolve(gm, scale_path(site, slot))
    return 0 if scaling is None else scaling.shape[0]


class _Builder:
    """Appends nodes one after another, starting after `anchor`, tagging each as LoRA's."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node, tag: dict):
        self.graph, self.last, self.tag = graph, anchor, tag
        self.stack = anchor.meta.get("nn_module_stack")

    def _add(self, node: torch.fx.Node, role: str = "branch") -> torch.fx.Node:
        node.meta[LORA_META] = {**self.tag, "role": role}
        if self.stack is not None:
            node.meta["nn_module_stack"] = self.stack
        self.last = node
        return node

    def call(self, target, *args, role: str = "branch") -> torch.fx.Node:
        with self.graph.inserting_after(self.last):
            return self._add(self.graph.call_function(target, args), role)

    def get_attr(self, path: str) -> torch.fx.Node:
        with self.graph.inserting_after(self.last):
            return self._add(self.graph.get_attr(path))

    def module(self, path: str, *args) -> torch.fx.Node:
        with self.graph.inserting_after(self.last):
            return self._add(self.graph.call_module(path, args))


def _branch(b: _Builder, site: Site, slot: str, x: torch.fx.Node, dropout: bool) -> torch.fx.Node:
    """B @ (scale * A @ dropout(x)), zero-padded to the full output when only some rows adapt."""
    if dropout:
        x = b.module(f"{site.holder}.lora_dropout.{slot}", x)
    scale = b.get_attr(scale_path(site, slot))
    total = None
    for block in site.blocks:
        h = b.call(aten.linear.default, x, b.get_attr(lora_path(site, "lora_A", slot, block.index)))
        h = b.call(aten.mul.Tensor, h, scale)
        h = b.call(aten.linear.default, h, b.get_attr(lora_path(site, "lora_B", slot, block.index)))
        if site.fused:
            h = b.call(aten.constant_pad_nd.default, h, [block.start, site.out_features - block.stop])
        total = h if total is None else b.call(aten.add.Tensor, total, h)
    return total


def _weight_delta(b: _Builder, site: Site, slot: str) -> torch.fx.Node:
    """(B * scale) @ A as a weight in W0's own layout."""
    scale = b.get_attr(scale_path(site, slot))
    total = None
    for block in site.blocks:
        a = b.get_attr(lora_path(site, "lora_A", slot, block.index))
        bs = b.call(aten.mul.Tensor, b.get_attr(lora_path(site, "lora_B", slot, block.index)), scale)
        h = b.call(aten.mm.default, bs, a)
        if site.fused:
            h = b.call(aten.constant_pad_nd.default, h, [0, 0, block.start, site.out_features - block.stop])
        total = h if total is None else b.call(aten.add.Tensor, total, h)
    return b.call(aten.t.default, total) if site.layout == "in_out" else total


def insert_lora(gm: torch.fx.GraphModule, matches: list[Match], slot: str, dropout: set[str]) -> Counter:
    """Rewrite every use of every matched weight; returns how many uses of each kind were rewritten.
    `dropout` names the sites (by weight) whose LoRA input goes through a dropout module."""
    counts: Counter = Counter()
    graph = gm.graph
    for match in matches:
        site = match.site
        tag = {"param": site.param}
        by_weight: dict[torch.fx.Node, list] = {}
        for use in match.uses:
            if use.kind == "weight":
                by_weight.setdefault(use.weight, []).append(use.node)
                counts["weight"] += 1
                continue
            b = _Builder(graph, use.node, tag)
            delta = _branch(b, site, slot, use.x, site.param in dropout)
            out = b.call(aten.add.Tensor, use.node, delta, role="combine")
            use.node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
            counts[use.kind] += 1
        for w, consumers in by_weight.items():
            b = _Builder(graph, w, tag)
            adapted = b.call(aten.add.Tensor, w, _weight_delta(b, site, slot), role="combine")
            for consumer in consumers:
                consumer.replace_input_with(w, adapted)
    graph.lint()
    gm.recompile()
    return counts


def lora_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if LORA_META in n.meta]


def strip_lora(graph: torch.fx.Graph) -> None:
    """Remove every LoRA node, wiring each consumer back to the base value (in place)."""
    for node in graph.nodes:
        if node.meta.get(LORA_META, {}).get("role") == "combine":
            node.replace_all_uses_with(node.args[0])
    for node in reversed(lora_nodes(graph)):
        graph.erase_node(node)
    graph.lint()

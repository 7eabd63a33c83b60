"""Rewrite: turn each matched weight into the paper's parallel W0 / A / B subgraph.

For a product y = x @ W0.T (+ b), the graph becomes
    y = linear(x, W0, b) + scaling * linear(linear(dropout(x), lora_A), lora_B)
which trains only A and B and never materializes a weight-sized tensor. Where W0 is consumed by an
op that is not a product with an activation (a split, a custom op), the weight itself is adapted:
W0 + scaling * (B @ A), transposed for [in, out] weights. Every node added carries
`meta["lora_fx"]`, which is what the fold pass removes.
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


def lora_path(site: Site, which: str, adapter: str, block_index: int | None = None) -> str:
    """Where a LoRA weight lives: `<holder>.lora_A.<adapter>.weight` (PEFT's names), or
    `<holder>.lora_A.<adapter>.block<i>.weight` for a block of a fused projection."""
    if site.fused:
        return f"{site.holder}.{which}.{adapter}.block{block_index}.weight"
    return f"{site.holder}.{which}.{adapter}.weight"


def make_lora_modules(site: Site, weight: torch.Tensor, init: str) -> tuple[nn.Module, nn.Module]:
    """lora_A and lora_B for one site (nn.Linear holders, or a ModuleDict of them per block)."""
    kw = dict(bias=False, device=weight.device, dtype=weight.dtype)
    a_mods, b_mods = {}, {}
    for block in site.blocks:
        a = nn.Linear(site.in_features, site.rank, **kw)
        b = nn.Linear(site.rank, block.stop - block.start, **kw)
        with torch.no_grad():
            if init == "gaussian":  # the paper's A ~ N(0, sigma^2); sigma = 1/r as PEFT's "gaussian"
                nn.init.normal_(a.weight, std=1 / site.rank)
            else:  # "kaiming": loralib's and PEFT's default
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)  # B = 0: training starts exactly at the pretrained model
        a_mods[f"block{block.index}"], b_mods[f"block{block.index}"] = a, b
    if not site.fused:
        return a_mods["block0"], b_mods["block0"]
    return nn.ModuleDict(a_mods), nn.ModuleDict(b_mods)


def install_lora_modules(gm: nn.Module, site: Site, adapter: str, lora_a: nn.Module, lora_b: nn.Module,
                         dropout: nn.Module | None) -> None:
    """Put LoRA modules at `<holder>.lora_A.<adapter>` etc., creating the ModuleDicts."""
    for which, module in (("lora_A", lora_a), ("lora_B", lora_b), ("lora_dropout", dropout)):
        if module is None:
            continue
        path = f"{site.holder}.{which}"
        holder = resolve(gm, path)
        if holder is None:
            holder = nn.ModuleDict()
            set_module(gm, path, holder)
        holder[adapter] = module


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


def _branch(b: _Builder, site: Site, adapter: str, x: torch.fx.Node, dropout: bool) -> torch.fx.Node:
    """scaling * B @ A @ dropout(x), zero-padded to the full output when only some rows adapt."""
    if dropout:
        x = b.module(f"{site.holder}.lora_dropout.{adapter}", x)
    total = None
    for block in site.blocks:
        h = b.call(aten.linear.default, x, b.get_attr(lora_path(site, "lora_A", adapter, block.index)))
        h = b.call(aten.linear.default, h, b.get_attr(lora_path(site, "lora_B", adapter, block.index)))
        h = b.call(aten.mul.Tensor, h, site.scaling)
        if site.fused:
            h = b.call(aten.constant_pad_nd.default, h, [block.start, site.out_features - block.stop])
        total = h if total is None else b.call(aten.add.Tensor, total, h)
    return total


def _weight_delta(b: _Builder, site: Site, adapter: str) -> torch.fx.Node:
    """scaling * B @ A as a weight in W0's own layout."""
    total = None
    for block in site.blocks:
        a = b.get_attr(lora_path(site, "lora_A", adapter, block.index))
        h = b.call(aten.mm.default, b.get_attr(lora_path(site, "lora_B", adapter, block.index)), a)
        h = b.call(aten.mul.Tensor, h, site.scaling)
        if site.fused:
            h = b.call(aten.constant_pad_nd.default, h, [0, 0, block.start, site.out_features - block.stop])
        total = h if total is None else b.call(aten.add.Tensor, total, h)
    return b.call(aten.t.default, total) if site.layout == "in_out" else total


def insert_lora(gm: torch.fx.GraphModule, matches: list[Match], adapter: str, dropout: bool) -> Counter:
    """Rewrite every use of every matched weight; returns how many uses of each kind were rewritten."""
    counts: Counter = Counter()
    graph = gm.graph
    for match in matches:
        site = match.site
        tag = {"adapter": adapter, "param": site.param}
        by_weight: dict[torch.fx.Node, list] = {}
        for use in match.uses:
            if use.kind == "weight":
                by_weight.setdefault(use.weight, []).append(use.node)
                counts["weight"] += 1
                continue
            b = _Builder(graph, use.node, tag)
            delta = _branch(b, site, adapter, use.x, dropout)
            out = b.call(aten.add.Tensor, use.node, delta, role="combine")
            use.node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
            counts[use.kind] += 1
        for w, consumers in by_weight.items():
            b = _Builder(graph, w, tag)
            adapted = b.call(aten.add.Tensor, w, _weight_delta(b, site, adapter), role="combine")
            for consumer in consumers:
                consumer.replace_input_with(w, adapted)
    graph.lint()
    gm.recompile()
    return counts


def lora_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if LORA_META in n.meta]

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

from collections import Counter

import torch

from .match import Match
from .slot import LORA_A, LORA_B, dropout_path, scale_path, weight_path
from .state import Site

aten = torch.ops.aten
LORA_META = "lora_fx"


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
        x = b.module(dropout_path(site, slot), x)
    scale = b.get_attr(scale_path(site, slot))
    total = None
    for block in site.blocks:
        h = b.call(aten.linear.default, x, b.get_attr(weight_path(site, LORA_A, slot, block.index)))
        h = b.call(aten.mul.Tensor, h, scale)
        h = b.call(aten.linear.default, h, b.get_attr(weight_path(site, LORA_B, slot, block.index)))
        if site.fused:
            h = b.call(aten.constant_pad_nd.default, h, [block.start, site.out_features - block.stop])
        total = h if total is None else b.call(aten.add.Tensor, total, h)
    return total


def _weight_delta(b: _Builder, site: Site, slot: str) -> torch.fx.Node:
    """(B * scale) @ A as a weight in W0's own layout."""
    scale = b.get_attr(scale_path(site, slot))
    total = None
    for block in site.blocks:
        a = b.get_attr(weight_path(site, LORA_A, slot, block.index))
        bs = b.call(aten.mul.Tensor, b.get_attr(weight_path(site, LORA_B, slot, block.index)), scale)
        h = b.call(aten.mm.default, bs, a)
        if site.fused:
            h = b.call(aten.constant_pad_nd.default, h, [0, 0, block.start, site.out_features - block.stop])
        total = h if total is None else b.call(aten.add.Tensor, total, h)
    return b.call(aten.t.default, total) if site.layout == "in_out" else total


def insert_lora(gm: torch.fx.GraphModule, matches: list[Match], slot: str, dropout: set[str]) -> Counter:
    """Rewrite every use of every matched weight to read the LoRA slot named `slot`; returns how many
    uses of each kind were rewritten. `dropout` names the sites (by weight) whose LoRA input goes
    through the slot's dropout module."""
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


def combine_inputs(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The base values LoRA combines with: the first input of every "combine" node."""
    return {n.args[0] for n in graph.nodes if n.meta.get(LORA_META, {}).get("role") == "combine"}


def weight_form_sites(graph: torch.fx.Graph) -> set[str]:
    """Sites (weight names) whose weight itself is adapted (W + s*B@A) somewhere in the graph."""
    return {n.meta[LORA_META]["param"] for n in graph.nodes
            if n.meta.get(LORA_META, {}).get("role") == "combine" and n.args[0].op == "get_attr"}


def strip_lora(graph: torch.fx.Graph) -> None:
    """Remove every LoRA node, wiring each consumer back to the base value (in place)."""
    for node in graph.nodes:
        if node.meta.get(LORA_META, {}).get("role") == "combine":
            node.replace_all_uses_with(node.args[0])
    for node in reversed(lora_nodes(graph)):
        graph.erase_node(node)
    graph.lint()
